"""compel's prompt dialect (``prompt_syntax="compel"``) against compel 2.5.1 itself: sdrt's parser against compel's
``PromptParser`` on written and generated prompts (the same fragments and weights, blends, conjunctions, errors); the
conditioning against ``Compel`` (its default ``DownweightMode.MASK``, no truncation, as CompelForSD / CompelForSDXL)
over transformers' text encoders of the tiny SD 1.5 and SDXL models, on ort-cpu and openvino; the exported text
encoders' attention mask against transformers'; an export whose text encoders take no mask (as sdrt wrote them
before) against ``DownweightMode.REMOVE``; an image against diffusers fed compel's ``prompt_embeds``; a request
through the OpenAI endpoint; the refusals.
"""

from __future__ import annotations

import importlib.util
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdrt.runtime.compel_syntax import Blend, parse_compel
from sdrt.runtime.errors import InputError

from .helpers.pipelines import ort_cuda_on_cpu, shared_pipeline

needs_compel = pytest.mark.skipif(importlib.util.find_spec("compel") is None,
                                  reason="the reference for compel's syntax is compel itself (the test extra: pip "
                                         "install compel==2.5.1)")


# -- the parser: compel's own, on the same prompts --------------------------------------------------------------------

def _theirs(text: str) -> tuple:
    """compel's parse in sdrt's shape: (parts, weights, loras); ("error",) where compel raises, ("swap",) for
    cross-attention control."""
    from compel.prompt_parser import Blend as TheirBlend
    from compel.prompt_parser import CrossAttentionControlSubstitute, PromptParser

    try:
        c = PromptParser().parse_conjunction(text)
    except Exception:  # noqa: BLE001 - compel raises pyparsing's, its own and ValueError alike
        return ("error",)
    parts: list = []
    for p in c.prompts:
        if isinstance(p, TheirBlend):
            parts.append(("blend", tuple(tuple((f.text, f.weight) for f in fp.children) for fp in p.prompts),
                          tuple(p.weights), p.normalize_weights))
        elif any(isinstance(f, CrossAttentionControlSubstitute) for f in p.children):
            return ("swap",)
        else:
            parts.append(tuple((f.text, f.weight) for f in p.children))
    return tuple(parts), tuple(c.weights), tuple((lo.model, float(lo.weight)) for lo in c.lora_weights)


def _ours(text: str, strict: bool = False) -> tuple:
    try:
        c = parse_compel(text, strict=strict)
    except InputError as e:
        return ("swap",) if ".swap()" in str(e) else ("error",)
    parts = [("blend", p.prompts, p.weights, p.normalize) if isinstance(p, Blend) else p for p in c.parts]
    return tuple(parts), c.weights, c.loras


WRITTEN = [
    "a cat", "a cat+", "a cat++ on a mat-", "a (red cat)++ on a mat--", "(a cat)1.3", "((a cat)1.3 dog)0.5",
    "cat+++", "(cat)++(dog)-", "cat+ dog+", "a cat.attend(1.2)", '"red cat"+', '"a, b. c"-', "(a cat, dog)++",
    "(a)+1.5", "(a)-.5", "(a).5", "cat+-", "a-b", "a - b", "-a", "1.5", "a,b,c", "a+,b", "a cat.", "a (cat).",
    "(a.)+", "(cat)1.5.", "a \\(cat\\)", "a \\+ b", 'a \\"cat\\" dog', '"a \\"b\\""+', "a\\,b", "cat+s",
    "(a \"b c\"+ d)-", '"(a)+"', "", "   ", "word++ (two words)+ \"quoted stuff\"- last",
    '("a cat", "a dog").blend(0.7, 0.3)', '("a cat", "a dog").blend()', '("a", "b").blend(1, 2, no_normalize)',
    '("a cat+", b).blend(0.3, 0.7)', "(a, b).blend(1,1)", ' ("a",  "b" ) .blend( 1 ,2 )', '("a cat", "a dog").and()',
    '("a cat", "a dog").and(1, 0.5)', '("a", "b").add()', '("", "a").and()', '("a (b)+", "c-").and(2, 1)',
    "withLora(foo, 0.5) a cat", "a cat useLora(bar)", '("a", "b").blend(0.7)', '("a", "b").and(1,2,3)',
    '("a cat", "b").blend(a, b)', '("a","b").blend(1,1) extra', "a cat.swap(dog)", "(a cat", "a cat)", '(a - b)+',
    "x (\"a\", \"b\").blend(1,2)", '("a", "b").and() c', 'a "cat', "(a)(b)", "a\tb", "a\nb", "(  spaced   out )+",
]


