"""Refit weight mapping, checked end to end on CPU: new weights are written into a copy of the exported
ONNX graph (same graph, new initializer values, matched through refit_map.json) and ONNX Runtime's output
is compared with the PyTorch model that holds the same weights (LoRAs fused by diffusers, or another
checkpoint)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdrt.export.refit import (
    RefitMap,
    RefitRequest,
    checkpoint_weights,
    complete_refit_map,
    initializers,
    load_graph,
    refit_folder,
    write_refit_export,
)
from sdrt.runtime.errors import ArtifactError, CompatibilityError, InputError
from sdrt.runtime.lora_files import LoraSpec

from .helpers.models import make_lora
from .helpers.references import diffusers_fused

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def base_model():  # type: ignore[no-untyped-def]
    from sdrt.export.loading import load_model

    return load_model(random_preset="sd15-tiny")  # the weights tiny_export exported (seed 0)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]  # type: ignore[no-any-return]


def _inputs(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    g = np.random.default_rng(seed)
    ids = g.integers(0, 49406, (2, 77)).astype(np.int32)
    ids[:, 0], ids[:, 12:] = 49406, 49407
    return {
        "unet": {"sample": g.standard_normal((2, 4, 8, 16)).astype(np.float32),
                 "timestep": np.array([999.0, 321.0], np.float32),
                 "encoder_hidden_states": g.standard_normal((2, 77, 32)).astype(np.float32)},
        "text_encoder": {"input_ids": ids, "attention_mask": np.ones_like(ids)},  # all ones: the ids as they are
    }


def _torch_outputs(unet, text_encoder) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    from sdrt.export import wrappers

    x = _inputs()
    with torch.inference_mode():
        u = wrappers.UNet(unet, sdxl=False)(*(torch.from_numpy(v) for v in x["unet"].values()))
        (h,) = wrappers.TextEncoder(text_encoder, penultimate=False, pooled=False)(torch.from_numpy(x["text_encoder"]["input_ids"]))
    return {"unet": u.numpy(), "text_encoder": h.numpy()}


def _onnx_outputs(folder: Path) -> dict[str, np.ndarray]:
    x = _inputs()
    return {c: _run(folder / c / "model.onnx", x[c]) for c in ("unet", "text_encoder")}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_refit_map_with_groupnorm_completion_covers_every_parameter(tiny_export, base_model) -> None:
    folder = tiny_export("sd15-tiny")
    for comp, module in (("unet", base_model.unet), ("text_encoder", base_model.text_encoders[0])):
        model = load_graph(folder / comp / "model.onnx")
        rmap = complete_refit_map(model, RefitMap.read(folder / comp))
        state = {k: v.numpy() for k, v in module.state_dict().items()}
        assert rmap.params() == set(state), sorted(set(state) ^ rmap.params())[:5]
        base = initializers(model)
        for init, entry in rmap.entries.items():
            want = state[entry.param].T if entry.transpose else state[entry.param]
            np.testing.assert_array_equal(base[init].reshape(want.shape), want, err_msg=f"{init} -> {entry.param}")
        if comp == "unet":
            # GroupNorm's (C,) parameters live in (C, 1, 1) initializers
            assert any(base[i].ndim == 3 and state[e.param].ndim == 1 for i, e in rmap.entries.items())


def test_stacked_lora_refit_matches_diffusers_fused_in_pytorch(tiny_export, base_model, tmp_path: Path) -> None:
    folder = tiny_export("sd15-tiny")
    te = base_model.text_encoders[0]
    a = make_lora(tmp_path / "a.safetensors", base_model.unet, te, "kohya", seed=11, alpha=1.0)
    b = make_lora(tmp_path / "b.safetensors", base_model.unet, te, "diffusers", seed=12)
    request = RefitRequest(loras=(LoraSpec(a, 0.8), LoraSpec(b, 0.5)))
    result = refit_folder(folder, request, out=tmp_path / "refit")
    assert set(result.components) == {"unet", "text_encoder"} and result.warnings == ()
    assert "a.safetensors:0.8" in result.weights and "b.safetensors:0.5" in result.weights

    ref_unet, ref_te = diffusers_fused(base_model.unet, te, base_model.vae, [(a, 0.8), (b, 0.5)])
    want = _torch_outputs(ref_unet, ref_te)
    got = _onnx_outputs(tmp_path / "refit")
    before = _onnx_outputs(folder)
    for comp in ("unet", "text_encoder"):
        assert _rel(got[comp], want[comp]) < 1e-4, comp
        assert _rel(before[comp], want[comp]) > 1e-2, comp  # the LoRAs change the output: not vacuous
    from sdrt.runtime.manifest import ExportManifest

    assert ExportManifest.read(tmp_path / "refit").source["weights"] == result.weights


def test_checkpoint_refit_matches_the_other_checkpoint(tiny_export, tmp_path: Path) -> None:
    from sdrt.export.loading import load_model

    folder = tiny_export("sd15-tiny")
    other = load_model(random_preset="sd15-tiny", seed=7)
    modules = {"unet": other.unet, "text_encoder": other.text_encoders[0]}
    values = {}
    for comp, module in modules.items():
        model = load_graph(folder / comp / "model.onnx")
        rmap = complete_refit_map(model, RefitMap.read(folder / comp))
        state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
        values[comp] = checkpoint_weights(rmap, initializers(model), state, comp)
    write_refit_export(folder, tmp_path / "other", values, "checkpoint seed 7")
    want = _torch_outputs(other.unet, other.text_encoders[0])
    got = _onnx_outputs(tmp_path / "other")
    for comp in modules:
        assert _rel(got[comp], want[comp]) < 1e-4, comp


def test_checkpoint_of_another_architecture_is_refused(tiny_export, base_model) -> None:
    folder = tiny_export("sd15-tiny")
    model = load_graph(folder / "unet" / "model.onnx")
    rmap = complete_refit_map(model, RefitMap.read(folder / "unet"))
    state = {k: v.numpy() for k, v in base_model.unet.state_dict().items()}
    with pytest.raises(CompatibilityError, match="lacks"):
        checkpoint_weights(rmap, initializers(model), {k: v for k, v in state.items() if "conv_in" not in k}, "unet")
    bigger = dict(state, **{"conv_in.weight": np.zeros((64, 4, 3, 3), np.float32)})
    with pytest.raises(CompatibilityError, match="not the same architecture"):
        checkpoint_weights(rmap, initializers(model), bigger, "unet")


def test_base_refit_is_the_pytorch_model(tiny_export, base_model, tmp_path: Path) -> None:
    """The base weights are the PyTorch model's (the seed-0 synthetic weights), not just the files copied."""
    folder = tiny_export("sd15-tiny")
    result = refit_folder(folder, RefitRequest(base=True), out=tmp_path / "base")
    assert result.weights == "base" and set(result.components) == {"unet", "text_encoder"}
    want = _torch_outputs(base_model.unet, base_model.text_encoders[0])
    got = _onnx_outputs(tmp_path / "base")
    for comp in ("unet", "text_encoder"):
        assert _rel(got[comp], want[comp]) < 1e-4, comp
    from sdrt.runtime.manifest import ExportManifest

    assert ExportManifest.read(tmp_path / "base").source["weights"] == "base"


