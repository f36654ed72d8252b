"""Inpainting: the mask's preparation and the per-step inputs of the inpainting step graphs.

Semantics are diffusers' ``StableDiffusionInpaintPipeline`` / ``StableDiffusionXLInpaintPipeline``:
white marks the region to repaint. The mask is converted to grayscale, resized to the output size
(Lanczos), scaled to [0, 1] and binarized at 0.5 (``VaeImageProcessor(do_binarize=True,
do_convert_grayscale=True)``), then downsampled to latent size by nearest neighbour
(``prepare_mask_latents``). Two kinds of model:

- a 9-channel inpainting UNet takes [latents, mask, masked image latents] at every step: the step graph's
  "concat" variant appends the fixed [mask, masked latents] block to its next UNet input, on the device
  (FLUX.1 Fill's transformer takes the same three, its mask as each latent pixel's 8 x 8 pixels: 64 channels,
  ``latent_mask``; the family says how many, ``Family.concat_mask_channels``);
- an ordinary 4-channel UNet inpaints by blending: after every step the unmasked region is replaced by
  the init image's latents noised to the next step's level (the same noise the run started from), and
  by the clean latents after the last step: the "blend" variant of the step graph.

``paste_back`` is diffusers' ``apply_overlay`` (after an optional ``VaeImageProcessor.blur`` of the mask):
the original pixels outside the mask, composited over the generated image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import samplers
from .engine import Array
from .errors import ArtifactError, InputError

MASKED_ENCODER = "vae_encoder_masked"  # the export's encoder of the masked image (9-channel UNets only)
MASK_MODES = ("1", "L", "RGB")  # what a mask image may be; diffusers converts each to grayscale ("L")


@dataclass(frozen=True)
class InpaintState:
    """What the denoising loop needs beyond the latents, batch rows first.

    ``mode``: "concat" (9-channel UNet) or "blend" (4-channel). ``mask`` [B, 1, h, w] at latent size (host
    float32, made from the user's mask). The rest stay on the device as the backend's arrays:
    ``masked_latents`` the masked-image encoder's own output [1, C, h, w] (concat), the blend's
    ``image_latents`` and ``noise`` already in the UNet's dtype (the step graph's ``image_latents`` and
    ``init_noise``).
    """

    mode: str
    mask: np.ndarray
    masked_latents: Array | None = None
    image_latents: Array | None = field(default=None, repr=False)
    noise: Array | None = field(default=None, repr=False)


def inpaint_mode(unet_channels: int, latent_channels: int, mask_channels: int = 1) -> str:
    """"concat" for an inpainting UNet (latents + mask + masked latents; ``mask_channels``: the family's mask
    channels), "blend" for an ordinary one."""
    if unet_channels == 2 * latent_channels + mask_channels:
        return "concat"
    if unet_channels == latent_channels:
        return "blend"
    raise InputError(f"a UNet of {unet_channels} input channels can neither inpaint by blending "
                     f"({latent_channels}) nor take a mask ({2 * latent_channels + mask_channels}); re-export the "
                     "model")


def image_size(image: Any) -> tuple[int, int]:
    """(width, height) of a PIL image or an [H, W, ...] array, before any resize."""
    if isinstance(image, np.ndarray):
        return int(image.shape[1]), int(image.shape[0])
    w, h = image.size
    return int(w), int(h)


def mask_to_pil(mask: Any) -> Any:
    """A PIL image (mode 1, L or RGB) or a uint8 array [H, W] / [H, W, 1] / [H, W, 3] -> a grayscale PIL image."""
    from PIL import Image

    fix = "white (255) marks the region to repaint, black (0) what to keep"
    if isinstance(mask, np.ndarray):
        if mask.dtype != np.uint8 or not (mask.ndim == 2 or (mask.ndim == 3 and mask.shape[2] in (1, 3))):
            raise InputError(f"mask_image array must be uint8 [H, W] (or [H, W, 1], [H, W, 3]), got "
                             f"{mask.dtype}{list(mask.shape)}: {fix}")
        mask = Image.fromarray(mask[..., 0] if mask.ndim == 3 and mask.shape[2] == 1 else mask)
    if not isinstance(mask, Image.Image):
        raise InputError(f"mask_image must be a PIL image or a uint8 array, not {type(mask).__name__}: {fix}")
    if mask.mode not in MASK_MODES:
        raise InputError(f"mask_image has mode {mask.mode}; give a grayscale (L), 1-bit or RGB image (a mask's "
                         f"transparency is not read): {fix}", cli=f"--mask has mode {mask.mode}; give a grayscale, "
                         f"1-bit or RGB image (a mask's transparency is not read): {fix}")
    return mask if mask.mode == "L" else mask.convert("L")


def check_mask(mask: Any, image: Any) -> Any:
    """The mask as a grayscale PIL image, refused unless it has the init image's size."""
    m = mask_to_pil(mask)
    if m.size != image_size(image):
        (w, h), (iw, ih) = m.size, image_size(image)
        raise InputError(f"mask_image is {w}x{h} but the image is {iw}x{ih}: give a mask of the image's size",
                         cli=f"--mask is {w}x{h} but --init-image is {iw}x{ih}: give a mask of the image's size")
    return m


