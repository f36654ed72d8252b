"""compel's conditioning on a CLIP encoder's states, in numpy, as compel 2.5.1 builds it (``EmbeddingsProvider``
and ``Compel``, with ``truncate_long_prompts=False`` as its CompelForSD / CompelForSDXL set it, and
``downweight_mode=DownweightMode.REMOVE``):

1. Each fragment is tokenized on its own; its tokens carry its weight. The tokens are cut into chunks of 75,
   framed by bos and eos (weight 1) and padded as the tokenizer pads; a chunk of a longer prompt ends after the
   last ``.`` within its 75 tokens, else the last ``,`` ``.`` ``;`` ``:``, else the last word's end, else at 75
   (compel's ``SplitLongTextMode.SENTENCES``).
2. Each chunk's states ``z``: where every weight is 1, ``z``; else ``empty + (z - empty) * w`` per token (weight 1
   keeps ``z``), ``empty`` the encoder's states of the empty prompt's row (bos, eos, padding).
3. For each fragment of weight ``w < 1``, the same prompt without that fragment is encoded likewise, and the result
   is the mix of the prompt's states (weight 1) and each of these (weight ``tan((1 - max(w, 1e-5)) pi / 2)``), the
   weights divided by their sum. compel's default, ``DownweightMode.MASK``, instead runs the encoder with an
   attention mask that hides the fragment: sdrt's text-encoder graphs take no mask, so sdrt follows ``REMOVE``.
4. ``.blend(w...)``: the prompts' states (padded to the longest with the empty row's states) mixed by ``w``,
   divided by their sum unless ``no_normalize``. ``.and(w...)``: each part's states, ``empty + (c - empty) * w``
   where ``w != 1``, joined on the sequence.
5. The prompts of a call are padded to the longest with the empty row's states, as compel pads them.

Where compel raises (a fragment's removal changes the number of chunks), sdrt pads the shorter states with the
empty row's, as compel pads everything else. A plan (``compel_plan``) holds the rows the encoder must read and how
their states combine; it needs only the tokenizer, so a call's chunk count (``plan_chunks``) is known before any
encoder runs. ``plan_states`` combines the encoder's states of those rows (float32).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .compel_syntax import Blend, CompelPrompt, Fragments

SENTENCE_ENDS = (".</w>",)
PHRASE_ENDS = (".</w>", ",</w>", ";</w>", ":</w>")
EPSILON = 1e-5  # compel's floor on a downweight (tan(pi / 2) is infinite)


@dataclass(frozen=True)
class Rows:
    """One weighted token sequence: ids int32 [k, 77] and their weights float32 [k, 77]."""

    ids: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class FragmentsPlan:
    """A prompt's fragments: its rows, and for each fragment of weight < 1 the rows without it with their lerp
    weight."""

    base: Rows
    without: tuple[tuple[float, Rows], ...]


@dataclass(frozen=True)
class BlendPlan:
    prompts: tuple[FragmentsPlan, ...]
    weights: tuple[float, ...]
    normalize: bool


@dataclass(frozen=True)
class CompelPlan:
    """A whole prompt: its parts (joined on the sequence) with their ``.and()`` weights."""

    parts: tuple[FragmentsPlan | BlendPlan, ...]
    weights: tuple[float, ...]


def split_point(tok: Any, ids: Sequence[int], n: int) -> int:
    """Where compel ends a chunk of ``ids`` (at most ``n`` tokens): after the last sentence end in the first ``n``,
    else the last phrase end, else the last word end, else at ``n``."""
    if len(ids) <= n:
        return n
    texts = tok.token_texts(ids[:n])
    for ends in (SENTENCE_ENDS, PHRASE_ENDS):
        for i in range(len(texts) - 1, -1, -1):
            if texts[i] in ends:
                return i + 1
    for i in range(len(texts) - 1, -1, -1):
        if texts[i].endswith("</w>"):
            return i + 1
    return n


def compel_rows(tok: Any, fragments: Fragments) -> Rows:
    """compel's rows of a prompt's fragments (``get_token_ids_and_expand_weights``): each fragment tokenized on its
    own, then chunked (see the module docstring)."""
    frags = list(fragments) or [("", 1.0)]
    ids: list[int] = []
    weights: list[float] = []
    for tokens, (_, w) in zip(tok.token_ids([t for t, _ in frags]), frags, strict=True):
        ids += tokens
        weights += [float(w)] * len(tokens)
    rows, mults = [], []
    while True:
        cut = split_point(tok, ids, tok.chunk_length)
        chunk, chunk_w = ids[:cut], weights[:cut]
        rows.append(tok.frame(chunk))
        mults.append([1.0, *chunk_w, *[1.0] * (tok.max_length - 1 - len(chunk_w))])
        ids, weights = ids[cut:], weights[cut:]
        if not ids:
            break
    return Rows(np.array(rows, np.int32), np.array(mults, np.float32))


def fragments_plan(tok: Any, fragments: Fragments) -> FragmentsPlan:
    without = []
    for i, (_, w) in enumerate(fragments):
        if w < 1:
            lerp = math.tan((1.0 - max(EPSILON, w)) * math.pi / 2)
            without.append((lerp, compel_rows(tok, fragments[:i] + fragments[i + 1:])))
    return FragmentsPlan(compel_rows(tok, fragments), tuple(without))


def compel_plan(tok: Any, prompt: CompelPrompt) -> CompelPlan:
    """The rows ``prompt`` needs from one encoder (``tok``: its ``ClipTokenizer``) and how they combine."""
    parts: list[FragmentsPlan | BlendPlan] = []
    for part in prompt.parts:
        if isinstance(part, Blend):
            parts.append(BlendPlan(tuple(fragments_plan(tok, p) for p in part.prompts), part.weights, part.normalize))
        else:
            parts.append(fragments_plan(tok, part))
    return CompelPlan(tuple(parts), prompt.weights)


def _all_rows(plan: FragmentsPlan) -> Iterator[Rows]:
    yield plan.base
    for _, rows in plan.without:
        yield rows


def _fragments(plan: CompelPlan) -> Iterator[FragmentsPlan]:
    for part in plan.parts:
        yield from (part.prompts if isinstance(part, BlendPlan) else (part,))


def plan_rows(plan: CompelPlan) -> Iterator[np.ndarray]:
    """Every 77-token row the plan's states are made of (repeats included)."""
    for frag in _fragments(plan):
        for rows in _all_rows(frag):
            yield from rows.ids


