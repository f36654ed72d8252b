"""diffusers' own first-block cache hooks on a FLUX.1 pipeline's transformer (the references of the caching tests;
the pipelines themselves: ``references.flux_preset_pipeline``), counting the steps that ran in full.

``first_block_cache`` applies ``transformer.enable_cache(FirstBlockCacheConfig(threshold=...))`` (diffusers'
``apply_first_block_cache``: head ``transformer_blocks[0]``, tail ``single_transformer_blocks[-1]``); the pipelines
set the hooks' cache context themselves. With a policy's fixed schedule the hooks' per-step decision is replaced by
the schedule's; with a threshold it is diffusers' own, and each step's relative change is recorded from the hooks'
state (without changing their decision) so that a test can keep its threshold away from the steps' changes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.feature_cache import SHALLOW_UNET, CachePolicy


def first_block_cache(transformer: torch.nn.Module, policy: CachePolicy, steps: int) -> tuple[list[bool], list[float]]:
    """Apply diffusers' first-block cache hooks to ``transformer`` (a fresh one: the hooks keep state) for a loop of
    ``steps`` steps, deciding per ``policy``. Returns two lists the run fills: whether each transformer call ran the
    remaining blocks (the hooks' own ``should_compute``), and each call's relative change as diffusers computes it
    (NaN where it compared nothing)."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry

    ran: list[bool] = []
    changes: list[float] = []
    transformer.enable_cache(FirstBlockCacheConfig(threshold=policy.threshold or 0.0))
    head = HookRegistry.check_if_exists_or_initialize(transformer.transformer_blocks[0]).get_hook(
        "fbc_leader_block_hook")
    rule = head._should_compute_remaining_blocks
    plan = iter(policy.full_steps(steps)) if policy.threshold is None else None

    def decide(residual: torch.Tensor) -> bool:
        last = head.state_manager.get_state().head_block_residual
        changes.append(float("nan") if last is None else float((residual - last).abs().mean() / last.abs().mean()))
        return bool(rule(residual)) if plan is None else bool(next(plan))

    head._should_compute_remaining_blocks = decide
    transformer.register_forward_hook(lambda *_: ran.append(head.state_manager.get_state().should_compute))
    return ran, changes


def cache_kw(policy: CachePolicy | None) -> dict[str, Any]:
    """A Pipeline call's caching keywords for ``policy`` (none: caching off)."""
    return {} if policy is None else {"cache": policy.kind, "cache_interval": policy.interval,
                                      "cache_schedule": policy.schedule, "cache_threshold": policy.threshold}


def full_count(loop: str) -> int:
    """How many steps ran the full transformer, as ``Result.loop`` says it."""
    return int(loop.split(" steps ran the full transformer")[0].rsplit(" of ", 1)[0].rsplit(" ", 1)[1])


def threshold_margin(changes: list[float], threshold: float) -> float:
    """How far the nearest step's change is from the threshold (the decisions agree reliably only away from it)."""
    return min(abs(c - threshold) for c in changes if not math.isnan(c))


def streamed_cached_export(cls_name: str, preset: str, ref_folder: Path, tmp_path: Path) -> Path:
    """The preset's seeded weights saved as a diffusers folder of ``cls_name`` and exported with the transformer
    streamed (as a full-size one is) and first-block caching; asserts that the transformer and its cached step were
    streamed and gated on their reduced-depth copies. ``ref_folder``: an export whose tokenizers the folder takes."""
    from sdrt.export.flux_export import export_flux, load_flux

    from .references import flux_preset_pipeline

    src = tmp_path / "diffusers"
    flux_preset_pipeline(cls_name, preset, ref_folder).save_pretrained(src, safe_serialization=True)
    out = tmp_path / "streamed"
    manifest = export_flux(load_flux(src, stream=True), out, block_cache=True)
    assert "unet" in manifest.source["streamed"]
    for name in ("unet", SHALLOW_UNET):
        par = manifest.components[name].parity
        assert par is not None and "reduced depth" in par.reference and par.rel_err <= par.bound
    return out
