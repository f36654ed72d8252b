"""SD3 / 3.5 export: the tiny presets' transformer and text encoders exported to ONNX, run with ONNX Runtime,
against the diffusers / transformers modules called directly (the reference is never sdrt's wrappers alone).

The models are built here with seeded random weights (``export/sd3_presets.py``); nothing is fetched. Each
export passes ``export_component``'s own parity gate, then is checked again at shapes other than the trace's
(``onnx_export.TRACE_LATENT``) and the gate's: other batch sizes, latent sizes (non-square, the full
``pos_embed_max_size`` grid), token counts.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail

from sdrt.export.onnx_export import IMAGE_LEVELS, PARITY_BOUND, TRACE_LATENT, export_component
from sdrt.export.sd3_presets import SD3_PRESETS, build_modules, get_sd3_preset
from sdrt.export.sd3_specs import (
    CLIP_NAMES,
    CLIP_TOKENS,
    _clip_spec,
    sd3_specs,
    t5_spec,
    transformer_spec,
    vae_decoder_spec,
)
from sdrt.runtime.families import FAMILY_KEYS, family_named

OPSET = 17
BOUND = PARITY_BOUND["fp32"]


def _rel(got: np.ndarray, want: torch.Tensor) -> float:
    w = want.detach().numpy().astype(np.float64)
    assert got.shape == w.shape
    return float(np.abs(got.astype(np.float64) - w).max() / max(np.abs(w).max(), 1e-12))


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=[n for n, p in SD3_PRESETS.items() if p.test_scale])  # tiny ones only
def tiny(request: pytest.FixtureRequest):
    return get_sd3_preset(request.param), build_modules(get_sd3_preset(request.param), seed=0)


def test_sd3_family_declares_what_diffusers_does() -> None:
    """The family's facts against diffusers' StableDiffusion3Pipeline (its signature and class name)."""
    from diffusers import StableDiffusion3Pipeline

    fam = family_named("sd3")
    params = inspect.signature(StableDiffusion3Pipeline.__init__).parameters
    assert [n for n in params if n.startswith("text_encoder")] == list(fam.encoders)
    assert f"{fam.diffusers_pipeline}Pipeline" == StableDiffusion3Pipeline.__name__
    assert "force_zeros_for_empty_prompt" not in params and not fam.zero_negatives
    assert fam.penultimate and fam.pooled
    assert "sd3" in FAMILY_KEYS
    with pytest.raises(NotImplementedError, match="both CLIP"):
        fam.pooled_encoder  # noqa: B018


def test_sd3_specs_follow_the_family(tiny) -> None:
    """The export's components: the family's encoders in order, then the denoiser and the VAE decoder; the
    transformer's text and pooled widths are what the encoders' join gives (T5's width; both CLIP projections)."""
    _, mods = tiny
    specs = sd3_specs(mods, t5_tokens=8)
    assert [s.name for s in specs] == [*family_named("sd3").encoders, "unet", "vae_decoder", "vae_encoder"]
    clip_l, clip_g, t5 = mods.text_encoders
    cfg = mods.transformer.config
    assert cfg.joint_attention_dim == t5.config.d_model > clip_l.config.hidden_size + clip_g.config.hidden_size
    assert cfg.pooled_projection_dim == clip_l.config.projection_dim + clip_g.config.projection_dim


def _transformer_inputs(g: torch.Generator, cfg, b: int, h: int, w: int, tokens: int) -> dict[str, torch.Tensor]:
    return {
        "sample": torch.randn(b, int(cfg.in_channels), h, w, generator=g),
        "timestep": torch.rand(b, generator=g) * 1000,
        "encoder_hidden_states": torch.randn(b, tokens, int(cfg.joint_attention_dim), generator=g),
        "pooled_projections": torch.randn(b, int(cfg.pooled_projection_dim), generator=g),
    }


def test_transformer_exports_and_matches_diffusers_at_other_shapes(tiny, tmp_path: Path) -> None:
    preset, mods = tiny
    tr = mods.transformer
    tokens = CLIP_TOKENS + 8  # a short T5 part keeps the trace small; the axis is dynamic
    comp = export_component(transformer_spec(tr, tokens), "fp32", tmp_path / "transformer", opset=OPSET,
                            parity_shape=(2, 12, 8))
    assert comp.parity.rel_err <= BOUND
    sess = _session(tmp_path / "transformer" / "model.onnx")
    g = torch.Generator().manual_seed(7)
    max_lat = int(tr.config.pos_embed_max_size) * int(tr.config.patch_size)
    # (batch, latent h, latent w, tokens): square, wide, the full grid (crop offset 0), other token counts
    shapes = [(1, 16, 16, CLIP_TOKENS + preset.t5_tokens), (3, 6, 20, 90), (1, max_lat, max_lat, 77), (2, 2, 4, 1)]
    assert TRACE_LATENT not in [(h, w) for _, h, w, _ in shapes]
    for b, h, w, t in shapes:
        feed = _transformer_inputs(g, tr.config, b, h, w, t)
        with torch.inference_mode():
            want = tr(hidden_states=feed["sample"], encoder_hidden_states=feed["encoder_hidden_states"],
                      pooled_projections=feed["pooled_projections"], timestep=feed["timestep"]).sample
        (got,) = sess.run(["out_sample"], {k: v.numpy() for k, v in feed.items()})
        rel = _rel(got, want)
        assert rel <= BOUND, f"{preset.name} transformer at {(b, h, w, t)}: rel err {rel:.2e} > {BOUND}"


def test_t5_exports_and_matches_transformers_at_other_lengths(tiny, tmp_path: Path) -> None:
    preset, mods = tiny
    t5 = mods.text_encoders[2]
    comp = export_component(t5_spec(t5, 24), "fp16", tmp_path / "text_encoder_3", opset=OPSET,
                            parity_shape=(2, 1, 1))
    assert comp.precision == "fp32"  # forced: T5 overflows fp16
    sess = _session(tmp_path / "text_encoder_3" / "model.onnx")
    g = torch.Generator().manual_seed(8)
    # T5's relative position buckets depend on the length: short, SD3's 256, and past max_distance (128)
    for b, t in [(1, 5), (2, preset.t5_tokens), (1, 300)]:
        ids = torch.randint(0, int(t5.config.vocab_size), (b, t), generator=g)
        with torch.inference_mode():
            want = t5(ids)[0]
        (got,) = sess.run(["hidden_states"], {"input_ids": ids.to(torch.int32).numpy()})
        rel = _rel(got, want)
        assert rel <= BOUND, f"{preset.name} T5 at {(b, t)}: rel err {rel:.2e} > {BOUND}"


def test_clip_encoders_export_penultimate_and_pooled(tiny, tmp_path: Path) -> None:
    """Both CLIP encoders through the shared TextEncoder wrapper, against transformers' outputs as diffusers'
    ``_get_clip_prompt_embeds`` reads them (``hidden_states[-2]``, ``text_embeds``)."""
    _, mods = tiny
    g = torch.Generator().manual_seed(9)
    for name, enc in zip(CLIP_NAMES, mods.text_encoders[:2]):
        export_component(_clip_spec(name, enc), "fp32", tmp_path / name, opset=OPSET, parity_shape=(2, 1, 1))
        sess = _session(tmp_path / name / "model.onnx")
        vocab = int(enc.config.vocab_size)
        ids = torch.randint(0, vocab - 2, (3, CLIP_TOKENS), generator=g)
        ids[:, 0], ids[:, 5:] = vocab - 2, vocab - 1
        with torch.inference_mode():
            out = enc(ids, output_hidden_states=True)
        hidden, pooled = sess.run(["hidden_states", "text_embeds"], {"input_ids": ids.to(torch.int32).numpy()})
        assert _rel(hidden, out.hidden_states[-2]) <= BOUND
        assert _rel(pooled, out.text_embeds) <= BOUND


def test_transformer_fp16_passes_the_gate(tiny, tmp_path: Path) -> None:
    """The fp16 graph (traced from a half copy) against the float32 module, within the fp16 bound (1e-2).
    Random tiny weights: says nothing yet of real SD3 weights' fp16 range."""
    _, mods = tiny
    comp = export_component(transformer_spec(mods.transformer, CLIP_TOKENS + 8), "fp16", tmp_path / "transformer",
                            opset=OPSET, parity_shape=(2, 12, 8))
    assert comp.precision == "fp16" and comp.parity.rel_err <= PARITY_BOUND["fp16"]


def test_vae_decoder_applies_the_shift_as_diffusers_decodes(tmp_path: Path) -> None:
    """``images`` against diffusers' SD3 decode: ``vae.decode(latents / scaling + shift)``, then the pipeline's
    ``VaeImageProcessor.postprocess`` to [0, 1], times 255, rounded; within the fp32 image bound (1 level)."""
    from diffusers.image_processor import VaeImageProcessor

    vae = build_modules(get_sd3_preset("sd3-tiny"), seed=0).vae
    assert vae.config.shift_factor and vae.config.latent_channels == 16
    export_component(vae_decoder_spec(vae), "fp32", tmp_path / "vae_decoder", opset=OPSET, parity_shape=(1, 4, 4))
    sess = _session(tmp_path / "vae_decoder" / "model.onnx")
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    proc = VaeImageProcessor(vae_scale_factor=f)
    g = torch.Generator().manual_seed(12)
    for b, h, w in [(2, 6, 10), (1, 8, 8)]:
        lat = torch.randn(b, 16, h, w, generator=g)
        with torch.inference_mode():
            img = vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor).sample
        want = np.round(proc.postprocess(img, output_type="np") * 255)
        images, finite = sess.run(["images", "finite"], {"latent_sample": lat.numpy()})
        assert images.shape == (b, h * f, w * f, 3) and finite.all()
        assert np.abs(images.astype(np.int16) - want).max() <= IMAGE_LEVELS["fp32"]
        # the shift matters: without it the images differ (so the check above is not vacuous)
        with torch.inference_mode():
            unshifted = np.round(proc.postprocess(vae.decode(lat / vae.config.scaling_factor).sample,
                                                  output_type="np") * 255)
        assert np.abs(unshifted - want).max() > IMAGE_LEVELS["fp32"]


