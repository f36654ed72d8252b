"""Shared CLI output: the per-stage timing table."""

from __future__ import annotations

from typing import Any


def timing_table(timings: dict[str, Any], steps: int) -> str:
    rows = [("text encoding", timings.get("text_encoder_ms", 0.0))]
    if "vae_encoder_ms" in timings:
        rows.append(("VAE encode", timings["vae_encoder_ms"]))
    unet = timings.get("unet_steps_ms", [])
    rows.append((f"denoising ({steps} steps)", sum(unet)))
    rows.append(("  per UNet step (median)", timings.get("unet_step_ms", 0.0)))
    rows.append(("VAE decode", timings.get("vae_decoder_ms", 0.0)))
    rows.append(("total", timings.get("total_ms", 0.0)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'stage':{width}s}  {'ms':>10s}"]
    lines += [f"{name:{width}s}  {ms:10.1f}" for name, ms in rows]
    if unet:
        lines.append(f"{'it/s':{width}s}  {1e3 / (sum(unet) / len(unet)):10.2f}")
    return "\n".join(lines)
