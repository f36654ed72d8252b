"""compel's prompt dialect in the text stage: its prompts checked against the family, the chunks they take, and
the encoders' states built from compel's plans (runtime/compel_prompts.py; the syntax: runtime/compel_syntax.py)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from .compel_prompts import (
    MASK_INPUT,
    compel_plan,
    downweighted,
    pad_to,
    plan_chunks,
    plan_rows,
    plan_states,
    row_key,
)
from .compel_syntax import parse_compel
from .engine import Array
from .errors import ArtifactError, InputError
from .families import Family
from .manifest import ExportManifest
from .text_encoders import EncoderRunner
from .tokenizer import ClipTokenizer, PromptTokenizer


def check_compel(family: Family, texts: Sequence[str]) -> None:
    """compel's syntax parsed (InputError on what it cannot read); its weights, blends and conjunctions are for
    the CLIP families: a family that reads prompts as plain text (SD 3 / 3.5, FLUX.1) refuses a prompt that
    uses them, or compel's brackets, quotes or escapes, before any work."""
    for t in texts:
        prompt = parse_compel(t)
        if not family.chunked and not (prompt.plain and not any(c in t for c in '()"\\')):
            raise InputError(f"compel's weights, blends, conjunctions and escapes apply to the CLIP families (SD "
                             f"1.x, 2.x, SDXL); this {family.label} model reads its prompts as plain text: "
                             f"write {t!r} without them, or use prompt_syntax='plain'")


def takes_masks(manifest: ExportManifest) -> bool:
    """compel's default downweighting (MASK) applies: every text encoder takes an attention mask (``MASK_INPUT``,
    recorded in the manifest; exports before it, and Optimum's, have none and get compel's REMOVE)."""
    return all(any(t.name == MASK_INPUT for t in manifest.components[n].inputs) for n in manifest.encoder_names)


def compel_chunks(tokenizers: Sequence[PromptTokenizer], texts: Sequence[str], mask: bool) -> int:
    """The 77-token chunks the longest of these prompts takes of any encoder (compel pads every encoder's states
    to the longest)."""
    return max(plan_chunks(compel_plan(tok, parse_compel(t), mask)) for tok in tokenizers for t in texts)


def _warn_removed() -> None:
    """A downweighted fragment on an export whose encoders take no attention mask: compel's REMOVE, said."""
    warnings.warn("compel's default downweighting (DownweightMode.MASK) hides a fragment below 1 with an "
                  "attention mask, which this export's text encoders do not take (exported by an older sdrt, or "
                  "by Optimum): the fragment is removed instead, as compel's DownweightMode.REMOVE does. For "
                  "compel's default, re-export the model with `sdrt export` and rebuild any engines from it",
                  stacklevel=2)


def compel_outputs(runner: EncoderRunner, manifest: ExportManifest, tokenizers: Sequence[PromptTokenizer],
                   prompts: list[str], chunks: int, lora: Mapping[str, Mapping[str, Array]] | None
                   ) -> tuple[list[dict[str, Array]], int]:
    """compel's conditioning of a CLIP family's prompts (runtime/compel_prompts.py), per encoder, as the encoder's
    outputs would be in chunks: hidden_states [rows x k, 77, C] (every encoder padded to the same k chunks, at
    least ``chunks``, with the empty prompt's states) and, from an encoder with a projection, text_embeds whose
    first chunk of each row is compel's pooled embedding: the encoder's projection of the prompt's raw text, cut
    at 75 tokens. The encoder reads its rows (each distinct one once) in batches of rows x k, the call's own
    shape. Returns (the outputs, k)."""
    be = runner.backend
    names = manifest.encoder_names
    mask = takes_masks(manifest)
    plans = [[compel_plan(tok, parse_compel(p), mask) for p in prompts] for tok in tokenizers]
    if not mask and any(downweighted(p) for each in plans for p in each):
        _warn_removed()
    k = max(chunks, *(plan_chunks(p) for each in plans for p in each))
    rows = len(prompts)
    outs: list[dict[str, Array]] = []
    for name, tok, each in zip(names, tokenizers, plans, strict=True):
        if not isinstance(tok, ClipTokenizer):
            raise ArtifactError(f"{name}: compel's syntax reads CLIP tokenizers; this export's is a "
                                f"{type(tok).__name__}: re-export the model with `sdrt export`")
        empty = np.array(tok.frame([]), np.int32)
        wanted = {key: (r, m) for plan in each for key, r, m in plan_rows(plan)}
        wanted.pop(row_key(empty), None)
        keys = [row_key(empty), *wanted]
        ids = [empty, *(r for r, _ in wanted.values())]
        masks = np.ones((len(ids), tok.max_length), np.int32)
        for i, (_, m) in enumerate(wanted.values(), start=1):
            if m is not None:
                masks[i] = m
        pooled = "text_embeds" in runner.engines[name].outputs
        if pooled:
            raw = list(tok.encode(prompts))  # the raw text's row: compel's get_pooled_embeddings
            ids += raw
            keys += [b"pooled"] * len(raw)  # read for the projection only
            masks = np.concatenate([masks, np.ones((len(raw), tok.max_length), np.int32)])
        hidden, embeds = runner.rows(name, np.stack(ids), masks, rows * k, (lora or {}).get(name) or {})
        dtype = hidden.dtype
        states = dict(zip(keys, hidden.astype(np.float32), strict=True))
        e = states[row_key(empty)]
        cond = np.stack([pad_to(plan_states(plan, states, e), k, e) for plan in each])
        out = {"hidden_states": be.to_device(np.ascontiguousarray(
            cond.reshape(rows * k, tok.max_length, -1).astype(dtype)))}
        if pooled and embeds is not None:
            first = np.zeros((rows, k, embeds.shape[-1]), embeds.dtype)
            first[:, 0] = embeds[-rows:]
            out["text_embeds"] = be.to_device(first.reshape(rows * k, -1))
        outs.append(out)
    return outs, k
