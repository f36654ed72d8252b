"""``write_t5_tokenizer``: the T5 tokenizer folder of an SD3-family export (``tokenizer_3/``).

The folder holds tokenizer.json + tokenizer_config.json (+ special_tokens_map.json when the source has one),
which is all the runtime's ``T5Tokenizer`` reads. A diffusers ``tokenizer_3`` folder (tokenizer.json, or only
SentencePiece's ``spiece.model``) is loaded by transformers' ``T5TokenizerFast`` and saved as it loads it.
Without a source, the tiny tokenizer shipped in ``assets/t5-tiny/`` (made by ``t5_tiny_tokenizer``) is used.
It ends in a parity gate: transformers' ``T5TokenizerFast`` on the source (what diffusers loads) must give
the same ids as the runtime on a set of probe prompts, or the folder is refused.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from sdrt.runtime.errors import ArtifactError, ParityError
from sdrt.runtime.t5_tokenizer import DEFAULT_LENGTH, T5Tokenizer

T5_ASSET = Path(__file__).parent / "assets" / "t5-tiny"
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # the last one only if present

# Probes of the parity gate: cased, accented (composed and decomposed), fullwidth, CJK and emoji (unknown
# to the tiny vocabulary), whitespace runs, digits and punctuation, T5's special tokens written in a prompt,
# and one prompt over the 256-token limit.
PROBES = (
    "",
    "a photograph of an astronaut riding a horse",
    "  Mixed CASE,   whitespace\t\nruns!!  and punctuation... (masterpiece:1.2) [x] {y} #tag @you  ",
    "café naïve Zürich cafe\u0301 ＡＢＣ ﬁne ½ x\u00a0y",
    "東京の夜景、ネオン 서울 🐱🚀 ✨",
    "1234567890 3.14 1e-5 $100 50% it's o'clock",
    "a </s> b <pad> c <unk> d <extra_id_5> e</s>f",
    " ".join(["a red fox jumping over a lazy dog"] * 40),
)


def _copy(source: Path, dest: Path) -> None:
    for name in FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)


def _convert(source: Path, dest: Path) -> None:
    """The source (tokenizer.json or spiece.model) -> tokenizer.json + tokenizer_config.json as transformers'
    T5TokenizerFast loads and saves it."""
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]

    try:
        tok = T5TokenizerFast.from_pretrained(str(source))
    except Exception as e:  # transformers and sentencepiece raise many kinds on a bad model file
        raise ArtifactError(f"transformers cannot read the tokenizer in {source} ({e}); the source folder is "
                            "corrupt: point at the model's tokenizer_3/ folder") from e
    with tempfile.TemporaryDirectory(prefix="sdrt-t5tok-") as tmp:
        tok.save_pretrained(tmp)
        _copy(Path(tmp), dest)


def _reference_ids(source: Path, prompts: list[str], max_length: int) -> list[list[int]]:
    """transformers' T5TokenizerFast on ``prompts``, called as diffusers' SD3 pipelines call it."""
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]

    tok = T5TokenizerFast.from_pretrained(str(source))
    enc = tok(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True)
    return [list(ids) for ids in enc["input_ids"]]


def write_t5_tokenizer(dest: Path, source: Path | None = None) -> None:
    """Write a T5 tokenizer folder into ``dest`` (created if needed) and check it against transformers.

    ``source``: a diffusers model's ``tokenizer_3`` folder (tokenizer.json + tokenizer_config.json, or only
    spiece.model), saved as transformers' T5TokenizerFast loads it. Without a source, the shipped tiny
    tokenizer is copied.

    The files are written in place: the caller writes into a temporary folder and renames it.
    Raises ArtifactError for a source folder without a tokenizer, ParityError if transformers'
    T5TokenizerFast on the source disagrees with the written folder on any probe prompt.
    """
    dest = Path(dest)
    src = T5_ASSET if source is None else Path(source)
    if not src.is_dir():
        raise ArtifactError(f"tokenizer folder {src} does not exist; point at the model's tokenizer_3/")
    dest.mkdir(parents=True, exist_ok=True)
    if source is None:
        _copy(src, dest)
    elif (src / "tokenizer.json").is_file() or (src / "spiece.model").is_file():
        if (src / "tokenizer.json").is_file() and not (src / "tokenizer_config.json").is_file():
            raise ArtifactError(f"{src / 'tokenizer_config.json'} is missing; point at the model's complete "
                                "tokenizer_3/ folder")
        # saved as transformers loads it: transformers 5 rebuilds T5's pre-tokenization from a tokenizer.json
        # (keeping its normalizer), so a copy of the file could tokenize differently from diffusers
        _convert(src, dest)
    else:
        hint = "reinstall sdrt" if source is None else "point at the model's tokenizer_3/ folder"
        raise ArtifactError(f"{src} holds neither tokenizer.json nor spiece.model; {hint}")

    # Parity gate: the runtime's reading of the written files against transformers reading the source
    probes = list(PROBES)
    want = _reference_ids(src, probes, DEFAULT_LENGTH)
    got = T5Tokenizer.from_folder(dest, max_length=DEFAULT_LENGTH).encode(probes).tolist()
    for prompt, w, g in zip(probes, want, got):
        if w != g:
            i = next(k for k, (a, b) in enumerate(zip(w, g)) if a != b)
            raise ParityError(
                f"the exported T5 tokenizer disagrees with transformers' T5TokenizerFast on {prompt[:60]!r} "
                f"at token {i}: {g[max(0, i - 2) : i + 3]} vs {w[max(0, i - 2) : i + 3]}; the source "
                "folder's tokenizer.json does not tokenize as the installed transformers does"
            )
