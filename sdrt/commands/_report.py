"""Shared CLI output: the per-stage timing table, and warnings shown after a progress bar."""

from __future__ import annotations

import sys
import warnings
from typing import Any


def timing_table(timings: dict[str, Any], steps: int) -> str:
    """The stages' rows add up to the total: what no stage measured (a first call's session warm-up,
    uploads, host work) is its own row."""
    unet = timings.get("unet_steps_ms", [])
    parts = [("text encoding", timings.get("text_encoder_ms", 0.0))]
    if "vae_encoder_ms" in timings:
        parts.append(("VAE encode", timings["vae_encoder_ms"]))
    if "refiner_steps_ms" in timings:  # base + refiner: each model's share of the schedule
        for who in ("base", "refiner"):
            own = timings[f"{who}_steps_ms"]
            parts.append((f"denoising, {who} ({len(own)} steps)", sum(own)))
    else:
        parts.append((f"denoising ({steps} steps)", sum(unet)))
    parts.append(("VAE decode", timings.get("vae_decoder_ms", 0.0)))
    total = timings.get("total_ms", 0.0)
    parts.append(("other (warm-up, uploads, host)", max(0.0, total - sum(ms for _, ms in parts))))
    rows = list(parts)
    rows.insert(len(parts) - 2, ("  per UNet step (median)", timings.get("unet_step_ms", 0.0)))  # not a part
    rows.append(("total", total))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'stage':{width}s}  {'ms':>10s}"]
    lines += [f"{name:{width}s}  {ms:10.1f}" for name, ms in rows]
    if unet:
        lines.append(f"{'it/s':{width}s}  {1e3 / (sum(unet) / len(unet)):10.2f}")
    return "\n".join(lines)


def print_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Warnings recorded during a call, one plain line each on stderr (no source line in the progress bar)."""
    seen: set[str] = set()
    for w in caught:
        text = " ".join(str(w.message).split())
        if text not in seen:
            seen.add(text)
            print(f"warning: {text}", file=sys.stderr)
