"""The SD 3 / 3.5 model an export takes: float32 modules for what is held in memory, ``Streamed`` components (the
transformer, T5) read one tensor at a time instead, the rule for which to stream, and LoRAs merged into it
(export/sd3_loading.py and sd3_single_file.py load one; export/sd3_export.py exports it)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdrt.runtime.families import family_named
from sdrt.runtime.lora_files import LoraSpec, MergeReport

from .exporter import TEXT_LEN
from .sd3_presets import Sd3Modules, Sd3Preset
from .sd3_specs import streamed_t5_spec, streamed_transformer_spec
from .streamed import WeightSource, fake_shapes, materialize, synthetic_weights

STREAM_PARAMS = 1_000_000_000  # a component with more parameters (4 GB in fp32) is streamed, not loaded


@dataclass(frozen=True)
class Streamed:
    """A large component that is never held in memory: its configuration (the module is built in fake mode
    from it) and where its weights are read from, one tensor at a time (export/streamed.py)."""

    config: dict[str, Any]
    weights: WeightSource
    kind: str  # "checkpoint" or "synthetic", for the manifest


@dataclass
class LoadedSd3:
    """An SD3 model: its preset (the architecture's name and default size), float32 modules in eval mode for
    what is held in memory, ``streamed`` for what is not (``transformer``, ``text_encoder_3``), each
    tokenizer's source folder (None: the tiny presets' shipped ones), the scheduler config."""

    preset: Sd3Preset
    modules: Sd3Modules
    scheduler_config: dict[str, Any]
    tokenizer_dirs: tuple[Path | None, Path | None, Path | None] = (None, None, None)
    source: dict[str, Any] = field(default_factory=dict)
    streamed: dict[str, Streamed] = field(default_factory=dict)

    @property
    def has_t5(self) -> bool:
        return self.modules.text_encoders[2] is not None or "text_encoder_3" in self.streamed

    @property
    def transformer_config(self) -> dict[str, Any]:
        """The transformer's config, held in memory or streamed."""
        tr = self.streamed.get("transformer")
        return dict(tr.config) if tr is not None else dict(self.modules.transformer.config)

    def held(self, *, t5: bool = True) -> Sd3Modules:
        """The modules with the streamed ones built in memory from their weights (``streamed.materialize``: the
        transformer alone is 8.4 GiB in fp32 for 3.5 Medium, 32 GiB for Large), for a reference that needs
        them all; ``t5=False`` leaves T5 out (None), as an export without it does."""
        mods = self.modules
        tr = self.streamed.get("transformer")
        transformer = mods.transformer if tr is None else materialize(
            streamed_transformer_spec(tr.config, TEXT_LEN + self.preset.t5_tokens), tr.weights)
        st5 = self.streamed.get("text_encoder_3")
        enc3 = None if not t5 else mods.text_encoders[2] if st5 is None else materialize(
            streamed_t5_spec(st5.config, self.preset.t5_tokens), st5.weights)
        return replace(mods, transformer=transformer, text_encoders=(*mods.text_encoders[:2], enc3))


def weight_shapes(transformer: dict[str, Any], t5: dict[str, Any] | None) -> dict[str, dict[str, tuple[int, ...]]]:
    """Each streamable component's weight names and shapes, from one build in fake mode (nothing allocated)."""
    builds = {"transformer": (streamed_transformer_spec(transformer, 8).build, "transformer.")}
    if t5 is not None:
        builds["text_encoder_3"] = (streamed_t5_spec(t5, 8).build, "encoder.")
    return {n: fake_shapes(build, prefix) for n, (build, prefix) in builds.items()}


def to_stream(shapes: dict[str, dict[str, tuple[int, ...]]], stream: bool | None) -> tuple[str, ...]:
    """The components to stream: all (True), none (False), or those past STREAM_PARAMS (None)."""
    if stream is not None:
        return tuple(shapes) if stream else ()
    return tuple(n for n, w in shapes.items() if sum(math.prod(s) for s in w.values()) > STREAM_PARAMS)


def streamed_parts(shapes: dict[str, dict[str, tuple[int, ...]]], stream: bool | None,
                   config: Callable[[str], dict[str, Any]], weights: Callable[[str], WeightSource],
                   kind: str) -> tuple[tuple[str, ...], dict[str, Streamed]]:
    """The components to stream (``to_stream``) and each one's ``Streamed``: ``config(name)`` and ``weights(name)``
    (``kind``: "synthetic" for a random preset's seeded weights, "checkpoint" for a folder's files)."""
    skip = to_stream(shapes, stream)
    return skip, {n: Streamed(config(n), weights(n), kind) for n in skip}


def synthetic_parts(preset: Any, shapes: dict[str, dict[str, tuple[int, ...]]], seed: int,
                    stream: bool | None) -> tuple[tuple[str, ...], dict[str, Streamed]]:
    """``streamed_parts`` of a random preset (SD 3 / 3.5 or FLUX.1): each streamed component's configuration from
    the preset (``transformer``, else its ``t5``) and weights seeded per tensor."""
    return streamed_parts(shapes, stream, lambda n: preset.config("transformer" if n == "transformer" else "t5"),
                          lambda n: synthetic_weights(seed, shapes[n]), "synthetic")


def merge_sd3_loras(model: LoadedSd3, specs: Sequence[LoraSpec]) -> dict[str, MergeReport]:
    """``sdrt export --lora``: the LoRAs merged into the transformer and both CLIP encoders (in memory; a streamed
    transformer's weights as they are read: export/lora_merge.py), recorded in ``model.source["loras"]``. T5 is
    not adapted (its modules are reported unmatched). Returns what matched per component."""
    from .lora_merge import merge_into

    mods = model.modules
    held = {"unet": mods.transformer, "text_encoder": mods.text_encoders[0], "text_encoder_2": mods.text_encoders[1]}
    st = model.streamed.get("transformer")
    streamed = {} if st is None else {"unet": (st.weights, weight_shapes(st.config, None)["transformer"])}
    fam = family_named(model.preset.family)
    reports, wrapped, record = merge_into(fam, fam.label, held, streamed, specs)
    if st is not None:
        model.streamed["transformer"] = replace(st, weights=wrapped["unet"])
    model.source["loras"] = record
    return reports
