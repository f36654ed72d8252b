"""LoRA files -> weight deltas per diffusers parameter (numpy and safetensors only; no torch).

A LoRA adds a low-rank product to a weight: ``W' = W + scale * (alpha / rank) * up @ down``, where
``scale`` is the user's strength and ``alpha / rank`` the file's own scaling (1 when it stores no
alpha). Several LoRAs stack by summing their deltas. Conv weights use the same product with the
kernel dims flattened into ``down`` (LoCon: ``down`` [rank, in, kh, kw], ``up`` [out, rank, 1, 1]). LyCORIS'
other algorithms (LoHa, LoKr, (IA)^3, OFT, full) and DoRA are refused by name.

Key layouts read (``.safetensors``):

- kohya / A1111: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``; text encoders ``lora_te_`` (``lora_te1_``, ``lora_te2_`` for SDXL; ``lora_te3_``: SD 3's T5);
  ComfyUI's ``diffusion_model.<module>.lora_down.weight`` (dotted);
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (``transformer.``, ``text_encoder.``,
  ``text_encoder_2.``), alphas as ``<module>.alpha`` keys or in the ``lora_adapter_metadata`` JSON;
- diffusers' older attention-processor layout: ``...attn1.processor.to_q_lora.down.weight``.

Every family's denoiser is the component ``unet`` here (SD 3's and FLUX.1's transformer too). The transformer
families' original layouts (kohya's ``lora_unet_joint_blocks_...``, ``lora_unet_double_blocks_...``) are mapped to
diffusers' module names by the family (``Family.lora_file``; runtime/families/sd3_lora.py, flux_lora.py).

Module names are resolved against the parameter names the engine's weights carry (the refit map's
``param`` values), so the kohya underscore spelling needs no hand-written table. SDXL LoRAs trained by
kohya's scripts on the original SGM UNet (``input_blocks_4_1_...``) are not mapped and are reported as
unmatched.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import ArtifactError, InputError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3")
# the file's prefix -> sdrt's component ("unet" is every family's denoiser: the UNet, or SD 3's and FLUX.1's
# transformer); kohya numbers the text encoders in the family's order (SD 3: CLIP-L, CLIP-G, T5; FLUX.1: CLIP-L, T5)
_KOHYA_PREFIX = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                 "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3"}
_KOHYA = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te3|lora_te)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# ComfyUI's spelling of kohya's denoiser keys: the original layout's dotted names under ``diffusion_model.``
_COMFY = re.compile(r"^(diffusion_model)\.(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_KOHYA_PREFIX["diffusion_model"] = "unet"
# PEFT's prefixes: diffusers' component names, and ComfyUI's / Black Forest Labs' ``diffusion_model.`` (the
# denoiser in its original layout, which the family maps: runtime/families)
_PEFT_PREFIX = {"transformer": "unet", "diffusion_model": "unet"}
_PEFT = re.compile(r"^(?:(unet|transformer|diffusion_model|text_encoder_3|text_encoder_2|text_encoder)\.)?(.+?)\."
                   r"(lora_A\.weight|lora_B\.weight|alpha)$")
_LEGACY = re.compile(r"^(?:(unet|text_encoder_2|text_encoder)\.)?(.+?)\.(down\.weight|up\.weight)$")
# the key parts of LyCORIS' other algorithms and of DoRA -> what they are: their weights are not a low-rank product
# up @ down (LoHa's Hadamard product, LoKr's Kronecker product, DoRA's normalised magnitude, (IA)^3's scaling, a
# full difference; LoCon's Tucker form adds a middle factor); sdrt reads plain LoRA and LoCon only
_UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
                ".on_input": "(IA)^3", ".diff": "full (diff)", "oft_": "OFT", "lora_mid": "LoCon with Tucker (lora_mid)"}
SUPPORTED = ("plain LoRA and LoCon: kohya / LyCORIS lora_down / lora_up (with alpha), or diffusers / PEFT "
             "lora_A / lora_B")
# diffusers' attention-processor names -> module names (UNet attention, CLIP attention, CLIP MLP)
_LEGACY_RENAMES = (
    (".processor.to_q_lora", ".to_q"), (".processor.to_k_lora", ".to_k"), (".processor.to_v_lora", ".to_v"),
    (".processor.to_out_lora", ".to_out.0"),
    (".self_attn.to_q_lora", ".self_attn.q_proj"), (".self_attn.to_k_lora", ".self_attn.k_proj"),
    (".self_attn.to_v_lora", ".self_attn.v_proj"), (".self_attn.to_out_lora", ".self_attn.out_proj"),
    (".lora_linear_layer", ""), (".lora", ""),
)


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: ``delta = (alpha / rank) * up @ down``."""

    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    module: str  # the module's name as the file spells it, prefix removed
    flat: bool  # kohya: dots became underscores
    down: np.ndarray  # [rank, in, *kernel]
    up: np.ndarray  # [out, rank, *1]
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta(self, shape: Sequence[int]) -> np.ndarray:
        """The float32 weight delta in the weight's own ``shape`` (without the user's strength)."""
        up = self.up.astype(np.float32).reshape(self.up.shape[0], self.rank)
        down = self.down.astype(np.float32).reshape(self.rank, -1)
        d = (up @ down) * np.float32(self.scaling)
        if d.size != int(np.prod(shape)):
            raise InputError(
                f"LoRA module {self.component}.{self.module} makes a {tuple(d.shape)} delta, but the weight is "
                f"{tuple(shape)}: the LoRA was trained for another architecture"
            )
        return d.reshape(tuple(shape))


