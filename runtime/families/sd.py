"""Stable Diffusion 1.x and 2.x: one CLIP text encoder (final, normed hidden states), no pooled embedding, a
UNet predicting epsilon (1.x, 2.x base) or v (2.x 768), a 4-channel VAE at 1/8 scale."""

from __future__ import annotations

from .base import Family

SD1 = Family(key="sd1", label="SD 1.x", encoders=("text_encoder",))
SD2 = Family(key="sd2", label="SD 2.x", encoders=("text_encoder",))
