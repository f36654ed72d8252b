"""Calls that start from an image, on the device: img2img's noised image latents; inpainting's mask checks,
starting latents and mask state, and the step graph's extra inputs (the host math lives in runtime/inpaint.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from . import inpaint, samplers
from .device_graphs import DeviceGraphs
from .engine import Array, Backend, Engine
from .errors import ArtifactError, InputError
from .images import to_uint8
from .noise import draw, seeds
from .results import Latents


def mode_of(engines: dict[str, Engine], latent_channels: int, mask_channels: int = 1) -> str:
    """``concat`` (an inpainting denoiser: a 9-channel UNet, FLUX.1 Fill; ``mask_channels``: the family's
    ``concat_mask_channels``), else the blend mode any UNet can inpaint with."""
    return inpaint.inpaint_mode(int(engines["unet"].inputs["sample"].shape[1] or 0), latent_channels, mask_channels)


def check_mask(folder: Path, engines: dict[str, Engine], mode: str, image: Any, mask_image: Any) -> Any:
    """The mask as a grayscale PIL image, checked against the image and the export, before any work."""
    if image is None:
        raise InputError("mask_image needs the image to inpaint: pass image=... (white in the mask = repaint)",
                         cli="--mask needs the image to inpaint: pass --init-image")
    if mode == "concat" and inpaint.MASKED_ENCODER not in engines:
        raise ArtifactError(f"{folder} is an inpainting model but has no {inpaint.MASKED_ENCODER}; "
                            "re-export the model with this sdrt version (`sdrt export`)")
    return inpaint.check_mask(mask_image, image)


def noised(graph: Engine, backend: Backend, enc_lat: Array, noise: Array, coeffs: Any) -> Array:
    """``ka image + kn noise`` in the UNet's dtype by the noising graph, the encoded image broadcast over
    the noise's rows; ``coeffs`` = (ka, kn)."""
    feeds = {"image_latents": enc_lat, "noise": noise, "coeffs": backend.to_device(np.asarray(coeffs, np.float32))}
    return graph(feeds)["latents"]


def noise_graph(graphs: DeviceGraphs, backend: Backend, enc_lat: Array, dtype: np.dtype[Any]) -> Engine:
    """The noising graph for the encoder's latents (one row: the one init image, broadcast over the batch)."""
    return graphs.noise(backend.meta(enc_lat)[0], dtype)


def img2img_latents(backend: Backend, engines: dict[str, Engine], graphs: DeviceGraphs, dtype: np.dtype[Any],
                    init: np.ndarray, noise: np.ndarray, plan: samplers.SamplerPlan) -> Array:
    """img2img's starting latents: the init image encoded and noised to the plan's first step, on the device."""
    enc_lat = engines["vae_encoder"]({"image": backend.to_device(init)})["latent"]
    graph = noise_graph(graphs, backend, enc_lat, dtype)
    return noised(graph, backend, enc_lat, backend.to_device(np.ascontiguousarray(noise, np.float32)),
                  plan.noise_coeffs)


def prepare(backend: Backend, engines: dict[str, Engine], graphs: DeviceGraphs, dtype: np.dtype[Any],
            vae_scale_factor: int, mode: str, plan: samplers.SamplerPlan, height: int, width: int, b: int,
            gens: list[np.random.Generator], seed: Any, noise: np.ndarray, init: np.ndarray, mask_l: Any,
            pure_noise: bool, encoded: Array | None = None) -> Latents:
    """Inpainting's starting latents and mask state, the encoders' latents kept on the device: the noising
    graph puts the image at the first step's level and, at level 0, gives the blend its image latents. A
    9-channel UNet at strength 1 starts from noise alone: its image latents are not encoded (diffusers'
    ``prepare_latents`` neither). ``encoded``: the VAE encoder's latents of ``init`` already made (an editing
    model's image that is its own reference), used rather than encoding it again."""
    be, dt = backend, dtype
    mask_px = inpaint.binarize(inpaint.resize_mask(mask_l, height, width))
    # the mask's channels: one, or an inpainting denoiser's own (its input channels less twice the latents')
    channels = int(engines["unet"].inputs["sample"].shape[1] or 0) - 2 * noise.shape[1] if mode == "concat" else 1
    lmask = inpaint.latent_mask(mask_px, vae_scale_factor, b, channels)
    step_noise = draw(gens, (plan.steps, *noise.shape), axis=1) if plan.needs_noise else None
    image = be.to_device(init)
    enc_lat = None if mode == "concat" and pure_noise \
        else encoded if encoded is not None else engines["vae_encoder"]({"image": image})["latent"]
    masked = None
    if mode == "concat":
        feeds = {"image": image, "mask": be.to_device(mask_px.astype(np.uint8)[None, :, :, None])}
        masked = engines[inpaint.MASKED_ENCODER](feeds)["latent"]
    x = None
    if pure_noise:
        x = be.to_device((noise.astype(np.float64) * plan.init_noise_sigma).astype(np.float32).astype(dt))
    state = inpaint.InpaintState(mode, lmask, masked_latents=masked)
    if enc_lat is not None:
        graph = noise_graph(graphs, be, enc_lat, dt)
        noise_dev = be.to_device(np.ascontiguousarray(noise, np.float32))
        if x is None:
            x = noised(graph, be, enc_lat, noise_dev, plan.noise_coeffs)
        if mode == "blend":  # the image latents themselves: noise level 0 (ka 1, kn 0) is exact
            state = replace(state, image_latents=noised(graph, be, enc_lat, noise_dev, (1.0, 0.0)),
                            noise=noise_dev if dt == np.float32 else be.to_device(noise.astype(dt)))
    assert x is not None  # pure noise, or an encoded image to noise
    return Latents(x, height, width, 0, None, step_noise, seeds(seed), inpaint=state)


