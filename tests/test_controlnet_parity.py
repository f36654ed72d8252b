"""ControlNet against diffusers' ControlNet pipelines: same synthetic weights, same latents.

Images within 1/255 of ``StableDiffusionControlNetPipeline`` (one ControlNet; two, with different
scales and a start/end window; guess mode; a net left out) and ``StableDiffusionXLControlNetPipeline``
in fp32, with two samplers, guided and unguided, at a non-square size; img2img with control against
``StableDiffusionControlNetImg2ImgPipeline``; and a ControlNet at scale 0 against the plain UNet, on ort-cpu
(two nets on openvino too). A ControlNet beside LoRA slots against the ControlNet pipeline with the LoRA loaded on
ort-cpu, ort-cuda's code path, openvino and the TensorRT fakes (SD 1.5, and SDXL in the slow tier).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdrt.runtime.pipeline import Pipeline

from .helpers.inputs import control_image, seed_for
from .helpers.pipelines import module_cache, shared_pipeline
from .helpers.references import diffusers_scheduler

_DIFFUSERS: dict[tuple[str, int, str], Any] = module_cache({})
PROMPT = "a house by a lake, evening light"


def _nets(preset: str, n: int) -> list[Any]:
    from sdrt.export.controlnet_loading import random_controlnet

    return [random_controlnet(preset.removesuffix("-tiny") + "-controlnet-tiny", seed=1 + j).controlnet
            for j in range(n)]


def _diffusers(preset: str, folder: Path, nets: list[int], kind: str = "txt2img") -> Any:
    """diffusers' ControlNet pipeline over the export's weights, with the nets of the given indices."""
    key = (preset, len(nets) * 10 + sum(nets), kind)
    if key not in _DIFFUSERS:
        from diffusers import (
            StableDiffusionControlNetImg2ImgPipeline,
            StableDiffusionControlNetPipeline,
            StableDiffusionXLControlNetPipeline,
        )
        from transformers import CLIPTokenizer

        from sdrt.export.loading import random_model

        m = random_model(preset)
        every = _nets(preset, max(nets) + 1)
        chosen = [every[j] for j in nets]
        cn = chosen[0] if len(chosen) == 1 else chosen
        tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        common = {"vae": m.vae, "unet": m.unet, "controlnet": cn,
                  "scheduler": diffusers_scheduler("ddim", m.scheduler_config)}
        if m.preset.family == "sdxl":
            pipe = StableDiffusionXLControlNetPipeline(
                text_encoder=m.text_encoders[0], text_encoder_2=m.text_encoders[1], tokenizer=tok,
                tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), force_zeros_for_empty_prompt=True,
                add_watermarker=False, **common)
        else:
            cls = StableDiffusionControlNetImg2ImgPipeline if kind == "img2img" else StableDiffusionControlNetPipeline
            pipe = cls(text_encoder=m.text_encoders[0], tokenizer=tok, safety_checker=None, feature_extractor=None,
                       requires_safety_checker=False, **common)
        pipe.set_progress_bar_config(disable=True)
        _DIFFUSERS[key] = (pipe, m.scheduler_config)
    return _DIFFUSERS[key]


def _u8(ref: np.ndarray) -> np.ndarray:
    return (ref * 255).round().astype(np.int32)


def _compare(folder: Path, preset: str, nets: list[int], sampler: str, guidance: float, height: int, width: int, *,
             scales: list[float] | None = None, start: list[float] | None = None, end: list[float] | None = None,
             guess: bool = False, steps: int = 6, sdrt_images: list[Any] | None = None,
             backend: str = "ort-cpu", tol: int = 1) -> Any:
    pipe, cfg = _diffusers(preset, folder, nets)
    pipe.scheduler = diffusers_scheduler(sampler, cfg)
    images = [control_image(10 + j) for j in nets]
    latents = np.random.default_rng(seed_for(preset, sampler, height)).standard_normal(
        (1, 4, height // 8, width // 8), dtype=np.float32)
    kw: dict[str, Any] = {}
    if scales is not None:
        kw["controlnet_conditioning_scale"] = scales if len(nets) > 1 else scales[0]
    if start is not None:
        kw["control_guidance_start"], kw["control_guidance_end"] = start, end
    with torch.no_grad():
        ref = pipe(PROMPT, image=images if len(nets) > 1 else images[0], height=height, width=width,
                   num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents),
                   output_type="np", guess_mode=guess, **kw).images
    mine = sdrt_images if sdrt_images is not None else images

    def per_net(v: list[float] | None, default: float) -> list[float] | None:
        """The call's values at the positions of ``nets`` among sdrt's images (a net left out: the default)."""
        if v is None or sdrt_images is None:
            return v
        full = [default] * len(mine)
        for k, j in enumerate(nets):
            full[j] = v[k]
        return full

    res = shared_pipeline(folder, backend)(
        PROMPT, height=height, width=width, steps=steps, guidance_scale=guidance, sampler=sampler, latents=latents,
        guess_mode=guess, control_images=mine, control_scales=per_net(scales, 1.0),
        control_start=per_net(start, 0.0), control_end=per_net(end, 1.0))
    got = np.asarray(res.images[0]).astype(np.int32)
    want = _u8(ref[0])
    assert got.shape == want.shape == (height, width, 3)
    diff = np.abs(got - want).max()
    assert diff <= tol, f"{preset} nets {nets} {sampler} guidance {guidance}: {diff}/255"
    assert want.std() > 5
    return res, want


@pytest.mark.parametrize(("sampler", "guidance"), [("ddim", 7.5), ("dpmpp-2m", 1.0), ("dpmpp-2m", 5.0)])
def test_one_controlnet(tiny_controlnet_export, sampler: str, guidance: float) -> None:
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    # net 0 alone (net 1 left out: it feeds zeros); a non-square size
    res, want = _compare(folder, "sd15-tiny", [0], sampler, guidance, 64, 80, scales=[0.8],
                         sdrt_images=[control_image(10)])
    assert "step by step" in res.loop
    # the control moves the image: the plain UNet's image differs from diffusers' controlled one
    plain = shared_pipeline(folder)(
        PROMPT, height=64, width=80, steps=6, guidance_scale=guidance, sampler=sampler,
        latents=np.random.default_rng(seed_for("sd15-tiny", sampler, 64)).standard_normal(
            (1, 4, 8, 10), dtype=np.float32))
    assert np.abs(np.asarray(plain.images[0]).astype(int) - want).max() > 3


@pytest.mark.parametrize(("sampler", "guidance"), [("ddim", 6.0), ("dpmpp-2m", 1.0)])
def test_two_controlnets_scales_and_window(tiny_controlnet_export, sampler: str, guidance: float) -> None:
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    _compare(folder, "sd15-tiny", [0, 1], sampler, guidance, 80, 64, scales=[0.6, 1.3], start=[0.0, 0.3],
             end=[0.7, 1.0], steps=7)


def test_second_net_only(tiny_controlnet_export) -> None:
    from sdrt.runtime.errors import InputError

    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    _compare(folder, "sd15-tiny", [1], "ddim", 7.5, 64, 64, sdrt_images=[None, control_image(11)])
    with pytest.raises(InputError, match="control_scales has 3 entries"):
        shared_pipeline(folder)(PROMPT, steps=2, control_images=[control_image(10)], control_scales=[1, 1, 1])


@pytest.mark.parametrize(("sampler", "guidance"), [("ddim", 7.5), ("dpmpp-2m", 1.0)])
def test_guess_mode(tiny_controlnet_export, sampler: str, guidance: float) -> None:
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    _compare(folder, "sd15-tiny", [0, 1], sampler, guidance, 64, 80, scales=[1.0, 0.5], guess=True)


@pytest.mark.slow  # exports the SDXL pair: over 1 min on 2 busy cores
@pytest.mark.parametrize(("sampler", "guidance"), [("euler", 6.0), ("dpmpp-2m", 1.0)])
def test_sdxl_controlnet(tiny_controlnet_export, sampler: str, guidance: float) -> None:
    folder = tiny_controlnet_export("sdxl-tiny", "fp32", 1)
    _compare(folder, "sdxl-tiny", [0], sampler, guidance, 64, 80, scales=[0.9], start=[0.0], end=[0.8])


def test_img2img_with_control(tiny_controlnet_export, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as mod
    from PIL import Image

    real = mod.retrieve_latents  # sdrt encodes to the latent mean: make diffusers do the same
    monkeypatch.setattr(mod, "retrieve_latents", lambda out, generator=None, sample_mode="sample": real(out, None,
                                                                                                       "argmax"))
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    pipe, cfg = _diffusers("sd15-tiny", folder, [0], "img2img")
    pipe.scheduler = diffusers_scheduler("ddim", cfg)
    init = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    cimg = control_image(10, 80, 64)
    noise = torch.randn((1, 4, 8, 10), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = pipe(PROMPT, image=init, control_image=cimg, strength=0.6, num_inference_steps=10, guidance_scale=6.0,
                   generator=torch.Generator().manual_seed(11), output_type="np",
                   controlnet_conditioning_scale=0.7, control_guidance_end=0.5).images
    res = shared_pipeline(folder)(PROMPT, image=init, strength=0.6, steps=10, guidance_scale=6.0, sampler="ddim",
                                  latents=noise.numpy(), control_images=[cimg], control_scales=[0.7],
                                  control_end=[0.5])
    diff = np.abs(np.asarray(res.images[0]).astype(np.int32) - _u8(ref[0])).max()
    assert diff <= 1, f"img2img + control: {diff}/255"
    assert len(res.timings["unet_steps_ms"]) == 6


def test_scale_zero_is_the_plain_unet(tiny_controlnet_export) -> None:
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    kw: dict[str, Any] = {"height": 64, "width": 64, "steps": 4, "guidance_scale": 7.5, "sampler": "ddim", "seed": 4}
    plain = np.asarray(shared_pipeline(folder)(PROMPT, **kw).images[0]).astype(int)
    zero = np.asarray(shared_pipeline(folder)(PROMPT, control_images=[control_image(10)], control_scales=[0.0],
                                              **kw).images[0]).astype(int)
    assert np.abs(plain - zero).max() <= 1


def test_inpainting_with_control_is_refused_before_any_engine(tiny_controlnet_export) -> None:
    from PIL import Image

    from sdrt.runtime.errors import InputError

    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    pipe = shared_pipeline(folder)
    calls: list[str] = []
    for name, e in pipe.engines.items():
        real = e.run
        e.run = lambda feeds, real=real, name=name: calls.append(name) or real(feeds)  # type: ignore[method-assign]
    try:
        with pytest.raises(InputError, match="ControlNet with inpainting is not supported yet"):
            pipe(PROMPT, steps=2, image=Image.new("RGB", (64, 64)), mask_image=Image.new("L", (64, 64), 255),
                 control_images=[control_image(10)])
        assert calls == []
    finally:
        for e in pipe.engines.values():
            e.__dict__.pop("run", None)


def test_openvino_matches_diffusers(tiny_controlnet_export) -> None:
    pytest.importorskip("openvino")
    from sdrt.runtime.ov_backend import OvBackend

    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    shared_pipeline(folder, "openvino", load=lambda: Pipeline.load(
        folder, backend=OvBackend(threads=2, precision="f32", cache_dir=False)))
    _compare(folder, "sd15-tiny", [0, 1], "ddim", 6.0, 64, 80, scales=[0.6, 1.3], start=[0.0, 0.3],
             end=[0.7, 1.0], backend="openvino")


_LORA_CASES: dict[tuple[str, str], tuple[Path, Path, np.ndarray, np.ndarray]] = {}
LORA_KW: dict[str, Any] = {"height": 64, "width": 96, "steps": 6, "guidance_scale": 7.5, "sampler": "ddim"}


@pytest.fixture(scope="module")
def lora_case(tmp_path_factory: pytest.TempPathFactory):
    """lora_case(preset, slots) -> (an export of ``preset`` with one ControlNet and ``--lora-slots slots``, a kohya
    LoRA of the UNet and the text encoders (with LoCon slots, ``attn-ff-conv``, the UNet's convolutions too),
    diffusers' ControlNet pipeline's image with the LoRA loaded at 0.8, and without it): made once for every
    backend."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the test extra)")

    def get(preset: str, slots: str) -> tuple[Path, Path, np.ndarray, np.ndarray]:
        if (preset, slots) in _LORA_CASES:
            return _LORA_CASES[preset, slots]
        import copy

        from sdrt.export.controlnet_loading import random_controlnet
        from sdrt.export.exporter import export_model
        from sdrt.export.loading import load_model, random_model
        from sdrt.export.lora_slots import SlotPlan

        from .helpers.models import make_lora

        tmp = tmp_path_factory.mktemp("cn-lora")
        folder = tmp / "export"
        export_model(load_model(random_preset=preset), folder, controlnets=[random_controlnet(
            preset.removesuffix("-tiny") + "-controlnet-tiny", seed=1)], lora_slots=SlotPlan.parse(slots))
        m = random_model(preset)
        sdxl = len(m.text_encoders) == 2
        locon = slots.endswith("conv")
        convs = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
        lora = make_lora(tmp / "style.safetensors", m.unet, m.text_encoders[0], "kohya", seed=6, alpha=2.0,
                         unet_targets=("to_q", "to_k", "to_v", "to_out.0", *(convs if locon else ())),
                         text_targets=("q_proj", "k_proj", "v_proj", "out_proj"), conv_rank=4 if locon else None,
                         text_encoder_2=m.text_encoders[1] if sdxl else None)
        base, cfg = _diffusers(preset, folder, [0])
        fresh = {k: copy.deepcopy(getattr(base, k)) for k in ("unet", "text_encoder", "text_encoder_2")
                 if hasattr(base, k)}  # load_lora_weights adapts them in place
        pipe = type(base)(**{**base.components, **fresh, "scheduler": diffusers_scheduler("ddim", cfg)})
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(lora), adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[0.8])
        base.scheduler = diffusers_scheduler("ddim", cfg)  # other tests leave their sampler's scheduler in it
        call = {"image": control_image(10), "height": 64, "width": 96, "num_inference_steps": 6,
                "guidance_scale": 7.5, "output_type": "np"}
        with torch.no_grad():
            want, plain = (_u8(p(PROMPT, latents=torch.from_numpy(_lora_latents()), **call).images[0])
                           for p in (pipe, base))
        _LORA_CASES[preset, slots] = (folder, lora, want, plain)
        return _LORA_CASES[preset, slots]

    return get


