"""The CLIP tokenizer: export side (folder from the shipped BPE data or a diffusers folder) and runtime side.

References: transformers' CLIPTokenizer built from vocab.json + merges.txt alone (its own construction of
the pipeline, as diffusers calls it), and open_clip's SimpleTokenizer (a pure-Python port of OpenAI's
original BPE code, its own copy of the BPE data).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from sdrt.export.tokenizer_assets import BPE_ASSET, clip_vocab_and_merges, write_clip_tokenizer
from sdrt.runtime.errors import ArtifactError, InputError, ParityError
from sdrt.runtime.tokenizer import ClipTokenizer

BOS, EOS = 49406, 49407
CLIP_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
PADS = {"<|endoftext|>": EOS, "!": 0}  # SD1.x / SDXL's first tokenizer; SD2.x / SDXL's second

TEXTS = [
    "",
    "a photograph of an astronaut riding a horse on mars",
    "A Photograph Of An ASTRONAUT, MiXeD cAsE",
    "café crème brûlée, naïve façade, Ångström, Straße, São Paulo, İstanbul",
    "東京の夜景 ネオン 北京天安门 서울의 밤",
    "🐱 cat emoji 🚀✨ family 👩‍👩‍👧 flag 🇯🇵",
    "masterpiece, (best quality:1.2), [[detailed]], {{eyes}} -- ugly... #art @artist ~ ^_^ ;-) a/b\\c",
    "  leading and trailing  \t\n whitespace   runs\r\n ",
    "numbers 1234567890 3.14159 1e-5 100% $5 2024-01-01 ½ ²",
    "it's we're they'll I'd you've can't o'clock",
    "hello! world!! wow!!!",
    " ".join(["a highly detailed oil painting of a red fox in a snowy forest"] * 10),  # ~140 tokens
]
# Special tokens written in a prompt: transformers reads them as special tokens; open_clip names its
# special tokens differently, so these are compared with transformers only.
SPECIAL_TEXTS = ["<|startoftext|> special <|endoftext|> tokens <|ENDOFTEXT|> <|endoftext|"]
# OpenAI's tokenizer (and transformers 4's slow one, with ftfy installed) first repairs text with ftfy,
# unescapes HTML twice and lowercases with Python; transformers 5 and sdrt do not. Each of these differs.
DIVERGENT = [
    "fish &amp; chips &lt;3",  # HTML entities
    "it’s “quoted”",  # ftfy straightens curly quotes
    "ＦＵＬＬ　ｗｉｄｔｈ，",  # ftfy narrows full-width forms
    "ﬁne ligature",  # ftfy splits ligatures
    "mojibake cafÃ©",  # ftfy repairs mojibake
    "control\x00\x07 chars \x1c",  # ftfy and str.split drop these
    "ΣΑΣ",  # Python's lower() writes a final sigma, the tokenizers library does not
]


# -- references ------------------------------------------------------------------------------------------


def _open_clip_tokenizer_module() -> ModuleType:
    """open_clip/tokenizer.py, loaded alone: the package's __init__ needs torchvision, which is not here."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (make install adds it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    mspec = importlib.util.spec_from_file_location("_open_clip_tokenizer_ref", path)
    assert mspec is not None and mspec.loader is not None
    mod = importlib.util.module_from_spec(mspec)
    # It imports torch only to return tensors from __call__, which is not used here: when torch is not
    # loaded yet, a stub spares its import (seconds); the real one is the fallback.
    if "torch" not in sys.modules:
        stub = ModuleType("torch")
        stub.Tensor = stub.LongTensor = object  # type: ignore[attr-defined]
        sys.modules["torch"] = stub
        try:
            mspec.loader.exec_module(mod)
            return mod
        except AttributeError:
            mod = importlib.util.module_from_spec(mspec)
        finally:
            del sys.modules["torch"]
    mspec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def open_clip_tok():
    mod = _open_clip_tokenizer_module()
    return mod, mod.SimpleTokenizer()  # with open_clip's own copy of the BPE data


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """pad token -> an exported tokenizer folder built from the shipped BPE data."""
    out = {}
    for pad in PADS:
        folder = tmp_path_factory.mktemp("tok") / "tokenizer"
        write_clip_tokenizer(folder, pad_token=pad)
        out[pad] = folder
    return out


