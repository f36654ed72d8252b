"""The sdrt manifest (``sdrt.json``) written beside every ONNX export.

It records what the runtime must know without opening a graph: the model family, prediction type,
precision and I/O of each component, the supported shape range, where the weights came from, the tool
versions, and the parity figures measured at export. The schema is versioned; readers refuse a newer
one with a message rather than guessing.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import ArtifactError, CompatibilityError
from .families import FAMILY_KEYS, Family, family_named, family_of

MANIFEST_NAME = "sdrt.json"
# what a command takes, for the message when its folder is missing
EXPORT_FOLDER = "an ONNX export, the folder written by `sdrt export`"
ANY_FOLDER = f"{EXPORT_FOLDER}, or an engine folder, written by `sdrt build`"
# The schema a manifest records is the lowest that reads its export, so an older sdrt refuses (naming the
# upgrade) only an export it would misread, and reads every other export as before:
# 1: every export written before the inputs below
# 2: a graph takes an input an sdrt reading 1 does not feed, and would fail on inside the first call instead of
#    refusing the folder: a text encoder's attention mask (compel's MASK downweighting), FLUX.1 Depth / Canny's
#    control latents, a FLUX.1 Union ControlNet's mode and the single-stream samples FLUX.1's ControlNets give
# A later addition an older reader would misread raises it again: a new schema here, its inputs in
# ``INPUT_SCHEMAS`` (or a rule in ``ExportManifest.__post_init__``).
SCHEMA_VERSION = 2  # the newest this sdrt reads
BASE_SCHEMA = 1
MASKED_TEXT_SCHEMA = 2
TEXT_MASK_INPUT = "attention_mask"
INPUT_SCHEMAS = {TEXT_MASK_INPUT: MASKED_TEXT_SCHEMA, "control_latents": 2,
                 "controlnet_mode": 2}  # input name -> the schema it needs
INPUT_PATTERNS = ((re.compile(r"controlnet_\d+_single_block_\d+"), 2),)  # (input names, the schema they need)


def input_schema(name: str) -> int:
    """The lowest manifest schema whose readers feed a graph input of this name."""
    return max((INPUT_SCHEMAS.get(name, BASE_SCHEMA), *(v for pat, v in INPUT_PATTERNS if pat.fullmatch(name))))

FAMILIES = FAMILY_KEYS  # the manifest's "family" values: runtime/families' registry


def encoder_names(family: str, refiner: bool = False) -> tuple[str, ...]:
    """Text encoder components of a family (its module in runtime/families declares them)."""
    return family_named(family, refiner).encoders


def pooled_encoder(name: str) -> bool:
    """SDXL's second encoder (OpenCLIP bigG) has a projection: the pooled embedding."""
    return name == "text_encoder_2"


def tokenizer_of(encoder: str) -> str:
    """``text_encoder_2`` -> ``tokenizer_2``: each encoder's tokenizer folder."""
    return encoder.replace("text_encoder", "tokenizer")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float16, float32, int32, uint8, bool
    shape: tuple[int | str, ...]  # ints are fixed, strings name a dynamic axis

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class Parity:
    """How an exported graph compared with its PyTorch module at export time."""

    reference: str  # e.g. "torch fp32"
    max_abs_err: float
    rel_err: float  # max |onnx - torch| / max |torch|
    bound: float  # rel_err must not exceed it

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Parity:
        return cls(d["reference"], float(d["max_abs_err"]), float(d["rel_err"]), float(d["bound"]))


@dataclass(frozen=True)
class Component:
    path: str  # relative to the export folder
    precision: str  # "fp16" | "fp32" | "bf16" (a bf16 graph takes and returns float32)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parity: Parity | None = None
    size_bytes: int = 0
    # backend name -> path of a graph optimized for it (e.g. "ort-cuda": fused CUDA-only operators)
    variants: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Component:
        return cls(
            path=d["path"],
            precision=d["precision"],
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            parity=Parity.from_dict(d["parity"]) if d.get("parity") else None,
            size_bytes=int(d.get("size_bytes", 0)),
            variants=dict(d.get("variants", {})),
        )


@dataclass(frozen=True)
class ShapeLimits:
    """Image sizes and batch the exported graphs accept (dynamic axes)."""

    min_size: int = 64
    max_size: int = 2048
    multiple_of: int = 8
    max_batch: int = 16

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapeLimits:
        return cls(**{k: int(v) for k, v in d.items()})