@needs_compel
@pytest.mark.parametrize("text", WRITTEN)
def test_the_parser_reads_what_compel_reads(text: str) -> None:
    assert _ours(text) == _theirs(text)


def _generated(n: int, seed: int) -> list[str]:
    pieces = ["cat", "a", "red", " ", " ", " ", "+", "++", "-", "--", "(", ")", '"', ",", ".", "1.3", "0.5", "2", "-0.5",
              ".5", "\\(", "\\)", '\\"', "\\+", "\\-", "=", "\\", ".attend(", "\t", "!", "1,", "0.3)", "word+",
              "(x y)1.2", "'", ":", ";"]
    rng = random.Random(seed)
    out = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 10))) for _ in range(n)]
    subs = ["cat", "a red fox", "snow+", "(dark forest)1.2", '"quoted, words"-', "x++", "(nested (deep)0.5)+", "1.5"]
    for _ in range(n // 4):  # blends and conjunctions, well formed or nearly
        k = rng.randint(1, 3)
        targets = ", ".join(rng.choice(['"{}"', "({})", "{}"]).format(rng.choice(subs)) for _ in range(k))
        weights = ", ".join(rng.choice(["0.7", "1", "0.3", ".5", "2.", "x"]) for _ in range(rng.choice([k, k, 0, k + 1])))
        out.append(f"({targets}){rng.choice(['.blend', '.and', '.add'])}({weights}){rng.choice(['', '', ' tail'])}")
    return out


@needs_compel
def test_the_parser_agrees_with_compel_on_generated_prompts() -> None:
    """Random strings of compel's syntax pieces (brackets, quotes, signs, escapes, numbers, tabs) and of blends
    and conjunctions: the same fragments, weights and errors as compel's parser, prompt for prompt."""
    pairs = [(t, _ours(t), _theirs(t)) for t in _generated(80, seed=11)]
    assert sum(p[2][0] == "error" for p in pairs) < len(pairs) // 4  # mostly prompts compel reads
    differ = [p for p in pairs if p[1] != p[2]]
    assert not differ, differ[:5]


@pytest.mark.parametrize(("text", "match"), [
    ("(a cat", "unclosed or unreadable bracket"),
    ("a cat)", "unmatched bracket"),
    ("(a - b)+", r"write \\\+ \\\- \\="),
    ('a "cat', "unclosed quote"),
    ('x ("a", "b").blend(1, 2)', "take the whole prompt"),
    ('("a", "b").and() c', "ignores the text after"),
    ("withLora(foo, 0.5) a cat", "loras="),
    ('("a", "b").blend(0.7)', "2 prompts but 1 weights"),
    ('("a", "b").and(1, 2, 3)', "joins 2 prompts but has 3 weights"),
    ('("a", "b").blend(x, y)', "takes numbers"),
    ('("a", "b").blend(1, 1) tail', "may not follow a .blend"),
    ("a cat.swap(dog)", "cross-attention control"),
    ('("a", "b").blend(1, -1)', "not sum to 0"),
    ("(" * 30 + "a" + ")" * 30, "nests brackets 30 deep"),
    ("cat" + "+" * 10000, "overflow a weight"),
    ("(" * 20 + "a" + ")9999999999999999999999" * 20, "multiply past what a float holds"),
    ('"a \\ud800 b"', "unpaired surrogate"),
])
def test_what_compel_reads_as_text_or_refuses_is_an_input_error(text: str, match: str) -> None:
    """compel raises on some of these and reads the others as text (brackets, quotes and all): sdrt refuses each,
    naming the problem and the fix."""
    with pytest.raises(InputError, match=match):
        parse_compel(text)


# -- the conditioning: Compel over transformers' encoders -------------------------------------------------------------

LONG = " ".join(["a red fox in the snow."] * 12) + " (dark forest)-- at night+"  # two chunks, split after a "."
PROMPTS = ["a cat++ on a mat-", '("a red cat", "a blue dog").blend(0.7, 0.3)', '("a cat+", "a dog-").and(1, 0.5)',
           "(a (red cat)1.4 dog)0.8, snow", '("a cat", "a dog").blend(2, 1, no_normalize)', "", "a (red)- cat (on)0",
           LONG]


def _sd15_compel(folder, mode: str = "MASK"):
    from compel import Compel, DownweightMode
    from transformers import CLIPTokenizer

    from sdrt.export.loading import random_model

    enc = random_model("sd15-tiny").text_encoders[0].eval()
    return Compel(tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), text_encoder=enc,
                  truncate_long_prompts=False, downweight_mode=DownweightMode[mode])


