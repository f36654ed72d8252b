"""Streamed exports (export/streamed.py): SD3's transformer and T5 traced on fake tensors, their weights written
one tensor at a time. The graphs against the PyTorch modules on the same weights at many shapes (odd patch
counts included: the dynamo exporter's position-grid crop is replaced), a diffusers folder exported streamed
giving the in-memory export's images, and synthetic full-architecture weights that are never built."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sdrt.export.sd3_presets import build_modules, get_sd3_preset
from sdrt.export.sd3_specs import streamed_t5_spec, streamed_transformer_spec
from sdrt.export.streamed import export_streamed, module_weights
from sdrt.runtime.manifest import ExportManifest
from sdrt.runtime.pipeline import Pipeline

from .helpers.pipelines import shared_pipeline

BOUND = {"fp32": 1e-5, "fp16": 5e-3}  # max |onnx - torch| / max |torch|


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_streamed_transformer_equals_torch(tmp_path: Path, precision: str) -> None:
    p = get_sd3_preset("sd35-medium-tiny")
    tr = build_modules(p, seed=0).transformer
    comp = export_streamed(streamed_transformer_spec(p.config("transformer"), 85), module_weights(tr), precision,
                           tmp_path / "transformer")
    assert comp.parity is None and comp.precision == precision and comp.path == "transformer/model.onnx"
    sess = _session(tmp_path / "transformer" / "model.onnx")
    assert [i.name for i in sess.get_inputs()] == [s.name for s in comp.inputs]
    dt = np.float16 if precision == "fp16" else np.float32
    g = torch.Generator().manual_seed(0)
    # latent sides of odd patch counts (5 x 7, 3 x 5, 1 x 16), the trace's shape, SD3's 333 text tokens
    for b, h, w, t in [(2, 10, 14, 85), (1, 6, 10, 333), (3, 2, 32, 77), (1, 16, 16, 333)]:
        x = (torch.randn(b, 16, h, w, generator=g), torch.rand(b, generator=g) * 1000,
             torch.randn(b, t, 48, generator=g), torch.randn(b, 32, generator=g))
        with torch.no_grad():
            want = tr(hidden_states=x[0], timestep=x[1], encoder_hidden_states=x[2], pooled_projections=x[3]).sample
        feeds = {"sample": x[0].numpy().astype(dt), "timestep": x[1].numpy(),
                 "encoder_hidden_states": x[2].numpy().astype(dt), "pooled_projections": x[3].numpy().astype(dt)}
        (got,) = sess.run(["out_sample"], feeds)
        rel = float(np.abs(got.astype(np.float32) - want.numpy()).max() / np.abs(want.numpy()).max())
        assert rel <= BOUND[precision], f"{(b, h, w, t)}: {rel:.2e}"


def test_streamed_t5_equals_torch_and_keeps_fp32(tmp_path: Path) -> None:
    """T5 (tied embeddings: its embed_tokens is its shared table, one weight under two names) streamed; kept in
    float32 even in an fp16 export; any token count."""
    p = get_sd3_preset("sd3-tiny")
    t5 = build_modules(p, seed=0).text_encoders[2]
    comp = export_streamed(streamed_t5_spec(p.config("t5"), 256), module_weights(t5), "fp16", tmp_path / "t5")
    assert comp.precision == "fp32"
    sess = _session(tmp_path / "t5" / "model.onnx")
    for tokens in (256, 77, 300):
        ids = torch.randint(0, 500, (2, tokens), generator=torch.Generator().manual_seed(tokens), dtype=torch.int32)
        with torch.no_grad():
            want = t5(input_ids=ids.long())[0].numpy()
        (got,) = sess.run(None, {"input_ids": ids.numpy()})
        assert float(np.abs(got - want).max() / np.abs(want).max()) <= BOUND["fp32"]


def test_a_diffusers_folder_exported_streamed_gives_the_in_memory_images(sd3_export, tmp_path: Path) -> None:
    """The tiny preset's seeded modules saved as a diffusers folder (safetensors), exported with the transformer
    and T5 streamed from it: the images equal the in-memory export's (same weights)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3

    ref_folder = sd3_export("sd3-tiny")
    p = get_sd3_preset("sd3-tiny")
    m = build_modules(p, seed=0)
    src = tmp_path / "sd3-diffusers"
    StableDiffusion3Pipeline(
        transformer=m.transformer, vae=m.vae, scheduler=FlowMatchEulerDiscreteScheduler.from_config(p.scheduler),
        text_encoder=m.text_encoders[0], tokenizer=CLIPTokenizer.from_pretrained(ref_folder / "tokenizer"),
        text_encoder_2=m.text_encoders[1], tokenizer_2=CLIPTokenizer.from_pretrained(ref_folder / "tokenizer_2"),
        text_encoder_3=m.text_encoders[2], tokenizer_3=T5TokenizerFast.from_pretrained(ref_folder / "tokenizer_3"),
    ).save_pretrained(src, safe_serialization=True)
    model = load_sd3(src, stream=True)
    assert set(model.streamed) == {"transformer", "text_encoder_3"} and model.modules.transformer is None
    out = tmp_path / "streamed-export"
    manifest = export_sd3(model, out, fp16=False)
    assert manifest.source["streamed"] == ["text_encoder_3", "unet"]
    assert manifest.components["unet"].path == "transformer/model.onnx"
    assert list(manifest.components) == ["text_encoder", "text_encoder_2", "text_encoder_3", "unet", "vae_decoder",
                                         "vae_encoder"]
    kw = {"negative_prompt": "blurry", "steps": 4, "seed": 3, "height": 64, "width": 96, "guidance_scale": 5.0}
    want = np.asarray(shared_pipeline(ref_folder)("a red fox", **kw).images[0], np.int16)
    with Pipeline.load(out, backend="ort-cpu") as pipe:
        got = np.asarray(pipe("a red fox", **kw).images[0], np.int16)
    assert want.std() > 5 and np.abs(got - want).max() <= 1


