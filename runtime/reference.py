"""Editing with a reference image (FLUX.1 Kontext, as diffusers' ``FluxKontextPipeline`` runs it): the image to
edit conditions the denoiser at every step beside the text, and generation starts from noise.

A denoiser whose graph has a ``reference_latents`` input takes one (FLUX.1 Kontext's transformer appends the
reference's packed latents to the image tokens on the sequence axis, with position ids of their own, and cuts
its output back to the generated tokens). The reference is resized to the size the family picks
(``Family.reference_size``: for FLUX.1, Kontext's preferred resolution nearest its aspect ratio, diffusers'
``_auto_resize``; or its own size rounded down to whole patches) and encoded by the export's VAE encoder on the
device (the latent distribution's mean, as FluxKontextPipeline's ``sample_mode="argmax"``), once per call.

Inpainting on an editing model (diffusers' ``FluxKontextInpaintPipeline``): ``image=`` and ``mask_image=`` as any
inpainting by blending (runtime/inpaint_stage.py: the unmasked region put back after every step, re-noised to the
next step's level), with the reference tokens beside the image's; the reference is ``reference_image=`` where given
(diffusers' ``image_reference``), else the image to inpaint itself. The image is sized as a reference is (the
call's ``reference_resize``), and that is the output's size, unless height and width are asked. With
``padding_mask_crop`` (``crop_pixels``) the box around the mask is cut from the image once sized, and from the
reference once sized, each then resized back to its size: the output is the box's picture, not pasted back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .device_graphs import DeviceGraphs
from .engine import Array, Backend, Engine
from .errors import ArtifactError, InputError
from .families import Family
from .images import to_uint8
from .inpaint import crop_region, image_size, resize_fill

REFERENCE_INPUT = "reference_latents"


def takes_reference(engines: dict[str, Engine]) -> bool:
    """The denoiser takes a reference image's latents (FLUX.1 Kontext)."""
    return REFERENCE_INPUT in engines["unet"].inputs


def check(folder: Path, engines: dict[str, Engine], req: Any) -> None:
    """A call's reference arguments (a ``GenerationRequest``) against the export, before any work."""
    ref, edits = req.reference_image, takes_reference(engines)
    if not isinstance(req.reference_resize, bool):
        raise InputError(f"reference_resize must be True or False, got {req.reference_resize!r}")
    if ref is None and edits and req.image is None:
        raise InputError(f"{folder} is an editing model (FLUX.1 Kontext): pass reference_image=, the image to edit "
                         "(or image= and mask_image= to inpaint)",
                         cli=f"{folder} is an editing model (FLUX.1 Kontext): pass --reference IMG, the image to "
                             "edit (or --init-image and --mask to inpaint)")
    if ref is not None and not edits:
        raise InputError(f"reference_image conditions an editing model (FLUX.1 Kontext); {folder} takes none: leave "
                         "it out (to start from an image, pass image= for img2img)",
                         cli=f"--reference conditions an editing model (FLUX.1 Kontext); {folder} takes none: leave "
                             "it out (to start from an image, pass --init-image)")
    if edits and req.image is not None and req.mask_image is None:
        raise InputError("an editing model (FLUX.1 Kontext) starts from noise, as FluxKontextPipeline: pass the "
                         "image to edit as reference_image= and leave image= out, or add mask_image= to inpaint "
                         "image= (white = repaint)",
                         cli="an editing model (FLUX.1 Kontext) starts from noise: pass the image to edit as "
                             "--reference and leave --init-image out, or add --mask to inpaint --init-image")
    if edits and "vae_encoder" not in engines:
        raise ArtifactError(f"{folder} has no VAE encoder, which encodes the reference image; re-export the model "
                            "with `sdrt export`")


def inpaints(engines: dict[str, Engine], mask_image: Any) -> bool:
    """Inpainting on an editing model (FluxKontextInpaintPipeline): a mask, on a denoiser that takes a reference."""
    return mask_image is not None and takes_reference(engines)


