"""One generation request, checked once: ``GenerationRequest`` and the range checks with their messages.

``Pipeline.__call__``'s keywords build one (its friendly front); ``Pipeline.generate``, the base + refiner call,
``sdrt generate`` and the server's jobs take it. ``checked()`` does every check that needs no model (ranges,
types, the pairs of arguments that go together) before any work; the pipeline then checks what depends on its
export (sizes, the UNet's channels, the ControlNets).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .compel_syntax import parse_compel
from .errors import InputError
from .feature_cache import DEFAULT_INTERVAL, CachePolicy, cache_policy
from .layer_skip import SkipGuidance, skip_guidance
from .lora_adapters import check_loras
from .prompt_syntax import check_syntax, lora_tags, parse_attention, prompt_schedule

OUTPUTS = ("images", "latents")
SEED_MAX = 2**32 - 1  # seeds are 32-bit, as in the popular UIs, so any seed printed can be typed back
GUIDANCE_MAX = 100.0  # far above any useful scale (5-9 is typical); larger values only saturate the image
DEFAULT_STRENGTH = 0.8


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one call asks for, checked once (``checked()`` and the pipeline's checks) before any work.

    ``height``/``width``: None is the model's default size (img2img: the image's own size, rounded down to a
    multiple of 8). ``guidance_scale``: 0..100, where <= 1 turns guidance off. ``seed``: 0..2**32-1, or a list
    of them, one per image; None for a random one (returned in ``Result.seed``). ``batch_size``: images per
    prompt. ``negative_prompt``: one for every image, or one per prompt. ``strength``: img2img only, in (0, 1],
    default 0.8 (inpainting: 1, the masked region starts from noise). ``output="latents"``: return the final
    latents (``Result.latents``), not images. ``prompt_embeds`` and friends: precomputed embeddings (diffusers'
    names) instead of ``prompt``. ``mask_image`` (with ``image``): inpaint, white = repaint, as diffusers'
    inpainting pipelines. ``paste_back``: a mask blur radius in pixels (0: a hard edge); the original pixels
    outside the mask are pasted back over the output. ``padding_mask_crop`` (inpainting; diffusers' argument):
    inpaint only the mask's region at the full output size: the box around the mask's non-black pixels, grown by
    this many pixels and widened to the output's aspect ratio, is cut from the image and the mask, generated at
    ``height`` x ``width`` (default: the image's size) and pasted back into the original through the mask (through
    the mask blurred by ``paste_back``, if given): the images have the original image's size. ``guidance_rescale``: 0..1, diffusers' option (guided
    only). ``timestep_spacing``: overrides the scheduler configuration's. ``control_images``: one per ControlNet
    of the export, in order (PIL images or uint8 [H, W, 3] arrays; None leaves a net out), resized to the output
    size as diffusers' ControlNet pipelines do; ``control_scales`` (default 1 each), ``control_start`` /
    ``control_end`` (fractions of the steps, diffusers' ``control_guidance_start`` / ``_end``), ``guess_mode``
    and ``control_preprocess`` ("canny" per image, or None); ``control_modes``: a Union ControlNet's mode per image
    (FLUX.1's; diffusers' ``control_mode``). A control model (FLUX.1 Depth / Canny: its transformer reads the
    control image itself; runtime/control_latents.py) takes one image, ``control_images=[image]``, and
    ``control_preprocess`` alone of the other control keywords. ``aesthetic_score`` / ``negative_aesthetic_score``:
    an SDXL refiner's conditioning (default 6.0 / 2.5, as diffusers' StableDiffusionXLImg2ImgPipeline).
    ``refiner_start``: with a refiner, the fraction of the schedule the base runs (default 0.8). ``cache``
    (an export made with ``--feature-cache``; runtime/feature_cache.py): ``"deepcache"`` (UNets) reuses the
    UNet's deep feature between full steps, ``"first-block"`` (transformers) what the blocks after the first
    added; every ``cache_interval``-th step full (``cache_schedule`` ``"uniform"``, or DeepCache's
    ``"nonuniform"``), or, first-block with ``cache_threshold``, diffusers' rule per step; None (the default)
    runs every step in full. ``loras``: (name or path, scale) pairs applied to this call's UNet (an export made
    with ``--lora-slots``; runtime/lora_adapters.py); a name is looked up in the pipeline's ``lora_dir``.
    ``prompt_syntax``: ``"plain"`` (the default: the text as it is) or ``"a1111"`` (AUTOMATIC1111's emphasis
    ``(a:1.2)``, ``[a]``, ``BREAK``, prompt editing ``[a:b:when]``, alternation ``[a|b]`` and ``<lora:NAME:W>``
    tags, which join ``loras``; runtime/prompt_syntax.py) or ``"compel"`` (compel's ``word+``, ``(words)1.3``,
    ``.blend()``, ``.and()``; runtime/compel_syntax.py). ``max_sequence_length``: T5's tokens per prompt
    (SD 3 / 3.5 and FLUX.1, diffusers' argument of that name: 2 to 512; None: the family's default, 256 and
    512); longer prompts are cut there, shorter ones padded to it. ``reference_image``: the image an editing model
    (FLUX.1 Kontext) edits, a PIL image or uint8 [H, W, 3] array: its latents condition every step, the output
    starts from noise (its size: the reference's, once sized, unless asked); ``reference_resize`` (default True):
    the reference is resized to the family's preferred resolution nearest its aspect ratio (Kontext's, as
    diffusers' ``_auto_resize``), else kept at its own size rounded down to whole patches. On such a model,
    ``image`` with ``mask_image`` inpaints (diffusers' ``FluxKontextInpaintPipeline``): the image is sized as a
    reference (unless height and width are asked) and is the reference unless ``reference_image`` is given.
    ``skip_layer_guidance_scale``: skip-layer guidance (SD 3.5 Medium's, diffusers' argument of that name; an export
    made with ``--skip-layers``; runtime/layer_skip.py): on the steps between ``skip_layer_guidance_start`` and
    ``_stop`` (fractions of the steps; default 0.01 and 0.2, as diffusers) the transformer runs again on the prompts
    with the export's layers skipped, and the guided prediction moves away from that pass by this scale (diffusers'
    default 2.8; None, the default: no SLG). Guided calls only.
    """

    prompt: str | Sequence[str] | None = None
    negative_prompt: str | Sequence[str] | None = None
    height: int | None = None
    width: int | None = None
    steps: int = 30
    guidance_scale: float = 7.5
    sampler: str | None = None  # the model's default (samplers.default_sampler)
    seed: int | Sequence[int] | None = None
    batch_size: int = 1
    latents: np.ndarray | None = None
    image: Any = None
    strength: float | None = None
    prompt_embeds: np.ndarray | None = None
    negative_prompt_embeds: np.ndarray | None = None
    pooled_prompt_embeds: np.ndarray | None = None
    negative_pooled_prompt_embeds: np.ndarray | None = None
    output: str = "images"
    mask_image: Any = None
    paste_back: float | None = None
    padding_mask_crop: int | None = None
    guidance_rescale: float = 0.0
    timestep_spacing: str | None = None
    control_images: Sequence[Any] | None = None
    control_scales: Any = None
    control_start: Any = None
    control_end: Any = None
    guess_mode: bool = False
    control_preprocess: Any = None
    control_modes: Any = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    refiner_start: float | None = None
    cache: str | None = None
    cache_interval: int = DEFAULT_INTERVAL
    cache_schedule: str = "uniform"
    cache_threshold: float | None = None
    loras: Sequence[tuple[str, float]] | None = None
    prompt_syntax: str = "plain"
    max_sequence_length: int | None = None
    reference_image: Any = None
    reference_resize: bool = True
    skip_layer_guidance_scale: float | None = None
    skip_layer_guidance_start: float | None = None
    skip_layer_guidance_stop: float | None = None

    @property
    def scores(self) -> tuple[float | None, float | None]:
        return self.aesthetic_score, self.negative_aesthetic_score

    @property
    def cache_policy(self) -> CachePolicy | None:
        """The request's feature-caching policy, checked (None: every step runs the full denoiser)."""
        return cache_policy(self.cache, self.cache_interval, self.cache_schedule, self.cache_threshold)

    @property
    def skip_guidance(self) -> SkipGuidance | None:
        """The request's skip-layer guidance, checked (None: none)."""
        return skip_guidance(self.skip_layer_guidance_scale, self.skip_layer_guidance_start,
                             self.skip_layer_guidance_stop)

    @property
    def images_count(self) -> int:
        """How many images the request makes (prompts or embedding rows, times batch_size)."""
        if self.prompt_embeds is not None:
            return int(np.shape(self.prompt_embeds)[0]) * self.batch_size
        return len(prompts_of(self.prompt if self.prompt is not None else "", self.batch_size))

    def checked(self, max_batch: int | None = None) -> GenerationRequest:
        """The model-independent checks, in the order a user meets them; returns the request with its seed
        resolved (drawn at random where none was given)."""
        if self.output not in OUTPUTS:
            raise InputError(f"output {self.output!r} is not one of {', '.join(OUTPUTS)}")
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise InputError("give either prompt or prompt_embeds (one of them)")
        top = max_batch if max_batch is not None else None
        if not is_int(self.batch_size) or self.batch_size < 1 or (top is not None and self.batch_size > top):
            rng = f"1..{top}" if top is not None else "1 or more"
            raise InputError(f"batch_size {self.batch_size!r} is outside the supported range {rng}",
                             cli=f"--batch-size {self.batch_size!r} is outside the supported range {rng}")
        check_guidance(self.guidance_scale)
        check_rescale(self.guidance_rescale)
        _ = self.cache_policy
        _ = self.skip_guidance
        check_loras(self.loras)
        syntax = check_syntax(self.prompt_syntax)
        req = self._a1111_checked() if syntax == "a1111" else self._compel_checked() if syntax == "compel" else self
        if self.prompt_embeds is not None and self.max_sequence_length is not None:
            raise InputError("max_sequence_length sets how prompts are tokenized: leave it out with prompt_embeds",
                             cli="--max-sequence-length applies to prompts")
        if self.image is None and self.strength is not None:
            raise InputError("strength applies to img2img only: pass image=..., or leave strength out",
                             cli="--strength applies to img2img only: pass --init-image, or leave --strength out")
        b = req.images_count
        return replace(req, seed=resolve_seed(self.seed, b))

    def _compel_checked(self) -> GenerationRequest:
        """A compel-syntax request with every prompt and negative parsed before any work (InputError naming what
        compel cannot read)."""
        if self.prompt is None:
            raise InputError("prompt_syntax applies to prompts: leave it out with prompt_embeds")
        for label, value in (("prompt", self.prompt), ("negative_prompt", self.negative_prompt)):
            for t in [] if value is None else [value] if isinstance(value, str) else list(value):
                if not isinstance(t, str):
                    raise InputError(f"{label} must be a string or a list of strings")
                parse_compel(t)
        return self

    def _a1111_checked(self) -> GenerationRequest:
        """An A1111-syntax request with its ``<lora:...>`` tags taken out of the prompts into ``loras`` (A1111
        reads them from the positive prompt), and every segment of its prompt editing parsed before any work."""
        if self.prompt is None:
            raise InputError("prompt_syntax applies to prompts: leave it out with prompt_embeds")
        steps = self.steps if is_int(self.steps) and self.steps >= 1 else 1
        texts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        negs = [] if self.negative_prompt is None else (
            [self.negative_prompt] if isinstance(self.negative_prompt, str) else list(self.negative_prompt))
        stripped, tags = [], []
        for t in texts:
            if not isinstance(t, str):
                raise InputError("prompt must be a string or a list of strings")
            text, found = lora_tags(t)
            stripped.append(text)
            tags += found
        for t in stripped + negs:
            if not isinstance(t, str):
                raise InputError("negative_prompt must be a string or a list of strings")
            for _, text in prompt_schedule(t, steps):  # each segment's text parses (a weight that is no number)
                parse_attention(text)
        if tags and len({n for n, _ in tags}) != len(tags):
            raise InputError(f"a <lora:...> tag names the same LoRA twice: {[n for n, _ in tags]}")
        loras = [*(self.loras or []), *tags] or None
        check_loras(loras)
        prompt = stripped[0] if isinstance(self.prompt, str) else stripped
        return replace(self, prompt=prompt, loras=loras)


