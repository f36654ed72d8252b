"""Makes the tiny T5 tokenizer asset (``assets/t5-tiny/``): a small SentencePiece unigram model, T5's format.

``python -m sdrt.export.t5_tiny_tokenizer --out DIR`` trains it with sentencepiece's trainer on English-ish
sentences generated here from word lists (digits and punctuation included), with T5's special pieces
(``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, no bos) and a small NFKC-like normalization table
(``norm_rules``: SentencePiece's full nmt_nfkc table alone is 240 KB; this one keeps the asset small and
still exercises the precompiled normalizer: fullwidth forms, ligatures, odd spaces, decomposed accents),
then writes what transformers' ``T5TokenizerFast`` makes of it (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, with T5's 100 ``<extra_id_N>`` sentinels after the pieces). The text, the order
and the trainer's seed are fixed, it trains on one thread, and the temporary paths the trainer records are
replaced by plain names, so running it again gives the same spiece.model byte for byte.

Needs sentencepiece, protobuf and transformers (the ``export`` extra); the tiny presets and tests only read
the committed folder.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

VOCAB_SIZE = 400
EXTRA_IDS = 100
MODEL_MAX_LENGTH = 512  # SD3's tokenizer_3 states 512; diffusers calls it with max_length=256 by default
SEED = 20260
N_SENTENCES = 4000



def _words(text: str, sep: str | None = None) -> list[str]:
    return text.split(sep)


_ADJ = _words("red blue green golden silver dark bright tiny huge ancient modern quiet noisy soft sharp wet "
              "dry cold warm old young happy sad strange beautiful detailed misty snowy sunny rainy wooden "
              "stone glass purple orange shiny dusty lonely busy famous")
_NOUN = _words("cat dog fox horse bird fish tree forest river mountain city street house castle robot "
               "astronaut painting photograph portrait landscape garden flower ocean boat train car bridge "
               "tower window door girl boy woman man dragon knight wizard moon sun star cloud sky lake field "
               "village market kitchen book lamp chair table")
_VERB = _words("riding walking running sitting standing flying swimming reading painting watching holding "
               "jumping sleeping dancing singing looking climbing crossing building eating")
_PREP = _words("on in under over near behind beside above through across with at from into")
_STYLE = _words("oil painting, watercolor, digital art, 35mm photo, studio lighting, cinematic, 8k, "
                "highly detailed, trending on artstation, concept art, soft focus, bokeh, hdr, pixel art, "
                "line drawing, anime style, by a famous artist, wide angle, macro shot, sharp focus", ", ")
_NAMES = _words("Paris London Tokyo Berlin Rome Alice Bob Mars Venus Monday July café naïve Zürich São Ñandú")
_PUNCT = (".", ",", "!", "?", ";", ":", "...", " -", " (", ")", "'s", "\"", "#", "@", "%", "&", "/", "+", "=")


def sentences(n: int = N_SENTENCES, seed: int = SEED) -> list[str]:
    """``n`` varied prompt-like sentences, the same for the same arguments."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = ["a", rng.choice(_ADJ), rng.choice(_NOUN), rng.choice(_VERB), rng.choice(_PREP), "the",
                 rng.choice(_ADJ), rng.choice(_NOUN)]
        if rng.random() < 0.5:
            words += [rng.choice(_PREP), rng.choice(_NAMES)]
        if rng.random() < 0.4:
            words += ["in", str(rng.randint(1, 2100))]
        if rng.random() < 0.3:
            words += [f"{rng.randint(0, 99)}.{rng.randint(0, 99)}", rng.choice(["%", "kg", "m", "$", "x"])]
        text = " ".join(words)
        if rng.random() < 0.6:
            text += ", " + ", ".join(rng.sample(_STYLE, rng.randint(1, 3)))
        text += rng.choice(_PUNCT) + (rng.choice(_PUNCT) if rng.random() < 0.2 else "")
        if rng.random() < 0.3:
            text = text.capitalize()
        if rng.random() < 0.1:
            text = text.upper()
        out.append(text)
    return out