def pixels(image: Any, family: Family, multiple: int, resize: bool, max_size: int,
           name: str = "reference_image", min_size: int | None = None) -> np.ndarray:
    """The reference as uint8 [1, H, W, 3] at the size the family picks (``resize`` False: its own size rounded
    down to a multiple of ``multiple``), Lanczos as diffusers' image processor; refused outside ``min_size``
    (default ``multiple``) to ``max_size`` pixels a side. ``name``: the argument it came from, for the message."""
    w, h = image_size(image)
    rw, rh = family.reference_size(w, h, multiple, resize)
    low = multiple if min_size is None else min_size
    if not (low <= rw <= max_size and low <= rh <= max_size):
        flag = {"reference_image": "--reference", "image": "--init-image"}.get(name, name)
        what = f"{w}x{h}, {rw}x{rh} once sized for the model: each side must be {low} to {max_size} pixels"
        raise InputError(f"{name} is {what}", cli=f"{flag} is {what}")
    return to_uint8(image, rh, rw, multiple)


def inpaint_pixels(image: Any, family: Family, limits: Any, resize: bool, height: int | None, width: int | None,
                   vae_factor: int) -> np.ndarray:
    """The image to inpaint on an editing model, uint8 [1, H, W, 3]: sized as a reference is, the output's size
    (FluxKontextInpaintPipeline sizes ``image`` as it sizes ``image_reference`` and paints at that size), or
    resized to the height and width asked, as any inpainting (``limits``: the export's ``ShapeLimits``)."""
    if height is None and width is None:
        return pixels(image, family, limits.multiple_of, resize, limits.max_size, name="image",
                      min_size=limits.min_size)
    return to_uint8(image, height, width, vae_factor)


def crop_pixels(init: np.ndarray, mask_l: Any, ref: np.ndarray | None,
                pad: int) -> tuple[np.ndarray, np.ndarray, Any]:
    """``padding_mask_crop`` on an editing model, as FluxKontextInpaintPipeline: (the image, the reference, the
    mask) cut to the box around the mask (``crop_region``, on the mask at its own size, widened to the sized
    image's aspect ratio) and each resized back to its size by ``resize_fill``. ``init`` and ``ref`` are uint8
    [1, H, W, 3], already sized (``inpaint_pixels``, ``pixels``); the reference is the cut image itself where
    ``ref`` is None. diffusers takes the box from the mask as given and cuts it from the images once sized: where
    sizing changed the image's size (a side rounded down to whole patches, the preferred resolution), the box is
    taken in the mask's pixels all the same, as diffusers does. diffusers pastes nothing back: the output is the
    box's picture at the sized image's size."""
    from PIL import Image

    h, w = int(init.shape[1]), int(init.shape[2])
    box = crop_region(mask_l, w, h, pad)

    def cut(px: np.ndarray) -> np.ndarray:
        im = Image.fromarray(px[0]).crop(box)  # PIL pads a box beyond the image with black, as diffusers' crop
        return np.asarray(resize_fill(im, int(px.shape[2]), int(px.shape[1])), dtype=np.uint8)[None]

    image = cut(init)
    return image, image if ref is None else cut(ref), resize_fill(mask_l.crop(box), w, h)


def latent(backend: Backend, engines: dict[str, Engine], image: np.ndarray) -> Array:
    """The VAE encoder's own latents of a uint8 [1, H, W, 3] image, on the device (its output dtype)."""
    return engines["vae_encoder"]({"image": backend.to_device(image)})["latent"]


def encode(backend: Backend, engines: dict[str, Engine], graphs: DeviceGraphs, dtype: np.dtype[Any],
           image: np.ndarray, encoded: Array | None = None) -> Array:
    """The reference's latents [1, C, H/8, W/8] on the device, in the denoiser's dtype; ``encoded``: the encoder's
    latents of ``image`` already made (the image to inpaint that is its own reference), not encoded again."""
    lat = latent(backend, engines, image) if encoded is None else encoded
    src = backend.meta(lat)[0]
    return lat if src == dtype else graphs.cast(src, dtype)({"latents": lat})["latents_cast"]
