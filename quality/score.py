"""Read a picture back: which shape, colour, position and background does it show?

Exact rules on the data set's own geometry (``shapes.py``), no learned classifier:

- background: the median of the picture's border, nearest named background;
- the shape's pixels: those far from that background colour (half way to the most distant colour), and of
  them the largest 4-connected region;
- colour: the median of the region's core pixels, nearest named colour;
- position: the region's centroid, nearest anchor of the named positions;
- shape and size: each shape is drawn at the region's centroid in a range of sizes, and the one whose
  coverage is closest (L1) to the region's wins (its size says whether the shape is large: the LoRA's variant).

Its ceiling (the share it reads right on pictures drawn by ``shapes.render`` that training never saw) is
measured by ``ceiling()`` and stated in the documentation; a generated picture can only score lower.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import shapes

ATTRIBUTES = ("shape", "colour", "position", "background")
MIN_CONTRAST = 40.0  # RGB distance under which nothing stands out from the background
_MIN_PIXELS = 12  # a region smaller than this is not a shape
_HALVES = np.linspace(0.12, 0.32, 21)  # sizes tried when matching a shape (fraction of the side)


@dataclass(frozen=True)
class Reading:
    """What a picture shows; an attribute is None where no shape stands out."""

    shape: str | None
    colour: str | None
    position: str | None
    background: str
    half: float | None = None  # half the shape's extent, a fraction of the side

    @property
    def large(self) -> bool:
        """Larger than any shape the base model was trained on (the LoRA's variant)."""
        return self.half is not None and self.half > shapes.LARGE

    def attributes(self) -> dict[str, str | None]:
        return {"shape": self.shape, "colour": self.colour, "position": self.position,
                "background": self.background}

    def describe(self) -> str:
        if self.shape is None:
            return f"no shape on a {self.background} background"
        caption = shapes.Scene(self.shape, str(self.colour), str(self.position), self.background).caption
        return caption + (" (large)" if self.large else "")


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    d = np.linalg.norm(np.array([table[n] for n in names], np.float32) - rgb, axis=1)
    return names[int(np.argmin(d))]


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask`` (a breadth-first fill; pictures are 64 x 64)."""
    h, w = mask.shape
    label = np.zeros(mask.shape, np.int32)
    best, best_size, n = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        n += 1
        label[y0, x0] = n
        size, queue = 0, deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            size += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not label[yy, xx]:
                    label[yy, xx] = n
                    queue.append((yy, xx))
        if size > best_size:
            best, best_size = n, size
    return label == best if best else np.zeros_like(mask)


def _as_picture(image: np.ndarray | Image.Image) -> np.ndarray:
    """float32 (64, 64, 3) in 0..255; other sizes are resampled to the data set's."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.convert("RGB")
    if img.size != (shapes.SIZE, shapes.SIZE):
        img = img.resize((shapes.SIZE, shapes.SIZE), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32)


_SUB = 4  # sub-samples per pixel side when drawing a candidate shape
_WIN = 44  # pixels per side of the window a candidate is drawn in (the largest candidate is 41 wide)
_OFFSETS = (np.arange(_WIN * _SUB, dtype=np.float32) + 0.5) / _SUB


def _coverage(shape: str, cx: float, cy: float, half: float, x0: int, y0: int) -> np.ndarray:
    """Coverage of ``shape`` per pixel of the window at (x0, y0), from 4 x 4 sub-samples: the geometry of
    ``shapes.shape_polygon``."""
    x = (x0 + _OFFSETS - cx)[None, :]
    y = (y0 + _OFFSETS - cy)[:, None]
    if shape == "circle":
        inside = x * x + y * y <= half * half
    elif shape == "square":
        inside = (np.abs(x) <= 0.9 * half) & (np.abs(y) <= 0.9 * half)
    else:  # triangle: apex at (0, -half), base at y = +half, half-width (y + half) / 2
        inside = (y >= -half) & (y <= half) & (np.abs(x) <= (y + half) / 2)
    return inside.reshape(_WIN, _SUB, _WIN, _SUB).mean(axis=(1, 3), dtype=np.float32)


def _shape_of(cover: np.ndarray, cx: float, cy: float) -> tuple[str, float]:
    """The shape (and its half extent, a fraction of the side) whose drawing, centred (by area) where the
    region is, best matches its coverage."""
    n = shapes.SIZE
    x0 = int(np.clip(round(cx) - _WIN // 2, 0, n - _WIN))
    y0 = int(np.clip(round(cy) - _WIN // 2, 0, n - _WIN))
    window = cover[y0: y0 + _WIN, x0: x0 + _WIN]
    outside = float(cover.sum() - window.sum())  # coverage no candidate can explain
    best, best_err = (shapes.SHAPES[0], 0.0), np.inf
    for shape in shapes.SHAPES:
        for half in _HALVES * n:
            # a triangle's centroid sits a third of its half extent below its box's centre
            oy = half / 3 if shape == "triangle" else 0.0
            err = outside + float(np.abs(_coverage(shape, cx, cy - oy, half, x0, y0) - window).sum())
            if err < best_err:
                best, best_err = (shape, float(half / n)), err
    return best


def read(image: np.ndarray | Image.Image) -> Reading:
    """What ``image`` (uint8 H x W x 3, or a PIL image) shows."""
    px = _as_picture(image)
    border = np.concatenate([px[:2].reshape(-1, 3), px[-2:].reshape(-1, 3), px[:, :2].reshape(-1, 3),
                             px[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = _nearest(bg, shapes.BACKGROUNDS)
    dist = np.linalg.norm(px - bg, axis=2)
    far = float(np.percentile(dist, 99.5))
    if far < MIN_CONTRAST:
        return Reading(None, None, None, background)
    region = _largest_region(dist > far / 2)
    if region.sum() < _MIN_PIXELS:
        return Reading(None, None, None, background)
    core = region & (dist > 0.75 * far)
    colour = _nearest(np.median(px[core if core.any() else region], axis=0), shapes.COLOURS)
    fg = np.array(shapes.COLOURS[colour], np.float32)
    # coverage: how far each pixel is from the background towards the shape's colour (0..1), in the region's box
    span = max(float(np.linalg.norm(fg - bg)), 1.0)
    cover = np.clip(((px - bg) @ (fg - bg)) / span**2, 0.0, 1.0)
    ys, xs = np.nonzero(region)
    keep = np.zeros_like(region)
    keep[max(ys.min() - 2, 0): ys.max() + 3, max(xs.min() - 2, 0): xs.max() + 3] = True
    cover = np.where(keep, cover, 0.0).astype(np.float32)
    total = float(cover.sum())
    if total < _MIN_PIXELS / 4:  # the region is not of its median's colour at all (noise, a blend)
        return Reading(None, None, None, background)
    yy, xx = np.mgrid[0: shapes.SIZE, 0: shapes.SIZE] + 0.5
    cx, cy = float((cover * xx).sum() / total), float((cover * yy).sum() / total)
    anchors = {name: (ax * shapes.SIZE, ay * shapes.SIZE) for name, (ax, ay) in shapes.POSITIONS.items()}
    position = min(anchors, key=lambda k: (anchors[k][0] - cx) ** 2 + (anchors[k][1] - cy) ** 2)
    shape, half = _shape_of(cover, cx, cy)
    return Reading(shape, colour, position, background, half)
