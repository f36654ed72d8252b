"""Few-step models (SD-Turbo, SDXL-Turbo style tiny models) on ort-cpu against diffusers: 1, 2 and 4
Euler ancestral steps over trailing timesteps at guidance 0, images within 1/255 in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.export.presets import get_preset
from sdrt.runtime.pipeline import Pipeline

from .helpers.references import diffusers_pipe


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("preset", ["sd-turbo-tiny", "sdxl-turbo-tiny"])
def test_turbo_matches_diffusers(tiny_export, monkeypatch: pytest.MonkeyPatch, preset: str, steps: int) -> None:
    from diffusers import EulerAncestralDiscreteScheduler
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as ea

    folder = tiny_export(preset, "fp32")
    pipe, cfg = diffusers_pipe(preset, folder)
    assert cfg["_class_name"] == "EulerAncestralDiscreteScheduler" and cfg["timestep_spacing"] == "trailing"
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(cfg)
    h = w = 64
    seed = 20 + steps
    latents = np.random.default_rng(seed + 100).standard_normal((1, 4, h // 8, w // 8), dtype=np.float32)
    # sdrt draws every step's fresh noise up front from the seed's generator (latents given: nothing else)
    step_noise = iter(np.random.default_rng(seed).standard_normal((steps, 1, 4, h // 8, w // 8), dtype=np.float32))
    monkeypatch.setattr(ea, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(step_noise)))
    prompt = "a cinematic photo of a raccoon in a spacesuit"
    with torch.no_grad():
        ref = pipe(prompt, height=h, width=w, num_inference_steps=steps, guidance_scale=0.0,
                   latents=torch.from_numpy(latents), output_type="np").images
    ref_u8 = (ref * 255).round().astype(np.int32)

    seen: list[tuple[int, ...]] = []
    with Pipeline.load(folder, backend="ort-cpu") as ours:
        unet = ours.engines["unet"]

        def recording(feeds):  # guidance 0: the UNet runs at batch 1, not 2
            seen.append(tuple(np.shape(feeds["sample"])))
            return unet(feeds)

        ours.engines["unet"] = type("Rec", (), {"__call__": staticmethod(recording), "inputs": unet.inputs,
                                                "outputs": unet.outputs, "name": "unet"})()
        res = ours(prompt, height=h, width=w, steps=steps, guidance_scale=0.0, sampler="euler-a", seed=seed,
                   latents=latents)
    got = np.asarray(res.images[0]).astype(np.int32)
    diff = np.abs(got - ref_u8[0]).max()
    assert diff <= 1, f"{preset} {steps} steps: max abs difference {diff}/255"
    assert 5 < ref_u8.std()
    assert seen == [(1, 4, h // 8, w // 8)] * steps


def test_turbo_presets_are_their_families() -> None:
    """The full-size presets: SD 2.1 and SDXL architectures at 512 with the turbo scheduler."""
    for name, base in (("sd-turbo", "sd21"), ("sdxl-turbo", "sdxl")):
        p, b = get_preset(name), get_preset(base)
        assert p.family == b.family and p.default_size == 512 and p.text_encoders == b.text_encoders
        assert p.unet["block_out_channels"] == b.unet["block_out_channels"] and not p.by_shape
        assert p.scheduler["_class_name"] == "EulerAncestralDiscreteScheduler"
        assert p.scheduler["timestep_spacing"] == "trailing"