def test_synthetic_weights_of_an_architecture_never_built(tmp_path: Path) -> None:
    """A random preset streamed: the transformer and T5 never exist in memory; their weights are drawn per
    tensor (the same every time) and the export runs."""
    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3

    model = load_sd3(random_preset="sd3-tiny", seed=4, stream=True)
    assert model.modules.transformer is None and model.modules.text_encoders[2] is None
    w = model.streamed["transformer"].weights
    assert torch.equal(w("proj_out.weight"), w("proj_out.weight")) and float(w("proj_out.weight").std()) > 0
    out = tmp_path / "synthetic"
    export_sd3(model, out, fp16=False)
    m = ExportManifest.read(out)
    for name in ("unet", "text_encoder_3"):  # gated on a reduced-depth copy: here, every block there is
        par = m.components[name].parity
        assert par is not None and "reduced depth" in par.reference and par.rel_err <= par.bound
    assert m.source["streamed"] == ["text_encoder_3", "unet"]
    latents = np.random.default_rng(1).standard_normal((1, 16, 8, 8), dtype=np.float32)
    with Pipeline.load(out, backend="ort-cpu") as pipe:
        res = pipe("a red fox", steps=2, latents=latents, height=64, width=64, guidance_scale=4.0)
    assert not any(res.nonfinite)
    # held in memory after all (the bench's baseline does so): diffusers on the same synthetic weights draws the
    # same picture, so the export bound every weight (the position grid buffer too) as materialize reads it
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    mods = model.held()
    assert mods.transformer is not None and mods.text_encoders[2] is not None
    assert mods.text_encoders[2].encoder.embed_tokens.weight is mods.text_encoders[2].shared.weight  # still tied
    ref = StableDiffusion3Pipeline(
        transformer=mods.transformer, vae=mods.vae,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config),
        text_encoder=mods.text_encoders[0], tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
        text_encoder_2=mods.text_encoders[1], tokenizer_2=CLIPTokenizer.from_pretrained(out / "tokenizer_2"),
        text_encoder_3=mods.text_encoders[2], tokenizer_3=T5TokenizerFast.from_pretrained(out / "tokenizer_3"))
    with torch.no_grad():
        want = ref("a red fox", num_inference_steps=2, latents=torch.from_numpy(latents), height=64, width=64,
                   guidance_scale=4.0, output_type="np").images[0]
    want_u8 = (want * 255).round().astype(np.int16)
    assert want_u8.std() > 5 and np.abs(np.asarray(res.images[0], np.int16) - want_u8).max() <= 1
    assert model.held(t5=False).text_encoders[2] is None


def test_the_gate_keeps_one_block_of_each_kind() -> None:
    """The reduced-depth gate's blocks for the full-size architectures: 3.5 Medium's first dual-attention block,
    its first plain block and the last; Large's and SD3 Medium's first and last; T5's first (the position bias)
    and last."""
    from sdrt.export.sd3_gate import t5_blocks, transformer_blocks

    blocks = {n: transformer_blocks(get_sd3_preset(n).config("transformer"))
              for n in ("sd35-medium", "sd35-large", "sd3-medium", "sd35-medium-tiny")}
    assert blocks == {"sd35-medium": [0, 13, 23], "sd35-large": [0, 37], "sd3-medium": [0, 23],
                      "sd35-medium-tiny": [0, 1]}
    assert t5_blocks(get_sd3_preset("sd35-large").config("t5")) == [0, 23]


def test_a_weight_written_wrong_is_caught_by_the_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read-back check can fail: a byte of the external data changed after the write (as a short write or a
    full disk would leave it) is an error naming the weight, not a silently wrong export."""
    from sdrt.export import streamed
    from sdrt.runtime.errors import ArtifactError

    real = streamed.give_default_mode

    def corrupt(path: Path) -> None:  # runs right after the write, before the read-back
        real(path)
        with open(path, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 0xFF]))

    monkeypatch.setattr(streamed, "give_default_mode", corrupt)
    p = get_sd3_preset("sd3-tiny")
    t5 = build_modules(p, seed=0).text_encoders[2]
    with pytest.raises(ArtifactError, match="was not written as its source gave it"):
        export_streamed(streamed_t5_spec(p.config("t5"), 16), module_weights(t5), "fp32", tmp_path / "t5")
