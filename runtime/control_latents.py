"""A denoiser that reads a control image itself (FLUX.1 Depth and Canny [dev], as diffusers' ``FluxControlPipeline``
runs them): no ControlNet, the control image's latents beside the latents at every step.

A denoiser whose graph has a ``control_latents`` input takes one: the call's control image (a depth map or canny
edges, ``control_images=[image]``, the field ControlNets take theirs in) resized to the output size as diffusers'
image processor does (Lanczos on the 8-bit pixels, then RGB), encoded once per call by the export's VAE encoder
(shifted and scaled as latents; the latent distribution's mean, where FluxControlPipeline samples it), and read at
every step as the text is. Without a size the output takes the control image's, rounded down to whole patches (as
sdrt's ControlNets; FluxControlPipeline's default is 1024 pixels whatever the image). img2img and inpainting by
blending (``image=``, ``mask_image=``: FluxControlImg2ImgPipeline, FluxControlInpaintPipeline) are the latents'
business (runtime/inpaint_stage.py), not the control image's: they combine as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import controlnet
from .device_graphs import DeviceGraphs
from .engine import Array, Backend, Engine
from .errors import ArtifactError, InputError

CONTROL_INPUT = "control_latents"
NAME = "a control model (FLUX.1 Depth / Canny)"
FLAGS = {"control_scales": "--control-scale", "control_start": "--control-start", "control_end": "--control-end",
         "guess_mode": "--guess-mode", "control_modes": "--control-mode"}


def takes_control(engines: dict[str, Engine]) -> bool:
    """The denoiser takes a control image's latents (FLUX.1 Depth / Canny)."""
    return CONTROL_INPUT in engines["unet"].inputs


def check(folder: Path, engines: dict[str, Engine], control_images: Any, control_scales: Any = None,
          control_start: Any = None, control_end: Any = None, guess_mode: Any = False,
          control_preprocess: Any = None, control_modes: Any = None) -> Any:
    """A call's control keywords on an export whose denoiser reads the control image itself, before any work: the
    control image (a PIL image, preprocessed where asked), or None for an export whose denoiser takes none (its
    ControlNets, if any, check the keywords: runtime/control_stage.py)."""
    if not takes_control(engines):
        return None
    images = [] if control_images is None else control_images
    if not isinstance(images, (list, tuple)):
        raise InputError(f"control_images must be a list, not {type(images).__name__}: e.g. control_images=[image]")
    given = [im for im in images if im is not None]
    if not given:
        raise InputError(f"{folder} is {NAME}: its transformer reads a control image at every step; pass "
                         "control_images=[image] (a depth map or canny edges)",
                         cli=f"{folder} is {NAME}: pass --control-image IMG (a depth map or canny edges)")
    if len(images) != 1:
        raise InputError(f"{len(images)} control images for {NAME}, which reads one: give control_images=[image]",
                         cli=f"{len(images)} --control-image for {NAME}, which reads one: give it once")
    for kw, v in (("control_scales", control_scales), ("control_start", control_start),
                  ("control_end", control_end), ("guess_mode", guess_mode or None),
                  ("control_modes", control_modes)):
        if v is not None:
            raise InputError(f"{kw} applies to ControlNets; {folder} is {NAME}, whose transformer reads its control "
                             f"image at every step with no scale or window (as FluxControlPipeline): leave {kw} out",
                             cli=f"{FLAGS[kw]} applies to ControlNets; {folder} is {NAME}, which takes "
                                 "no scale or window: leave it out")
    if "vae_encoder" not in engines:
        raise ArtifactError(f"{folder} has no VAE encoder, which encodes the control image; re-export the model with "
                            "`sdrt export`")
    prep = control_preprocess[0] if isinstance(control_preprocess, (list, tuple)) and len(control_preprocess) == 1 \
        else control_preprocess
    if prep is not None and prep not in controlnet.PREPROCESSORS:
        raise InputError(f"control_preprocess {prep!r} is not one of {', '.join(controlnet.PREPROCESSORS)} (or None)",
                         cli=f"--control-preprocess {prep!r} is not one of {', '.join(controlnet.PREPROCESSORS)}")
    image = controlnet.check_image(given[0])
    if prep == "canny":
        from .preprocess import canny

        image = canny(image.convert("RGB"))
    return image


def call_size(image: Any, limits: Any, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) of a call: as given, a side not given the control image's rounded down to the export's
    multiple (``ShapeLimits``), refused outside the export's sizes, naming the image, before any work."""
    m = limits.multiple_of
    h = image.height - image.height % m if height is None else height
    w = image.width - image.width % m if width is None else width
    if any(given is None and not limits.min_size <= v <= limits.max_size for given, v in ((height, h), (width, w))):
        what = (f"control_images[0] is {image.width}x{image.height} pixels, {w}x{h} rounded down to a multiple of {m}: "
                f"each side the output takes from it must be {limits.min_size} to {limits.max_size} pixels")
        raise InputError(f"{what}; give a larger image, or height= and width= (it is resized to them)",
                         cli=f"{what.replace('control_images[0]', '--control-image')}; give a larger image, or "
                             "--height and --width")
    return h, w


def encode(backend: Backend, engines: dict[str, Engine], graphs: DeviceGraphs, dtype: np.dtype[Any], image: Any,
           height: int, width: int) -> Array:
    """The control image's latents [1, C, height/8, width/8] on the device, in the denoiser's dtype: resized to the
    output size (``controlnet.pixels``) and encoded by the export's VAE encoder."""
    px = controlnet.pixels(image, height, width)[None]
    latent = engines["vae_encoder"]({"image": backend.to_device(np.ascontiguousarray(px))})["latent"]
    src = backend.meta(latent)[0]
    return latent if src == dtype else graphs.cast(src, dtype)({"latents": latent})["latents_cast"]
