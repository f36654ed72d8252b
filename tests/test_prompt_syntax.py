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

from .helpers.pipelines import loaded_on, shared_pipeline

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


# -- prompt editing: the conditioning changes at the segment's step, on the device ----------------------------

EDITED = "a [red:blue:2] fox, (snow:1.3)"  # 5 steps: "a red fox" through step 2, then "a blue fox"
SEGMENTS = ([("a red fox, ", 1.0), ("snow", 1.3)], [("a blue fox, ", 1.0), ("snow", 1.3)])
SWITCH = 3  # A1111 reads segment j at 0-based step i while i <= its last step (2): steps 0, 1, 2, then the next


def _sd15_states(folder: Path, fragments: list[tuple[str, float]]) -> torch.Tensor:
    from sdrt.export.loading import random_model

    enc = random_model("sd15-tiny").text_encoders[0].eval()
    ids, w = _rows(_hf_tokenizer(folder, "tokenizer"), fragments)
    with torch.no_grad():
        return _emphasis(enc(torch.tensor(ids)).last_hidden_state, torch.tensor(w))


def _edited_reference(folder: Path, latents: np.ndarray, steps: int = 5) -> np.ndarray:
    """diffusers' StableDiffusionPipeline fed each segment's states (A1111's emphasis in torch), swapped by its
    step-end callback after step SWITCH - 1 (the guided batch is [negative, positive])."""
    from .helpers.references import diffusers_pipe, diffusers_scheduler

    pipe, cfg = diffusers_pipe("sd15-tiny", folder)
    pipe.scheduler = diffusers_scheduler("euler", cfg)
    neg = _sd15_states(folder, [("blurry", 1.0)])
    first, then = (_sd15_states(folder, f) for f in SEGMENTS)

    def swap(_pipe, i: int, _t, kw: dict) -> dict:
        return {"prompt_embeds": torch.cat([neg, then])} if i == SWITCH - 1 else {}

    with torch.no_grad():
        out = pipe(prompt_embeds=first, negative_prompt_embeds=neg, num_inference_steps=steps, guidance_scale=6.0,
                   latents=torch.from_numpy(latents), height=64, width=64, output_type="np",
                   callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    return (out[0] * 255).round().astype(np.int32)


def test_prompt_editing_switches_the_conditioning_at_a1111s_step(tiny_export) -> None:
    folder = tiny_export("sd15-tiny")
    latents = np.random.default_rng(8).standard_normal((1, 4, 8, 8), dtype=np.float32)
    want = _edited_reference(folder, latents)
    pipe = shared_pipeline(folder)
    kw = {"negative_prompt": "blurry", "steps": 5, "guidance_scale": 6.0, "sampler": "euler", "latents": latents,
          "height": 64, "width": 64}
    got = np.asarray(pipe(EDITED, prompt_syntax="a1111", **kw).images[0]).astype(np.int32)
    assert int(np.abs(got - want).max()) <= 1
    unedited = np.asarray(pipe("a red fox, (snow:1.3)", prompt_syntax="a1111", **kw).images[0]).astype(np.int32)
    assert np.abs(unedited - want).max() > 1  # the switch changed the picture


def test_alternation_runs_a1111s_order(tiny_export) -> None:
    """``[red|blue]`` over 4 steps: A1111's schedule [(1, red), (2, blue), (3, red), (4, blue)] read by its rule
    (segment j while i <= its last step) gives red, red, blue, red on steps 0-3: the same image as prompt editing
    written out step by step would, and not the image of either word alone."""
    pipe = shared_pipeline(tiny_export("sd15-tiny"))
    kw = {"steps": 4, "seed": 3, "guidance_scale": 5.0, "sampler": "euler", "height": 64, "width": 64,
          "prompt_syntax": "a1111"}
    alt = np.asarray(pipe("a [red|blue] fox", **kw).images[0])
    spelled = np.asarray(pipe("a [[red:blue:1]:red:2] fox", **kw).images[0])  # red 0-1, blue 2, red 3
    assert np.array_equal(alt, spelled)
    for word in ("red", "blue"):
        assert not np.array_equal(alt, np.asarray(pipe(f"a {word} fox", **kw).images[0]))


def test_prompt_editing_on_the_tensorrt_loop_gives_the_ort_cpu_image(tiny_export, tmp_path: Path,
                                                                     fake_gpu) -> None:
    """The captured loop copies the next segment's conditioning into its bound buffers before the step (fakes:
    the logic, not TensorRT)."""
    from sdrt.export.profiles import custom_profile
    from sdrt.export.trt_build import BuildOptions, build_engines
    from sdrt.runtime.pipeline import Pipeline

    src = tiny_export("sd15-tiny")
    out = tmp_path / "engines"
    build_engines(src, out, custom_profile(batch="1:1:1", height=64, width=64), BuildOptions(workspace_gb=1))
    kw = {"negative_prompt": "blurry", "steps": 5, "guidance_scale": 6.0, "sampler": "euler", "seed": 4,
          "height": 64, "width": 64, "prompt_syntax": "a1111"}
    want = np.asarray(shared_pipeline(src)(EDITED, **kw).images[0], np.int16)
    with Pipeline.load(out, backend="tensorrt") as trt:
        res = trt(EDITED, **kw)
    assert res.loop == "captured CUDA graphs"
    assert np.abs(np.asarray(res.images[0], np.int16) - want).max() <= 1


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_prompt_editing_on_the_ort_cuda_code_path(tiny_export, monkeypatch: pytest.MonkeyPatch,
                                                  cuda_graph: bool) -> None:
    """ort-cuda's code path in CPU memory on the CPU EP (IO binding; with cuda_graph the composed UNet + step
    session, whose bound conditioning is overwritten at the segment's step): the ort-cpu image. Says nothing of
    a GPU."""
    src = tiny_export("sd15-tiny")
    kw = {"negative_prompt": "blurry", "steps": 5, "guidance_scale": 6.0, "sampler": "euler", "seed": 4,
          "height": 64, "width": 64, "prompt_syntax": "a1111"}
    want = np.asarray(shared_pipeline(src)(EDITED, **kw).images[0])
    with loaded_on(src, "ort-cuda-path", monkeypatch, cuda_graph=cuda_graph) as pipe:
        for _ in range(2):  # the second call reuses the composed session's bindings
            res = pipe(EDITED, **kw)
            np.testing.assert_array_equal(np.asarray(res.images[0]), want)
            assert ("UNet + sampler step as one ONNX Runtime session" in res.loop) == cuda_graph, res.loop


def test_prompt_editing_on_openvino(tiny_export) -> None:
    src = tiny_export("sd15-tiny")
    kw = {"negative_prompt": "blurry", "steps": 5, "guidance_scale": 6.0, "sampler": "euler", "seed": 4,
          "height": 64, "width": 64, "prompt_syntax": "a1111"}
    with loaded_on(src, "openvino") as ov:
        want = np.asarray(shared_pipeline(src)(EDITED, **kw).images[0], np.int16)
        got = np.asarray(ov(EDITED, **kw).images[0], np.int16)
    assert np.abs(got - want).max() <= 2


def test_the_loop_refuses_a_bad_segment_table(tiny_export) -> None:
    """``cond_steps`` checked by every loop alike: steps inside 1..steps-1 and increasing, cond's names and
    shapes."""
    from sdrt.runtime.engine import StepLoop

    meta = lambda a: (a.dtype, a.shape)
    cond = {"encoder_hidden_states": np.zeros((2, 77, 8), np.float32)}
    ok = StepLoop._check_cond_steps(cond, [(2, cond), (3, cond)], 5, meta)
    assert list(ok) == [2, 3]
    for bad, match in (([(0, cond)], "within 1..4"), ([(3, cond), (2, cond)], "increase"),
                       ([(5, cond)], "within 1..4"), ([(1, {"x": cond["encoder_hidden_states"]})], "holds"),
                       ([(1, {"encoder_hidden_states": np.zeros((2, 154, 8), np.float32)})], "chunks")):
        with pytest.raises(InputError, match=match):
            StepLoop._check_cond_steps(cond, bad, 5, meta)


# -- refusals and the serving path ---------------------------------------------------------------------------

def test_bad_prompts_and_non_clip_families_are_refused_before_work(tiny_export, sd3_export) -> None:
    pipe = shared_pipeline(tiny_export("sd15-tiny"))
    with pytest.raises(InputError, match="prompt_syntax must be one of plain, a1111, compel"):
        pipe("a cat", steps=2, prompt_syntax="invokeai")
    with pytest.raises(InputError, match="not a number"):
        pipe("a (cat:1.2.3)", steps=2, prompt_syntax="a1111")
    sd3 = shared_pipeline(sd3_export("sd3-tiny"))
    with pytest.raises(InputError, match="CLIP families"):
        sd3("a (red:1.3) fox", steps=2, prompt_syntax="a1111")
    sd3("a red fox", steps=1, prompt_syntax="a1111", height=64, width=64)  # nothing to weigh: plain text


def test_the_a1111_endpoint_reads_a1111s_language(tiny_export) -> None:
    """Over ``/sdapi/v1/txt2img`` a weighted prompt and negative give the image of the same conditioning passed
    as embeddings (computed here in torch); a weight that is no number is a 422 naming it."""
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
                       json={"prompt": "a (cat:1.2.3)", "steps": 3, "width": 64, "height": 64})
        assert r.status_code == 422 and "not a number" in r.text, r.text
        # the OpenAI endpoint reads the prompt as it is unless asked
        r = httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                       json={"prompt": WEIGHTED, "negative_prompt": "(blurry:1.2), dark", "size": "64x64",
                             "steps": 3, "seed": 21, "guidance_scale": 6.0, "sampler": "euler",
                             "prompt_syntax": "a1111"})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)