@pytest.fixture(scope="module")
def maskless_export(tiny_export, tmp_path_factory):
    """The tiny SD 1.5 export as sdrt wrote it before its text encoders took an attention mask: the text encoder
    exported again from the same weights with the spec of then (``input_ids`` only), the manifest recording it."""
    import shutil
    from dataclasses import replace

    from sdrt.export import wrappers
    from sdrt.export.exporter import MIN_OPSET, component_specs
    from sdrt.export.loading import random_model
    from sdrt.export.onnx_export import export_component
    from sdrt.runtime.manifest import ExportManifest

    out = tmp_path_factory.mktemp("maskless") / "sd15-tiny"
    shutil.copytree(tiny_export("sd15-tiny"), out)
    man = ExportManifest.read(out)
    model = random_model("sd15-tiny")
    (spec,) = (s for s in component_specs(model) if s.name == "text_encoder")
    vocab = int(model.text_encoders[0].config.vocab_size)
    shutil.rmtree(out / "text_encoder")
    comp = export_component(replace(spec, inputs=spec.inputs[:1], example=wrappers.clip_ids_example(vocab)), "fp32",
                            out / "text_encoder", opset=MIN_OPSET, parity_shape=(2, 8, 8))
    replace(man, components={**man.components, "text_encoder": comp}).write(out)
    return out


@needs_compel
def test_sd15_conditioning_is_compels(tiny_export) -> None:
    """Each prompt alone, then a guided batch of prompts of different lengths (padded with the empty prompt's
    states, as compel pads them), within 2e-5 of compel's tensors: its default downweighting (MASK: a fragment below
    1 hidden by the attention mask)."""
    folder = tiny_export("sd15-tiny")
    ref = _sd15_compel(folder)
    pipe = shared_pipeline(folder)
    for text in PROMPTS:
        with torch.no_grad():
            want = ref(text).numpy()
        got = pipe.backend.to_host(pipe.encode_prompt(text, guided=False, prompt_syntax="compel").hidden)
        assert got.shape == want.shape, text
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=text)
    with torch.no_grad():
        want = ref(["blurry-, dark", "(low quality)0.5", LONG, "a cat++"]).numpy()  # compel pads them alike
    got = pipe.backend.to_host(pipe.encode_prompt([LONG, "a cat++"], ["blurry-, dark", "(low quality)0.5"],
                                                  prompt_syntax="compel").hidden)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    plain = pipe.backend.to_host(pipe.encode_prompt(PROMPTS[0], guided=False).hidden)
    assert np.abs(plain - ref(PROMPTS[0]).detach().numpy()).max() > 1e-2  # plain reads the signs as text
    removed = _sd15_compel(folder, "REMOVE")
    with torch.no_grad():  # the modes differ where a fragment is below 1: the mask is what made compel's states
        assert np.abs(ref(PROMPTS[0]).numpy() - removed(PROMPTS[0]).numpy()).max() > 1e-2