@dataclass(frozen=True)
class ExportManifest:
    family: str  # a key of runtime/families: "sd1" | "sd2" | "sdxl" | "sd3"
    preset: str  # architecture preset name, e.g. "sd15" or "sd15-tiny"
    prediction_type: str  # "epsilon" | "v_prediction" | "flow_prediction"
    components: dict[str, Component]
    latent_channels: int
    vae_scale_factor: int  # pixels per latent
    default_size: int  # the resolution the model was trained at
    text_max_length: int  # tokens per chunk, 77 for CLIP
    limits: ShapeLimits = field(default_factory=ShapeLimits)
    source: dict[str, Any] = field(default_factory=dict)  # kind, path, sha256
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""
    schema: int = BASE_SCHEMA  # the lowest schema that reads this export (raised in __post_init__)
    clip_skip: int = 0  # the text encoders condition on a layer this many before the model's own
    kind: str = "onnx"
    # the ControlNet components, in the order they were given to the export; "unet_control" takes their
    # residuals (optional: older manifests have none)
    controlnets: tuple[str, ...] = ()
    # an SDXL refiner: only text_encoder_2, and the UNet's time ids are [h, w, crop_top, crop_left,
    # aesthetic_score]; absent (False) in manifests written before refiners were supported
    refiner: bool = False
    # the VAE's latent scaling factor (SD 1.x/2.x 0.18215, SDXL 0.13025): latents of two models can be handed
    # from one to the other only when it is the same; None in older manifests
    latent_scaling: float | None = None

    def __post_init__(self) -> None:
        needed = max((input_schema(t.name) for c in self.components.values() for t in c.inputs), default=BASE_SCHEMA)
        if self.schema < needed:
            object.__setattr__(self, "schema", needed)

    @property
    def encoder_names(self) -> tuple[str, ...]:
        """The text encoders this export has, in the family's order (an optional one may be left out)."""
        fam = self.model_family
        return tuple(e for e in fam.encoders if e in self.components or e not in fam.optional_encoders)

    @property
    def model_family(self) -> Family:
        """The family module's description of this model (runtime/families)."""
        return family_of(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def write(self, folder: str | Path) -> None:
        atomic_write_text(Path(folder) / MANIFEST_NAME, self.to_json())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportManifest:
        schema = int(d.get("schema", 0))
        if schema > SCHEMA_VERSION:
            raise CompatibilityError(
                f"manifest schema {schema} is newer than this sdrt understands ({BASE_SCHEMA} to {SCHEMA_VERSION}): "
                "the export has parts this version would misread; upgrade sdrt (pip install -U sdrt) or re-export "
                "with this version"
            )
        if schema < 1:
            raise CompatibilityError("manifest has no schema version; re-export the model with `sdrt export`")
        if d.get("family") not in FAMILIES:
            raise ArtifactError(f"manifest names unknown family {d.get('family')!r}; expected one of {FAMILIES}")
        return cls(
            family=d["family"],
            preset=d["preset"],
            prediction_type=d["prediction_type"],
            components={k: Component.from_dict(v) for k, v in d["components"].items()},
            latent_channels=int(d["latent_channels"]),
            vae_scale_factor=int(d["vae_scale_factor"]),
            default_size=int(d["default_size"]),
            text_max_length=int(d["text_max_length"]),
            limits=ShapeLimits.from_dict(d.get("limits", {})),
            source=dict(d.get("source", {})),
            tools=dict(d.get("tools", {})),
            created=d.get("created", ""),
            schema=schema,
            kind=d.get("kind", "onnx"),
            clip_skip=int(d.get("clip_skip", 0)),
            controlnets=tuple(str(c) for c in d.get("controlnets", ())),
            refiner=bool(d.get("refiner", False)),
            latent_scaling=None if d.get("latent_scaling") is None else float(d["latent_scaling"]),
        )

    @classmethod
    def read(cls, folder: str | Path, *, wanted: str = ANY_FOLDER) -> ExportManifest:
        """``wanted``: what the caller takes, for the message when ``folder`` is not a folder."""
        path = Path(folder) / MANIFEST_NAME
        if not Path(folder).is_dir():
            what = "is not a folder" if Path(folder).exists() else "does not exist"
            raise ArtifactError(f"{folder} {what}; pass {wanted}")
        if not path.is_file():
            raise ArtifactError(
                f"{path} is missing: {folder} is not an sdrt export; create one with "
                f"`sdrt export --model CHECKPOINT --out {folder}`"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{path} is unreadable ({e}); re-export the model with `sdrt export`") from e
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path} is incomplete or corrupt ({e!r}); re-export the model") from e


def export_entries(folder: Path) -> set[str]:
    """The top-level names an sdrt export's ``sdrt.json`` accounts for: its components' and variants'
    folders, the tokenizers of its text encoders, ``scheduler/``, ``model_index.json`` and itself.
    Read as plain JSON, so a manifest of any schema version names its files. Raises ValueError (JSON),
    OSError, LookupError, TypeError or AttributeError for a manifest that is not one."""
    data = json.loads((folder / MANIFEST_NAME).read_text())
    names = {MANIFEST_NAME, "model_index.json", "scheduler"}
    for name, comp in data["components"].items():
        for rel in (comp["path"], *comp.get("variants", {}).values()):
            names.add(Path(rel).parts[0])
        if name.startswith("text_encoder"):
            names.add(name.replace("text_encoder", "tokenizer"))
    return names
