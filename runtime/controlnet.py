"""ControlNet: the call's control inputs, checked before any engine runs, and the per-step scale table.

Semantics are diffusers' ``StableDiffusionControlNetPipeline`` / ``StableDiffusionXLControlNetPipeline``
(one ``ControlNetModel`` or a ``MultiControlNetModel``):

- a control image is resized to the call's width x height with Lanczos in PIL, then converted to RGB, as
  ``VaeImageProcessor(do_convert_rgb=True, do_normalize=False).preprocess`` does (in that order: a
  palette image is resized as its palette indices), *before* its /255. The resize happens on 8-bit
  pixels in both, so the exported graph, which divides the uint8 pixels by 255, sees exactly the floats
  diffusers feeds its ControlNet (k / 255 in float32);
- net j's scale at step i is ``control_scales[j] * keep[i][j]`` with diffusers' ``controlnet_keep``:
  ``keep = 0`` when ``i / steps < start[j]`` or ``(i + 1) / steps > end[j]``; the net still runs (its
  residuals are then multiplied by 0), so every step is the same computation;
- a Union ControlNet (FLUX.1's ``num_mode``) takes a control mode per call, an integer below its mode count
  (diffusers' ``control_mode``), given one per control image (``control_modes``);
- ``guess_mode``: each residual r of R gets ``logspace(-1, 0, R)[r]`` on top of the scale, and with
  classifier-free guidance the unconditional rows get scale 0 (diffusers runs the net on the
  conditional rows only and feeds zeros for the others: the same sums).

The table is [steps, nets, rows, R] float32, computed once per call; the loop uploads one [rows, R] row
per net per step, as it does the timestep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CompatibilityError, InputError

SCALE_MAX = 10.0  # far above any useful conditioning scale (0.5-1.5 is typical)
# PIL modes that convert to 8-bit RGB without losing the meaning of the pixels (16-bit and float images,
# depth maps say, would be clipped at 255: convert those yourself)
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV")
PREPROCESSORS = ("canny",)
RESAMPLE = "lanczos"  # VaeImageProcessor's default resample


@dataclass(frozen=True)
class ControlRequest:
    """The checked control inputs of one call: one entry per exported net (None: the net does not run)."""

    images: tuple[Any, ...]  # PIL images at their own size (modes convertible to RGB), or None
    scales: tuple[float, ...]
    start: tuple[float, ...]
    end: tuple[float, ...]
    guess_mode: bool
    modes: tuple[int | None, ...] = ()  # a Union net's control mode (None: a net without modes, or left out)

    @property
    def active(self) -> tuple[int, ...]:
        return tuple(j for j, im in enumerate(self.images) if im is not None)


def check_request(nets: Sequence[str], folder: Any, control_images: Any = None, control_scales: Any = None,
                  control_start: Any = None, control_end: Any = None, guess_mode: bool = False,
                  control_preprocess: Any = None, canny_low: float = 100, canny_high: float = 200,
                  control_modes: Any = None, num_modes: Sequence[int | None] = ()) -> ControlRequest | None:
    """The call's control keywords, checked against the export's ControlNets; None when no net runs.

    ``control_preprocess``: None, "canny", or a list of them, one per image (applied to the image at its
    own size, before the resize, as diffusers' examples run OpenCV's Canny). ``control_modes``: a Union net's mode,
    one per image (None for a net without modes); ``num_modes``: each net's mode count (None: it takes no mode)."""
    images = _as_list(control_images, "control_images")
    given = [im for im in images if im is not None] if images is not None else []
    if images is None or not given:
        for kw, v in (("control_scales", control_scales), ("control_start", control_start),
                      ("control_end", control_end), ("control_preprocess", control_preprocess),
                      ("control_modes", control_modes)):
            if v is not None:
                raise InputError(f"{kw} applies to control images: pass control_images=[...], or leave {kw} out",
                                 cli=f"{_cli(kw)} applies to control images: pass --control-image, or leave it out")
        if guess_mode:
            raise InputError("guess_mode needs a control image: pass control_images=[...], or leave guess_mode out",
                             cli="--guess-mode needs a control image: pass --control-image, or leave it out")
        return None
    if not nets:
        raise CompatibilityError(
            f"{folder} was exported without ControlNets, so control images cannot be used: re-export the model "
            "with its ControlNet(s) (`sdrt export ... --controlnet CONTROLNET`), or generate without control_images",
            cli=f"{folder} was exported without ControlNets, so --control-image cannot be used: re-export the model "
                "with `sdrt export ... --controlnet CONTROLNET`, or leave --control-image out")
    n = len(nets)
    if len(images) > n:
        raise InputError(f"{len(images)} control images for the {n} ControlNet(s) of this export ({', '.join(nets)}): "
                         "give at most one per net, in order (None leaves a net out)",
                         cli=f"{len(images)} --control-image for the {n} ControlNet(s) of this export "
                             f"({', '.join(nets)}): give at most one per net, in order")
    given_n = len(images)
    images = images + [None] * (n - len(images))
    prep = _per_net(control_preprocess, n, "control_preprocess", None, given_n)
    pil: list[Any] = []
    for j, im in enumerate(images):
        if im is None:
            pil.append(None)
            continue
        p = prep[j]
        if p is not None and p not in PREPROCESSORS:
            raise InputError(f"control_preprocess {p!r} is not one of {', '.join(PREPROCESSORS)} (or None)",
                             cli=f"--control-preprocess {p!r} is not one of {', '.join(PREPROCESSORS)}")
        img = check_image(im, j)
        if p == "canny":
            from .preprocess import canny

            img = canny(img.convert("RGB"), canny_low, canny_high)
        pil.append(img)
    scales = tuple(float(v) for v in _per_net(control_scales, n, "control_scales", 1.0, given_n))
    start = tuple(float(v) for v in _per_net(control_start, n, "control_start", 0.0, given_n))
    end = tuple(float(v) for v in _per_net(control_end, n, "control_end", 1.0, given_n))
    for j in range(n):
        if not 0.0 <= scales[j] <= SCALE_MAX:
            raise InputError(f"control_scales[{j}] is {scales[j]}: give a number from 0 to {SCALE_MAX:g} (1 is the "
                             "default; diffusers' controlnet_conditioning_scale)",
                             cli=f"--control-scale {scales[j]} (net {j}): give a number from 0 to {SCALE_MAX:g}")
        if not (0.0 <= start[j] < end[j] <= 1.0):
            raise InputError(f"the control window of net {j} is [{start[j]}, {end[j]}]: control_start and "
                             "control_end are fractions of the steps with 0 <= start < end <= 1",
                             cli=f"--control-start {start[j]} --control-end {end[j]} (net {j}): give fractions of "
                                 "the steps with 0 <= start < end <= 1")
    modes = _modes(control_modes, nets, images, list(num_modes) + [None] * (n - len(num_modes)), given_n)
    return ControlRequest(tuple(pil), scales, start, end, bool(guess_mode), modes)