@pytest.fixture(scope="module")
def toks(folders: dict[str, Path]) -> dict[str, ClipTokenizer]:
    """pad token -> the runtime tokenizer of that folder (shared: it is safe across calls and threads)."""
    return {pad: ClipTokenizer.from_folder(folder) for pad, folder in folders.items()}


def _hf_from_vocab(folder: Path, tmp: Path, pad: str):
    """transformers' CLIPTokenizer from vocab.json + merges.txt only (with tokenizer.json present,
    transformers 5 would load our own pipeline and compare it with itself)."""
    from transformers import CLIPTokenizer

    ref = tmp / f"ref-{PADS[pad]}"
    ref.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folder / name, ref / name)
    return CLIPTokenizer.from_pretrained(str(ref), pad_token=pad, model_max_length=77)


def _hf_ids(tok, texts: list[str]) -> np.ndarray:
    return np.array(tok(texts, padding="max_length", max_length=77, truncation=True)["input_ids"])


# -- export side -------------------------------------------------------------------------------------------


def test_shipped_bpe_is_clips(open_clip_tok) -> None:
    _, st = open_clip_tok
    assert hashlib.sha256(BPE_ASSET.read_bytes()).hexdigest() == CLIP_BPE_SHA256
    assert (BPE_ASSET.parent / "LICENSE-CLIP.txt").is_file()
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    # open_clip builds the same vocabulary; only its special tokens are spelled differently
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert {names.get(k, k): v for k, v in st.encoder.items()} == vocab
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS and vocab["!"] == 0


@pytest.mark.parametrize("pad", list(PADS))
def test_folder_loads_in_transformers_and_tokenizers(folders: dict[str, Path], pad: str) -> None:
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    folder = folders[pad]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["pad_token"] == pad
    hf = CLIPTokenizer.from_pretrained(str(folder))  # what a diffusers user loading the export gets
    assert hf.model_max_length == 77 and hf.pad_token == pad and hf.pad_token_id == PADS[pad]
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert merges[:2] == ["i n", "t h"]  # the string form every tokenizers version reads (0.15+)
    alone = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert alone.encode("a photo of a cat").ids == [BOS, 320, 1125, 539, 320, 2368, EOS]


@pytest.mark.parametrize("pad", list(PADS))
def test_ids_match_transformers(folders: dict[str, Path], toks: dict[str, ClipTokenizer], tmp_path: Path, pad: str) -> None:
    from transformers import CLIPTokenizer

    texts = TEXTS + SPECIAL_TEXTS + DIVERGENT
    want = _hf_ids(_hf_from_vocab(folders[pad], tmp_path, pad), texts)
    assert want.shape == (len(texts), 77)
    long = want[len(TEXTS) - 1]
    assert long[76] == EOS and (long[1:76] != PADS[pad]).all()  # the long text was cut to bos + 75 + eos
    got = toks[pad].encode(texts)
    assert got.dtype == np.int32 and got.shape == (len(texts), 77)
    np.testing.assert_array_equal(got, want)
    # transformers loading the export's tokenizer.json agrees too
    np.testing.assert_array_equal(_hf_ids(CLIPTokenizer.from_pretrained(str(folders[pad])), texts), want)