def _lora_latents() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, 4, 8, 12), dtype=np.float32)


def _lora_cases() -> list[Any]:
    """Every backend on the plain slots; ort-cuda's code path (composed step sessions: a minute and more per case
    on 2 cores) on those alone, LoCon and SDXL on the other three backends."""
    cases: list[Any] = [("sd15-tiny", "8", b) for b in ("ort-cpu", "ort-cuda-path", "openvino", "tensorrt")]
    cases += [("sd15-tiny", "8:attn-ff-conv", b) for b in ("ort-cpu", "openvino", "tensorrt")]
    # exports the SDXL pair: over 1 min
    cases += [pytest.param("sdxl-tiny", "8:attn-ff", b, marks=pytest.mark.slow) for b in ("ort-cpu", "openvino",
                                                                                        "tensorrt")]
    return cases


@pytest.mark.parametrize(("preset", "slots", "backend"), _lora_cases())
def test_controlnet_with_lora_slots_matches_diffusers_with_the_lora(lora_case, request: pytest.FixtureRequest,
                                                                    tmp_path: Path, preset: str, slots: str,
                                                                    backend: str) -> None:
    """An export made with ControlNets and --lora-slots: ``unet_control`` takes the call's LoRA factors after
    the residuals, under the UNet's names; a LoRA (UNet and text encoders) with a control image gives diffusers'
    ControlNet pipeline's image (SD 1.5's, SDXL's) with the same LoRA loaded, within 1/255, and no LoRA its plain
    image. With LoCon slots (``attn-ff-conv``) the file adapts the UNet's convolutions too. On ort-cpu, ort-cuda's
    code path (on the CPU EP, its composed step sessions), openvino (fp32) and the TensorRT fakes (the captured
    loop): none says anything of a GPU."""
    from .helpers.pipelines import loaded_on_any

    folder, lora, want, plain_want = lora_case(preset, slots)
    kw = {**LORA_KW, "latents": _lora_latents(), "control_images": [control_image(10)]}
    with loaded_on_any(folder, backend, request, tmp_path / "engines") as pipe:
        styled = pipe(PROMPT, loras=[(lora, 0.8)], **kw)
        plain = np.asarray(pipe(PROMPT, **kw).images[0]).astype(np.int32)
        # control calls alone: the plain UNet is not loaded, except where every engine loads with the model (TensorRT)
        assert "unet_control" in pipe.engines and ("unet" in pipe.engines) == (backend == "tensorrt")
    got = np.asarray(styled.images[0]).astype(np.int32)
    assert np.abs(got - want).max() <= 1, f"{preset} on {backend}, with the LoRA: {np.abs(got - want).max()}/255"
    assert np.abs(plain - plain_want).max() <= 1, f"{preset} on {backend}, no LoRA: {np.abs(plain - plain_want).max()}/255"
    assert np.abs(plain_want - want).max() > 2 and want.std() > 5  # the LoRA mattered
    if backend == "tensorrt":
        assert styled.loop == "captured CUDA graphs", styled.loop
