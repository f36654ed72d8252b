"""SD 3 / 3.5 exported in bf16 (``sdrt export --bf16``): CLIP-L, CLIP-G, T5 and the transformer as bf16 graphs
behind a float32 interface, the VAE in fp32, each gated by the bf16 emulation (tests/test_flux_bf16.py checks it
by hand and on a broken graph); images on openvino against diffusers' ``StableDiffusion3Pipeline`` with its
transformer and text encoders in bf16, guided with a negative prompt.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from sdrt.runtime.manifest import ExportManifest

from .helpers.references import sd3_decode, sd3_pipeline

PROMPT = "a red fox in the snow, highly detailed"
NEGATIVE = "blurry, low quality"
BF16_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet")


@pytest.mark.parametrize("preset", ["sd35-medium-tiny"])
def test_the_export_writes_bf16_graphs_and_an_fp32_vae(sd3_export, preset: str) -> None:
    folder = sd3_export(preset, precision="bf16")
    m = ExportManifest.read(folder)
    assert {n: c.precision for n, c in m.components.items()} == {
        **dict.fromkeys(BF16_PARTS, "bf16"), "vae_decoder": "fp32", "vae_encoder": "fp32"}
    for name in BF16_PARTS:
        comp = m.components[name]
        g = onnx.load(str(folder / comp.path), load_external_data=False).graph
        floats = {t.data_type for t in g.initializer if t.data_type != TensorProto.INT64 and len(t.dims) > 1}
        assert floats == {TensorProto.BFLOAT16}, name
        assert {v.type.tensor_type.elem_type for v in [*g.input, *g.output]} <= {TensorProto.FLOAT,
                                                                                  TensorProto.INT32}, name
        assert comp.parity is not None and "emulating bf16" in comp.parity.reference
        assert comp.parity.rel_err <= comp.parity.bound


def test_openvino_images_match_diffusers_in_bf16(sd3_export) -> None:
    """The export's images, end to end, on openvino at f32 (every CPU has it; it runs the bf16 steps its own way),
    guided with a negative prompt: within twice the distance between diffusers' own bf16 and fp32 images of
    diffusers' bf16 images, at its largest (at least 2 levels) and on average (at least half a level). An image
    check of the whole export, not of bf16 rounding (tests/test_flux_bf16.py checks the gate's emulation)."""
    from diffusers import StableDiffusion3Pipeline

    from sdrt.export.sd3_presets import build_modules, get_sd3_preset
    from sdrt.runtime.pipeline import Pipeline

    preset = "sd35-medium-tiny"
    folder = sd3_export(preset, precision="bf16")
    p = get_sd3_preset(preset)
    latents = np.random.default_rng(0).standard_normal((1, 16, 8, 12), dtype=np.float32)
    kw = {"negative_prompt": NEGATIVE, "height": 64, "width": 96, "num_inference_steps": 4, "guidance_scale": 5.0,
          "output_type": "latent"}
    wants = []
    for dtype in (torch.float32, torch.bfloat16):
        ref = sd3_pipeline(StableDiffusion3Pipeline, build_modules(p, seed=0), folder, p.scheduler, t5=True)
        for module in (ref.transformer, ref.text_encoder, ref.text_encoder_2, ref.text_encoder_3):
            module.to(dtype)
        with torch.no_grad():
            lat = ref(PROMPT, latents=torch.from_numpy(latents).to(dtype), **kw).images
        wants.append(sd3_decode(ref, lat.float()))
    want32, want = wants
    own = np.abs(want - want32)
    with Pipeline.load(folder, backend="openvino", precision="f32") as pipe:
        got = np.asarray(pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=96, steps=4, guidance_scale=5.0,
                              latents=latents).images[0]).astype(np.int32)
    diff = np.abs(got[None] - want)
    assert want.std() > 5
    assert int(diff.max()) <= max(2 * int(own.max()), 2), (int(diff.max()), int(own.max()))
    assert float(diff.mean()) <= max(2 * float(own.mean()), 0.5), (float(diff.mean()), float(own.mean()))


def test_a_streamed_part_is_gated_by_the_bf16_emulation() -> None:
    """T5 streamed in bf16, as a full-size model's is: its reduced-depth gate runs the emulated graph (and says
    so in the record) within its bound."""
    from sdrt.export.sd3_gate import gate_streamed
    from sdrt.export.sd3_loading import load_sd3

    model = load_sd3(random_preset="sd35-medium-tiny", stream=True)
    st = model.streamed["text_encoder_3"]
    par = gate_streamed("text_encoder_3", st.config, st.weights, "bf16", model.preset.t5_tokens, (1, 8, 8))
    assert "emulating bf16" in par.reference and "reduced depth" in par.reference
    assert par.rel_err <= par.bound