def test_pad_bang_is_a_special_token(toks: dict[str, ClipTokenizer]) -> None:
    """SD2/SDXL's pad "!" is a special token in transformers, so "!" in a prompt becomes id 0
    (diffusers issue 4153); with the SD1 pad, "!" runs are ordinary BPE tokens."""
    text = ["hello! world!!"]
    sd1 = toks["<|endoftext|>"].encode(text)[0]
    sd2 = toks["!"].encode(text)[0]
    assert list(sd1[:6]) == [BOS, 3306, 256, 1002, 748, EOS]  # "hello" "!" "world" "!!"
    assert list(sd2[:7]) == [BOS, 3306, 0, 1002, 0, 0, EOS] and (sd2[7:] == 0).all()


def test_bpe_matches_open_clip(toks: dict[str, ClipTokenizer], open_clip_tok) -> None:
    mod, st = open_clip_tok
    tok = toks["<|endoftext|>"]
    ours = tok.encode_chunks(TEXTS)  # long enough for every text: compare the untruncated tokens
    for text, chunks in zip(TEXTS, ours):
        body = [int(t) for row in chunks for t in row[1 : 1 + list(row).index(EOS, 1) - 1]]
        assert body == st.encode(text), text
    for text in DIVERGENT:
        want = st.encode(text)
        got = tok._tokens([text])[0]
        assert got != want, text
        # the difference is only open_clip's cleaning (ftfy, HTML unescape, Python lowercase)
        assert tok._tokens([mod._clean_lower(text)])[0] == want, text


def test_source_folders(tmp_path: Path, folders: dict[str, Path]) -> None:
    """A diffusers tokenizer folder as transformers 4 saves it (vocab.json + merges.txt, the pad token in
    special_tokens_map.json) and as transformers 5 saves it (tokenizer.json), with textual-inversion tokens."""
    from transformers import CLIPTokenizer

    v4 = tmp_path / "v4"
    v4.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folders["!"] / name, v4 / name)
    tok_dict = {"__type": "AddedToken", "content": "!", "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}
    (v4 / "special_tokens_map.json").write_text(json.dumps({"pad_token": tok_dict}))
    (v4 / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    out = tmp_path / "out-v4"
    write_clip_tokenizer(out, pad_token="<|endoftext|>", source=v4)  # the source's declared pad wins
    assert json.loads((out / "tokenizer_config.json").read_text())["pad_token"] == "!"
    texts = TEXTS + SPECIAL_TEXTS
    want = _hf_ids(CLIPTokenizer.from_pretrained(str(v4), model_max_length=77), texts)
    np.testing.assert_array_equal(ClipTokenizer.from_folder(out).encode(texts), want)

    hf = CLIPTokenizer.from_pretrained(str(folders["<|endoftext|>"]))
    hf.add_tokens(["<my-concept>", "<other>"])
    hf.save_pretrained(str(tmp_path / "v5"))
    assert not (tmp_path / "v5" / "vocab.json").exists()  # transformers 5 writes tokenizer.json only
    out = tmp_path / "out-v5"
    write_clip_tokenizer(out, pad_token="!", source=tmp_path / "v5")
    texts = TEXTS + ["a <my-concept> b <other><OTHER>, c"]
    got = ClipTokenizer.from_folder(out).encode(texts)
    np.testing.assert_array_equal(got, _hf_ids(hf, texts))
    assert list(got[-1][:6]) == [BOS, 320, 49408, 321, 49409, 49409]


def test_source_errors(tmp_path: Path, folders: dict[str, Path]) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        write_clip_tokenizer(tmp_path / "o1", "!", source=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="merges.txt"):
        write_clip_tokenizer(tmp_path / "o2", "!", source=tmp_path / "empty")
    with pytest.raises(InputError, match="not in the vocabulary"):
        write_clip_tokenizer(tmp_path / "o3", "<pad>")
    # a source that declares another bos token: transformers frames with it, sdrt always with CLIP's,
    # so the parity gate refuses it
    odd = tmp_path / "odd"
    odd.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folders["!"] / name, odd / name)
    (odd / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "pad_token": "!"}))
    with pytest.raises(ParityError, match="disagrees with transformers"):
        write_clip_tokenizer(tmp_path / "o4", "!", source=odd)