# -- the checks, each with its message ---------------------------------------------------------------------

def is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def prompts_of(prompt: str | Sequence[str], batch_size: int) -> list[str]:
    """The prompt of every image: each prompt ``batch_size`` times in place."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise InputError("prompt is empty: give a string or a non-empty list of strings")
    return [p for p in prompts for _ in range(batch_size)]


def negatives_of(negative_prompt: str | Sequence[str] | None, b: int, batch_size: int = 1) -> list[str]:
    """The negative prompt of each of ``b`` images (``b / batch_size`` prompts): a string for every image, or a
    list with one per prompt (each repeated ``batch_size`` times, as the prompts) or one per image."""
    if negative_prompt is None:
        return [""] * b
    if isinstance(negative_prompt, str):
        return [negative_prompt] * b
    negs = list(negative_prompt)
    if len(negs) == b:
        return negs
    if len(negs) * batch_size == b:
        return [n for n in negs for _ in range(batch_size)]
    prompts = b // batch_size
    raise InputError(f"{len(negs)} negative prompts for {prompts} prompt{'s' if prompts != 1 else ''} "
                     f"({b} images): give one string for every image, or a list with one per prompt")


def float_array(a: Any, label: str, ndim: int) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim != ndim or not np.all(np.isfinite(arr)):
        raise InputError(f"{label} must be a finite float array of {ndim} dimensions, got shape {list(arr.shape)}")
    return arr


def check_rescale(r: Any) -> None:
    if not is_number(r) or not 0.0 <= r <= 1.0:
        raise InputError(f"guidance_rescale must be a number from 0 to 1 (0.7 is typical for v-prediction models), "
                         f"got {r!r}", cli=f"--guidance-rescale must be a number from 0 to 1, got {r!r}")


def check_guidance(g: Any) -> None:
    if not is_number(g) or not math.isfinite(g) or not 0.0 <= g <= GUIDANCE_MAX:
        what = f"a finite number from 0 to {GUIDANCE_MAX:g} (1 or less turns guidance off; 5-9 is typical)"
        raise InputError(f"guidance_scale must be {what}, got {g!r}", cli=f"--guidance must be {what}, got {g!r}")


def resolve_seed(seed: Any, b: int) -> int | list[int]:
    """The seed(s) a call uses: checked, and drawn at random when none was given."""
    if seed is None:
        return secrets.randbits(32)
    for s in [seed] if is_int(seed) else seed if isinstance(seed, (list, tuple)) else [seed]:
        if not is_int(s) or not 0 <= s <= SEED_MAX:
            raise InputError(f"seed must be an integer from 0 to {SEED_MAX}, a list of them (one per image), or "
                             f"None (a random seed, returned in Result.seed), got {seed!r}",
                             cli=f"--seed must be an integer from 0 to {SEED_MAX}, got {seed!r}; leave --seed out "
                                 "for a random seed (the seed used is printed)")
    if is_int(seed):
        return int(seed)
    if len(seed) != b:
        raise InputError(f"{len(seed)} seeds for {b} images; give one seed, or one per image")
    return [int(s) for s in seed]


def check_latents(latents: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The caller's initial noise (``latents=``) as float32, of the shape the size and batch need, finite."""
    noise = np.asarray(latents, dtype=np.float32)
    if noise.shape != shape:
        raise InputError(f"latents have shape {noise.shape}, expected {shape} for this size and batch")
    if not np.all(np.isfinite(noise)):
        raise InputError("latents hold NaN or inf values: pass finite noise (standard normal, as "
                         "np.random.default_rng(seed).standard_normal(shape)), or leave latents out")
    return noise


def call_size(height: int | None, width: int | None, init: np.ndarray | None, control_size: tuple[int, int] | None,
              default: int) -> tuple[int, int]:
    """A call's (height, width): an init image's own (already resized to any size asked), else the size asked,
    filled from the control image's size (as diffusers' ControlNet pipelines), else the model's default."""
    if init is not None:
        return int(init.shape[1]), int(init.shape[2])
    if control_size is not None:
        height = control_size[0] if height is None else height
        width = control_size[1] if width is None else width
    return (default if height is None else int(height)), (default if width is None else int(width))


def check_side(label: str, v: Any, limits: Any, default_size: int) -> None:
    """A height or width within the export's limits (``ShapeLimits``)."""
    lim = limits
    if not is_int(v) or v % lim.multiple_of or not lim.min_size <= v <= lim.max_size:
        raise InputError(
            f"{label} {v!r} is not supported: use a multiple of {lim.multiple_of} between "
            f"{lim.min_size} and {lim.max_size}, or None for the default ({default_size})",
            cli=f"--{label} {v!r} is not supported: use a multiple of {lim.multiple_of} between "
                f"{lim.min_size} and {lim.max_size}, or leave it out for the default ({default_size})",
        )
