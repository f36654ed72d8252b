"""The shapes data set: one filled shape in a named colour, at a named position, on a named background,
with its caption in plain English ("a red circle at the top left on a white background").

Drawn by code from a seed (Pillow, 4x supersampled then reduced, so edges are anti-aliased): the same seed
gives the same pictures on every machine. The score (``score.py``) reads pictures back with the same
geometry, so this module is the single description of what the model was taught.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # pixels per side of a training picture
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 230),
    "yellow": (245, 215, 30),
    "orange": (245, 130, 20),
    "purple": (140, 50, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
# Anchor of each position, as a fraction of the side (x, y); the shape's centre is jittered around it.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
HALF_SIZES = (0.16, 0.17, 0.18, 0.19)  # half the shape's extent, as a fraction of the side
# the variant the LoRA is trained on: the same captions, every shape larger than the base ever saw
LARGE_HALF_SIZES = (0.25, 0.26, 0.27, 0.28)
LARGE = 0.22  # a shape whose half extent is over this is read as large  # half the shape's extent, as a fraction of the side
JITTER = 0.03  # position jitter, a fraction of the side
_SUPER = 4


@dataclass(frozen=True)
class Scene:
    """What one picture shows. ``caption`` is its prompt."""

    shape: str
    colour: str
    position: str
    background: str
    half: float = 0.175  # half extent, fraction of the side
    dx: float = 0.0  # offset from the position's anchor, fraction of the side
    dy: float = 0.0

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} {where} on a {self.background} background"

    @property
    def centre(self) -> tuple[float, float]:
        ax, ay = POSITIONS[self.position]
        return ax + self.dx, ay + self.dy

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "position": self.position,
                "background": self.background}


def shape_polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]] | None:
    """The outline of ``shape`` centred at (cx, cy) with half extent ``half`` (any unit); None for a circle,
    which is drawn as an ellipse in the box (cx - half, cy - half, cx + half, cy + half)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = half * 0.9
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # pointing up, as wide as it is tall
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    raise ValueError(f"unknown shape {shape!r}; the data set has {', '.join(SHAPES)}")


def shape_mask(shape: str, cx: float, cy: float, half: float, size: int = SIZE) -> np.ndarray:
    """Coverage (0..1, float32, size x size) of ``shape`` with centre and half extent in pixels."""
    big = Image.new("L", (size * _SUPER, size * _SUPER), 0)
    draw = ImageDraw.Draw(big)
    s = _SUPER
    poly = shape_polygon(shape, cx * s, cy * s, half * s)
    if poly is None:
        draw.ellipse((s * (cx - half), s * (cy - half), s * (cx + half), s * (cy + half)), fill=255)
    else:
        draw.polygon(poly, fill=255)
    small = big.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The picture of ``scene``: uint8 (size, size, 3)."""
    cx, cy = scene.centre
    cover = shape_mask(scene.shape, cx * size, cy * size, scene.half * size, size)[..., None]
    fg = np.array(COLOURS[scene.colour], np.float32)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    return np.clip(np.rint(bg + (fg - bg) * cover), 0, 255).astype(np.uint8)


def random_scene(rng: np.random.Generator, large: bool = False) -> Scene:
    """One scene, every attribute drawn uniformly (``large``: from the LoRA variant's sizes)."""
    halves = LARGE_HALF_SIZES if large else HALF_SIZES
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        position=list(POSITIONS)[rng.integers(len(POSITIONS))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        half=float(halves[rng.integers(len(halves))]),
        dx=float(rng.uniform(-JITTER, JITTER)),
        dy=float(rng.uniform(-JITTER, JITTER)),
    )


def scenes(seed: int, n: int, large: bool = False) -> list[Scene]:
    """``n`` scenes from ``seed`` (the same on every machine: numpy's PCG64)."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng, large) for _ in range(n)]


def batch(seed: int, n: int, size: int = SIZE, large: bool = False) -> tuple[np.ndarray, list[str]]:
    """``n`` pictures (uint8, n x size x size x 3) and their captions."""
    sc = scenes(seed, n, large)
    return np.stack([render(s, size) for s in sc]), [s.caption for s in sc]


def vocabulary() -> list[str]:
    """Every word a caption uses (the tokenizer learns these as whole tokens)."""
    words = {"a", "an", "at", "the", "in", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS}
    for p in POSITIONS:
        words.update(p.split())
    return sorted(words)


def parse(caption: str) -> Scene | None:
    """The scene a caption of this data set describes ("a red circle at the top left on a white background",
    any case, a final full stop allowed); None for any other text."""
    import re

    alt = "|".join
    m = re.fullmatch(
        rf"an? ({alt(COLOURS)}) ({alt(SHAPES)}) (?:at the ({alt(p for p in POSITIONS if p != 'center')})|in the "
        rf"(center)) on an? ({alt(BACKGROUNDS)}) background\.?", " ".join(caption.lower().split()))
    if m is None:
        return None
    colour, shape, pos, centre, background = m.groups()
    return Scene(shape, colour, pos or centre, background)