@dataclass(frozen=True)
class LoraFile:
    path: str
    layout: str  # "kohya" | "diffusers" | "diffusers-legacy"
    modules: tuple[LoraModule, ...]
    sha256: str

    def components(self) -> set[str]:
        return {m.component for m in self.modules}


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and the strength to apply it with (``a.safetensors:0.8``)."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        path, sep, scale = text.rpartition(":")
        if sep and path and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", scale):
            return cls(Path(path), float(scale))
        return cls(Path(text), 1.0)

    def describe(self, digest: str = "") -> str:
        return f"{self.path.name}:{self.scale:g}" + (f" (sha256 {digest[:12]})" if digest else "")


# -- reading ---------------------------------------------------------------------------------------------

def read_lora(path: str | Path) -> LoraFile:
    """Read a ``.safetensors`` LoRA in any supported layout."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"LoRA file {p} does not exist")
    if p.suffix.lower() != ".safetensors":
        raise InputError(f"{p.name}: LoRAs are read from .safetensors files only (pickled .pt/.ckpt are not loaded)")
    try:
        with safe_open(str(p), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as e:  # safetensors raises several kinds for a corrupt header
        raise ArtifactError(f"{p} is not a readable safetensors file ({e})") from e
    layout, modules = parse_lora(tensors, metadata, name=p.name)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return LoraFile(str(p), layout, tuple(modules), digest)


def _layout(keys: Iterable[str]) -> str:
    ks = list(keys)
    if any(k.endswith(("lora_down.weight", "lora_up.weight")) for k in ks):
        return "kohya"
    if any(k.endswith(("lora_A.weight", "lora_B.weight")) for k in ks):
        return "diffusers"
    if any(k.endswith((".down.weight", ".up.weight")) and "lora" in k for k in ks):
        return "diffusers-legacy"
    return "unknown"


def parse_lora(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None, *, name: str = "LoRA"
) -> tuple[str, list[LoraModule]]:
    """Split a LoRA state dict into modules. Raises InputError for the kinds sdrt does not read (LyCORIS' LoHa,
    LoKr, (IA)^3, OFT, full; DoRA), naming them and the kinds it reads."""
    bad = sorted({s for k in tensors for s in _UNSUPPORTED if s in k})
    if bad:
        kinds = ", ".join(dict.fromkeys(_UNSUPPORTED[s] for s in bad))
        raise InputError(f"{name}: a {kinds} file ({', '.join(bad)} tensors), which sdrt does not read: it reads "
                         f"{SUPPORTED}. Use a LoRA or LoCon file, or merge this one into the checkpoint with the "
                         "tool that trained it")
    layout = _layout(tensors)
    if layout == "unknown":
        raise InputError(f"{name}: no LoRA weights found (expected kohya lora_down/lora_up or diffusers "
                         "lora_A/lora_B keys)")
    pattern = {"kohya": _KOHYA, "diffusers": _PEFT, "diffusers-legacy": _LEGACY}[layout]
    down_key, up_key = {"kohya": ("lora_down.weight", "lora_up.weight"),
                        "diffusers": ("lora_A.weight", "lora_B.weight"),
                        "diffusers-legacy": ("down.weight", "up.weight")}[layout]
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = pattern.match(key) or (_COMFY.match(key) if layout == "kohya" else None)
        if m is None:
            continue
        prefix, module, kind = m.groups()
        component = _KOHYA_PREFIX[prefix] if layout == "kohya" else _PEFT_PREFIX.get(prefix, prefix or "unet")
        parts.setdefault((component, module), {})[kind] = value
    peft_alpha = _metadata_alphas(metadata or {})
    modules = []
    for (component, module), d in sorted(parts.items()):
        if down_key not in d or up_key not in d:
            if set(d) == {"alpha"}:
                continue
            raise InputError(f"{name}: {component}.{module} has {sorted(d)} but needs both {down_key} and {up_key}")
        alpha: float | None = float(np.asarray(d["alpha"]).reshape(-1)[0]) if "alpha" in d else None
        if alpha is None and layout == "diffusers":
            alpha = peft_alpha(component, module)
        if layout == "diffusers-legacy":
            for old, new in _LEGACY_RENAMES:
                if module.endswith(old):
                    module = module[: -len(old)] + new
                    break
        down, up = d[down_key], d[up_key]
        if down.shape[0] != up.shape[1]:
            raise InputError(f"{name}: {component}.{module}: down {down.shape} and up {up.shape} disagree on the rank")
        modules.append(LoraModule(component, module, layout == "kohya", down, up, alpha))
    return layout, modules


def _metadata_alphas(metadata: Mapping[str, str]) -> Callable[[str, str], float | None]:
    """PEFT's lora_alpha from diffusers' ``lora_adapter_metadata`` (prefixed LoraConfig fields)."""
    raw = metadata.get("lora_adapter_metadata")
    cfg: dict[str, object] = json.loads(raw) if raw else {}

    def alpha(component: str, module: str) -> float | None:
        # the fields are prefixed with the file's component name: a transformer's "transformer." (sdrt's "unet")
        names = [component, *(k for k, v in _PEFT_PREFIX.items() if v == component)]
        for name in names:
            patterns = cfg.get(f"{name}.alpha_pattern") or {}
            assert isinstance(patterns, dict)
            for pat, value in patterns.items():
                if re.fullmatch(rf"(.*\.)?{pat}", module):
                    return float(value)
        for name in names:
            value = cfg.get(f"{name}.lora_alpha")
            if value is not None:
                return float(value)  # type: ignore[arg-type]
        return None

    return alpha


# -- resolving module names to parameters -----------------------------------------------------------------

class ParamIndex:
    """Finds the ``<module>.weight`` parameter a LoRA module adapts, in either spelling."""

    def __init__(self, param_names: Iterable[str]) -> None:
        self.dotted: dict[str, str] = {}
        self.flat: dict[str, str] = {}
        for p in param_names:
            if not p.endswith(".weight"):
                continue
            module = p[: -len(".weight")]
            for alias in (module, f"text_model.{module}"):
                self.dotted.setdefault(alias, p)
                self.flat.setdefault(alias.replace(".", "_"), p)

    def find(self, m: LoraModule) -> str | None:
        table = self.flat if m.flat else self.dotted
        return table.get(m.module)


@dataclass(frozen=True)
class MergeReport:
    matched: tuple[str, ...]  # parameter names that get a delta
    unmatched: tuple[str, ...]  # "file: component.module" that adapt no weight of the engine


def lora_deltas(
    loras: Sequence[tuple[LoraFile, float]],
    component: str,
    param_shapes: Mapping[str, Sequence[int]],
) -> tuple[dict[str, np.ndarray], MergeReport]:
    """Summed float32 deltas ``sum_i scale_i * delta_i`` per parameter of ``component``.

    ``param_shapes`` maps every parameter the engine holds to its (PyTorch) shape. Modules that name no
    such parameter are reported, not fatal: SDXL, say, drops the text encoders' last layer.
    """
    index = ParamIndex(param_shapes)
    deltas: dict[str, np.ndarray] = {}
    unmatched: list[str] = []
    for lora, scale in loras:
        for m in lora.modules:
            if m.component != component:
                continue
            param = index.find(m)
            if param is None:
                unmatched.append(f"{Path(lora.path).name}: {m.component}.{m.module}")
                continue
            d = m.delta(param_shapes[param]) * np.float32(scale)
            deltas[param] = deltas[param] + d if param in deltas else d
    return deltas, MergeReport(tuple(sorted(deltas)), tuple(unmatched))
