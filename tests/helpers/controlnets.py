"""The ControlNet tests' shared parts (SD 3 / 3.5 and FLUX.1 nets): an image with some of an export's nets against
diffusers' ControlNet pipeline, the built engines' images against ort-cpu's, a net's diffusers folder read back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.runtime.pipeline import Pipeline

from .inputs import control_image
from .pipelines import shared_pipeline
from .references import assert_diffusers_images


def compare_with_nets(ref: Any, pipe: Pipeline, prompt: str, nets: tuple[int, ...], scales: Sequence[float],
                      exported: int, *, start: float, end: float, steps: int, guidance: float,
                      ref_latents: Callable[[np.ndarray], Any], what: str, ref_kw: dict[str, Any] | None = None,
                      call_kw: dict[str, Any] | None = None) -> np.ndarray:
    """sdrt's 64 x 96 image (``pipe``, an export of ``exported`` nets: those not in ``nets`` given no image) against
    ``ref``'s (diffusers' pipeline of the ``nets`` alone, one net or a multi-net) for the same control images
    (``control_image(11 + j)`` for net j), latents (``ref_latents`` makes diffusers' of them), scales and window,
    within 1/255. ``ref_kw``, ``call_kw``: the two calls' other arguments. Returns sdrt's image, int32 [H, W, 3]."""
    import torch

    height, width = 64, 96
    images = [control_image(11 + j) for j in nets]
    latents = np.random.default_rng(4).standard_normal((1, 16, height // 8, width // 8), dtype=np.float32)
    multi = len(nets) > 1
    with torch.no_grad():
        want = ref(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                   latents=ref_latents(latents), output_type="np",
                   control_image=[im.convert("RGB") for im in images] if multi else images[0].convert("RGB"),
                   controlnet_conditioning_scale=list(scales) if multi else scales[0],
                   control_guidance_start=[start] * len(nets) if multi else start,
                   control_guidance_end=[end] * len(nets) if multi else end, **(ref_kw or {})).images
    given: list = [None] * exported
    given_scales = [1.0] * exported
    for j, im in zip(nets, images, strict=True):
        given[j], given_scales[j] = im, scales[nets.index(j)]
    res = pipe(prompt, height=height, width=width, steps=steps, guidance_scale=guidance, latents=latents,
               control_images=given, control_scales=given_scales, control_start=start, control_end=end,
               **(call_kw or {}))
    got, _ = assert_diffusers_images(res.images, want[:1], what)
    assert got.shape == (1, height, width, 3)
    return got[0]


def assert_engines_give_ort_cpu_images(src: Path, out: Path, profile: Any, cudart: Any, components: set[str],
                                       prompt: str, kw: dict[str, Any], cases: Sequence[dict[str, Any]]) -> None:
    """Logic check on the TensorRT fakes (``fake_gpu``'s ``cudart``): ``build_engines`` of ``src`` with ``profile``
    makes at least ``components``, and the captured step gives ort-cpu's images, within 1/255, for each of the
    ``cases`` (arguments beside ``kw``); no device memory is left after. Says nothing of real TensorRT."""
    from sdrt.export.trt_build import BuildOptions, build_engines

    manifest = build_engines(src, out, profile, BuildOptions(workspace_gb=1))
    assert components <= {r.component for r in manifest.engines}
    with Pipeline.load(out, backend="tensorrt") as pipe:
        for case in cases:
            want = shared_pipeline(src)(prompt, **kw, **case)
            got = pipe(prompt, **kw, **case)
            assert got.loop == "captured CUDA graphs"
            a, b = np.asarray(want.images[0], np.int16), np.asarray(got.images[0], np.int16)
            assert a.std() > 5 and np.abs(a - b).max() <= 1
    assert cudart.alive()["allocations"] == 0


def assert_folder_loads_as_its_class(tmp_path: Path, preset: str, cls: str) -> None:
    """A net of ``preset`` (seed 2) saved as diffusers saves it (config.json + safetensors) loads as ``cls``, weight
    for weight."""
    import torch

    from sdrt.export.controlnet_loading import load_controlnet, random_controlnet

    net = random_controlnet(preset, seed=2).controlnet
    net.save_pretrained(tmp_path / "cn", safe_serialization=True)
    got = load_controlnet(tmp_path / "cn")
    assert type(got.controlnet).__name__ == cls and got.source["kind"] == "diffusers"
    want = net.state_dict()
    assert got.controlnet.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in got.controlnet.state_dict().items())
