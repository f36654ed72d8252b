"""What the transformer families' exports (SD 3 / 3.5, FLUX.1) read alike from a transformer's config."""

from __future__ import annotations

from typing import Any


def inner_width(config: Any) -> int:
    """The transformer's (or a ControlNet's) token width, diffusers' ``inner_dim``: its attention heads times each
    head's width."""
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])
