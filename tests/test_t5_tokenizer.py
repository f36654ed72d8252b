"""The T5 tokenizer (SD3's ``tokenizer_3``): runtime side against transformers, export side's folders.

References, on the tiny shipped asset (``export/assets/t5-tiny``, a real SentencePiece unigram model):
transformers' ``T5TokenizerFast`` (what diffusers' SD3 pipelines load; the ids must equal it), and a
SentencePiece-backed "slow" tokenizer, an independent implementation. transformers 5 has no slow T5 tokenizer
any more (``T5Tokenizer`` is ``T5TokenizerFast``), so ``SlowT5`` below rebuilds transformers 4's slow
``T5Tokenizer`` (legacy mode, as SD3's folders declare) on transformers' own ``SentencePieceBackend``: the
``sentencepiece`` library tokenizes the text and transformers' Python trie splits off the special tokens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sdrt.export.t5_tokenizer_assets import T5_ASSET, write_t5_tokenizer
from sdrt.runtime.errors import ArtifactError, InputError, ParityError
from sdrt.runtime.t5_tokenizer import T5Tokenizer

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

PAD, EOS, UNK = 0, 1, 2
LENGTHS = (256, 77, 512)
LONG = " ".join(["a highly detailed oil painting of a red fox in a snowy forest, 35mm photo"] * 40)  # > 512
TEXTS = [
    "",
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT, MiXeD cAsE",
    LONG,
    "café naïve Zürich São Ñandú, crème brûlée Ångström",
    "decomposed: cafe\u0301 nai\u0308ve; fullwidth ＡＢＣ１２３; ﬁne ﬂow ½ ² ™ …",
    "東京の夜景 ネオン 北京 서울의 밤",
    "🐱 cat emoji 🚀✨ family 👩‍👩‍👧 flag 🇯🇵",
    "  leading and trailing  \t\n whitespace   runs\r\n ",
    "x\u00a0y\u3000z\u2009w",
    "numbers 1234567890 3.14159 1e-5 100% $5 2024-01-01",
    "masterpiece, (best quality:1.2), [[detailed]], {{eyes}} -- ugly... #art @artist ~ ^_^ ;-) a/b\\c",
    "it's we're they'll I'd o'clock!!! ?? ...",
    "a </s> b <pad> c <unk> d <extra_id_5> e</s>f<extra_id_0><extra_id_99>",
    "<pad><pad> x",
    "<extra_id_100> is not a sentinel, <extra_id_5 > neither",
]
# Where the slow and fast transformers tokenizers disagree; the runtime follows the fast one (diffusers' SD3
# folders load T5TokenizerFast). Each entry: the text and the fact.
SLOW_FAST_DIFFER = {
    # SentencePiece reads a literal "▁" (U+2581, its own word marker) in the text as a word boundary of its
    # own and emits an extra "▁" piece; the fast pipeline splits on whitespace first and merges it into the
    # word's marker: slow [3, 3, 399, ...], fast [3, 399, ...]
    "▁a ▁ b ▁": "literal word marker",
    # transformers 4's slow T5Tokenizer appends eos only if the ids do not already end with it (and warns);
    # the fast one always appends it: slow [..., 1, pad], fast [..., 1, 1]
    "a prompt that ends with the eos token </s>": "eos already last",
    "</s>": "eos already last",
}


def _slow_class() -> type:
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class SlowT5(SentencePieceBackend):
        """transformers 4's slow T5Tokenizer: spiece.model, 100 sentinels after its pieces in reverse order
        (``<extra_id_0>`` is the last id), eos appended unless already last."""

        def build_inputs_with_special_tokens(self, ids, ids_b=None):  # type: ignore[no-untyped-def]
            if ids_b is not None:
                raise NotImplementedError
            return ids if ids and ids[-1] == self.eos_token_id else ids + [self.eos_token_id]

        def num_special_tokens_to_add(self, pair: bool = False) -> int:
            return 1

        def get_special_tokens_mask(self, ids, ids_b=None, already_has_special_tokens=False):  # type: ignore[no-untyped-def]
            return [0] * len(ids) + [1]

    return SlowT5


@pytest.fixture(scope="module")
def slow():  # type: ignore[no-untyped-def]
    from transformers import AddedToken

    model = str(T5_ASSET / "spiece.model")
    n = spm.SentencePieceProcessor(model_file=model).get_piece_size()
    decoder = {i: AddedToken(t, special=True) for i, t in enumerate(("<pad>", "</s>", "<unk>"))}
    decoder.update({n + 99 - i: AddedToken(f"<extra_id_{i}>", special=True) for i in range(100)})
    return _slow_class()(vocab_file=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                         legacy=True, added_tokens_decoder=decoder,
                         additional_special_tokens=[f"<extra_id_{i}>" for i in range(100)])


@pytest.fixture(scope="module")
def fast():  # type: ignore[no-untyped-def]
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(T5_ASSET))


@pytest.fixture(scope="module")
def sp():  # type: ignore[no-untyped-def]
    return spm.SentencePieceProcessor(model_file=str(T5_ASSET / "spiece.model"))


def _ref(tok, texts: list[str], length: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """As diffusers' StableDiffusion3Pipeline._get_t5_prompt_embeds calls tokenizer_3."""
    enc = tok(texts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True)
    return [list(ids) for ids in enc["input_ids"]]


