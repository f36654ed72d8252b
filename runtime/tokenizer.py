"""``ClipTokenizer``: prompts -> CLIP token ids, from an export's tokenizer folder (numpy + tokenizers only).

``encode`` gives the ids diffusers feeds a text encoder; ``encode_chunks`` lifts the 77-token limit the
way the popular UIs do. Safe to call from several threads at once: the tokenizer's state is set once at
load and never changed by a call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, InputError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_FIX = "re-export the model with `sdrt export` to rewrite it"


def _token_str(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ClipTokenizer:
    """CLIP's BPE tokenizer with bos / eos framing and padding to a fixed length (77).

    ``encode(prompts)`` -> int32 [B, 77]: bos, the prompt's first 75 tokens, eos, then the pad id; the
    same ids as ``CLIPTokenizer(prompts, padding="max_length", max_length=77, truncation=True)``, which
    is how diffusers pipelines call transformers. Longer prompts are cut after 75 tokens.

    ``encode_chunks(prompts)`` -> int32 [B, n_chunks, 77], for prompts longer than 75 tokens: each
    prompt's tokens (bos / eos excluded) are cut into chunks of 75, and each chunk is framed like an
    ``encode`` row (bos + chunk + eos + pad). Every prompt of the batch gets as many chunks as the
    longest one needs (at least one); the extra chunks are empty rows (bos, eos, pad ...). A prompt of
    at most 75 tokens therefore gives exactly its ``encode`` row as chunk 0. The text encoder runs on each
    chunk and the hidden states are concatenated along the sequence, as A1111 does (without its
    comma-aware chunk boundaries, BREAK keyword and attention weights).

    Prompts are normalized as transformers' CLIPTokenizer does (Unicode NFC, whitespace runs to one
    space, lower case); unlike OpenAI's original tokenizer, no ftfy repair or HTML unescaping is applied.
    The special tokens (bos, eos and the pad token) written in a prompt are read as those tokens: with
    SD 2.x / SDXL's pad token "!", every "!" in a prompt becomes id 0, as it does in diffusers.
    """

    def __init__(self, tokenizer: Any, pad_token: str, max_length: int = 77) -> None:
        # the tokenizer must not truncate or pad by itself: this class frames and pads every row
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        ids = {}
        for name, token in (("bos", BOS), ("eos", EOS), ("pad", pad_token)):
            tid = tokenizer.token_to_id(token)
            if tid is None:
                raise ArtifactError(f"the tokenizer has no {name} token {token!r}; {_FIX}")
            ids[name] = int(tid)
        if max_length < 3:
            raise ArtifactError(f"tokenizer model_max_length {max_length} is too small; {_FIX}")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.pad_token = pad_token
        self.max_length = max_length
        self.chunk_length = max_length - 2  # tokens per row between bos and eos

    @classmethod
    def from_folder(cls, path: str | Path) -> ClipTokenizer:
        """Load ``tokenizer.json`` and ``tokenizer_config.json`` from an export's tokenizer folder."""
        from tokenizers import Tokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise ArtifactError(f"tokenizer folder {folder} is missing; {_FIX}")
        tj, tc = folder / "tokenizer.json", folder / "tokenizer_config.json"
        for f in (tj, tc):
            if not f.is_file():
                raise ArtifactError(f"{f} is missing; {_FIX}")
        try:
            tokenizer = Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ArtifactError(f"{tj} is corrupt ({e}); {_FIX}") from e
        try:
            config = json.loads(tc.read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise TypeError("not a JSON object")
        except (OSError, ValueError, TypeError) as e:
            raise ArtifactError(f"{tc} is corrupt ({e}); {_FIX}") from e
        pad = _token_str(config.get("pad_token"))
        if pad is None:
            raise ArtifactError(f"{tc} names no pad_token; {_FIX}")
        max_length = config.get("model_max_length", 77)
        if not isinstance(max_length, int) or max_length > 4096:
            raise ArtifactError(f"{tc} has model_max_length {max_length!r}, expected 77; {_FIX}")
        return cls(tokenizer, pad, max_length)

    def _tokens(self, prompts: Sequence[str]) -> list[list[int]]:
        """Each prompt's token ids, without bos / eos."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise InputError("prompts must be a list of strings")
        if not prompts:
            return []
        return [enc.ids for enc in self._tok.encode_batch(list(prompts), add_special_tokens=False)]

    def _row(self, tokens: Sequence[int]) -> list[int]:
        row = [self.bos_id, *tokens, self.eos_id]
        return row + [self.pad_id] * (self.max_length - len(row))

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """int32 [B, 77]: each prompt framed, cut after 75 tokens and padded (see the class docstring)."""
        rows = [self._row(t[: self.chunk_length]) for t in self._tokens(prompts)]
        return np.array(rows, dtype=np.int32).reshape(len(rows), self.max_length)

    def encode_chunks(self, prompts: Sequence[str]) -> np.ndarray:
        """int32 [B, n_chunks, 77]: each prompt in framed 75-token chunks (see the class docstring)."""
        tokens = self._tokens(prompts)
        n = self.chunk_length
        n_chunks = max([1] + [-(-len(t) // n) for t in tokens])
        out = np.empty((len(tokens), n_chunks, self.max_length), dtype=np.int32)
        for i, t in enumerate(tokens):
            for k in range(n_chunks):
                out[i, k] = self._row(t[k * n : (k + 1) * n])
        return out

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        """The number of tokens of each prompt, bos / eos excluded (more than 75 is cut by ``encode``)."""
        return [len(t) for t in self._tokens(prompts)]
