"""``T5Tokenizer``: prompts -> T5 token ids (SD3's ``tokenizer_3``), from an export's tokenizer folder.

numpy + the ``tokenizers`` library only. The ids are what diffusers' ``StableDiffusion3Pipeline`` feeds T5:
``tokenizer_3(prompt, padding="max_length", max_length=256, truncation=True, add_special_tokens=True)``.
Safe to call from several threads at once: the tokenizer's state is set once at load, never changed by a call.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, InputError
from .tokenizer import FIX, read_config, token_str

DEFAULT_LENGTH = 256  # diffusers' max_sequence_length default for SD3 / SD3.5
MIN_LENGTH = 2  # diffusers' max_sequence_length range: MIN_LENGTH..MAX_LENGTH
MAX_LENGTH = 512  # diffusers refuses a longer max_sequence_length


def check_length(max_length: Any, model_max_length: int = MAX_LENGTH) -> int:
    """``max_length`` if it is a usable T5 sequence length (2 to 512, at most the tokenizer's own limit)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not MIN_LENGTH <= max_length <= MAX_LENGTH:
        raise InputError(f"the T5 sequence length must be an integer from {MIN_LENGTH} to {MAX_LENGTH}: {max_length!r}")
    if max_length > model_max_length:
        raise InputError(
            f"the T5 sequence length {max_length} is over the tokenizer's model_max_length {model_max_length}"
        )
    return max_length


class T5Tokenizer:
    """T5's SentencePiece (unigram) tokenizer, each prompt as one row: its tokens, ``</s>``, then the pad id.

    ``encode(prompts)`` -> int32 [B, L]: the prompt's first L - 1 tokens, eos, pad ... (L = ``max_length``,
    256 by default, as diffusers' SD3 pipelines); the same ids as transformers'
    ``T5TokenizerFast(prompts, padding="max_length", max_length=L, truncation=True)``. A longer prompt is cut
    so that eos still ends the row. ``encode_chunks(prompts)`` -> int32 [B, 1, L]: the same rows in
    ClipTokenizer's chunked shape (T5 has no 77-token limit to lift, so there is always one chunk).

    Everything about the text (SentencePiece's normalization, the ``▁`` word marker, the unigram model, the
    special tokens ``</s>``, ``<pad>``, ``<unk>`` and ``<extra_id_N>`` written in a prompt, which are read as
    those tokens) is the folder's tokenizer.json; this class only frames, truncates and pads.
    """

    def __init__(self, tokenizer: Any, *, eos_token: str = "</s>", pad_token: str = "<pad>",
                 max_length: int = DEFAULT_LENGTH, model_max_length: int = MAX_LENGTH) -> None:
        # the tokenizer must not truncate or pad by itself: this class frames and pads every row
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        ids = {}
        for name, token in (("eos", eos_token), ("pad", pad_token)):
            tid = tokenizer.token_to_id(token)
            if tid is None:
                raise ArtifactError(f"the T5 tokenizer has no {name} token {token!r}; {FIX}")
            ids[name] = int(tid)
        self.eos_id, self.pad_id = ids["eos"], ids["pad"]
        self.eos_token, self.pad_token = eos_token, pad_token
        self.model_max_length = model_max_length
        self.max_length = check_length(max_length, model_max_length)

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int = DEFAULT_LENGTH) -> T5Tokenizer:
        """Load ``tokenizer.json`` and ``tokenizer_config.json`` (eos / pad tokens, model_max_length)."""
        from tokenizers import Tokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise ArtifactError(f"T5 tokenizer folder {folder} is missing; {FIX}")
        tj, tc = folder / "tokenizer.json", folder / "tokenizer_config.json"
        for f in (tj, tc):
            if not f.is_file():
                raise ArtifactError(f"{f} is missing; {FIX}")
        config = read_config(tc)
        model_max = config.get("model_max_length", MAX_LENGTH)
        if isinstance(model_max, bool) or not isinstance(model_max, (int, float)) or model_max < 2:
            raise ArtifactError(f"{tc} has model_max_length {model_max!r}, expected a length (512); {FIX}")
        try:
            tokenizer = Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ArtifactError(f"{tj} is corrupt ({e}); {FIX}") from e
        # transformers' T5 defaults where the config names none
        eos = token_str(config.get("eos_token")) or "</s>"
        pad = token_str(config.get("pad_token")) or "<pad>"
        # a huge model_max_length (transformers' "no limit" sentinel, 1e30) leaves 512 as the limit
        return cls(tokenizer, eos_token=eos, pad_token=pad, max_length=max_length,
                   model_max_length=int(min(model_max, MAX_LENGTH)))

    def with_length(self, max_length: Any) -> T5Tokenizer:
        """This tokenizer framing rows of ``max_length`` tokens (a call's ``max_sequence_length``; checked as
        the constructor checks it); the SentencePiece model is shared, not copied."""
        other = copy.copy(self)
        other.max_length = check_length(max_length, self.model_max_length)
        return other

    def _tokens(self, prompts: Sequence[str]) -> list[list[int]]:
        """Each prompt's token ids, without eos."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise InputError("prompts must be a list of strings")
        if not prompts:
            return []
        return [enc.ids for enc in self._tok.encode_batch(list(prompts), add_special_tokens=False)]

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """int32 [B, L]: each prompt's tokens cut to L - 1, eos, then pad ids (see the class docstring)."""
        n = self.max_length
        tokens = self._tokens(prompts)
        out = np.full((len(tokens), n), self.pad_id, dtype=np.int32)
        for i, t in enumerate(tokens):
            t = t[: n - 1]
            out[i, : len(t)] = t
            out[i, len(t)] = self.eos_id
        return out

    def encode_chunks(self, prompts: Sequence[str]) -> np.ndarray:
        """int32 [B, 1, L]: ``encode``'s rows in ClipTokenizer.encode_chunks' shape (always one chunk)."""
        return self.encode(prompts)[:, None, :]

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        """The number of tokens of each prompt, eos excluded (more than L - 1 is cut by ``encode``)."""
        return [len(t) for t in self._tokens(prompts)]
