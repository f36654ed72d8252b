"""The export's memory: the exporter's graph re-packed into one weights file a tensor at a time (equal to onnx's
own load and save), and an export that gives its model up frees each module before ONNX Runtime checks its graphs,
writing the same files as one that keeps it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from sdrt.export import onnx_export
from sdrt.export.exporter import export_model
from sdrt.export.loading import load_model

EXTERNAL = "model.onnx_data"


def _graph(rng: np.random.Generator) -> onnx.ModelProto:
    """x [2, 16] -> MatMul(w1) + b (small) -> MatMul(w2) + Constant c: weights of 1 KiB and more, a small one,
    and a large Constant (an attribute tensor, which stays in the graph)."""
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1")
    b = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float16), "w2")
    c = numpy_helper.from_array(rng.standard_normal((2, 64)).astype(np.float16), "c_value")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["hb"]),
        helper.make_node("Cast", ["hb"], ["h16"], to=onnx.TensorProto.FLOAT16),
        helper.make_node("MatMul", ["h16", "w2"], ["y0"]),
        helper.make_node("Constant", [], ["c"], value=c),
        helper.make_node("Add", ["y0", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [2, 64])], [w1, b, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.producer_name = "sdrt"  # what the re-pack's clean-up sets: the reference below does not clean up
    return model


def _raw(folder: Path, model: onnx.ModelProto, *, torch_external: bool) -> Path:
    """The exporter's output as torch writes it: one file, or (past 2 GB) one external file per weight."""
    folder.mkdir()
    path = folder / "model.onnx"
    if torch_external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def _values(path: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))  # reads the external data back
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("torch_external", [False, True], ids=["one-file", "file-per-weight"])
def test_repack_equals_onnx_load_and_save(tmp_path: Path, torch_external: bool) -> None:
    model = _graph(np.random.default_rng(0))
    unused = numpy_helper.from_array(np.ones((64, 64), np.float32), "unused")
    with_unused = onnx.ModelProto()
    with_unused.CopyFrom(model)
    with_unused.graph.initializer.append(unused)
    raw = _raw(tmp_path / "raw", with_unused, torch_external=torch_external)
    # the reference: onnx's own whole-model load and save, of the graph cleaned as the export cleans it (the
    # initializer nothing reads dropped, doc strings set empty)
    want = tmp_path / "want"
    want.mkdir()
    loaded = onnx.load(str(raw))
    keep = [t for t in loaded.graph.initializer if t.name != "unused"]
    del loaded.graph.initializer[:]
    loaded.graph.initializer.extend(keep)
    for node in loaded.graph.node:
        node.doc_string = ""
    onnx.save_model(loaded, str(want / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL, size_threshold=1024)

    got = tmp_path / "got"
    got.mkdir()
    assert onnx_export.repack(raw, got / "model.onnx", external=True) is True
    assert (got / "model.onnx").read_bytes() == (want / "model.onnx").read_bytes()
    assert (got / EXTERNAL).read_bytes() == (want / EXTERNAL).read_bytes()
    values, expected = _values(got / "model.onnx"), _values(want / "model.onnx")
    assert sorted(values) == ["b", "w1", "w2"]
    for name, a in expected.items():
        np.testing.assert_array_equal(values[name], a)
        assert values[name].dtype == a.dtype
    m = onnx.load(str(got / "model.onnx"), load_external_data=False)
    stored = {t.name: t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer}
    assert stored == {"w1": True, "b": False, "w2": True}  # 128 bytes stay in the graph, as onnx decides
    onnx.checker.check_model(str(got / "model.onnx"))


def test_repack_one_file_below_the_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _graph(np.random.default_rng(1))
    raw = _raw(tmp_path / "raw", model, torch_external=True)
    got = tmp_path / "got"
    got.mkdir()
    assert onnx_export.repack(raw, got / "model.onnx") is False  # far below 1 GiB: one file
    assert sorted(p.name for p in got.iterdir()) == ["model.onnx"]
    want = onnx.load(str(raw))
    for node in want.graph.node:
        node.doc_string = ""
    assert (got / "model.onnx").read_bytes() == want.SerializeToString()
    # past the threshold (lowered here), the weights go to model.onnx_data
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 100)
    (got / "model.onnx").unlink()
    assert onnx_export.repack(raw, got / "model.onnx") is True
    assert (got / EXTERNAL).is_file()


