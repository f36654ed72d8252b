"""A1111's weighted prompts on CLIP encoders: its chunking of a parsed prompt into 77-token rows with a weight
per token, and its "Original" emphasis on the encoder's hidden states.

``a1111_rows(tokenizer, text)`` follows A1111's ``FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line``: each
fragment of ``prompt_syntax.parse_attention`` is tokenized on its own and its tokens carry its weight; a chunk
holds 75 tokens, framed by bos and eos (weight 1) and padded as the tokenizer pads; ``BREAK`` ends the chunk
(padding it); a chunk that fills up with a comma among its last 20 tokens ends after that comma and the rest
moves to the next chunk (A1111's ``comma_padding_backtrack``, default 20). Textual-inversion embeddings are not
looked up (sdrt loads none).

``emphasize(hidden, weights)`` is A1111's ``EmphasisOriginal``: the hidden states times their token's weight,
then scaled back to the mean they had (per prompt and chunk here; A1111 takes one mean over a call's batch of
prompts, which is the same for the usual batch of one prompt repeated).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .prompt_syntax import parse_attention

COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default


def a1111_rows(tok: Any, text: str, backtrack: int = COMMA_BACKTRACK) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [chunks, 77], weights float32 [chunks, 77]) of one prompt, as A1111 chunks it."""
    parsed = parse_attention(text)
    tokenized = tok.token_ids([t for t, _ in parsed])
    n, comma = tok.chunk_length, tok.comma_id
    rows: list[list[int]] = []
    mults: list[list[float]] = []
    chunk: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal chunk, weights, last_comma
        rows.append(tok.frame(chunk))
        mults.append([1.0, *weights, *[1.0] * (tok.max_length - 1 - len(weights))])
        chunk, weights, last_comma = [], [], -1

    for tokens, (frag, weight) in zip(tokenized, parsed, strict=True):
        if (frag, weight) == ("BREAK", -1.0):
            close()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(chunk)
            elif backtrack and len(chunk) == n and last_comma != -1 and len(chunk) - last_comma <= backtrack:
                cut = last_comma + 1
                moved, moved_w = chunk[cut:], weights[cut:]
                chunk, weights = chunk[:cut], weights[:cut]
                close()
                chunk, weights = moved, moved_w
            if len(chunk) == n:
                close()
            chunk.append(token)
            weights.append(weight)
    if chunk or not rows:
        close()
    return np.array(rows, np.int32), np.array(mults, np.float32)


def a1111_batch(tok: Any, texts: Sequence[str], chunks: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(ids [rows, k, 77], weights [rows, k, 77]) of several prompts, each padded to the most chunks (at least
    ``chunks``) with empty chunks (the empty prompt's row, weight 1: what A1111's "pad prompt/negative prompt"
    option adds)."""
    each = [a1111_rows(tok, t) for t in texts]
    k = max(chunks, *(ids.shape[0] for ids, _ in each))
    empty = np.array(tok.frame([]), np.int32)
    ids = np.empty((len(each), k, tok.max_length), np.int32)
    w = np.ones((len(each), k, tok.max_length), np.float32)
    for r, (i, m) in enumerate(each):
        ids[r, : len(i)], w[r, : len(m)] = i, m
        ids[r, len(i):] = empty
    return ids, w


def chunk_count(tok: Any, texts: Sequence[str]) -> int:
    """The chunks ``a1111_batch`` gives these texts."""
    return max(a1111_rows(tok, t)[0].shape[0] for t in texts)


def emphasize(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's "Original" emphasis on [rows, 77, C] states with [rows, 77] weights (float32): each row times
    its weights, then rescaled to the mean it had."""
    z = hidden.astype(np.float32)
    before = z.mean(axis=(1, 2), keepdims=True)
    z = z * weights[:, :, None]
    return z * (before / z.mean(axis=(1, 2), keepdims=True))


def weighted(weights: np.ndarray) -> bool:
    """Any weight other than 1 (emphasis to apply)."""
    return bool(np.any(weights != 1.0))
