"""AUTOMATIC1111's prompt dialect in the text stage: its prompts checked against the family, the chunks they take
over every segment of prompt editing, their token rows with weights, and the emphasis on an encoder's states
(the syntax: runtime/prompt_syntax.py; chunking and weighting: runtime/weighted_prompts.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .engine import Array, Backend
from .errors import InputError
from .families import Family
from .prompt_syntax import parse_attention, segments
from .tokenizer import PromptTokenizer
from .weighted_prompts import a1111_batch, chunk_count, emphasize, weighted


def segment_texts(texts: Sequence[str]) -> list[str]:
    """The texts of every segment of these prompts' prompt editing."""
    return [t for _, seg in segments(list(texts), 1000) for t in seg]


def check_a1111(family: Family, texts: Sequence[str]) -> None:
    """A1111's emphasis and BREAK are for the CLIP families, which chunk their prompts; a family that does
    not (SD 3 / 3.5, FLUX.1: T5 reads them too) refuses a prompt that uses them, before any work."""
    if family.chunked:
        return
    for t in texts:
        if parse_attention(t) != [(t, 1.0)]:
            raise InputError(f"A1111's emphasis, escapes and BREAK apply to the CLIP families (SD 1.x, 2.x, "
                             f"SDXL); this {family.label} model reads its prompts as plain text: write "
                             f"{t!r} without them, or use prompt_syntax='plain'")


def a1111_chunks(tokenizers: Sequence[PromptTokenizer], texts: Sequence[str]) -> tuple[int, ...]:
    """The 77-token chunks each tokenizer makes of these texts (together) by A1111's chunking."""
    return tuple(chunk_count(tok, texts) for tok in tokenizers)


def weighted_rows(tok: PromptTokenizer, prompts: list[str], chunks: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A1111's rows of a CLIP family's prompts (at least ``chunks`` each) and their weights (None where every
    weight is 1)."""
    ids, w = a1111_batch(tok, prompts, chunks)
    return ids, (w if weighted(w) else None)


def emphasized(backend: Backend, out: dict[str, Array], weights: np.ndarray) -> dict[str, Array]:
    """An encoder's outputs with A1111's emphasis on its states (``weights`` [rows, k, n], per prompt and chunk);
    the weighted states pass through the host once."""
    rows, k, n = weights.shape
    hid = backend.to_host(out["hidden_states"])
    return {**out, "hidden_states": backend.to_device(emphasize(hid, weights.reshape(rows * k, n)).astype(hid.dtype))}