def _chunks(part: FragmentsPlan | BlendPlan) -> int:
    if isinstance(part, BlendPlan):
        return max(_chunks(p) for p in part.prompts)
    return max(len(r.ids) for r in _all_rows(part))


def plan_chunks(plan: CompelPlan) -> int:
    """The 77-token chunks of the plan's states (before a call pads its prompts to the longest)."""
    return sum(_chunks(p) for p in plan.parts)


def pad_to(states: np.ndarray, chunks: int, empty: np.ndarray) -> np.ndarray:
    """[T, C] states padded to ``chunks`` x 77 with the empty row's states [77, C] (compel's padding)."""
    missing = chunks - len(states) // len(empty)
    return np.concatenate([states, *[empty] * missing]) if missing > 0 else states


def _rows_states(rows: Rows, states: Mapping[bytes, np.ndarray], empty: np.ndarray) -> np.ndarray:
    out = []
    for ids, w in zip(rows.ids, rows.weights, strict=True):
        z = states[ids.tobytes()]
        if np.all(w == 1):
            out.append(z)
        else:
            ww = w[:, None]
            out.append(np.where(ww == 1, z, empty + (z - empty) * ww))
    return np.concatenate(out)


def _mix(parts: list[np.ndarray], weights: Sequence[float], normalize: bool, empty: np.ndarray) -> np.ndarray:
    """compel's ``apply_embedding_weights`` over states padded to the longest."""
    k = max(len(p) for p in parts) // len(empty)
    stacked = np.stack([pad_to(p, k, empty) for p in parts])
    w = np.array(weights, np.float32)
    if normalize:
        w = w / w.sum(dtype=np.float32)
    return (stacked * w[:, None, None]).sum(axis=0, dtype=np.float32)


def _fragments_states(plan: FragmentsPlan, states: Mapping[bytes, np.ndarray], empty: np.ndarray) -> np.ndarray:
    base = _rows_states(plan.base, states, empty)
    if not plan.without:
        return base
    variants = [base, *(_rows_states(r, states, empty) for _, r in plan.without)]
    return _mix(variants, [1.0, *(lerp for lerp, _ in plan.without)], True, empty)


def plan_states(plan: CompelPlan, states: Mapping[bytes, np.ndarray], empty: np.ndarray) -> np.ndarray:
    """The prompt's conditioning [chunks x 77, C] float32 from the encoder's states of its rows (``states``: each
    row's ``ids.tobytes()`` -> [77, C] float32; ``empty``: the empty prompt's row's states)."""
    out = []
    for part, weight in zip(plan.parts, plan.weights, strict=True):
        if isinstance(part, BlendPlan):
            c = _mix([_fragments_states(p, states, empty) for p in part.prompts], part.weights, part.normalize,
                     empty)
        else:
            c = _fragments_states(part, states, empty)
        if weight != 1:
            e = np.tile(empty, (len(c) // len(empty), 1))
            c = e + (c - e) * np.float32(weight)
        out.append(c)
    return np.concatenate(out).astype(np.float32, copy=False)
