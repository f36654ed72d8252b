"""A1111's prompt language: the parser against A1111's own documented examples (its ``prompt_parser.py``
docstrings and the schedule example at its head), its chunking (BREAK, the comma backtrack) against token ids
worked out by hand with transformers' CLIPTokenizer, and the weighted embeddings against A1111's "Original"
emphasis written here in torch over transformers' CLIP text models (SD 1.5 and SDXL's two encoders); through
the A1111 endpoint, a weighted prompt gives the image of the same conditioning given as embeddings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import InputError
from sdrt.runtime.prompt_syntax import lora_tags, parse_attention, prompt_schedule

from .helpers.pipelines import shared_pipeline

# -- the parser: A1111's documented examples -----------------------------------------------------------------

@pytest.mark.parametrize(("text", "want"), [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # A1111's leniency: a non-numeric weight is text; an unmatched closing bracket is text; spaces around a weight
    ("(a:b)", [("a:b", 1.1)]),
    ("a) b]", [("a) b]", 1.0)]),
    ("(cat: 1.5 )", [("cat", 1.5)]),
    ("[[dim]]", [("dim", 1 / 1.1 / 1.1)]),
    ("red cat BREAK blue dog", [("red cat", 1.0), ("BREAK", -1.0), ("blue dog", 1.0)]),
])
def test_attention_as_a1111_documents_it(text: str, want: list[tuple[str, float]]) -> None:
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in want], rtol=1e-12)


@pytest.mark.parametrize(("text", "want"), [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(k, "a" if k % 2 else "(b:1.1)") for k in range(1, 11)]),
])
def test_prompt_editing_schedules_as_a1111_documents_them(text: str, want: list[tuple[int, str]]) -> None:
    assert prompt_schedule(text, 10) == want


def test_the_schedule_example_at_the_head_of_a1111s_parser() -> None:
    text = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
            "[ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(text, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful")]


def test_lora_tags_leave_the_text() -> None:
    assert lora_tags("a fox <lora:ink:0.7>, snow <lora:detail:0.2:0.9> <lora:plain>") == \
        ("a fox , snow", [("ink", 0.7), ("detail", 0.9), ("plain", 1.0)])
    with pytest.raises(InputError, match="must be a number"):
        lora_tags("<lora:ink:lots>")


# -- the embeddings: A1111's emphasis written in torch over transformers' models ----------------------------

def _hf_tokenizer(folder: Path, sub: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder / sub)


def _rows(tok, fragments: list[tuple[str, float]]) -> tuple[list[list[int]], list[list[float]]]:
    """A1111's rows for prompts of at most 75 tokens with no BREAK (one chunk): bos, each fragment's tokens with
    its weight, eos, then the pad id; weight 1 outside the text."""
    ids, w = [tok.bos_token_id], [1.0]
    for text, weight in fragments:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        w += [weight] * len(t)
    ids.append(tok.eos_token_id)
    w.append(1.0)
    pad = tok.pad_token_id
    return [ids + [pad] * (77 - len(ids))], [w + [1.0] * (77 - len(w))]


def _emphasis(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A1111's EmphasisOriginal.after_transformers, verbatim in torch."""
    original_mean = z.mean()
    z = z * w.reshape(w.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


WEIGHTED = "a (red:1.5) fox in [snow], ((detailed))"
FRAGMENTS = [("a ", 1.0), ("red", 1.5), (" fox in ", 1.0), ("snow", 1 / 1.1), (", ", 1.0), ("detailed", 1.21)]


def test_sd15_weighted_states_are_a1111s(tiny_export) -> None:
    from sdrt.export.loading import random_model

    folder = tiny_export("sd15-tiny")
    enc = random_model("sd15-tiny").text_encoders[0].eval()
    ids, w = _rows(_hf_tokenizer(folder, "tokenizer"), FRAGMENTS)
    with torch.no_grad():
        want = _emphasis(enc(torch.tensor(ids)).last_hidden_state, torch.tensor(w)).numpy()
    pipe = shared_pipeline(folder)
    emb = pipe.encode_prompt(WEIGHTED, guided=False, prompt_syntax="a1111")
    got = pipe.backend.to_host(emb.hidden)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    plain = pipe.backend.to_host(pipe.encode_prompt(WEIGHTED, guided=False).hidden)
    assert np.abs(plain - want).max() > 1e-2  # the plain syntax reads the brackets as text


def test_sdxl_weights_both_encoders_and_keeps_the_pooled_embedding(tiny_export) -> None:
    """SDXL: each encoder's penultimate states weighted on their own (A1111 wraps each), joined on channels; the
    pooled embedding is the second encoder's projection of the unweighted chunk."""
    from sdrt.export.loading import random_model

    folder = tiny_export("sdxl-tiny")
    m = random_model("sdxl-tiny")
    parts, pooled = [], None
    with torch.no_grad():
        for enc, sub in zip(m.text_encoders, ("tokenizer", "tokenizer_2"), strict=True):
            ids, w = _rows(_hf_tokenizer(folder, sub), FRAGMENTS)
            out = enc.eval()(torch.tensor(ids), output_hidden_states=True)
            parts.append(_emphasis(out.hidden_states[-2], torch.tensor(w)))
            pooled = getattr(out, "text_embeds", None)
    want = torch.cat(parts, dim=-1).numpy()
    pipe = shared_pipeline(folder)
    emb = pipe.encode_prompt(WEIGHTED, guided=False, prompt_syntax="a1111")
    np.testing.assert_allclose(pipe.backend.to_host(emb.hidden), want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(pipe.backend.to_host(emb.pooled), pooled.numpy(), rtol=0, atol=2e-5)


def test_break_starts_a_chunk(tiny_export) -> None:
    """``BREAK``: two 77-token chunks, each the encoding of its own text, joined on the sequence."""
    from sdrt.export.loading import random_model

    folder = tiny_export("sd15-tiny")
    enc = random_model("sd15-tiny").text_encoders[0].eval()
    tok = _hf_tokenizer(folder, "tokenizer")
    with torch.no_grad():
        want = torch.cat([enc(torch.tensor(_rows(tok, [(t, 1.0)])[0])).last_hidden_state
                          for t in ("red cat", "blue dog")], dim=1).numpy()
    pipe = shared_pipeline(folder)
    got = pipe.backend.to_host(pipe.encode_prompt("red cat BREAK blue dog", guided=False, prompt_syntax="a1111").hidden)
    assert got.shape == (1, 154, want.shape[-1])
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_a_full_chunk_breaks_after_its_last_comma(tiny_export) -> None:
    """A1111's comma backtrack: 70 words, a comma, 10 more: the first chunk ends after the comma (it was within
    20 tokens of the end), the 10 words open the second; ids worked out with transformers' tokenizer."""
    from sdrt.runtime.tokenizer import ClipTokenizer
    from sdrt.runtime.weighted_prompts import a1111_rows

    folder = tiny_export("sd15-tiny")
    hf = _hf_tokenizer(folder, "tokenizer")
    cat, dog = (hf(w, add_special_tokens=False)["input_ids"] for w in ("cat", "dog"))
    comma = hf(",", add_special_tokens=False)["input_ids"]
    assert len(cat) == len(dog) == len(comma) == 1
    ids, w = a1111_rows(ClipTokenizer.from_folder(folder / "tokenizer"), " ".join(["cat"] * 70) + ", " +
                        " ".join(["dog"] * 10))
    pad, bos, eos = hf.pad_token_id, hf.bos_token_id, hf.eos_token_id
    first = [bos, *cat * 70, *comma, eos]
    second = [bos, *dog * 10, eos]
    assert ids.tolist() == [first + [pad] * (77 - len(first)), second + [pad] * (77 - len(second))]
    assert (w == 1.0).all()


# -- refusals and the serving path ---------------------------------------------------------------------------

def test_prompt_editing_and_non_clip_families_are_refused_before_work(tiny_export, sd3_export) -> None:
    pipe = shared_pipeline(tiny_export("sd15-tiny"))
    for text in ("a [cat:dog:0.5]", "a [cat|dog]"):
        with pytest.raises(InputError, match="prompt editing"):
            pipe(text, steps=2, prompt_syntax="a1111")
        pipe(text, steps=1, height=64, width=64)  # the plain syntax reads the brackets as text
    with pytest.raises(InputError, match="prompt_syntax must be one of plain, a1111"):
        pipe("a cat", steps=2, prompt_syntax="compel")
    with pytest.raises(InputError, match="not a number"):
        pipe("a (cat:1.2.3)", steps=2, prompt_syntax="a1111")
    sd3 = shared_pipeline(sd3_export("sd3-tiny"))
    with pytest.raises(InputError, match="CLIP families"):
        sd3("a (red:1.3) fox", steps=2, prompt_syntax="a1111")
    sd3("a red fox", steps=1, prompt_syntax="a1111", height=64, width=64)  # nothing to weigh: plain text


def test_the_a1111_endpoint_reads_a1111s_language(tiny_export) -> None:
    """Over ``/sdapi/v1/txt2img`` a weighted prompt and negative give the image of the same conditioning passed
    as embeddings (computed here in torch); prompt editing is a 422 naming it."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from sdrt.export.loading import random_model
    from sdrt.serve import create_app

    from .helpers.serve_live import LiveServer, pixels

    folder = tiny_export("sd15-tiny")
    enc = random_model("sd15-tiny").text_encoders[0].eval()
    tok = _hf_tokenizer(folder, "tokenizer")
    with torch.no_grad():
        def states(fragments: list[tuple[str, float]]) -> np.ndarray:
            ids, w = _rows(tok, fragments)
            return _emphasis(enc(torch.tensor(ids)).last_hidden_state, torch.tensor(w)).numpy()

        pos, neg = states(FRAGMENTS), states([("blurry", 1.2), (", dark", 1.0)])
    pipe = shared_pipeline(folder)
    want = np.asarray(pipe(prompt_embeds=pos, negative_prompt_embeds=neg, steps=3, seed=21, height=64, width=64,
                           guidance_scale=6.0, sampler="euler").images[0])
    app = create_app(pipe, max_batch=4, batch_window_ms=50, max_steps=8, max_pixels=128 * 128, warmup=False)
    with LiveServer(app) as server:
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=120,
                       json={"prompt": WEIGHTED, "negative_prompt": "(blurry:1.2), dark", "steps": 3, "seed": 21,
                             "width": 64, "height": 64, "cfg_scale": 6.0, "sampler_name": "Euler"})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), want)
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=120,
                       json={"prompt": "a [cat:dog:0.5]", "steps": 3, "width": 64, "height": 64})
        assert r.status_code == 422 and "prompt editing" in r.text, r.text
        # the OpenAI endpoint reads the prompt as it is unless asked
        r = httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                       json={"prompt": WEIGHTED, "negative_prompt": "(blurry:1.2), dark", "size": "64x64",
                             "steps": 3, "seed": 21, "guidance_scale": 6.0, "sampler": "euler",
                             "prompt_syntax": "a1111"})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)