def test_asset_is_t5_shaped(slow, fast, sp) -> None:  # type: ignore[no-untyped-def]
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert sp.bos_id() == -1 and 300 <= sp.get_piece_size() <= 1000
    n = sp.get_piece_size()
    for tok in (slow, fast):
        assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [n + 99, n]
        assert len(tok) == n + 100
    assert sum(p.stat().st_size for p in T5_ASSET.iterdir()) < 100_000


@pytest.mark.parametrize("length", LENGTHS)
def test_encode_equals_transformers_fast(fast, length: int) -> None:  # type: ignore[no-untyped-def]
    texts = TEXTS + list(SLOW_FAST_DIFFER)
    ours = T5Tokenizer.from_folder(T5_ASSET, max_length=length).encode(texts)
    assert ours.dtype == np.int32 and ours.shape == (len(texts), length)
    assert ours.tolist() == _ref(fast, texts, length)


@pytest.mark.parametrize("length", LENGTHS)
def test_encode_equals_sentencepiece_slow(slow, length: int) -> None:  # type: ignore[no-untyped-def]
    ours = T5Tokenizer.from_folder(T5_ASSET, max_length=length).encode(TEXTS).tolist()
    assert ours == _ref(slow, TEXTS, length)


def test_slow_and_fast_disagree_where_stated(slow, fast) -> None:  # type: ignore[no-untyped-def]
    """The disagreements are real (else drop them from SLOW_FAST_DIFFER), and the runtime follows fast."""
    texts = list(SLOW_FAST_DIFFER)
    ours = T5Tokenizer.from_folder(T5_ASSET).encode(texts).tolist()
    for text, s, f, o in zip(texts, _ref(slow, texts, 256), _ref(fast, texts, 256), ours):
        assert s != f, text
        assert o == f, text


def test_tokens_equal_sentencepiece_itself(sp) -> None:  # type: ignore[no-untyped-def]
    """Text without special tokens: the row is SentencePiece's own ids, then eos, then pad."""
    texts = [t for t in TEXTS if "<" not in t]
    tok = T5Tokenizer.from_folder(T5_ASSET, max_length=512)
    rows = tok.encode(texts)
    for text, row, n in zip(texts, rows.tolist(), tok.count_tokens(texts)):
        want = sp.encode(text)
        assert n == len(want)
        k = min(n, 511)
        assert row[:k] == want[:k] and row[k] == EOS and set(row[k + 1 :]) <= {PAD}


def test_truncation_keeps_eos_last() -> None:
    for length in LENGTHS:
        tok = T5Tokenizer.from_folder(T5_ASSET, max_length=length)
        row = tok.encode([LONG])[0]
        assert tok.count_tokens([LONG])[0] > 512
        assert row[-1] == EOS and PAD not in row and EOS not in row[:-1]


def test_unknown_characters_are_unk() -> None:
    tok = T5Tokenizer.from_folder(T5_ASSET)
    row = tok.encode(["東京 🐱"])[0].tolist()
    assert row[:5] == [3, UNK, 3, UNK, EOS]


def test_attributes_chunks_and_counts() -> None:
    tok = T5Tokenizer.from_folder(T5_ASSET)
    assert (tok.max_length, tok.pad_id, tok.eos_id, tok.model_max_length) == (256, PAD, EOS, 512)
    chunks = tok.encode_chunks(TEXTS)
    assert chunks.dtype == np.int32 and chunks.shape == (len(TEXTS), 1, 256)
    assert (chunks[:, 0] == tok.encode(TEXTS)).all()
    assert tok.encode([]).shape == (0, 256) and tok.encode_chunks([]).shape == (0, 1, 256)
    assert tok.count_tokens(["", "</s>"]) == [0, 1]


def test_threads_share_one_tokenizer() -> None:
    tok = T5Tokenizer.from_folder(T5_ASSET, max_length=77)
    want = tok.encode(TEXTS)
    results: list[np.ndarray] = []

    def work() -> None:
        for _ in range(20):
            results.append(tok.encode(TEXTS))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 80 and all((r == want).all() for r in results)


@pytest.mark.parametrize("length", [1, 0, 513, "256", True, 2.5])
def test_bad_length_is_input_error(length) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="sequence length"):
        T5Tokenizer.from_folder(T5_ASSET, max_length=length)


def test_bad_prompts_are_input_error() -> None:
    tok = T5Tokenizer.from_folder(T5_ASSET)
    for bad in ("a string, not a list", ["ok", 3]):
        with pytest.raises(InputError, match="list of strings"):
            tok.encode(bad)  # type: ignore[arg-type]