@needs_compel
def test_a_fragment_across_a_chunk_boundary_is_masked_as_compel_masks_it(tiny_export) -> None:
    """74 words and a downweighted fragment that the chunking splits (``red`` ends the first chunk, ``cat`` starts
    the second): compel masks from its first token to its last, the first chunk's end and the second's start
    excepted; sdrt's states are compel's (two chunks: nothing is removed, so nothing moves)."""
    folder = tiny_export("sd15-tiny")
    ref = _sd15_compel(folder)
    text = " ".join(["word"] * 74) + " (red cat)-"
    with torch.no_grad():
        want = ref(text).numpy()
    got = shared_pipeline(folder).backend.to_host(
        shared_pipeline(folder).encode_prompt(text, guided=False, prompt_syntax="compel").hidden)
    assert got.shape == want.shape == (1, 154, want.shape[-1])
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@needs_compel
def test_a_downweighted_fragment_without_tokens_hides_nothing(tiny_export) -> None:
    """``a cat ""-``: a fragment below 1 with no tokens. compel's MASK raises (it finds nothing to hide); sdrt
    hides nothing, which gives what compel's REMOVE gives."""
    folder = tiny_export("sd15-tiny")
    text = 'a cat ""-'
    with pytest.raises(TypeError):
        _sd15_compel(folder)(text)
    with torch.no_grad():
        want = _sd15_compel(folder, "REMOVE")(text).numpy()
    pipe = shared_pipeline(folder)
    got = pipe.backend.to_host(pipe.encode_prompt(text, guided=False, prompt_syntax="compel").hidden)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@needs_compel
@pytest.mark.parametrize("backend", ["openvino", "ort-cuda-code-path"])
def test_compels_mask_on_the_other_backends(tiny_export, monkeypatch, backend: str) -> None:
    """The masked variants through openvino (f32) and ort-cuda's code path (IO binding on the CPU EP), the text stage
    alone on the export's text encoder: compel's states within 1e-4 (openvino's own kernels) and 2e-5."""
    from sdrt.runtime.conditioning import TextConditioning
    from sdrt.runtime.device_graphs import DeviceGraphs
    from sdrt.runtime.loading import tokenizers
    from sdrt.runtime.manifest import ExportManifest

    folder = tiny_export("sd15-tiny")
    if backend == "openvino":
        pytest.importorskip("openvino", reason="the openvino backend needs OpenVINO (pip install sdrt[openvino])")
        from sdrt.runtime.ov_backend import OvBackend

        be, atol = OvBackend(precision="f32", cache_dir=False), 1e-4
    else:
        be, atol = ort_cuda_on_cpu(monkeypatch), 2e-5
    man = ExportManifest.read(folder)
    engines = {"text_encoder": be.load(str(folder / "text_encoder" / "model.onnx"), "text_encoder")}
    text = TextConditioning(man, be, engines, tokenizers(man, folder), DeviceGraphs(be), np.dtype(np.float32))
    prompt = "a (red cat)0.6 on a mat-, (snow)0"
    with torch.no_grad():
        want = _sd15_compel(folder)(prompt).numpy()
    try:
        emb = text.encode([prompt], 1, False, syntax="compel")
        got = np.array(be.to_host(emb.hidden), np.float32)  # read while emb lives (CPU EP: numpy() is a view)
    finally:
        be.close()
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@needs_compel
def test_an_export_without_the_mask_gets_compels_remove(maskless_export) -> None:
    """An export whose text encoder takes no attention mask (sdrt's before it did) keeps working: a prompt with a
    fragment below 1 is encoded as compel's DownweightMode.REMOVE encodes it, with a warning naming the re-export;
    one without such a fragment gives compel's states with no warning (the modes agree there)."""
    import warnings

    ref = _sd15_compel(maskless_export, "REMOVE")
    pipe = shared_pipeline(maskless_export)
    for text in ("a cat++ on a mat-", "(a (red cat)1.4 dog)0.8, snow", LONG):
        with torch.no_grad():
            want = ref(text).numpy()
        with pytest.warns(UserWarning, match=r"DownweightMode.REMOVE does\. For compel's default, re-export"):
            got = pipe.backend.to_host(pipe.encode_prompt(text, guided=False, prompt_syntax="compel").hidden)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=text)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = pipe.backend.to_host(pipe.encode_prompt('("a cat+", "a dog").blend(0.7, 0.3)', guided=False,
                                                      prompt_syntax="compel").hidden)
    with torch.no_grad():
        np.testing.assert_allclose(got, _sd15_compel(maskless_export)('("a cat+", "a dog").blend(0.7, 0.3)').numpy(),
                                   rtol=0, atol=2e-5)