def test_repack_never_loads_every_weight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The external-data path reads one weight at a time: onnx's whole-model loaders are never called."""
    raw = _raw(tmp_path / "raw", _graph(np.random.default_rng(2)), torch_external=True)

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("the whole model's weights were loaded")

    monkeypatch.setattr(onnx, "load_external_data_for_model", refuse)
    original_load = onnx.load

    def lean_load(f: object, *a: object, **k: object) -> onnx.ModelProto:
        assert k.get("load_external_data") is False, "onnx.load without load_external_data=False"
        return original_load(f, *a, **k)

    monkeypatch.setattr(onnx, "load", lean_load)
    got = tmp_path / "got"
    got.mkdir()
    assert onnx_export.repack(raw, got / "model.onnx", external=True) is True
    monkeypatch.undo()
    np.testing.assert_array_equal(_values(got / "model.onnx")["w1"], _values(raw)["w1"])


def test_share_groups_keep_the_unets_graphs_together() -> None:
    model = load_model(random_preset="sd15-tiny")
    from sdrt.export.exporter import component_specs

    specs = component_specs(model, deepcache=True)
    names = [[s.name for s in g] for g in onnx_export.share_groups(specs)]
    assert names == [["text_encoder"], ["unet", "unet_shallow"], ["vae_decoder", "vae_encoder"]]


def _digests(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "sdrt.json":
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    manifest = json.loads((folder / "sdrt.json").read_text())
    manifest.pop("created")
    out["sdrt.json"] = json.dumps(manifest, sort_keys=True)  # parity figures and sizes included
    return out


def test_release_frees_each_module_before_its_checks_and_writes_the_same_export(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 with DeepCache: the UNet serves two graphs; it is freed after the second one's trace, before ONNX
    Runtime opens either. The files (graphs, weights, refit maps, parity figures) equal a kept model's export, and
    the kept model is as it was (float32, its outputs unchanged: the half graphs were traced from copies)."""
    kept_model = load_model(random_preset="sd15-tiny")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, int(kept_model.unet.config.cross_attention_dim),
                      generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = kept_model.unet(x, 10, ctx).sample
    kept = tmp_path / "kept"
    export_model(kept_model, kept, deepcache=True)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in kept_model.unet.parameters())
    with torch.no_grad():
        torch.testing.assert_close(kept_model.unet(x, 10, ctx).sample, before, rtol=0, atol=0)
    del kept_model

    model = load_model(random_preset="sd15-tiny")
    modules = {"text_encoder": model.text_encoders[0], "unet": model.unet, "unet_shallow": model.unet,
               "vae_decoder": model.vae, "vae_encoder": model.vae}
    held_at_check: dict[str, list[str]] = {}
    check = onnx_export.check_parity

    def recording(spec: onnx_export.ComponentSpec, *a: object, **k: object) -> object:
        held_at_check[spec.name] = [n for n, m in modules.items()
                                    if any(p.device.type != "meta" for p in m.parameters())]
        return check(spec, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_export, "check_parity", recording)
    released = tmp_path / "released"
    export_model(model, released, deepcache=True, release=True)
    assert held_at_check == {
        "text_encoder": ["unet", "unet_shallow", "vae_decoder", "vae_encoder"],
        "unet": ["vae_decoder", "vae_encoder"],
        "unet_shallow": ["vae_decoder", "vae_encoder"],
        "vae_decoder": [],
        "vae_encoder": [],
    }
    assert all(p.device.type == "meta" for m in modules.values() for p in m.parameters())
    assert _digests(released) == _digests(kept)