def resize_mask(mask_l: Any, height: int, width: int) -> Any:
    """The grayscale mask at the output size, resized as VaeImageProcessor does (Lanczos)."""
    from PIL import Image

    return mask_l if mask_l.size == (width, height) else mask_l.resize((width, height), resample=Image.Resampling.LANCZOS)


def binarize(mask_l: Any) -> np.ndarray:
    """[H, W] float32 of 0 and 1: diffusers' mask at pixel size (1 = repaint)."""
    m = np.asarray(mask_l, dtype=np.float32) / 255.0
    return (m >= 0.5).astype(np.float32)


def latent_mask(mask_px: np.ndarray, factor: int, batch: int, channels: int = 1) -> np.ndarray:
    """[B, channels, h, w]: one channel, torch's nearest interpolation to 1/factor of the size (pixel factor*i
    of row i); factor^2 channels, each latent pixel's factor x factor pixels, channel dy * factor + dx
    (FluxFillPipeline's ``mask.view(B, h, f, w, f).permute(0, 2, 4, 1, 3)``)."""
    if channels == factor * factor and channels != 1:
        h, w = mask_px.shape[0] // factor, mask_px.shape[1] // factor
        cells = mask_px[:h * factor, :w * factor].reshape(h, factor, w, factor).transpose(1, 3, 0, 2)
        return np.ascontiguousarray(np.broadcast_to(cells.reshape(channels, h, w), (batch, channels, h, w)))
    if channels != 1:
        raise ArtifactError(f"the inpainting denoiser takes a mask of {channels} channels, neither one nor "
                            f"{factor * factor} (each latent pixel's pixels); re-export the model with `sdrt export`")
    return np.ascontiguousarray(np.broadcast_to(mask_px[::factor, ::factor], (batch, 1, *mask_px[::factor, ::factor].shape)))


def blend_table(plan: samplers.SamplerPlan) -> np.ndarray:
    """[steps, 2]: the "blend" step graph's BLEND_COLUMNS, (ka, kn) that noise the image latents to the next
    step's level (``SamplerPlan.renoise_table``)."""
    return plan.renoise_table()


def paste_back(image: Any, init: Any, mask_l: Any, blur: float) -> Any:
    """diffusers' ``apply_overlay``: ``init``'s pixels where the (blurred) mask is black, over ``image``."""
    from PIL import Image, ImageFilter, ImageOps

    if blur:
        mask_l = mask_l.filter(ImageFilter.GaussianBlur(blur))
    width, height = init.width, init.height
    init_masked = Image.new("RGBa", (width, height))
    init_masked.paste(init.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_l.convert("L")))
    init_masked = init_masked.convert("RGBA")
    out = image.convert("RGBA")
    out.alpha_composite(init_masked)
    return out.convert("RGB")


def paste_back_all(images: list[Any], init: np.ndarray, mask_l: Any, blur: float) -> list[Any]:
    """``paste_back`` over each image of a call: ``init`` is the uint8 [1, H, W, 3] init image, ``mask_l`` the
    call's mask (resized to the images' size here)."""
    from PIL import Image

    original = Image.fromarray(init[0])
    mask = resize_mask(mask_l, original.height, original.width)
    return [paste_back(im, original, mask, blur) for im in images]


def check_paste_back(blur: Any) -> float | None:
    if blur is None:
        return None
    if isinstance(blur, bool) or not isinstance(blur, (int, float, np.integer, np.floating)) or not 0 <= blur <= 256:
        raise InputError(f"paste_back must be None or a mask blur radius from 0 to 256 pixels, got {blur!r}",
                         cli=f"--paste-back must be a mask blur radius from 0 to 256 pixels, got {blur!r}")
    return float(blur)