# -- runtime side ------------------------------------------------------------------------------------------


def _digit_ids(folder: Path) -> list[int]:
    vocab = json.loads((folder / "vocab.json").read_text())
    return [vocab[f"{d}</w>"] for d in range(10)]


@pytest.mark.parametrize("pad", list(PADS))
def test_encode_chunks_by_hand(folders: dict[str, Path], toks: dict[str, ClipTokenizer], pad: str) -> None:
    tok = toks[pad]
    p, digit = PADS[pad], _digit_ids(folders[pad])
    # every digit is one token: a prompt of n digits has n tokens, in a known order
    prompts = [" ".join(str(i % 10) for i in range(n)) for n in (160, 1, 75, 76, 0)]
    tokens = [[digit[i % 10] for i in range(n)] for n in (160, 1, 75, 76, 0)]
    got = tok.encode_chunks(prompts)
    assert got.dtype == np.int32 and got.shape == (5, 3, 77)  # 160 tokens -> 75 + 75 + 10

    def row(body: list[int]) -> list[int]:
        return [BOS, *body, EOS] + [p] * (75 - len(body))

    for i, t in enumerate(tokens):
        for k in range(3):
            assert list(got[i, k]) == row(t[75 * k : 75 * (k + 1)]), (i, k)
    assert list(got[3, 1, :4]) == [BOS, digit[75 % 10], EOS, p]  # 76 tokens: the 76th alone in chunk 1
    # a prompt that fits gives encode's row; alone in a batch it needs one chunk
    np.testing.assert_array_equal(tok.encode_chunks(prompts[1:3]), tok.encode(prompts[1:3])[:, None])
    assert tok.encode_chunks([prompts[3]]).shape == (1, 2, 77)
    np.testing.assert_array_equal(got[:, 0], tok.encode(prompts))  # chunk 0 is always the truncated row
    assert tok.count_tokens(prompts) == [160, 1, 75, 76, 0]


def test_encode_edge_cases(toks: dict[str, ClipTokenizer]) -> None:
    tok = toks["!"]
    assert tok.encode([]).shape == (0, 77) and tok.encode_chunks([]).shape == (0, 1, 77)
    assert list(tok.encode([""])[0][:3]) == [BOS, EOS, 0]
    for bad in ("a string", ["ok", None], [("a", "b")]):
        with pytest.raises(InputError, match="list of strings"):
            tok.encode(bad)  # type: ignore[arg-type]


def test_concurrent_calls(toks: dict[str, ClipTokenizer]) -> None:
    tok = toks["<|endoftext|>"]
    batches = [TEXTS[i:] + TEXTS[:i] for i in range(8)]
    want = [tok.encode_chunks(b) for b in batches]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(10):
            got[i] = tok.encode_chunks(batches[i])
            tok.encode(batches[i][:2])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        np.testing.assert_array_equal(got[i], want[i])


def test_folder_errors(tmp_path: Path, folders: dict[str, Path]) -> None:
    with pytest.raises(ArtifactError, match="sdrt export"):
        ClipTokenizer.from_folder(tmp_path / "missing")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        broken = tmp_path / f"no-{name}"
        shutil.copytree(folders["!"], broken)
        (broken / name).unlink()
        with pytest.raises(ArtifactError, match=f"{name} is missing.*sdrt export"):
            ClipTokenizer.from_folder(broken)
        (broken / name).write_text("{not json")
        with pytest.raises(ArtifactError, match=f"{name} is corrupt"):
            ClipTokenizer.from_folder(broken)
    broken = tmp_path / "bad-pad"
    shutil.copytree(folders["!"], broken)
    (broken / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ArtifactError, match="no pad token '<pad>'"):
        ClipTokenizer.from_folder(broken)


def test_runtime_import_is_lean() -> None:
    code = (
        "import sys, sdrt.runtime.tokenizer\n"
        "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
