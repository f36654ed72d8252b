"""compel's conditioning on a CLIP encoder's states, in numpy, as compel 2.5.1 builds it (``EmbeddingsProvider``
and ``Compel``, with ``truncate_long_prompts=False`` as its CompelForSD / CompelForSDXL set it, and its default
``downweight_mode=DownweightMode.MASK``, or ``REMOVE`` where the text encoders take no attention mask):

1. Each fragment is tokenized on its own; its tokens carry its weight. The tokens are cut into chunks of 75,
   framed by bos and eos (weight 1) and padded as the tokenizer pads; a chunk of a longer prompt ends after the
   last ``.`` within its 75 tokens, else the last ``,`` ``.`` ``;`` ``:``, else the last word's end, else at 75
   (compel's ``SplitLongTextMode.SENTENCES``).
2. Each chunk's states ``z``: where every weight is 1, ``z``; else ``empty + (z - empty) * w`` per token (weight 1
   keeps ``z``), ``empty`` the encoder's states of the empty prompt's row (bos, eos, padding).
3. For each fragment of weight ``w < 1``, a variant of the prompt without that fragment is encoded likewise, and
   the result is the mix of the prompt's states (weight 1) and each variant's (weight
   ``tan((1 - max(w, 1e-5)) pi / 2)``), the weights divided by their sum. ``MASK`` (``mask=True``): the variant is
   the same tokens with an attention mask (``MASK_INPUT``) that hides the fragment's, from its first token to
   its last (a chunk boundary inside it included), but for every chunk's first and last position, as compel
   masks them; the rest of the prompt keeps its positions. ``REMOVE``: the variant is the prompt tokenized
   without the fragment (the tokens after it move up).
4. ``.blend(w...)``: the prompts' states (padded to the longest with the empty row's states) mixed by ``w``,
   divided by their sum unless ``no_normalize``. ``.and(w...)``: each part's states, ``empty + (c - empty) * w``
   where ``w != 1``, joined on the sequence.
5. The prompts of a call are padded to the longest with the empty row's states, as compel pads them.

Where compel raises, sdrt goes on: with ``REMOVE``, a fragment's removal that changes the number of chunks (sdrt
pads the shorter states with the empty row's, as compel pads everything else); with ``MASK``, a downweighted
fragment with no tokens (its variant is the prompt itself: nothing to hide, as ``REMOVE`` gives). A plan
(``compel_plan``) holds the rows the encoder must read (token ids, and their masks) and how their states
combine; it needs only the tokenizer, so a call's chunk count (``plan_chunks``) is known before any encoder runs.
``plan_states`` combines the encoder's states of those rows (float32).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .compel_syntax import Blend, CompelPrompt, Fragments
from .manifest import TEXT_MASK_INPUT

SENTENCE_ENDS = (".</w>",)
PHRASE_ENDS = (".</w>", ",</w>", ";</w>", ":</w>")
EPSILON = 1e-5  # compel's floor on a downweight (tan(pi / 2) is infinite)
# the text encoders' mask input (int32 [B, 77], 1: attended), where the export has it (its manifest's schema says so)
MASK_INPUT = TEXT_MASK_INPUT


@dataclass(frozen=True)
class Rows:
    """One weighted token sequence: ids int32 [k, 77], their weights float32 [k, 77], and the attention mask the
    encoder reads them with (int32 [k, 77], 0: hidden; None: every token attended)."""

    ids: np.ndarray
    weights: np.ndarray
    mask: np.ndarray | None = None


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


def _rows_and_spans(tok: Any, fragments: Fragments) -> tuple[Rows, list[tuple[int, int] | None]]:
    """compel's rows of a prompt's fragments, and where each fragment's tokens went: (first, last) positions in the
    rows read as one sequence (row r's position p is r x 77 + p), None for a fragment with no tokens."""
    frags = list(fragments) or [("", 1.0)]
    ids: list[int] = []
    weights: list[float] = []
    owner: list[int] = []  # each token's fragment
    for i, (tokens, (_, w)) in enumerate(zip(tok.token_ids([t for t, _ in frags]), frags, strict=True)):
        ids += tokens
        weights += [float(w)] * len(tokens)
        owner += [i] * len(tokens)
    rows: list[list[int]] = []
    mults: list[list[float]] = []
    spans: list[tuple[int, int] | None] = [None] * len(frags)
    while True:
        cut = split_point(tok, ids, tok.chunk_length)
        chunk, chunk_w = ids[:cut], weights[:cut]
        for j, i in enumerate(owner[:cut]):
            at = len(rows) * tok.max_length + 1 + j  # after the row's bos
            spans[i] = (spans[i] or (at, at))[0], at
        rows.append(tok.frame(chunk))
        mults.append([1.0, *chunk_w, *[1.0] * (tok.max_length - 1 - len(chunk_w))])
        ids, weights, owner = ids[cut:], weights[cut:], owner[cut:]
        if not ids:
            break
    return Rows(np.array(rows, np.int32), np.array(mults, np.float32)), spans


def compel_rows(tok: Any, fragments: Fragments) -> Rows:
    """compel's rows of a prompt's fragments (``get_token_ids_and_expand_weights``): each fragment tokenized on its
    own, then chunked (see the module docstring)."""
    return _rows_and_spans(tok, fragments)[0]


def hide_fragment(rows: Rows, span: tuple[int, int] | None) -> Rows:
    """``rows`` with compel's MASK-mode mask for the fragment at ``span``: 0 from its first token to its last, but
    1 at every row's first and last position (compel keeps the chunks' bos and eos markers)."""
    k, n = rows.ids.shape
    mask = np.ones(k * n, np.int32)
    if span is not None:
        mask[span[0]:span[1] + 1] = 0
        mask[0::n] = 1
        mask[n - 1::n] = 1
    return Rows(rows.ids, rows.weights, mask.reshape(k, n))


def fragments_plan(tok: Any, fragments: Fragments, mask: bool = False) -> FragmentsPlan:
    """The rows of a prompt's fragments and, per fragment below 1, of its variant without it: the same rows with
    the fragment hidden by the attention mask (``mask``, compel's MASK), or the fragments without it (REMOVE)."""
    base, spans = _rows_and_spans(tok, fragments)
    without = []
    for i, (_, w) in enumerate(fragments):
        if w < 1:
            lerp = math.tan((1.0 - max(EPSILON, w)) * math.pi / 2)
            rows = hide_fragment(base, spans[i]) if mask else compel_rows(tok, fragments[:i] + fragments[i + 1:])
            without.append((lerp, rows))
    return FragmentsPlan(base, tuple(without))


def compel_plan(tok: Any, prompt: CompelPrompt, mask: bool = False) -> CompelPlan:
    """The rows ``prompt`` needs from one encoder (``tok``: its ``ClipTokenizer``) and how they combine; ``mask``:
    compel's default MASK downweighting (the encoder takes ``MASK_INPUT``), else REMOVE."""
    parts: list[FragmentsPlan | BlendPlan] = []
    for part in prompt.parts:
        if isinstance(part, Blend):
            parts.append(BlendPlan(tuple(fragments_plan(tok, p, mask) for p in part.prompts), part.weights,
                                   part.normalize))
        else:
            parts.append(fragments_plan(tok, part, mask))
    return CompelPlan(tuple(parts), prompt.weights)


def downweighted(plan: CompelPlan) -> bool:
    """Any fragment below 1 (the only prompts whose states MASK and REMOVE make differently)."""
    return any(frag.without for frag in _fragments(plan))


def _all_rows(plan: FragmentsPlan) -> Iterator[Rows]:
    yield plan.base
    for _, rows in plan.without:
        yield rows


def _fragments(plan: CompelPlan) -> Iterator[FragmentsPlan]:
    for part in plan.parts:
        yield from (part.prompts if isinstance(part, BlendPlan) else (part,))


def row_key(ids: np.ndarray, mask: np.ndarray | None = None) -> bytes:
    """What identifies one encoder row's states: its ids, and its mask where it hides any token."""
    return ids.tobytes() if mask is None or mask.all() else ids.tobytes() + mask.tobytes()


def plan_rows(plan: CompelPlan) -> Iterator[tuple[bytes, np.ndarray, np.ndarray | None]]:
    """Every 77-token row the plan's states are made of (repeats included): (its ``row_key``, ids int32 [77], its
    attention mask int32 [77] or None)."""
    for frag in _fragments(plan):
        for rows in _all_rows(frag):
            for r, ids in enumerate(rows.ids):
                mask = None if rows.mask is None else rows.mask[r]
                yield row_key(ids, mask), ids, mask


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
    for r, (ids, w) in enumerate(zip(rows.ids, rows.weights, strict=True)):
        z = states[row_key(ids, None if rows.mask is None else rows.mask[r])]
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
    row's ``row_key`` -> [77, C] float32; ``empty``: the empty prompt's row's states)."""
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
