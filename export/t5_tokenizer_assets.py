"""``write_t5_tokenizer``: the T5 tokenizer folder of an SD3-family export (``tokenizer_3/``).

The folder holds tokenizer.json + tokenizer_config.json (+ special_tokens_map.json when the source has one),
which is all the runtime's ``T5Tokenizer`` reads. From a diffusers ``tokenizer_3`` folder they are
copied; a folder with only SentencePiece's ``spiece.model`` is converted by transformers' ``T5TokenizerFast``.
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
    """spiece.model -> tokenizer.json + tokenizer_config.json, by transformers' T5TokenizerFast."""
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]

    try:
        tok = T5TokenizerFast.from_pretrained(str(source))
    except Exception as e:  # transformers and sentencepiece raise many kinds on a bad model file
        raise ArtifactError(f"transformers cannot read {source / 'spiece.model'} ({e}); the source folder is "
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

    ``source``: a diffusers model's ``tokenizer_3`` folder: its tokenizer.json, tokenizer_config.json (and
    special_tokens_map.json) are copied; a folder with only spiece.model (+ tokenizer_config.json) is
    converted with transformers' T5TokenizerFast. Without a source, the shipped tiny tokenizer is copied.

    The files are written in place: the caller writes into a temporary folder and renames it.
    Raises ArtifactError for a source folder without a tokenizer, ParityError if transformers'
    T5TokenizerFast on the source disagrees with the written folder on any probe prompt.
    """
    dest = Path(dest)
    src = T5_ASSET if source is None else Path(source)
    if not src.is_dir():
        raise ArtifactError(f"tokenizer folder {src} does not exist; point at the model's tokenizer_3/")
    dest.mkdir(parents=True, exist_ok=True)
    if (src / "tokenizer.json").is_file():
        if not (src / "tokenizer_config.json").is_file():
            raise ArtifactError(f"{src / 'tokenizer_config.json'} is missing; point at the model's complete "
                                "tokenizer_3/ folder")
        _copy(src, dest)
    elif (src / "spiece.model").is_file():
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
