"""``write_clip_tokenizer``: the CLIP BPE tokenizer folder of an export (``tokenizer/``, ``tokenizer_2/``).

The folder holds vocab.json + merges.txt + tokenizer_config.json (what transformers' ``CLIPTokenizer``
loads) and a self-contained tokenizer.json that the ``tokenizers`` library alone can run, which is all
the runtime reads. It ends in a parity gate: transformers' own ``CLIPTokenizer`` must give the same ids
on a set of probe prompts, or the folder is refused.

Without a source folder the vocabulary is rebuilt from the original CLIP BPE data shipped in
``assets/`` (MIT licensed, see ``assets/LICENSE-CLIP.txt``); every SD 1.x / 2.x / XL text encoder
uses that same vocabulary and differs only in its pad token.
"""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from pathlib import Path
from typing import Any

from sdrt.runtime.errors import ArtifactError, ParityError
from sdrt.runtime.tokenizer import SPLIT_PATTERN, ClipTokenizer, build_tokenizer_json  # noqa: F401 (re-exported)

BPE_ASSET = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 77  # CLIP's context: bos + 75 tokens + eos
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # the BPE data holds more merges than CLIP uses; CLIP keeps this many

# Probes of the parity gate: cased, accented, CJK, emoji, punctuation runs, digits, whitespace runs,
# the special tokens and the SD2 pad "!" written in a prompt, and one over-long prompt.
PROBES = (
    "",
    "a photograph of an astronaut riding a horse",
    "  Mixed CASE,   whitespace\t\nruns!!  and punctuation... (masterpiece:1.2) [x] {y} #tag @you",
    "café naïve Ångström Straße ΣΊΣΥΦΟΣ İstanbul",
    "東京の夜景、ネオン 서울 北京 🐱🚀 👩‍👩‍👧 ✨",
    "1234567890 3.14 1e-5 $100 50% it's we're they'll I'd o'clock",
    "hello! world!! wow!!! <|startoftext|> x <|endoftext|> y <|ENDOFTEXT|>",
    " ".join(["a red fox jumping over a lazy dog"] * 12),
)