def _modes(control_modes: Any, nets: Sequence[str], images: list[Any], counts: list[int | None],
           given: int) -> tuple[int | None, ...]:
    """Each net's control mode: an integer below its mode count for a Union net that runs, None otherwise (a single
    mode is each Union net's)."""
    if control_modes is not None and not isinstance(control_modes, (list, tuple)):
        if all(c is None for c in counts):
            raise InputError(f"control_modes is {control_modes!r}, but no ControlNet of this export takes a control "
                             "mode (none is a Union ControlNet): leave control_modes out",
                             cli="--control-mode: no ControlNet of this export takes a control mode (none is a Union "
                                 "ControlNet): leave it out")
        control_modes = [control_modes if c is not None else None for c in counts]
    per = _per_net(control_modes, len(nets), "control_modes", None, given)
    out: list[int | None] = []
    for j, (m, count) in enumerate(zip(per, counts, strict=True)):
        if count is None:
            if m is not None:
                raise InputError(f"control_modes[{j}] is {m!r}, but ControlNet {j} ({nets[j]}) takes no control mode "
                                 "(it is no Union ControlNet): give None for it",
                                 cli=f"--control-mode {m} (net {j}): {nets[j]} takes no control mode (it is no Union "
                                     "ControlNet): give none for it")
            out.append(None)
            continue
        if images[j] is None:
            out.append(None)
            continue
        if m is None:
            raise InputError(f"ControlNet {j} ({nets[j]}) is a Union ControlNet of {count} control modes: pass "
                             f"control_modes=[...] with its mode, 0 to {count - 1} (diffusers' control_mode)",
                             cli=f"ControlNet {j} ({nets[j]}) is a Union ControlNet of {count} control modes: pass "
                                 f"--control-mode with its mode, 0 to {count - 1}")
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 0 <= int(m) < count:
            raise InputError(f"control_modes[{j}] is {m!r}: ControlNet {j} ({nets[j]}) has {count} control modes, "
                             f"give an integer from 0 to {count - 1}",
                             cli=f"--control-mode {m} (net {j}): {nets[j]} has {count} control modes, give an "
                                 f"integer from 0 to {count - 1}")
        out.append(int(m))
    return tuple(out)