@pytest.mark.xfail(strict=True, raises=OrtFail, reason="torch.onnx dynamo export (torch 2.13) crops SD3's position embedding one "
                   "row / column too many when a side has an odd number of patches; the torch.export program "
                   "itself is right. sdrt's in-memory exports use dynamo=False, which is exact; its streamed "
                   "exports crop with narrow (Sd3Transformer(dynamo=True)). A pass here means torch fixed it: drop "
                   "this marker and the narrow crop.")
def test_dynamo_exporter_keeps_the_pos_embed_crop_dynamic(tmp_path: Path) -> None:
    """Found while doing this work: traced at batch 2, latent 10x14 (5x7 patches), the dynamo graph is exact at
    even patch counts (6x4, 16x16) and fails at odd ones, the traced shape included (ONNX Runtime: the cropped
    position embedding is [1, 6, 8, C] where 5x7 patches need [1, 5, 7, C]; with the ONNX optimizer on, a
    broadcast error in the Add instead). Traced at batch 1, the batch axis is also fixed to 1 (torch.export
    specialises sizes 0 and 1), and a side of one patch is refused by the program's guards."""
    import warnings

    from sdrt.export.sd3_wrappers import Sd3Transformer

    tr = build_modules(get_sd3_preset("sd3-tiny"), seed=0).transformer
    g = torch.Generator().manual_seed(11)
    names = ["sample", "timestep", "encoder_hidden_states", "pooled_projections"]
    example = tuple(_transformer_inputs(g, tr.config, 2, *TRACE_LATENT, 85).values())
    b, t = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("tokens", min=1, max=1024)
    h, w = torch.export.Dim("h", min=2, max=16), torch.export.Dim("w", min=2, max=16)
    dyn = {"sample": {0: b, 2: 2 * h, 3: 2 * w}, "timestep": {0: b}, "encoder_hidden_states": {0: b, 1: t},
           "pooled_projections": {0: b}}
    path = tmp_path / "transformer.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Sd3Transformer(tr), example, str(path), input_names=names, output_names=["out_sample"],
                          dynamic_shapes=dyn, dynamo=True, opset_version=18)
    sess = _session(path)
    for shape in [(2, 12, 8, 90), (2, *TRACE_LATENT, 85)]:
        feed = _transformer_inputs(g, tr.config, *shape)
        with torch.inference_mode():
            want = tr(hidden_states=feed["sample"], encoder_hidden_states=feed["encoder_hidden_states"],
                      pooled_projections=feed["pooled_projections"], timestep=feed["timestep"]).sample
        (got,) = sess.run(["out_sample"], {k: v.numpy() for k, v in feed.items()})
        assert _rel(got, want) <= BOUND