@pytest.mark.parametrize("make", ["missing", "file"])
def test_a_target_that_is_not_a_folder_names_what_refit_takes(tmp_path: Path, make: str) -> None:
    from sdrt.cli import main

    target = tmp_path / "engines"
    if make == "file":
        target.write_text("not a folder")
    with pytest.raises(ArtifactError) as e:
        refit_folder(target, RefitRequest(base=True))
    msg = str(e.value)
    assert msg.startswith(f"{target} {'does not exist' if make == 'missing' else 'is not a folder'}; pass an engine "
                          "folder written by `sdrt build --refittable`")
    assert "ONNX export written by `sdrt export` with --out DIR" in msg
    assert main(["refit", str(target), "--base"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == (["engines"] if make == "file" else [])


def test_a_lora_for_another_model_is_refused(tiny_export, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    z = np.zeros((2, 8), np.float32)
    path = tmp_path / "other.safetensors"
    save_file({"lora_unet_not_a_module.lora_down.weight": z, "lora_unet_not_a_module.lora_up.weight": z.T.copy()},
              str(path))
    with pytest.raises(InputError, match="no module matches"):
        refit_folder(tiny_export("sd15-tiny"), RefitRequest(loras=(LoraSpec(path, 1.0),)), out=tmp_path / "x")


def test_engine_refit_explains_a_non_refittable_engine(tiny_export, tmp_path: Path) -> None:
    """Checked before TensorRT is needed: the message carries the rebuild command with --refittable."""
    from sdrt.export.profiles import custom_profile
    from sdrt.export.trt_build import BuildOptions, plan_engines
    from sdrt.runtime.engine_manifest import EngineEnv, EngineManifest

    folder = tiny_export("sd15-tiny")
    prof = custom_profile(height=64)
    _, plans = plan_engines(folder, prof, BuildOptions(), EngineEnv("tensorrt", "10.13.0.35"))
    engines = tmp_path / "engines"
    engines.mkdir()
    EngineManifest("custom", prof.shapes(), tuple(p.record for p in plans), str(folder),
                   "sdrt build X --out Y").write(engines)
    with pytest.raises(CompatibilityError, match="not built refittable.*--refittable"):
        refit_folder(engines, RefitRequest(base=True))
    with pytest.raises(InputError, match="exactly one"):
        RefitRequest()


def test_an_export_with_controlnets_is_refused_before_any_weight_is_read(tiny_controlnet_export,
                                                                         tmp_path: Path) -> None:
    """Its UNet is held twice (unet and unet_control) and only unet is refittable: refit would leave
    ControlNet calls on the old weights, so it is refused, naming the export-time merge; nothing is written."""
    src = tiny_controlnet_export("sd15-tiny", "fp32", 1)
    out = tmp_path / "refitted"
    with pytest.raises(CompatibilityError, match="has ControlNets.*unet_control.*--lora FILE"):
        refit_folder(src, RefitRequest(base=True), out=out)
    assert not out.exists()