@needs_compel
def test_a_removal_that_changes_the_chunks_is_padded(maskless_export) -> None:
    """REMOVE (an export without the mask): 74 words and a downweighted fragment: the prompt takes two chunks,
    without the fragment one. compel raises there (its tensors differ in length); sdrt pads the shorter with the
    empty prompt's states, as compel pads everything else: the lerp worked out here from compel's own pieces (its
    tokens, weighted states, empty states)."""
    from compel.embeddings_provider import DownweightMode

    ref = _sd15_compel(maskless_export, "REMOVE")
    text = " ".join(["word"] * 74) + " (red cat)-"
    with pytest.raises(RuntimeError):
        ref(text)
    p = ref.conditioning_provider
    assert p.downweight_mode == DownweightMode.REMOVE
    frags, weights = [" ".join(["word"] * 74), "red cat"], [1.0, 0.9]
    with torch.no_grad():
        base = p.build_weighted_embedding_tensor(*p.get_token_ids_and_expand_weights(frags, weights, "cpu")[:2])
        without = p.build_weighted_embedding_tensor(*p.get_token_ids_and_expand_weights(frags[:1], [1.0], "cpu")[:2])
        without = torch.cat([without, p.empty_z], dim=1)
        lerp = torch.tensor([1.0, math.tan(0.1 * math.pi / 2)])
        lerp = lerp / lerp.sum()
        want = (base * lerp[0] + without * lerp[1]).numpy()
    pipe = shared_pipeline(maskless_export)
    with pytest.warns(UserWarning, match="DownweightMode.REMOVE"):
        got = pipe.backend.to_host(pipe.encode_prompt(text, guided=False, prompt_syntax="compel").hidden)
    assert got.shape == (1, 154, want.shape[-1])
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("preset", ["sd15-tiny", "sdxl-tiny"])
def test_the_text_encoders_read_the_mask_as_transformers_does(tiny_export, preset: str) -> None:
    """Each exported text encoder (ONNX Runtime) against transformers' own CLIP text model: an all-ones mask gives
    the states of the model called without a mask (the graph's reading of the ids alone), and compel's mask (a
    fragment hidden, bos and eos kept) those of the model called with that mask; three rows, for the dynamic
    batch."""
    import onnxruntime as ort

    from sdrt.export.loading import random_model

    folder = tiny_export(preset)
    sdxl = preset == "sdxl-tiny"
    ids = np.full((3, 77), 49407, np.int32)
    ids[:, 0] = 49406
    ids[:, 1:9] = np.random.default_rng(3).integers(0, 49406, (3, 8))
    mask = np.ones((3, 77), np.int32)
    mask[0, 2:5], mask[2, 5:70] = 0, 0
    for name, enc in zip(("text_encoder", "text_encoder_2"), random_model(preset).text_encoders):
        sess = ort.InferenceSession(str(folder / name / "model.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
        for m, ref_mask in ((np.ones_like(mask), None), (mask, torch.from_numpy(mask).long())):
            with torch.no_grad():
                out = enc(torch.from_numpy(ids).long(), attention_mask=ref_mask, output_hidden_states=True)
            got = sess.run(None, {"input_ids": ids, "attention_mask": m})
            want = out.hidden_states[-2] if sdxl else out.last_hidden_state
            np.testing.assert_allclose(got[0], want.numpy(), rtol=0, atol=2e-5)
            if len(got) > 1:
                np.testing.assert_allclose(got[1], out.text_embeds.numpy(), rtol=0, atol=2e-5)
        with torch.no_grad():  # the mask changes the states: the graph does not ignore it
            unmasked = enc(torch.from_numpy(ids).long(), output_hidden_states=True).hidden_states[-1]
            masked = enc(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                         output_hidden_states=True).hidden_states[-1]
        assert np.abs(unmasked[0].numpy() - masked[0].numpy()).max() > 1e-3


@needs_compel
def test_sdxl_conditioning_is_compel_for_sdxl(tiny_export) -> None:
    """SDXL: compel's CompelForSDXL (each encoder's penultimate states weighted on its own, padded to the longer,
    joined on channels; the pooled embedding the second encoder's projection of the raw prompt), with its default
    DownweightMode.MASK (each encoder masks the fragment in its own tokens)."""
    from compel import Compel, CompelForSDXL, ReturnedEmbeddingsType
    from transformers import CLIPTokenizer

    from sdrt.export.loading import random_model

    folder = tiny_export("sdxl-tiny")
    m = random_model("sdxl-tiny")
    ref = CompelForSDXL(SimpleNamespace(
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), text_encoder=m.text_encoders[0].eval(),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), text_encoder_2=m.text_encoders[1].eval()))
    pipe = shared_pipeline(folder)
    prompt, negative = '("a red cat-", "a dog++").blend(0.6, 0.4)', "(blurry)0.7, " + LONG
    with torch.no_grad():
        want = ref(prompt, negative_prompt=negative)
    emb = pipe.encode_prompt(prompt, negative, prompt_syntax="compel")
    hidden, pooled = pipe.backend.to_host(emb.hidden), pipe.backend.to_host(emb.pooled)
    np.testing.assert_allclose(hidden[0], want.negative_embeds[0].numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(hidden[1], want.embeds[0].numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(pooled[0], want.negative_pooled_embeds[0].numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(pooled[1], want.pooled_embeds[0].numpy(), rtol=0, atol=2e-5)
    # a weighted .and(): CompelForSDXL raises (its second encoder's Compel returns the pooled embedding with the
    # empty prompt's states); sdrt weighs each encoder's part as Compel does without the pooled embedding
    weighted = '("a red cat-", "a dog++").and(1, 0.5)'
    with pytest.raises(AttributeError):
        ref(weighted)
    second = Compel(tokenizer=ref.compel_2.conditioning_provider.tokenizer, text_encoder=m.text_encoders[1].eval(),
                    returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                    truncate_long_prompts=False)
    with torch.no_grad():
        want_h = torch.cat([ref.compel_1(weighted), second(weighted)], dim=-1).numpy()
        want_p = ref.compel_2.conditioning_provider.get_pooled_embeddings([weighted]).numpy()
    emb = pipe.encode_prompt(weighted, guided=False, prompt_syntax="compel")
    np.testing.assert_allclose(pipe.backend.to_host(emb.hidden), want_h, rtol=0, atol=2e-5)
    np.testing.assert_allclose(pipe.backend.to_host(emb.pooled), want_p, rtol=0, atol=2e-5)


# -- through the pipeline and the server ------------------------------------------------------------------------------

PROMPT, NEGATIVE = '("a red fox+", "snowy forest").blend(0.7, 0.3)', "blurry-, (dark)0.8"


def _compel_embeds(folder, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
    ref = _sd15_compel(folder)
    with torch.no_grad():
        pos, neg = ref(prompt), ref(negative)
        return tuple(ref.pad_conditioning_tensors_to_same_length([pos, neg]))  # type: ignore[return-value]


@needs_compel
def test_an_image_is_diffusers_fed_compels_embeddings(tiny_export) -> None:
    """diffusers' StableDiffusionPipeline fed compel's prompt_embeds and negative_prompt_embeds gives sdrt's image of
    the same prompts in compel's syntax (ort-cpu), within 1/255."""
    from .helpers.references import diffusers_pipe, diffusers_scheduler

    folder = tiny_export("sd15-tiny")
    pos, neg = _compel_embeds(folder, PROMPT, NEGATIVE)
    ref, cfg = diffusers_pipe("sd15-tiny", folder)
    ref.scheduler = diffusers_scheduler("euler", cfg)
    latents = np.random.default_rng(5).standard_normal((1, 4, 8, 8), dtype=np.float32)
    with torch.no_grad():
        want = ref(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=4, guidance_scale=6.0,
                   latents=torch.from_numpy(latents), height=64, width=64, output_type="np").images[0]
    want = (want * 255).round().astype(np.int32)
    pipe = shared_pipeline(folder)
    kw = {"negative_prompt": NEGATIVE, "steps": 4, "guidance_scale": 6.0, "sampler": "euler", "latents": latents,
          "height": 64, "width": 64}
    got = np.asarray(pipe(PROMPT, prompt_syntax="compel", **kw).images[0]).astype(np.int32)
    assert int(np.abs(got - want).max()) <= 1
    plain = np.asarray(pipe(PROMPT, **kw).images[0]).astype(np.int32)
    assert np.abs(plain - want).max() > 1  # the syntax changed the picture


@needs_compel
def test_the_openai_endpoint_reads_compels_syntax(tiny_export) -> None:
    """``prompt_syntax: "compel"`` over ``/v1/images/generations``: the image of compel's embeddings passed as
    prompt_embeds (within 1/255); a blend with too few weights is a 422 naming the fix."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from sdrt.serve import create_app

    from .helpers.serve_live import LiveServer, pixels

    folder = tiny_export("sd15-tiny")
    pos, neg = _compel_embeds(folder, PROMPT, NEGATIVE)
    pipe = shared_pipeline(folder)
    want = np.asarray(pipe(prompt_embeds=pos.numpy(), negative_prompt_embeds=neg.numpy(), steps=3, seed=21,
                           height=64, width=64, guidance_scale=6.0, sampler="euler").images[0], np.int16)
    app = create_app(pipe, max_batch=4, batch_window_ms=50, max_steps=8, max_pixels=128 * 128, warmup=False)
    with LiveServer(app) as server:
        r = httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                       json={"prompt": PROMPT, "negative_prompt": NEGATIVE, "size": "64x64", "steps": 3, "seed": 21,
                             "guidance_scale": 6.0, "sampler": "euler", "prompt_syntax": "compel"})
        assert r.status_code == 200, r.text
        assert np.abs(pixels(r.json()["data"][0]["b64_json"]).astype(np.int16) - want).max() <= 1
        r = httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                       json={"prompt": '("a", "b").blend(0.7)', "size": "64x64", "steps": 3,
                             "prompt_syntax": "compel"})
        assert r.status_code == 422 and "one weight per prompt" in r.text, r.text


def test_bad_prompts_and_plain_text_families_are_refused_before_work(tiny_export, sd3_export) -> None:
    pipe = shared_pipeline(tiny_export("sd15-tiny"))
    with pytest.raises(InputError, match="unclosed or unreadable bracket"):
        pipe("a (red cat", steps=2, prompt_syntax="compel")
    with pytest.raises(InputError, match="2 prompts but 1 weights"):
        pipe("a cat", negative_prompt='("a", "b").blend(0.7)', steps=2, prompt_syntax="compel")
    with pytest.raises(InputError, match="prompt_syntax applies to prompts"):
        pipe(prompt_embeds=np.zeros((1, 77, 32), np.float32), steps=2, prompt_syntax="compel")
    sd3 = shared_pipeline(sd3_export("sd3-tiny"))
    for text in ("a red fox+", '("a", "b").blend(1, 1)', "a \\(red\\) fox"):
        with pytest.raises(InputError, match="CLIP families"):
            sd3(text, steps=1, prompt_syntax="compel", height=64, width=64)
    sd3("a red fox", steps=1, prompt_syntax="compel", height=64, width=64)  # nothing of compel's: plain text


def test_a_static_tensorrt_profile_serves_compel_prompts(tiny_export, tmp_path, fake_gpu) -> None:
    """Engines built for one image and one chunk (text encoder batch 2:2:2) serve a guided call whose compel prompt
    needs more rows than that (its downweighted fragments' variants): the encoder reads them in batches of the call's
    own shape, the attention mask bound beside the ids (its profile the ids'); the image is the ort-cpu one (fakes:
    the logic, not TensorRT)."""
    from sdrt.export.profiles import component_shapes, custom_profile
    from sdrt.export.trt_build import BuildOptions, build_engines
    from sdrt.runtime.manifest import ExportManifest
    from sdrt.runtime.pipeline import Pipeline

    src = tiny_export("sd15-tiny")
    out = tmp_path / "engines"
    profile = custom_profile(batch="1:1:1", height=64, width=64)
    ids, mask = component_shapes(profile, ExportManifest.read(src), "text_encoder")
    assert (ids.name, mask.name) == ("input_ids", "attention_mask")
    assert (mask.min, mask.opt, mask.max) == (ids.min, ids.opt, ids.max) == ((2, 77),) * 3
    build_engines(src, out, profile, BuildOptions(workspace_gb=1))
    kw = {"negative_prompt": "blurry-, (dark)0.5", "steps": 3, "guidance_scale": 6.0, "sampler": "euler", "seed": 4,
          "height": 64, "width": 64, "prompt_syntax": "compel"}
    prompt = "a (red)- fox in the (snow)0.3, forest+"
    want = np.asarray(shared_pipeline(src)(prompt, **kw).images[0], np.int16)
    with Pipeline.load(out, backend="tensorrt") as trt:
        assert list(trt.engines["text_encoder"].inputs) == ["input_ids", "attention_mask"]
        got = np.asarray(trt(prompt, **kw).images[0], np.int16)
    assert np.abs(got - want).max() <= 1