def loop_inputs(backend: Backend, graphs: DeviceGraphs, state: inpaint.InpaintState, plan: samplers.SamplerPlan,
                guided: bool, dt: np.dtype[Any]) -> tuple[dict[str, Array], np.ndarray]:
    """(the inpainting step graph's extra inputs on the device, its coeffs table). Only the mask is uploaded;
    a 9-channel UNet's [mask, masked latents] block is assembled by the extra-channels graph."""
    be = backend
    mask = be.to_device(state.mask.astype(dt))
    if state.mode == "blend":
        feeds = {"mask": mask, "image_latents": state.image_latents, "init_noise": state.noise}
        return feeds, np.hstack([plan.table, inpaint.blend_table(plan)])
    src, _ = be.meta(state.masked_latents)
    extra = graphs.extra(guided, src, dt, state.mask.shape[1])({"mask": mask, "masked_latents": state.masked_latents})
    return {"unet_extra": extra["unet_extra"]}, plan.table


def check_call(folder: Path, engines: dict[str, Engine], mode: str,
               req: Any) -> tuple[Any, float | None, int | None]:
    """A whole call's inpainting arguments (a ``GenerationRequest``), checked against the export before any
    work: (the mask or None, the paste-back blur radius or None, the ``padding_mask_crop`` or None)."""
    pad = check_crop(req.padding_mask_crop, req.mask_image is not None, req.output)
    mask = None if req.mask_image is None else check_mask(folder, engines, mode, req.image, req.mask_image)
    check_crop_mask(pad, mask)
    if req.guidance_rescale and (mask is not None or mode == "concat"):
        raise InputError("guidance_rescale with inpainting is not supported: leave guidance_rescale at 0",
                         cli="--guidance-rescale with inpainting is not supported: leave it out")
    blur = inpaint.check_paste_back(req.paste_back)
    if blur is not None and (mask is None or req.output != "images"):
        raise InputError("paste_back applies to inpainting images: pass mask_image=, or leave paste_back out",
                         cli="--paste-back applies to inpainting: pass --mask, or leave --paste-back out")
    if mask is None and mode == "concat":
        raise InputError(f"{folder} is an inpainting model (its denoiser takes a mask): pass image= and "
                         "mask_image= (white = repaint)",
                         cli=f"{folder} is an inpainting model: pass --init-image and --mask")
    return mask, blur, pad


def check_crop(padding_mask_crop: Any, masked: bool, output: str = "images") -> int | None:
    """``padding_mask_crop`` checked before any work: None, or the padding, refused without a mask (``masked``) or
    with an output other than images."""
    pad = inpaint.check_padding_mask_crop(padding_mask_crop)
    if pad is not None and (not masked or output != "images"):
        raise InputError("padding_mask_crop inpaints the mask's region and pastes it back into the image: pass "
                         "image= and mask_image= with output='images', or leave padding_mask_crop out",
                         cli="--padding-mask-crop applies to inpainting images: pass --init-image and --mask, or "
                             "leave --padding-mask-crop out")
    return pad


def check_crop_mask(pad: int | None, mask_l: Any) -> None:
    """A mask with a non-black pixel where ``padding_mask_crop`` is given (its box is cut around them)."""
    if pad is not None and inpaint.mask_box(mask_l) is None:
        raise InputError("padding_mask_crop crops around the mask's white region, but mask_image is all black: "
                         "paint the region to repaint white, or leave padding_mask_crop out",
                         cli="--padding-mask-crop crops around the white region of --mask, but the mask is all "
                             "black: paint the region to repaint white, or leave --padding-mask-crop out")


def mask_crop(image: Any, mask_l: Any, height: int | None, width: int | None, multiple: int,
              pad: int) -> inpaint.MaskCrop:
    """``padding_mask_crop``'s inputs: the image and mask cut around the mask and resized to the call's size
    (the size asked, else the image's own, each rounded down to ``multiple``, as img2img's)."""
    original = to_uint8(image, None, None, 1)  # the image as given, checked: it is pasted back at its own size
    w, h = width or original.shape[2], height or original.shape[1]
    w, h = w - w % multiple, h - h % multiple
    if w <= 0 or h <= 0:
        raise InputError(f"image is {original.shape[2]}x{original.shape[1]}: inpainting needs at least "
                         f"{multiple}x{multiple} pixels")
    # an image with transparency is cut and resized before it loses its alpha, as diffusers (inpaint.mask_crop)
    keep = not isinstance(image, np.ndarray) and inpaint.has_transparency(image)
    return inpaint.mask_crop(image if keep else original[0], mask_l, int(h), int(w), pad)
