"""``ClipTokenizer``: prompts -> CLIP token ids, from an export's tokenizer folder (numpy + tokenizers only).

``encode`` gives the ids diffusers feeds a text encoder; ``encode_chunks`` lifts the 77-token limit the
way the popular UIs do. Safe to call from several threads at once: the tokenizer's state is set once at
load and never changed by a call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import ArtifactError, InputError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
FIX = "re-export the model with `sdrt export` to rewrite it"

# CLIP's pre-tokenizer: its special tokens, English contractions, letter runs, single digits, and runs of
# anything else that is not whitespace. Whitespace only separates.
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise TypeError("not a JSON object")
    except (OSError, ValueError, TypeError) as e:
        raise ArtifactError(f"{path} is corrupt ({e}); {FIX}") from e
    return config


def _max_length(config: dict[str, Any], path: Path) -> int:
    max_length = config.get("model_max_length", 77)
    if not isinstance(max_length, int) or max_length > 4096:
        raise ArtifactError(f"{path} has model_max_length {max_length!r}, expected 77; {FIX}")
    return max_length


def _read_bpe(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json and merges.txt (its ``#version`` header skipped)."""
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    except (OSError, ValueError) as e:
        raise ArtifactError(f"the tokenizer files in {folder} are unreadable ({e}); {FIX}") from e
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    if not isinstance(vocab, dict) or any(len(m) != 2 for m in merges):
        raise ArtifactError(f"the tokenizer files in {folder} are corrupt (bad vocabulary or merges); {FIX}")
    return vocab, merges  # type: ignore[return-value]


def token_str(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class PromptTokenizer(Protocol):
    """What the text stage asks of a tokenizer (``ClipTokenizer``, ``t5_tokenizer.T5Tokenizer``)."""

    max_length: int

    def encode(self, prompts: Sequence[str]) -> np.ndarray: ...  # int32 [B, max_length]

    def encode_chunks(self, prompts: Sequence[str]) -> np.ndarray: ...  # int32 [B, chunks, max_length]

    def count_tokens(self, prompts: Sequence[str]) -> list[int]: ...


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
                raise ArtifactError(f"the tokenizer has no {name} token {token!r}; {FIX}")
            ids[name] = int(tid)
        if max_length < 3:
            raise ArtifactError(f"tokenizer model_max_length {max_length} is too small; {FIX}")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.pad_token = pad_token
        self.max_length = max_length
        self.chunk_length = max_length - 2  # tokens per row between bos and eos

    @classmethod
    def from_folder(cls, path: str | Path, *, vocab_merges: bool = False) -> ClipTokenizer:
        """Load ``tokenizer.json`` and ``tokenizer_config.json`` from an export's tokenizer folder."""
        from tokenizers import Tokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise ArtifactError(f"tokenizer folder {folder} is missing; {FIX}")
        tj, tc = folder / "tokenizer.json", folder / "tokenizer_config.json"
        # vocab_merges: a folder without tokenizer.json may hold vocab.json + merges.txt (Optimum's exports)
        bpe = vocab_merges and not tj.is_file() and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        for f in (tc,) if bpe else (tj, tc):
            if not f.is_file():
                raise ArtifactError(f"{f} is missing; {FIX}")
        config = read_config(tc)
        pad = token_str(config.get("pad_token"))
        if bpe:  # vocab.json + merges.txt, as transformers' slow CLIPTokenizer saves them (Optimum's exports)
            smap = folder / "special_tokens_map.json"
            if smap.is_file():  # transformers lets the map win over the config
                pad = token_str(read_config(smap).get("pad_token")) or pad
            if pad is None:
                raise ArtifactError(f"{tc} names no pad_token; {FIX}")
            tokenizer = build_tokenizer_json(*_read_bpe(folder), pad)
            return cls(tokenizer, pad, _max_length(config, tc))
        try:
            tokenizer = Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ArtifactError(f"{tj} is corrupt ({e}); {FIX}") from e
        if pad is None:
            raise ArtifactError(f"{tc} names no pad_token; {FIX}")
        return cls(tokenizer, pad, _max_length(config, tc))

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

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids, without bos / eos (each text tokenized on its own, as A1111 tokenizes the
        fragments of a weighted prompt)."""
        return self._tokens(texts)

    def frame(self, tokens: Sequence[int]) -> list[int]:
        """One row: bos, ``tokens`` (at most ``chunk_length``), eos, then the pad id to ``max_length``."""
        if len(tokens) > self.chunk_length:
            raise ValueError(f"{len(tokens)} tokens do not fit a row of {self.chunk_length}")
        return self._row(tokens)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each id's text in the vocabulary (``</w>`` ends a word), as transformers' ``convert_ids_to_tokens``."""
        return [self._tok.id_to_token(int(i)) or "" for i in ids]

    @property
    def comma_id(self) -> int | None:
        """The id of "," as a word (A1111 breaks a full chunk after the last comma)."""
        tid = self._tok.token_to_id(",</w>")
        return None if tid is None else int(tid)

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


def build_tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str,
                         extra_tokens: Sequence[dict[str, Any]] = ()) -> Any:
    """A ``tokenizers.Tokenizer`` of CLIP's pipeline, configured to tokenize as transformers' CLIPTokenizer.

    Normalize (NFC, whitespace runs -> one space, lowercase), split with CLIP's pattern, map bytes to
    symbols, BPE with ``</w>`` ending each word, then bos ... eos. No truncation or padding is stored:
    the runtime applies them. bos, eos and the pad token are special added tokens, matched in the raw
    prompt before normalization, as transformers registers them; for SD2/SDXL's pad "!" that turns every
    "!" in a prompt into the pad id 0, which is what diffusers feeds those models.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    for name in (BOS, EOS, pad_token):
        if name not in vocab:
            raise InputError(f"token {name!r} is not in the vocabulary; a CLIP tokenizer needs it")
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=EOS, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, dropout=None))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    # The byte-level step keeps GPT-2's split too, as transformers does: it changes only the pieces
    # "<|startoftext|>" / "<|endoftext|>" that reach the model in another case ("<|", "endoftext", "|>").
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    specials = list(dict.fromkeys([pad_token, BOS, EOS]))  # the unknown token is eos
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    for t in extra_tokens:
        flags = {k: bool(t[k]) for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in t}
        tok.add_tokens([AddedToken(t["content"], **flags)])
        if tok.token_to_id(t["content"]) != int(t["id"]):
            raise ArtifactError(
                f"added token {t['content']!r} has id {t['id']} in the source but the ids of added tokens "
                f"must follow the vocabulary ({len(vocab)}, {len(vocab) + 1}, ...); the source folder is corrupt"
            )
    return tok