def _copy_asset(tmp_path: Path) -> Path:
    folder = tmp_path / "tok"
    shutil.copytree(T5_ASSET, folder)
    return folder


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_missing_file_is_artifact_error(tmp_path: Path, name: str) -> None:
    folder = _copy_asset(tmp_path)
    (folder / name).unlink()
    with pytest.raises(ArtifactError, match=f"{name} is missing.*sdrt export"):
        T5Tokenizer.from_folder(folder)
    with pytest.raises(ArtifactError, match="is missing.*sdrt export"):
        T5Tokenizer.from_folder(tmp_path / "nowhere")


def test_corrupt_files_are_artifact_errors(tmp_path: Path) -> None:
    folder = _copy_asset(tmp_path)
    (folder / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ArtifactError, match="tokenizer.json is corrupt.*sdrt export"):
        T5Tokenizer.from_folder(folder)
    folder = _copy_asset(tmp_path / "b")
    (folder / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ArtifactError, match="tokenizer_config.json is corrupt"):
        T5Tokenizer.from_folder(folder)
    config = json.loads((T5_ASSET / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["pad_token"] = "<nope>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ArtifactError, match="no pad token '<nope>'"):
        T5Tokenizer.from_folder(folder)


def test_runtime_module_stays_lean() -> None:
    code = ("import sys, sdrt.runtime.t5_tokenizer as m; "
            "m.T5Tokenizer.from_folder(sys.argv[1]).encode(['a']); "
            "bad = {'torch', 'transformers', 'diffusers', 'sentencepiece'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(T5_ASSET)], check=True)


# --- export side -------------------------------------------------------------------------------------------

def test_write_without_source_is_the_asset(tmp_path: Path) -> None:
    write_t5_tokenizer(tmp_path / "t")
    names = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        assert (tmp_path / "t" / name).read_bytes() == (T5_ASSET / name).read_bytes()


def test_write_saves_a_source_folder_as_transformers_loads_it(tmp_path: Path, fast) -> None:  # type: ignore[no-untyped-def]
    source = _copy_asset(tmp_path)
    (source / "special_tokens_map.json").unlink()  # optional
    write_t5_tokenizer(tmp_path / "t", source)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "t").iterdir()}
    assert T5Tokenizer.from_folder(tmp_path / "t").encode(TEXTS).tolist() == _ref(fast, TEXTS, 256)


def test_write_converts_a_spiece_only_source(tmp_path: Path, fast) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "src"
    source.mkdir()
    shutil.copyfile(T5_ASSET / "spiece.model", source / "spiece.model")
    write_t5_tokenizer(tmp_path / "t", source)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "t").iterdir()}
    tok = T5Tokenizer.from_folder(tmp_path / "t")
    assert tok.encode(TEXTS).tolist() == _ref(fast, TEXTS, 256)


def test_write_refuses_a_folder_without_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ArtifactError, match="neither tokenizer.json nor spiece.model.*tokenizer_3"):
        write_t5_tokenizer(tmp_path / "t", tmp_path / "src")
    with pytest.raises(ArtifactError, match="does not exist"):
        write_t5_tokenizer(tmp_path / "t", tmp_path / "nowhere")
    source = _copy_asset(tmp_path)
    (source / "tokenizer_config.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer_config.json is missing"):
        write_t5_tokenizer(tmp_path / "t2", source)


def _lowercasing_source(tmp_path: Path) -> Path:
    """The asset with a tokenizer.json whose normalizer also lowercases: transformers 5 rebuilds T5's
    normalizer from the file's precompiled charsmap alone, so it does not lowercase, and the file as written
    would in the runtime."""
    source = _copy_asset(tmp_path)
    data = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Sequence", "normalizers": [data["normalizer"], {"type": "Lowercase"}]}
    (source / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return source


def test_a_source_is_written_as_transformers_reads_it(tmp_path: Path) -> None:
    """Saved through T5TokenizerFast, the folder tokenizes as transformers does even where the source file,
    read as it is, would not (so a plain copy would be wrong)."""
    from transformers import T5TokenizerFast

    source = _lowercasing_source(tmp_path)
    write_t5_tokenizer(tmp_path / "t", source)
    prompt = ["Mixed CASE Words"]
    want = _ref(T5TokenizerFast.from_pretrained(str(source)), prompt, 256)
    assert T5Tokenizer.from_folder(tmp_path / "t").encode(prompt).tolist() == want
    assert T5Tokenizer.from_folder(source).encode(prompt).tolist() != want


def test_parity_gate_refuses_a_folder_that_tokenizes_otherwise(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate itself: a written folder that disagrees with transformers on the source (here, the file
    copied as it is instead of saved by transformers) is refused."""
    import sdrt.export.t5_tokenizer_assets as assets

    monkeypatch.setattr(assets, "_convert", assets._copy)
    with pytest.raises(ParityError, match="T5TokenizerFast"):
        write_t5_tokenizer(tmp_path / "t", _lowercasing_source(tmp_path))


def test_asset_script_is_deterministic(tmp_path: Path) -> None:
    """The committed spiece.model is what ``python -m sdrt.export.t5_tiny_tokenizer`` trains, to the byte."""
    from sdrt.export.t5_tiny_tokenizer import train_spiece

    assert train_spiece(tmp_path).read_bytes() == (T5_ASSET / "spiece.model").read_bytes()
