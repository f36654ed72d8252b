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


# -- padding_mask_crop: inpaint only the masked region, at the output's full size --------------------------
# diffusers' ``padding_mask_crop``: a box around the mask (``crop_region``), padded and widened to the output's
# aspect ratio, is cut from the image and the mask and resized to the output size (``resize_fill``); the
# generated picture is resized back into the box and pasted through the mask over the original (``overlay``).


def check_padding_mask_crop(pad: Any) -> int | None:
    """None, or a padding in pixels from 0 to 4096 (a whole number)."""
    if pad is None:
        return None
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or not 0 <= pad <= 4096:
        raise InputError(f"padding_mask_crop must be None or a whole number of pixels from 0 to 4096 (the margin "
                         f"kept around the mask's box; 32 is usual), got {pad!r}",
                         cli=f"--padding-mask-crop must be a whole number of pixels from 0 to 4096 (32 is usual), "
                             f"got {pad!r}")
    return int(pad)


def mask_box(mask_l: Any) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2): the smallest box holding every non-black pixel of the mask, None for an all-black one."""
    m = np.asarray(mask_l.convert("L")) != 0
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    if not len(cols):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_region(mask_l: Any, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """diffusers' ``VaeImageProcessor.get_crop_region``: the mask's box grown by ``pad`` (within the image), then
    widened (or heightened) about its centre to the ``width`` : ``height`` aspect ratio, moved back inside the
    image where it spills over. (x1, y1, x2, y2); the mask must hold a non-black pixel (``mask_box``)."""
    box = mask_box(mask_l)
    assert box is not None  # refused before the call (inpaint_stage.check_call)
    w, h = mask_l.size
    x1, y1, x2, y2 = max(box[0] - pad, 0), max(box[1] - pad, 0), min(box[2] + pad, w), min(box[3] + pad, h)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _widen(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), h)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), w)
    return x1, y1, x2, y2


def _widen(lo: int, hi: int, diff: int, size: int) -> tuple[int, int]:
    """One side of ``crop_region``: [lo, hi) grown by ``diff`` about its centre, moved back inside [0, size)."""
    lo, hi = lo - diff // 2, hi + diff - diff // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def resize_fill(image: Any, width: int, height: int, mode: str | None = None) -> Any:
    """diffusers' ``resize_mode="fill"``: resized (Lanczos) to fit inside width x height keeping its aspect
    ratio, centred, the bands left over filled by stretching its edge rows (or columns) with PIL's default
    resampling, as diffusers. ``mode``: the result's (default: the image's); pasted into an RGB result, an image
    with transparency loses it after the resize, as in diffusers' RGB canvas."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out = Image.new(mode or image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return out


def resize_crop(image: Any, width: int, height: int) -> Any:
    """diffusers' ``resize_mode="crop"``: resized (Lanczos) to cover width x height keeping its aspect ratio,
    centred, the excess cut off."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


@dataclass(frozen=True)
class MaskCrop:
    """A call that inpaints only the mask's region (``padding_mask_crop``): ``box`` (x1, y1, x2, y2) in the
    original, the ``original`` image (RGB, or as given where it has transparency) and ``mask`` (grayscale) at
    their own size, and what the call generates from: ``init`` uint8 [1, H, W, 3] and ``crop_mask`` (grayscale)
    at the output size."""

    box: tuple[int, int, int, int]
    original: Any = field(repr=False)
    mask: Any = field(repr=False)
    init: np.ndarray = field(repr=False)
    crop_mask: Any = field(repr=False)


def has_transparency(image: Any) -> bool:
    """A PIL image with an alpha channel or a transparent colour (Pillow's ``has_transparency_data``, which
    Pillow 9 lacks)."""
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def mask_crop(image: Any, mask_l: Any, height: int, width: int, pad: int) -> MaskCrop:
    """The image and mask cut to ``crop_region`` and resized to height x width by ``resize_fill`` (diffusers'
    ``preprocess(..., crops_coords=box, resize_mode="fill")``). An image with transparency is cut and resized as
    given (PIL resizes it with its colours weighted by their alpha) and loses its alpha only then, and it is pasted
    back with its alpha (``overlay``), as diffusers does it; any other image is converted to RGB first."""
    from PIL import Image

    original = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    if not has_transparency(original):
        original = original.convert("RGB")
    box = crop_region(mask_l, width, height, pad)
    init = np.asarray(resize_fill(original.crop(box), width, height, "RGB"), dtype=np.uint8)[None]
    return MaskCrop(box, original, mask_l, init, resize_fill(mask_l.crop(box), width, height))


def overlay(image: Any, crop: MaskCrop, blur: float | None) -> Any:
    """diffusers' ``apply_overlay`` with ``crop_coords``: the generated ``image`` resized into the box
    (``resize_crop``) on a transparent canvas of the original's size, the original's pixels where the mask (blurred
    by ``blur`` pixels, if given) is black composited over it (through the original's own alpha, if it has one)."""
    from PIL import Image

    x1, y1, x2, y2 = crop.box
    canvas = Image.new("RGBA", crop.original.size)
    canvas.paste(resize_crop(image, x2 - x1, y2 - y1), (x1, y1))
    return paste_back(canvas.convert("RGB"), crop.original, crop.mask, blur or 0)
