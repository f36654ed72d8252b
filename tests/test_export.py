"""ONNX export: every tiny preset in fp32 and fp16, checked against PyTorch by the test itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from sdrt.cli import main
from sdrt.export import onnx_export
from sdrt.export.exporter import export_model
from sdrt.export.loading import load_model, random_model
from sdrt.runtime.errors import ParityError
from sdrt.runtime.manifest import ExportManifest, Parity

from .helpers.models import TINY


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max() / np.abs(b).max())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("preset", TINY)
def test_tiny_export_matches_pytorch(tiny_export, preset: str, precision: str) -> None:
    folder = tiny_export(preset, precision)
    m = ExportManifest.read(folder)
    model = random_model(preset)  # the same synthetic weights, rebuilt independently
    sdxl = m.family == "sdxl"
    bound = 1e-4 if precision == "fp32" else 1e-2
    dt = np.float32 if precision == "fp32" else np.float16

    # layout (Optimum's) and manifest
    expected = {"model_index.json", "sdrt.json", "text_encoder", "unet", "vae_decoder", "vae_encoder",
                "tokenizer", "scheduler"} | ({"text_encoder_2", "tokenizer_2"} if sdxl else set())
    assert expected <= {p.name for p in folder.iterdir()}
    assert (folder / "unet" / "model.onnx_data").is_file()
    assert m.prediction_type == model.prediction_type
    # each component records its export-time parity check; the outputs themselves are compared with
    # PyTorch below, by this test, on inputs the export never saw
    assert all(c.parity is not None for c in m.components.values())
    checked: set[str] = set()
    assert m.components["vae_decoder"].precision == ("fp32" if sdxl else precision)
    assert not [p for p in folder.parent.iterdir() if ".partial" in p.name]

    # UNet at a shape the export never saw (batch 3, non-square, two prompt chunks)
    g = torch.Generator().manual_seed(7)
    cross = model.unet.config.cross_attention_dim
    sample, t, ehs = torch.randn(3, 4, 16, 8, generator=g), torch.tensor([1.0, 500.0, 999.0]), torch.randn(
        3, 154, cross, generator=g)
    kw = {}
    feed = {"sample": sample.numpy().astype(dt), "timestep": t.numpy(), "encoder_hidden_states": ehs.numpy().astype(dt)}
    if sdxl:
        te, tid = torch.randn(3, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 3)
        kw["added_cond_kwargs"] = {"text_embeds": te, "time_ids": tid}
        feed |= {"text_embeds": te.numpy().astype(dt), "time_ids": tid.numpy().astype(dt)}
    with torch.no_grad():
        ref = model.unet(sample, t, ehs, **kw).sample.numpy()
    got = _session(folder / "unet" / "model.onnx").run(None, feed)[0]
    assert got.dtype == dt and _rel(got, ref) < bound
    checked.add("unet")

    # text encoders: SD1/2 last hidden state; SDXL penultimate + pooled projection of the second
    ids = np.full((2, 77), 49407, np.int32)
    ids[:, 0] = 49406
    ids[0, 1:6] = [320, 1125, 539, 320, 2368]
    ids[1, 1:4] = [1237, 4558, 256]
    for i, enc in enumerate(model.text_encoders):
        name = "text_encoder" if i == 0 else "text_encoder_2"
        with torch.no_grad():
            out = enc(torch.from_numpy(ids).long(), output_hidden_states=True)
        want = out.hidden_states[-2] if sdxl else out.last_hidden_state
        # an all-ones attention mask: the ids as they are (compel's masks: test_compel_syntax.py)
        got_all = _session(folder / name / "model.onnx").run(None, {"input_ids": ids,
                                                                    "attention_mask": np.ones_like(ids)})
        assert _rel(got_all[0], want.numpy()) < bound
        if sdxl and i == 1:
            assert _rel(got_all[1], out.text_embeds.numpy()) < bound
        checked.add(name)

    # VAE decoder: diffusers' postprocessing by hand, in levels
    lat = torch.randn(2, 4, 8, 16, generator=g)
    with torch.no_grad():
        img = model.vae.decode(lat / model.vae.config.scaling_factor).sample
    want_px = ((img / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy()
    dec_dt = np.float32 if sdxl else dt
    px, finite = _session(folder / "vae_decoder" / "model.onnx").run(None, {"latent_sample": lat.numpy().astype(dec_dt)})
    assert px.dtype == np.uint8 and px.shape == (2, 64, 128, 3) and finite.all()
    levels = np.abs(px.astype(np.int32) - want_px.astype(np.int32)).max()
    assert levels <= (1 if dec_dt == np.float32 else 8)
    assert 0 < px.mean() < 255  # the test image is not saturated to one value
    checked.add("vae_decoder")

    # VAE encoder: scaled latent mean of the image mapped to [-1, 1]
    pix = torch.randint(0, 256, (1, 64, 48, 3), generator=g, dtype=torch.uint8)
    x = pix.permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        want_lat = model.vae.encode(x).latent_dist.mean * model.vae.config.scaling_factor
    got_lat = _session(folder / "vae_encoder" / "model.onnx").run(None, {"image": pix.numpy()})[0]
    assert _rel(got_lat, want_lat.numpy()) < bound
    checked.add("vae_encoder")
    assert checked == set(m.components)  # every exported graph was compared with PyTorch here


def test_refit_map_names_every_weight(tiny_export) -> None:
    folder = tiny_export("sd15-tiny", "fp32")
    model = random_model("sd15-tiny")
    refit = json.loads((folder / "unet" / "refit_map.json").read_text())
    graph = onnx.load(str(folder / "unet" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t, base_dir=str(folder / "unet")) for t in graph.graph.initializer}
    params = dict(model.unet.state_dict())
    mapped = {v["param"] for v in refit["initializers"].values()}
    # every parameter of the UNet is reachable by name (GroupNorm's as folded (C, 1, 1) constants)
    assert set(params) <= mapped, sorted(set(params) - mapped)[:5]
    assert not refit["ambiguous"]
    for init_name, v in refit["initializers"].items():
        p = params[v["param"]].numpy()
        want = p.T if v["transpose"] else p
        np.testing.assert_array_equal(inits[init_name].reshape(want.shape), want)


def test_parity_gate_refuses_and_keeps_previous_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "export"
    out.mkdir()
    # a previous export (its manifest names its files): replaceable, so only the gate can keep it
    (out / "sdrt.json").write_text(json.dumps({"components": {"unet": {"path": "unet/model.onnx"}}}))
    (out / "unet").mkdir()
    (out / "unet" / "model.onnx").write_text("the last good export")
    monkeypatch.setitem(onnx_export.PARITY_BOUND, "fp32", 1e-12)  # unreachable: the gate must refuse
    with pytest.raises(ParityError, match="text_encoder"):
        export_model(load_model(random_preset="sd15-tiny"), out, fp16=False)
    assert (out / "unet" / "model.onnx").read_text() == "the last good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no partial folder left


def test_interrupted_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C while the second component is being checked
            raise KeyboardInterrupt
        return Parity("stand-in", 0.0, 0.0, 1e-4)

    monkeypatch.setattr(onnx_export, "check_parity", lambda *a, **k: interrupt())
    with pytest.raises(KeyboardInterrupt):
        export_model(load_model(random_preset="sd15-tiny"), tmp_path / "out", fp16=False)
    assert list(tmp_path.iterdir()) == []


def test_reexport_replaces_whole_folder(tmp_path: Path) -> None:
    out = tmp_path / "e"
    out.mkdir()
    # a previous export (another folder, or one holding files its sdrt.json does not name, is refused:
    # tests/test_output_safety.py); what only it held goes with it
    (out / "sdrt.json").write_text(json.dumps({"components": {"unet": {"path": "stale/model.onnx"}}}))
    (out / "stale").mkdir()
    (out / "stale" / "model.onnx").write_text("old")
    export_model(load_model(random_preset="sd15-tiny"), out, fp16=False)
    assert not (out / "stale").exists() and (out / "sdrt.json").is_file()


def test_diffusers_folder_source(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from sdrt.export.tokenizer_assets import write_clip_tokenizer

    m = random_model("sd15-tiny")
    write_clip_tokenizer(tmp_path / "tok", pad_token="<|endoftext|>")
    from diffusers import PNDMScheduler

    pipe = StableDiffusionPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=CLIPTokenizer.from_pretrained(tmp_path / "tok"),
        unet=m.unet, scheduler=PNDMScheduler.from_config(m.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert loaded.preset.family == "sd1" and loaded.source["kind"] == "diffusers"
    for a, b in zip(loaded.unet.state_dict().values(), m.unet.state_dict().values()):
        assert torch.equal(a, b)
    man = export_model(loaded, tmp_path / "onnx", fp16=False)
    assert man.source["sha256"] and man.family == "sd1"

    # a component missing: a clear error naming it
    import shutil

    shutil.rmtree(tmp_path / "model" / "vae")
    assert main(["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--random", "sd99"], "unknown preset"),
    ],
)
def test_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv_tail: list[str], message: str) -> None:
    assert main(["export", *argv_tail, "--out", str(tmp_path / "o")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_pickle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    assert main(["export", "--model", str(ckpt), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "pickle" in err and "--allow-pickle" in err


def test_cli_unwritable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["export", "--random", "sd15-tiny", "--out", str(blocker / "sub" / "o")]) == 1
    assert "cannot create" in capsys.readouterr().err


def test_cli_opset_too_old(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--random", "sd15-tiny", "--out", str(tmp_path / "o"), "--opset", "13"]) == 1
    assert "opset 13" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SDRT_SKIP_SLOW") == "1", reason="SDRT_SKIP_SLOW=1")
def test_full_size_sd15_export(tmp_path: Path) -> None:
    """The real SD1.5 architecture (synthetic weights), fp16, through the parity gate."""
    man = export_model(load_model(random_preset="sd15"), tmp_path / "sd15", fp16=True)
    unet = man.components["unet"]
    assert unet.parity is not None and unet.parity.rel_err <= 1e-2
    assert 1.6e9 < unet.size_bytes < 1.9e9  # 860M fp16 parameters


@pytest.mark.slow  # about 1.5 min on 2 busy cores
def test_cli_export_ort_cuda_variant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdrt.runtime.pipeline import Pipeline

    out = tmp_path / "o"
    assert main(["export", "--random", "sd15-tiny", "--out", str(out), "--ort-cuda"]) == 0
    man = ExportManifest.read(out)
    assert man.components["unet"].variants == {"ort-cuda": "unet/model_ort_cuda.onnx"}
    fused = onnx.load(str(out / "unet" / "model_ort_cuda.onnx"), load_external_data=False)
    assert sum(n.op_type == "MultiHeadAttention" for n in fused.graph.node) == 32  # 16 blocks x (self, cross)
    pipe = Pipeline.load(out, backend="ort-cpu")  # the CPU backend keeps the portable graph
    assert pipe.backend.graph_for(man.components["unet"]) == "unet/model.onnx"
    assert len(pipe("a", steps=2, seed=0).images) == 1
