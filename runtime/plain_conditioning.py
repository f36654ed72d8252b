"""Plain prompts in the text stage (the default dialect, and how every family without chunking reads its prompts):
their token rows, and the warning when a family cuts a long prompt as diffusers does."""

from __future__ import annotations

import warnings

import numpy as np

from .families import Family
from .tokenizer import PromptTokenizer


def plain_rows(family: Family, tok: PromptTokenizer, prompts: list[str]) -> np.ndarray:
    """[rows, chunks, tokens]: in 77-token chunks where the family chunks long prompts, else one row each
    (cut at the tokenizer's length, as diffusers)."""
    return tok.encode_chunks(prompts) if family.chunked else tok.encode(prompts)[:, None]


def warn_cut(family: Family, name: str, tok: PromptTokenizer, prompts: list[str]) -> None:
    """A family that cuts long prompts (as diffusers does) says so, as diffusers' pipelines log it: a
    warning naming the encoder, the prompt and how many tokens were cut."""
    room = tok.max_length - (1 if family.tokenizer_kind(name) == "t5" else 2)  # T5: eos; CLIP: bos, eos
    for i, n in enumerate(tok.count_tokens(prompts)):
        if n > room:
            warnings.warn(f"{name}: prompt {i} has {n} tokens; the {n - room} past {room} are cut (this "
                          f"{family.label} model reads {room}, as diffusers does)",
                          stacklevel=5)  # past TextConditioning's encode and the pipeline's text stage
