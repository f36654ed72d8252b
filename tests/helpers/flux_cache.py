"""diffusers' own first-block cache hooks on a transformer (FLUX.1's, SD 3 / 3.5's: the references of the caching
tests; the pipelines themselves: ``references.flux_preset_pipeline``, ``references.sd3_pipeline``), counting the
steps that ran in full.

``first_block_cache`` applies diffusers' ``apply_first_block_cache`` (``FirstBlockCacheConfig(threshold=...)``; on
FLUX.1 through ``transformer.enable_cache``): head the first block, tail the last. FluxPipeline sets the hooks'
cache context itself; the other pipelines (FLUX.1 Fill, img2img, inpainting, Kontext, Control; every SD 3 one)
set none, and ``hooks_context`` sets the one their single transformer call per step amounts to. With a policy's
fixed schedule the hooks' per-step decision is replaced by the schedule's; with a threshold it is diffusers' own,
and each step's relative change is recorded from the hooks' state (without changing their decision) so that a
test can keep its threshold away from the steps' changes.

SD 3's last block (``context_pre_only``) returns None for its context, which diffusers 0.42's tail hook subtracts
(a TypeError on ``SD3Transformer2DModel``): ``first_block_cache`` makes that block return its input context instead;
``SD3Transformer2DModel.forward`` never reads the last block's context, so the model's outputs are unchanged
(tests/test_block_cache.py checks it, uncached).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.feature_cache import SHALLOW_UNET, CachePolicy


def first_block_cache(transformer: torch.nn.Module, policy: CachePolicy, steps: int) -> tuple[list[bool], list[float]]:
    """Apply diffusers' first-block cache hooks to ``transformer`` (a fresh one: the hooks keep state) for a loop of
    ``steps`` steps, deciding per ``policy``. Returns two lists the run fills: whether each transformer call ran the
    remaining blocks (the hooks' own ``should_compute``), and each call's relative change as diffusers computes it
    (NaN where it compared nothing)."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

    ran: list[bool] = []
    changes: list[float] = []
    last_block = transformer.transformer_blocks[-1]
    if getattr(last_block, "context_pre_only", False):  # SD 3's last block (see the module docstring)
        plain = last_block.forward

        def forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            context, hidden = plain(*args, **kwargs)
            return (kwargs["encoder_hidden_states"] if context is None else context), hidden

        last_block.forward = forward
    config = FirstBlockCacheConfig(threshold=policy.threshold or 0.0)
    if hasattr(transformer, "enable_cache"):  # FLUX.1's (diffusers' CacheMixin); SD 3's transformer has none
        transformer.enable_cache(config)
    else:
        apply_first_block_cache(transformer, config)
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


@contextlib.contextmanager
def hooks_context(transformer: torch.nn.Module) -> Iterator[None]:
    """The hooks' cache context around a pipeline call that sets none itself (diffusers 0.42's FLUX.1 Fill,
    img2img, inpainting, Kontext and Control pipelines, and every SD 3 one): one context for the call, which their
    one transformer call per step (classifier-free guidance batched in it, on SD 3) amounts to; what
    ``cache_context("cond")`` sets, for a transformer without diffusers' ``CacheMixin`` too."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(transformer, CacheContext("cond"))
    try:
        yield
    finally:
        _set_cache_context(transformer, None)


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


def assert_away_from_threshold(changes: list[float], threshold: float) -> None:
    """Every step's change is more than 2e-3 from the threshold, so sdrt's and diffusers' decisions can be compared
    (float noise near it could flip one)."""
    margin = threshold_margin(changes, threshold)
    assert margin > 2e-3, f"a step's change is within {margin:.1e} of the threshold: pick another threshold"


def assert_threshold_decides(ran: list[bool], changes: list[float], threshold: float, runs: int, loop: str) -> None:
    """A threshold-rule comparison that means something: away from the threshold, some of the ``runs`` calls full
    and some cached (the reference's hooks' ``ran``), and sdrt's ``Result.loop`` ran the same number in full."""
    assert_away_from_threshold(changes, threshold)
    assert len(ran) == runs and 1 < sum(ran) < runs, f"the threshold decides nothing here ({ran}, {changes})"
    assert full_count(loop) == sum(ran), (loop, ran)


def streamed_cached_export(cls_name: str, preset: str, ref_folder: Path, tmp_path: Path) -> Path:
    """The preset's seeded weights saved as a diffusers folder of ``cls_name`` and exported with the transformer
    streamed (as a full-size one is) and first-block caching; asserts that the transformer and its cached step were
    streamed and gated on their reduced-depth copies. ``ref_folder``: an export whose tokenizers the folder takes."""
    from sdrt.export.flux_export import export_flux
    from sdrt.export.flux_loading import load_flux

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
