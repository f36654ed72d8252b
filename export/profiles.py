"""Build profiles: a request range (images, pixels, prompt chunks) -> per-tensor min/opt/max shapes.

A profile speaks the user's units; each engine input gets its shapes from the axis names the export
recorded in ``sdrt.json``:

==================  ===========================================================================
axis                size
==================  ===========================================================================
``batch``           text encoders: prompts x chunks, doubled with CFG (conditional and
                    unconditional prompts are encoded in one call); UNet: images, doubled with
                    CFG (the ControlNets and ``unet_control`` too); VAE: images
``height/width``    latent pixels: image pixels / the VAE's scale factor (8)
``height/N``        a ControlNet residual N times below latent size, a transformer's patch grid: ceil(latent / N)
``reference_*``     a reference image's latent pixels (FLUX.1 Kontext; ranged as the image's), and
                    ``reference_height/N`` its patch grid
``image_*``         image pixels (the uint8 inputs: the VAE encoder's image, the ControlNets' control image)
``sequence``        77 tokens x prompt chunks (long prompts are encoded in 77-token chunks)
``t5_tokens``       a T5 encoder's tokens per prompt (a call's ``max_sequence_length``): the profile's
                    ``t5_tokens`` range, else the family's default alone (``text_tokens``: SD3's 256,
                    FLUX.1's 512)
``text_tokens``     a transformer's text tokens: its other text tokens (SD3's 77 CLIP tokens, FLUX.1's
                    none) and T5's (``denoiser_text_tokens`` at the default: SD3's 333, FLUX.1's 512)
==================  ===========================================================================

The sampler's step graphs (``runtime/step_graph.py``), which ``sdrt build`` prebuilds beside the
components, take latents of the images' batch and, guided, the UNet's doubled output
(``step_graph_shapes``).

No TensorRT here: this is plain arithmetic, tested on CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from sdrt.engines import PROFILES_DIR, profile_names
from sdrt.runtime.engine_manifest import ProfileShapes, TensorShapes
from sdrt.runtime.errors import ArtifactError, CompatibilityError, InputError
from sdrt.runtime.families import FAMILY_KEYS, Family
from sdrt.runtime.feature_cache import SHALLOW_UNET
from sdrt.runtime.layer_skip import SKIP_UNET
from sdrt.runtime.manifest import ExportManifest
from sdrt.runtime.t5_tokenizer import MAX_LENGTH as T5_MAX_LENGTH
from sdrt.runtime.t5_tokenizer import MIN_LENGTH as T5_MIN_LENGTH

TOKENS_PER_CHUNK = 77
FAMILIES = FAMILY_KEYS  # runtime/families' registry


@dataclass(frozen=True)
class Range:
    """min <= opt <= max, all positive. A static range has min == max."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if self.min < 1:
            raise InputError(f"{self.min}:{self.opt}:{self.max}: the minimum must be at least 1")
        if not self.min <= self.opt <= self.max:
            raise InputError(
                f"{self.min}:{self.opt}:{self.max} is not a valid MIN:OPT:MAX range: it needs "
                f"MIN <= OPT <= MAX (e.g. 256:512:1024)"
            )

    @classmethod
    def static(cls, n: int) -> Range:
        return cls(n, n, n)

    @classmethod
    def parse(cls, value: int | str, what: str = "value") -> Range:
        """``512``, ``"512"`` or ``"256:512:1024"``."""
        if isinstance(value, bool):
            raise InputError(f"{what}: expected N or MIN:OPT:MAX, got {value!r}")
        if isinstance(value, int):
            return cls.static(value)
        parts = str(value).strip().split(":")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise InputError(f"{what}: {value!r} is not N or MIN:OPT:MAX (whole numbers, e.g. 256:512:1024)") from None
        if len(nums) == 1:
            return cls.static(nums[0])
        if len(nums) != 3:
            raise InputError(f"{what}: {value!r} has {len(nums)} parts; give N or MIN:OPT:MAX (e.g. 256:512:1024)")
        try:
            return cls(*nums)
        except InputError as e:
            raise InputError(f"{what}: {e}") from None

    @property
    def is_static(self) -> bool:
        return self.min == self.max

    def scaled(self, k: int) -> Range:
        return Range(self.min * k, self.opt * k, self.max * k)

    def times(self, other: Range) -> Range:
        return Range(self.min * other.min, self.opt * other.opt, self.max * other.max)

    def divided(self, k: int) -> Range:
        return Range(self.min // k, self.opt // k, self.max // k)

    def triple(self) -> tuple[int, int, int]:
        return (self.min, self.opt, self.max)

    def __str__(self) -> str:
        return str(self.min) if self.is_static else f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class BuildProfile:
    """What engines should serve: images per call, pixel sizes, prompt chunks, and whether CFG doubles
    the batch. ``family`` (optional) names the model family the profile was written for. ``t5_tokens``: the
    T5 tokens per prompt (a call's ``max_sequence_length``) a model with a T5 encoder serves; None: the
    family's default alone."""

    name: str
    batch: Range
    height: Range
    width: Range
    chunks: Range = Range(1, 1, 1)
    cfg: bool = True
    family: str | None = None
    description: str = ""
    t5_tokens: Range | None = None

    def __post_init__(self) -> None:
        t5 = self.t5_tokens
        if t5 is not None and not T5_MIN_LENGTH <= t5.min <= t5.max <= T5_MAX_LENGTH:
            raise InputError(f"profile {self.name}: t5_tokens (--t5-tokens) {t5} is outside {T5_MIN_LENGTH}.."
                             f"{T5_MAX_LENGTH}, the T5 tokens per prompt a call may ask for (diffusers' "
                             f"max_sequence_length): give N or MIN:OPT:MAX within it, e.g. 128:256:{T5_MAX_LENGTH}")

    @property
    def is_static(self) -> bool:
        ranges = (self.batch, self.height, self.width, self.chunks, *((self.t5_tokens,) if self.t5_tokens else ()))
        return all(r.is_static for r in ranges)

    def text_batch(self) -> Range:
        """Rows per text-encoder call: every chunk of every prompt, twice with CFG."""
        return self.batch.times(self.chunks).scaled(2 if self.cfg else 1)

    def unet_batch(self) -> Range:
        return self.batch.scaled(2 if self.cfg else 1)

    def shapes(self) -> ProfileShapes:
        return ProfileShapes(self.batch.triple(), self.height.triple(), self.width.triple(),
                             self.chunks.triple(), self.cfg,
                             None if self.t5_tokens is None else self.t5_tokens.triple())

    def cli_args(self) -> list[str]:
        """The ``sdrt build`` options that recreate this profile."""
        if (self.name in profile_names() and load_profile(self.name) == self):
            return ["--profile", self.name]
        args = ["--batch", str(self.batch), "--height", str(self.height), "--width", str(self.width),
                "--chunks", str(self.chunks)]
        if self.t5_tokens is not None:
            args += ["--t5-tokens", str(self.t5_tokens)]
        return args + ([] if self.cfg else ["--no-cfg"])

    def t5_range(self, family: Family) -> Range:
        """T5's tokens per prompt the engines take: the profile's range, else the family's default alone."""
        return self.t5_tokens if self.t5_tokens is not None else Range.static(family.text_tokens)


def profile_from_mapping(name: str, d: Mapping[str, Any]) -> BuildProfile:
    known = {"batch", "height", "width", "chunks", "cfg", "family", "description", "t5_tokens"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ArtifactError(f"profile {name}: unknown keys {unknown}; a profile has {sorted(known)}")
    missing = [k for k in ("batch", "height", "width") if k not in d]
    if missing:
        raise ArtifactError(f"profile {name}: missing {missing}; give each as N or \"MIN:OPT:MAX\"")
    family = d.get("family")
    if family is not None and family not in FAMILIES:
        raise ArtifactError(f"profile {name}: unknown family {family!r}; expected one of {FAMILIES}")
    return BuildProfile(
        name=name,
        batch=Range.parse(d["batch"], f"{name}: batch"),
        height=Range.parse(d["height"], f"{name}: height"),
        width=Range.parse(d["width"], f"{name}: width"),
        chunks=Range.parse(d.get("chunks", 1), f"{name}: chunks"),
        cfg=bool(d.get("cfg", True)),
        family=family,
        description=str(d.get("description", "")),
        t5_tokens=Range.parse(d["t5_tokens"], f"{name}: t5_tokens") if "t5_tokens" in d else None,
    )


def load_profile(name_or_path: str | Path) -> BuildProfile:
    """A shipped profile by name (``sd15-512``) or a ``.toml`` file by path."""
    p = Path(name_or_path)
    if p.suffix != ".toml":
        p = PROFILES_DIR / f"{name_or_path}.toml"
        if not p.is_file():
            raise InputError(f"unknown profile {name_or_path!r}; choose one of: {', '.join(profile_names())} "
                             "(or pass a .toml file)")
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ArtifactError(f"cannot read profile {p}: {e}") from e
    return profile_from_mapping(p.stem, data)


def custom_profile(batch: str | int = 1, height: str | int | None = None, width: str | int | None = None,
                   chunks: str | int = 1, cfg: bool = True, *, default_size: int = 512,
                   t5_tokens: str | int | None = None) -> BuildProfile:
    """A profile from command-line values; a missing height or width takes the model's default size, a missing
    ``t5_tokens`` the family's default T5 length."""
    h = Range.parse(height if height is not None else default_size, "--height")
    w = Range.parse(width if width is not None else (height if height is not None else default_size), "--width")
    b, c = Range.parse(batch, "--batch"), Range.parse(chunks, "--chunks")
    t5 = None if t5_tokens is None else Range.parse(t5_tokens, "--t5-tokens")
    kind = "static" if all(r.is_static for r in (b, h, w, c, *((t5,) if t5 else ()))) else "dynamic"
    return BuildProfile(name="custom", batch=b, height=h, width=w, chunks=c, cfg=cfg, t5_tokens=t5,
                        description=f"custom {kind}: batch {b}, {h} x {w} px, chunks {c}"
                                    + ("" if t5 is None else f", T5 tokens {t5}"))


# -- validation against an export ---------------------------------------------------------------------

def validate(profile: BuildProfile, manifest: ExportManifest) -> None:
    """Raise InputError/CompatibilityError when ``profile`` asks for shapes the export cannot serve."""
    if profile.family is not None and profile.family != manifest.family:
        raise CompatibilityError(
            f"profile {profile.name} is for {profile.family} models, but this export is {manifest.family} "
            f"({manifest.preset}); choose a {manifest.family} profile or give --batch/--height/--width"
        )
    lim = manifest.limits
    step = max(lim.multiple_of, manifest.vae_scale_factor)
    for label, r in (("height", profile.height), ("width", profile.width)):
        for which, v in (("min", r.min), ("opt", r.opt), ("max", r.max)):
            if v % step:
                raise InputError(f"profile {profile.name}: {label} {which} {v} px is not a multiple of {step} "
                                 f"(the latent is 1/{manifest.vae_scale_factor} of the image)")
        if r.min < lim.min_size or r.max > lim.max_size:
            raise InputError(f"profile {profile.name}: {label} {r} px is outside what the export supports "
                             f"({lim.min_size}..{lim.max_size} px)")
    if profile.chunks.max > 1 and not manifest.model_family.chunked:
        raise InputError(f"profile {profile.name}: {manifest.model_family.label} models encode one 77-token row per "
                         f"prompt (longer prompts are cut, as diffusers does): use chunks 1, not {profile.chunks}")
    if profile.cfg and not manifest.model_family.classifier_free:
        raise InputError(f"profile {profile.name} doubles the denoiser's batch for classifier-free guidance, which "
                         f"{manifest.model_family.label} does not run (one row per image): use a profile with "
                         "cfg = false, or --no-cfg")
    if profile.batch.max > lim.max_batch:
        raise InputError(f"profile {profile.name}: batch up to {profile.batch.max} exceeds the export's limit "
                         f"of {lim.max_batch} images")
    if profile.t5_tokens is not None and not manifest.model_family.takes_sequence_length:
        raise InputError(f"profile {profile.name}: t5_tokens {profile.t5_tokens} sets T5's tokens per prompt, but "
                         f"{manifest.model_family.label} has no T5 encoder (its CLIP encoders read 77-token chunks): "
                         "leave t5_tokens (--t5-tokens) out")


def _denoiser(component: str) -> bool:
    """Components run once per denoising step on the (CFG-doubled) UNet batch."""
    return component in ("unet", "unet_control", SHALLOW_UNET, SKIP_UNET) or component.startswith("controlnet_")


def _axis_range(component: str, axis: str, profile: BuildProfile, factor: int, family: Family) -> Range:
    if axis == "batch":
        if component.startswith("text_encoder"):
            return profile.text_batch()
        return profile.unet_batch() if _denoiser(component) else profile.batch
    if axis in ("height", "width"):
        return getattr(profile, axis).divided(factor)  # type: ignore[no-any-return]
    side, _, down = axis.partition("/")
    if side in ("height", "width") and down.isdigit() and int(down) > 0:
        # a ControlNet residual below latent size: each stride-2 downsampling gives ceil(n / 2)
        latent, k = getattr(profile, side).divided(factor), int(down)
        return Range(-(-latent.min // k), -(-latent.opt // k), -(-latent.max // k))
    if axis in ("image_height", "image_width"):
        return getattr(profile, axis.removeprefix("image_"))  # type: ignore[no-any-return]
    if axis in ("reference_height", "reference_width"):  # a reference image (FLUX.1 Kontext): the image sides
        return getattr(profile, axis.removeprefix("reference_")).divided(factor)  # type: ignore[no-any-return]
    if side in ("reference_height", "reference_width") and down.isdigit() and int(down) > 0:
        # first-block caching's residual over a reference's tokens: its patch grid
        latent, k = getattr(profile, side.removeprefix("reference_")).divided(factor), int(down)
        return Range(-(-latent.min // k), -(-latent.opt // k), -(-latent.max // k))
    if axis == "sequence":
        return profile.chunks.scaled(TOKENS_PER_CHUNK)
    if axis == "t5_tokens":
        return profile.t5_range(family)
    if axis == "text_tokens":
        # the denoiser's other text tokens (SD3's 77 CLIP tokens; FLUX.1's none) ahead of T5's
        t5, other = profile.t5_range(family), family.denoiser_text_tokens - family.text_tokens
        return Range(other + t5.min, other + t5.opt, other + t5.max)
    raise ArtifactError(
        f"{component}: the export names an axis {axis!r} that sdrt's profiles do not know; "
        "re-export the model with this sdrt version"
    )


def component_shapes(profile: BuildProfile, manifest: ExportManifest, component: str) -> tuple[TensorShapes, ...]:
    """min/opt/max shapes of every input of one component, in the export's input order."""
    comp = manifest.components[component]
    f = manifest.vae_scale_factor
    out = []
    for spec in comp.inputs:
        lo, mid, hi = [], [], []
        for d in spec.shape:
            r = Range.static(d) if isinstance(d, int) else _axis_range(component, d, profile, f,
                                                                       manifest.model_family)
            lo.append(r.min)
            mid.append(r.opt)
            hi.append(r.max)
        out.append(TensorShapes(spec.name, tuple(lo), tuple(mid), tuple(hi)))
    return tuple(out)


def engine_shapes(profile: BuildProfile, manifest: ExportManifest) -> dict[str, tuple[TensorShapes, ...]]:
    """Validated shapes of every component of an export under ``profile``."""
    validate(profile, manifest)
    return {name: component_shapes(profile, manifest, name) for name in manifest.components}


def mask_channels(manifest: ExportManifest) -> int:
    """The mask channels an inpainting denoiser of this export's family takes (``Family.concat_mask_channels``:
    1 for a 9-channel UNet, 64 for FLUX.1 Fill)."""
    return manifest.model_family.concat_mask_channels(manifest.vae_scale_factor)


def step_graph_modes(manifest: ExportManifest) -> tuple[str | None, ...]:
    """The step graph variants an export's UNet runs: an inpainting denoiser (2C + M input channels, M the
    family's mask channels) only the mask-concatenating one; an ordinary UNet the plain one and the inpainting
    blend."""
    unet = manifest.components.get("unet")
    sample = next((i for i in unet.inputs if i.name == "sample"), None) if unet is not None else None
    channels = sample.shape[1] if sample is not None else manifest.latent_channels
    return ("concat",) if channels == 2 * manifest.latent_channels + mask_channels(manifest) else (None, "blend")


def step_graph_shapes(profile: BuildProfile, manifest: ExportManifest, guided: bool,
                      inpaint: str | None = None) -> tuple[TensorShapes, ...]:
    """min/opt/max shapes of the sampler step graph's latent-sized inputs under ``profile`` (its ``guidance``
    and ``coeffs`` inputs are static). Guided: ``unet_out`` has the UNet's 2B rows. ``inpaint``: the
    variant's extra inputs too (runtime/step_graph.py)."""
    f, c = manifest.vae_scale_factor, manifest.latent_channels
    b, h, w = profile.batch, profile.height.divided(f), profile.width.divided(f)

    def shapes(name: str, rows: Range, channels: int = c) -> TensorShapes:
        return TensorShapes(name, (rows.min, channels, h.min, w.min), (rows.opt, channels, h.opt, w.opt),
                            (rows.max, channels, h.max, w.max))

    rows = b.scaled(2) if guided else b
    base = (shapes("latents", b), shapes("unet_out", rows), shapes("x0_prev", b), shapes("noise", b))
    if inpaint == "concat":
        return (*base, shapes("unet_extra", rows, c + mask_channels(manifest)))
    if inpaint == "blend":
        return (*base, shapes("mask", b, 1), shapes("image_latents", b), shapes("init_noise", b))
    return base


def input_graph_shapes(profile: BuildProfile, manifest: ExportManifest, guided: bool,
                       concat: bool = False) -> tuple[TensorShapes, ...]:
    """min/opt/max shapes of the first-input graph's inputs (runtime/step_graph.py ``build_input_graph``):
    ``latents`` per image, ``unet_extra`` (a 9-channel UNet) per UNet row; ``scale`` is static."""
    latents = step_graph_shapes(profile, manifest, guided)[0]
    if not concat:
        return (latents,)
    extra = next(s for s in step_graph_shapes(profile, manifest, guided, "concat") if s.name == "unet_extra")
    return (latents, extra)


def text_join_shapes(profile: BuildProfile, manifest: ExportManifest) -> tuple[TensorShapes, ...]:
    """min/opt/max shapes of the prompt embeddings' join graph (runtime/text_join.py) under ``profile``:
    every encoder's hidden states and the pooled output at the text encoders' rows, ``keep`` at the
    UNet's (the text rows without their chunks)."""
    n, r = profile.text_batch(), profile.unet_batch()
    encoders = manifest.encoder_names

    def width(component: str, output: str) -> int:
        spec = next((s for s in manifest.components[component].outputs if s.name == output), None)
        last = None if spec is None else spec.shape[-1]
        if not isinstance(last, int):
            raise ArtifactError(f"{component}: the export records no fixed width for {output}; re-export the "
                                "model with `sdrt export`")
        return last

    shapes = [TensorShapes(f"hidden_{j}", (n.min, TOKENS_PER_CHUNK, c), (n.opt, TOKENS_PER_CHUNK, c),
                           (n.max, TOKENS_PER_CHUNK, c))
              for j, c in enumerate(width(e, "hidden_states") for e in encoders)]
    pooled = [e for e in encoders if any(s.name == "text_embeds" for s in manifest.components[e].outputs)]
    if pooled:
        p = width(pooled[-1], "text_embeds")
        shapes.append(TensorShapes("text_embeds", (n.min, p), (n.opt, p), (n.max, p)))
    return (*shapes, TensorShapes("keep", (r.min,), (r.opt,), (r.max,)))