def byte_symbols() -> list[str]:
    """The 256 symbols byte-level BPE writes bytes as, in byte order (CLIP's and GPT-2's mapping).

    Printable Latin-1 bytes stand for themselves; every other byte (controls, space, 0x7f-0xa0, 0xad)
    is sent to 256, 257, ... in byte order, so each symbol is one printable, non-space character.
    """
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, extra = [], 0
    for b in range(256):
        if b in keep:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def clip_vocab_and_merges(bpe_gz: Path = BPE_ASSET) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (49408 tokens) and merges from the original BPE data file.

    The ids are: the 256 byte symbols (in the order CLIP lists them: the kept bytes first, then the
    remapped ones), the same with the end-of-word marker ``</w>``, one token per merge, then bos, eos.
    """
    vocab, merges = _read_bpe(bpe_gz)
    return dict(vocab), list(merges)


@functools.lru_cache(maxsize=2)
def _read_bpe(bpe_gz: Path) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    try:
        lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ArtifactError(f"cannot read the CLIP BPE data {bpe_gz}: {e}; reinstall sdrt") from e
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]  # line 0 is a header
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ArtifactError(f"{bpe_gz} is not the CLIP BPE data (bad merges); reinstall sdrt")
    # CLIP lists the byte symbols by code point: the kept bytes, then the remapped ones
    ordered = sorted(byte_symbols(), key=ord)
    tokens = ordered + [s + "</w>" for s in ordered] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ArtifactError(f"{bpe_gz} gives duplicate tokens; it is not the CLIP BPE data, reinstall sdrt")
    return vocab, tuple(merges)  # type: ignore[arg-type]


def _token_str(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {path}: {e}; the tokenizer folder is corrupt") from e


def _read_source(source: Path) -> tuple[dict[str, int], list[tuple[str, str]], str | None, list[dict[str, Any]]]:
    """(vocab, merges, declared pad token, added tokens beyond the vocab) of a diffusers tokenizer folder.

    transformers 4 saves vocab.json + merges.txt; transformers 5 saves only tokenizer.json.
    """
    if not source.is_dir():
        raise ArtifactError(f"tokenizer folder {source} does not exist; point at the model's tokenizer/ folder")
    tj = source / "tokenizer.json"
    added: list[dict[str, Any]] = []
    if (source / "vocab.json").is_file() and (source / "merges.txt").is_file():
        vocab = _read_json(source / "vocab.json")
        try:
            text = (source / "merges.txt").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ArtifactError(f"cannot read {source / 'merges.txt'}: {e}") from e
        lines = text.split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [tuple(line.split()) for line in lines if line.strip()]
        if (source / "added_tokens.json").is_file():
            added += [{"content": k, "id": v} for k, v in _read_json(source / "added_tokens.json").items()]
    elif tj.is_file():
        data = _read_json(tj)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise ArtifactError(f"{tj} is not a BPE tokenizer; a CLIP tokenizer folder was expected")
        vocab = model.get("vocab")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
        added += data.get("added_tokens") or []
    else:
        raise ArtifactError(
            f"{source} holds neither vocab.json + merges.txt nor tokenizer.json; "
            "point at the model's tokenizer/ folder"
        )
    if not isinstance(vocab, dict) or any(len(m) != 2 for m in merges):
        raise ArtifactError(f"the tokenizer files in {source} are corrupt (bad vocabulary or merges)")
    pad: str | None = None
    config: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # transformers lets the map win
        if (source / name).is_file():
            data = _read_json(source / name)
            if not isinstance(data, dict):
                raise ArtifactError(f"{source / name} is corrupt (not a JSON object)")
            if name == "tokenizer_config.json":
                config = data
            pad = _token_str(data.get("pad_token")) or pad
    for sid, tok in (config.get("added_tokens_decoder") or {}).items():
        added.append({**tok, "id": int(sid)})
    extra: dict[int, dict[str, Any]] = {}
    for tok in added:
        if tok.get("content") not in vocab:
            extra[int(tok["id"])] = tok
    return vocab, merges, pad, [extra[i] for i in sorted(extra)]  # type: ignore[return-value]


def _portable_json(tok: Any) -> str:
    """tokenizer.json with the merges as "a b" strings: tokenizers 0.20+ writes pairs, which older
    versions (the runtime allows 0.15+) cannot read; every version reads strings. A merge symbol with a
    space could not be written so, and keeps the pair form."""
    data = json.loads(tok.to_str())
    merges = data["model"]["merges"]
    if all(isinstance(m, list) and " " not in m[0] + m[1] for m in merges):
        data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(data, ensure_ascii=False)


def _reference_ids(folder: Path, pad_token: str, prompts: list[str]) -> list[list[int]]:
    """transformers' CLIPTokenizer on ``prompts``, called as diffusers pipelines call it."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token)
    enc = tok(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    return [list(ids) for ids in enc["input_ids"]]


def write_clip_tokenizer(folder: Path, pad_token: str, source: Path | None = None) -> None:
    """Write a CLIP tokenizer folder into ``folder`` (created if needed) and check it against transformers.

    ``source``: a diffusers model's tokenizer folder (vocab.json + merges.txt, or a transformers 5
    tokenizer.json; tokenizer_config.json). Its vocabulary, merges, added tokens and declared pad token
    are used, so the export tokenizes as diffusers does with that model; ``pad_token`` is the fallback
    when the source declares none. Without a source, CLIP's vocabulary is rebuilt from the shipped BPE data.

    The files are written in place: the caller writes into a temporary folder and renames it.
    Raises ParityError if transformers' CLIPTokenizer disagrees on any probe prompt.
    """
    folder = Path(folder)
    extra: list[dict[str, Any]] = []
    if source is None:
        vocab, merges = clip_vocab_and_merges()
    else:
        vocab, merges, declared, extra = _read_source(Path(source))
        pad_token = declared or pad_token
    tok = build_tokenizer_json(vocab, merges, pad_token, extra)

    folder.mkdir(parents=True, exist_ok=True)
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(specials, indent=2),
        "tokenizer_config.json": json.dumps(
            {"tokenizer_class": "CLIPTokenizer", **specials, "model_max_length": MAX_LENGTH,
             "do_lower_case": True, "errors": "replace", "add_prefix_space": False}, indent=2),
    }
    if extra:
        files["added_tokens.json"] = json.dumps({t["content"]: int(t["id"]) for t in extra}, ensure_ascii=False)
    files["tokenizer.json"] = _portable_json(tok)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")

    # Parity gate: the runtime's reading of these files against transformers reading the source folder
    # (what diffusers loads for this model) or, for the shipped data, vocab.json + merges.txt alone (not
    # our tokenizer.json, which would test it against itself).
    probes = list(PROBES) + [f"a {t['content']} b" for t in extra[:8]]
    if source is None:
        with tempfile.TemporaryDirectory(prefix="sdrt-tok-") as tmp:
            for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
                (Path(tmp) / name).write_text(files[name], encoding="utf-8")
            want = _reference_ids(Path(tmp), pad_token, probes)
    else:
        want = _reference_ids(Path(source), pad_token, probes)
    got = ClipTokenizer.from_folder(folder).encode(probes).tolist()
    for prompt, w, g in zip(probes, want, got):
        if w != g:
            i = next(k for k, (a, b) in enumerate(zip(w, g)) if a != b)
            raise ParityError(
                f"the exported tokenizer disagrees with transformers' CLIPTokenizer on {prompt[:60]!r} at "
                f"token {i}: {g[max(0, i - 2) : i + 3]} vs {w[max(0, i - 2) : i + 3]}; the source folder holds "
                "a tokenizer sdrt cannot mirror (sdrt exports CLIP BPE tokenizers only)"
            )