def norm_rules() -> list[tuple[str, str]]:
    """(source, target) pairs of the normalization table: a small subset of NFKC, odd spaces to a space."""
    import unicodedata

    fullwidth = range(0xFF01, 0xFF5F)  # fullwidth ASCII
    rules = [(chr(c), unicodedata.normalize("NFKC", chr(c))) for c in fullwidth]
    rules += [(c, unicodedata.normalize("NFKC", c)) for c in "ﬁﬂ²³¹½™…"]
    rules += [(c, " ") for c in "\t\n\r\u00a0\u2002\u2003\u2009\u3000"]  # odd spaces -> space
    for base in "aeiouAEIOUnNcC":  # decomposed accents -> the composed letter, where Unicode has one
        for mark in "\u0300\u0301\u0303\u0308\u0327":
            composed = unicodedata.normalize("NFC", base + mark)
            if len(composed) == 1:
                rules.append((base + mark, composed))
    return rules


def train_spiece(out: Path) -> Path:
    """Train the SentencePiece model into ``out/spiece.model``, deterministically."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdrt-t5tiny-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(sentences()) + "\n", encoding="utf-8")
        table = Path(tmp) / "rules.tsv"
        hexes = [" ".join(f"{ord(c):X}" for c in s) for pair in norm_rules() for s in pair]
        table.write_text("".join(f"{a}\t{b}\n" for a, b in zip(hexes[::2], hexes[1::2])), encoding="utf-8")
        spm.set_random_generator_seed(SEED)
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "spiece"), model_type="unigram",
            vocab_size=VOCAB_SIZE, character_coverage=1.0, normalization_rule_tsv=str(table),
            pad_id=0, pad_piece="<pad>", eos_id=1, eos_piece="</s>", unk_id=2, unk_piece="<unk>", bos_id=-1,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, split_digits=False,
            byte_fallback=False, minloglevel=2,
        )
        # the trainer records its input paths (a random temporary folder) in the model: name them plainly
        raw = (Path(tmp) / "spiece.model").read_bytes()
        proto = model_pb2.ModelProto.FromString(raw)  # type: ignore[attr-defined]
        proto.trainer_spec.input[:] = ["corpus.txt"]
        proto.trainer_spec.model_prefix = "spiece"
        proto.normalizer_spec.normalization_rule_tsv = "rules.tsv"
        model = out / "spiece.model"
        model.write_bytes(proto.SerializeToString())
    return model


def make_asset(out: Path) -> None:
    """spiece.model plus transformers' T5TokenizerFast conversion of it, into ``out``."""
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]

    out = Path(out)
    model = train_spiece(out)
    with tempfile.TemporaryDirectory(prefix="sdrt-t5tiny-") as tmp:
        (Path(tmp) / "src").mkdir()
        (Path(tmp) / "src" / "spiece.model").write_bytes(model.read_bytes())
        # from_pretrained converts spiece.model (the constructor alone would not read it)
        tok = T5TokenizerFast.from_pretrained(str(Path(tmp) / "src"), extra_ids=EXTRA_IDS,
                                              model_max_length=MODEL_MAX_LENGTH)
        tok.save_pretrained(str(Path(tmp) / "out"))
        tmp = str(Path(tmp) / "out")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = Path(tmp) / name
            if src.is_file():
                (out / name).write_bytes(src.read_bytes())
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):  # from_pretrained's call arguments, not the tokenizer's
        config.pop(key, None)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
    smap = out / "special_tokens_map.json"
    if not smap.is_file():  # transformers 5 does not write it; transformers 4 and diffusers' folders have it
        specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                    "additional_special_tokens": [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]}
        smap.write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdrt.export.t5_tiny_tokenizer",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the tokenizer files into")
    make_asset(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
