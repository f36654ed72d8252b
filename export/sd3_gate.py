"""The parity gate of a streamed SD3 component (the MMDiT, T5) within the memory of a few blocks: a reduced-depth
copy at full width.

A streamed component is too large to run beside its PyTorch module. Its blocks come in a few kinds (the MMDiT:
dual-attention blocks, plain joint blocks, the last block whose context stream ends; T5: the first block, which
holds the relative position bias, and the others), and its graph is the same code path at any depth. So the gate
exports, through the same streamed path, a copy that keeps one block of each kind with the checkpoint's own
weights for those blocks (and every weight outside the blocks), builds the same copy in PyTorch, and compares
them on fresh inputs with ``onnx_export.check_parity``. The manifest's parity records which blocks were checked.
"""

from __future__ import annotations

import copy
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.errors import ArtifactError
from sdrt.runtime.manifest import Parity

from .lora_slots import SlotPlan, slotted_gate
from .onnx_export import check_parity
from .sd3_specs import (
    cached_spec,
    skip_spec,
    streamed_cached_spec,
    streamed_skip_spec,
    streamed_t5_spec,
    streamed_transformer_spec,
    t5_spec,
    transformer_spec,
)
from .streamed import StreamedSpec, WeightSource, export_streamed

TRANSFORMER_BLOCKS = re.compile(r"^transformer_blocks\.(\d+)\.")
T5_BLOCKS = re.compile(r"^encoder\.block\.(\d+)\.")


def transformer_blocks(config: dict[str, Any]) -> list[int]:
    """One block of each kind: the first dual-attention block, the first plain one, the last."""
    n = int(config["num_layers"])
    dual = set(config.get("dual_attention_layers") or ())
    picked = [min(dual)] if dual else []
    plain = [i for i in range(n - 1) if i not in dual]
    if plain:
        picked.append(plain[0])
    return sorted(set(picked)) + [n - 1]


def t5_blocks(config: dict[str, Any]) -> list[int]:
    """T5's first block (it holds the relative position bias) and its last."""
    n = int(config["num_layers"])
    return [0, n - 1] if n > 1 else [0]


def _reduced_transformer(config: dict[str, Any], picked: list[int]) -> dict[str, Any]:
    dual = set(config.get("dual_attention_layers") or ())
    return {**config, "num_layers": len(picked),
            "dual_attention_layers": tuple(j for j, i in enumerate(picked) if i in dual)}


def mapped_weights(weights: WeightSource, pattern: re.Pattern[str], prefix: str, picked: list[int]) -> WeightSource:
    """The reduced copy's weight names -> the full model's (its block j is the full model's block picked[j])."""

    def get(name: str) -> torch.Tensor:
        m = pattern.match(name)
        if m is None:
            return weights(name)
        return weights(f"{prefix}{picked[int(m.group(1))]}.{name[m.end():]}")

    return get


def load_reduced(module: torch.nn.Module, source: WeightSource, name: str) -> torch.nn.Module:
    """A reduced-depth copy's weights, each read once from ``source`` (a tied weight, such as T5's embed_tokens,
    under its first name); the module float32 in eval mode. ArtifactError where they do not load."""
    names = [n for n, _ in [*module.named_parameters(), *module.named_buffers()]]
    missing, unexpected = module.load_state_dict({k: source(k) for k in names}, strict=False)
    tied = {n for n, _ in module.named_parameters(remove_duplicate=False)} - set(names)
    if unexpected or set(missing) - tied:
        raise ArtifactError(f"{name}: the reduced copy's weights do not load ({sorted(missing)[:3]} missing, "
                            f"{sorted(unexpected)[:3]} unexpected)")
    return module.float().eval()


def gate_streamed(kind: str, config: dict[str, Any], weights: WeightSource, precision: str, tokens: int,
                  parity_shape: tuple[int, int, int], progress: Callable[[str], None] = lambda m: None,
                  block_cache: bool = False, control: tuple[int, int] | None = None,
                  slots: tuple[SlotPlan, tuple[str, ...]] | None = None,
                  skip_layers: list[int] | None = None) -> Parity:
    """The reduced-depth gate of a streamed ``transformer`` (``block_cache``: with first-block caching's
    residual outputs), first-block caching's ``cached`` step, the ``control`` transformer taking ControlNet
    samples (``control``: (nets, samples per net); the reduced copy reads the samples its own depth picks, random
    ones) or ``text_encoder_3`` (see the module docstring); raises ParityError past the precision's bound, like
    every component's gate. The cached step runs only the first block, which every reduced copy keeps as its own
    first: its gate is exact in depth. ``slots``: the transformer's LoRA slots (the plan and the family's
    targets), on the reduced copy's layers alike, gated with random factors. ``skip``: skip-layer guidance's pass
    with ``skip_layers`` skipped, its reduced copy keeping those blocks too (skipped there alike)."""
    from diffusers import SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    from .sd3_controlnet import streamed_unet_control_spec, unet_control_spec
    from .sd3_wrappers import controlled_blocks

    used: list[int] = []
    skipped: list[int] = []
    if kind in ("transformer", "cached", "control", "skip"):
        picked = sorted({0, *transformer_blocks(config), *(skip_layers if kind == "skip" and skip_layers else [])})
        reduced = _reduced_transformer(config, picked)
        source = mapped_weights(weights, TRANSFORMER_BLOCKS, "transformer_blocks.", picked)
        skipped = [picked.index(i) for i in skip_layers or []] if kind == "skip" else []
        if kind == "skip":
            sspec: StreamedSpec = streamed_skip_spec(reduced, tokens, skipped)
        elif kind == "control":
            assert control is not None
            used = controlled_blocks(len(picked), control[1])
            sspec = streamed_unet_control_spec(reduced, tokens, control[0], used, control[1])
        else:
            sspec = (streamed_cached_spec(reduced, tokens) if kind == "cached"
                     else streamed_transformer_spec(reduced, tokens, block_cache))
        module = SD3Transformer2DModel(**reduced)
        total = int(config["num_layers"])
    else:
        picked = t5_blocks(config)
        reduced = {**config, "num_layers": len(picked)}
        source = mapped_weights(weights, T5_BLOCKS, "encoder.block.", picked)
        sspec = streamed_t5_spec(reduced, tokens)
        module = T5EncoderModel(T5Config(**reduced))
        total = int(config["num_layers"])
    progress(f"{sspec.name}: parity gate on blocks {picked} of {total} at full width (a reduced-depth copy)")
    module = load_reduced(module, source, sspec.name)
    if kind == "control":
        assert control is not None
        cspec = unet_control_spec(module, tokens, control[0], used, control[1])
    elif kind == "skip":
        cspec = skip_spec(module, tokens, skipped)
    else:
        cspec = (cached_spec(module, tokens) if kind == "cached" else transformer_spec(module, tokens, block_cache)
                 if kind == "transformer" else t5_spec(module, tokens))
    if slots is not None:
        sspec, cspec = slotted_gate(sspec, cspec, module, *slots)
    with tempfile.TemporaryDirectory(prefix="sdrt-gate-") as tmp:
        comp = export_streamed(sspec, source, precision, Path(tmp) / sspec.name)
        # the module's own example inputs and I/O, run on the streamed graph (dynamo names match the contract)
        par = check_parity(copy.copy(cspec), comp.precision, Path(tmp) / sspec.name / "model.onnx", parity_shape)
    return Parity(reference=f"{par.reference}; blocks {picked} of {total} (reduced depth, full width)",
                  max_abs_err=par.max_abs_err, rel_err=par.rel_err, bound=par.bound)