def _cli(kw: str) -> str:
    return {"control_scales": "--control-scale", "control_start": "--control-start", "control_end": "--control-end",
            "control_preprocess": "--control-preprocess", "control_modes": "--control-mode"}.get(
        kw, "--" + kw.replace("_", "-"))


def _as_list(v: Any, label: str) -> list[Any] | None:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return list(v)
    raise InputError(f"{label} must be a list with one entry per ControlNet (None leaves a net out), "
                     f"not {type(v).__name__}: e.g. {label}=[image]")


def _per_net(v: Any, n: int, label: str, default: Any, given: int) -> list[Any]:
    """One value per net: None (the default for each), a single value (for each), or a list with one per
    control image given (the nets after them: the default) or one per net."""
    if v is None:
        return [default] * n
    if not isinstance(v, (list, tuple)):
        v = [v] * n
    if len(v) not in (given, n):
        raise InputError(f"{label} has {len(v)} entries for the {given} control image(s) and {n} ControlNet(s) of "
                         "this export: give one per control image, in order",
                         cli=f"{_cli(label)} is given {len(v)} times for {given} --control-image: give it once per "
                             "--control-image, in order, once for all, or not at all")
    v = list(v) + [None] * (n - len(v))
    out = [default if x is None else x for x in v]
    if default is not None:
        for x in out:
            if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not np.isfinite(x):
                raise InputError(f"{label} must hold finite numbers, got {x!r}", cli=f"{_cli(label)} must be a "
                                 f"finite number, got {x!r}")
    return out


def check_image(image: Any, j: int = 0) -> Any:
    """A PIL image (of a mode that converts to 8-bit RGB) or a uint8 array [H, W] / [H, W, 3] -> a PIL image,
    its mode kept (diffusers resizes before it converts)."""
    from PIL import Image

    label = f"control_images[{j}]"
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise InputError(f"{label} array must be uint8 [H, W, 3] (RGB) or [H, W] (grayscale), got "
                             f"{image.dtype}{list(image.shape)}: convert it to 8-bit pixels first")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"{label} must be a PIL image or a uint8 [H, W, 3] array, not {type(image).__name__}")
    if image.mode not in IMAGE_MODES:
        raise InputError(f"{label} has mode {image.mode}, which does not convert to 8-bit RGB without clipping: "
                         "convert it to RGB or L (8 bits per channel) first",
                         cli=f"--control-image (net {j}) has mode {image.mode}, which does not convert to 8-bit RGB "
                             "without clipping: convert it to an 8-bit RGB or grayscale image first")
    if image.width < 1 or image.height < 1:
        raise InputError(f"{label} is empty ({image.width}x{image.height})")
    return image


def default_size(req: ControlRequest, multiple: int) -> tuple[int, int]:
    """(height, width) of a call that gives none: the first control image's, rounded down to ``multiple``
    (diffusers' ``get_default_height_width``)."""
    im = req.images[req.active[0]]
    return im.height - im.height % multiple, im.width - im.width % multiple


def pixels(image: Any, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] at the call's size: PIL's Lanczos on the 8-bit pixels, then RGB, as VaeImageProcessor's
    resize and convert_to_rgb (PIL's resize of an image to its own size changes nothing)."""
    from PIL import Image

    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def keep(steps: int, start: float, end: float) -> np.ndarray:
    """[steps] of 0/1: diffusers' ``controlnet_keep`` for one net (float division as in Python)."""
    return np.array([1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)])


def scale_table(req: ControlRequest, steps: int, rows: int, residuals: int, guided: bool) -> np.ndarray:
    """[steps, nets, rows, R] float32: what each residual of each net is multiplied by, per step and row.

    ``rows``: the UNet's rows (2B guided: the unconditional B first)."""
    n = len(req.images)
    out = np.zeros((steps, n, rows, residuals), np.float64)
    per_res = np.logspace(-1, 0, residuals) if req.guess_mode else np.ones(residuals)
    first = rows // 2 if req.guess_mode and guided else 0  # guess mode: the unconditional rows get zeros
    for j in range(n):
        if req.images[j] is None:
            continue
        s = req.scales[j] * keep(steps, req.start[j], req.end[j])  # [steps]
        out[:, j, first:, :] = s[:, None, None] * per_res[None, None, :]
    return out.astype(np.float32)


def residual_names(j: int, outputs: Sequence[str]) -> dict[str, str]:
    """ControlNet j's output name -> the ``unet_control`` input it feeds."""
    return {o: f"controlnet_{j}_{o}" for o in outputs}
