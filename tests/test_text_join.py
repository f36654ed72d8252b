"""The prompt embeddings' join graph (runtime/text_join.py): bit for bit a numpy join written here, and the
pipeline's embeddings and images those of the numpy join."""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest

from sdrt.export.profiles import custom_profile, text_join_shapes
from sdrt.runtime.errors import ArtifactError, InputError
from sdrt.runtime.manifest import ExportManifest
from sdrt.runtime.ort_backend import OrtBackend
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.text_join import JoinVariant, join_engine_name, join_graph_bytes, join_variant

F16, F32 = "float16", "float32"
LONG = " ".join(f"word{i}" for i in range(120))  # over 77 tokens: several chunks


def numpy_join(hidden: list[np.ndarray], pooled: np.ndarray | None, keep: np.ndarray, out: str):
    """The reference, written from the contract: rows of k chunks joined along the sequence, the encoders
    along the channels (numpy's dtype promotion), dropped rows set to 0, then the cast."""
    rows = keep.shape[0]
    joined = np.concatenate([h.reshape(rows, -1, h.shape[-1]) for h in hidden], axis=-1)
    joined[keep == 0] = 0
    first = None
    if pooled is not None:
        first = pooled.reshape(rows, -1, pooled.shape[-1])[:, 0].copy()
        first[keep == 0] = 0
    return joined.astype(out), None if first is None else first.astype(out)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.dtype == np.float16 else np.uint32)


@pytest.mark.parametrize("hidden_dtypes, pooled_dtype, out", [
    ((F16,), None, F16), ((F32,), None, F32), ((F32,), None, F16), ((F16,), None, F32),
    ((F16, F16), F16, F16), ((F32, F32), F32, F32), ((F32, F32), F32, F16), ((F16, F32), F16, F32),
    ((F32,), F32, F16),  # the refiner's shape: one pooled encoder
])
@pytest.mark.parametrize("chunks", [1, 3])
def test_the_graph_equals_the_numpy_join_bit_for_bit(hidden_dtypes, pooled_dtype, out, chunks) -> None:
    rng = np.random.default_rng(len(hidden_dtypes) * 10 + chunks)
    rows, widths, p = 4, (8, 12), 6
    n = rows * chunks
    # wide-ranging values: fp32 -> fp16 rounding, negatives (a product by 0 would give -0) and tiny values
    hidden = [(rng.standard_normal((n, 77, widths[j])) * 10.0 ** rng.integers(-6, 4, (n, 77, widths[j])))
              .astype(d) for j, d in enumerate(hidden_dtypes)]
    pooled = None if pooled_dtype is None else (rng.standard_normal((n, p)) * 50).astype(pooled_dtype)
    engine = OrtBackend("cpu").load(join_graph_bytes(hidden_dtypes, pooled_dtype, out), "text_join")
    for keep in (np.array([0, 0, 1, 1], np.float32), np.ones(rows, np.float32)):
        feeds = {f"hidden_{j}": h for j, h in enumerate(hidden)} | {"keep": keep}
        if pooled is not None:
            feeds["text_embeds"] = pooled
        got = engine(feeds)
        want_h, want_p = numpy_join([h.copy() for h in hidden], None if pooled is None else pooled.copy(), keep, out)
        assert got["hidden"].dtype == np.dtype(out) and got["hidden"].shape == (rows, 77 * chunks, sum(
            widths[: len(hidden_dtypes)]))
        np.testing.assert_array_equal(_bits(got["hidden"]), _bits(want_h))
        if pooled is None:
            assert "pooled" not in got
        else:
            assert got["pooled"].shape == (rows, p) and got["pooled"].dtype == np.dtype(out)
            np.testing.assert_array_equal(_bits(got["pooled"]), _bits(want_p))
        if keep[0] == 0:  # +0 exactly, not -0
            assert not np.signbit(got["hidden"][:2]).any() and not got["hidden"][:2].any()


def test_names_and_bytes_are_stable_and_distinct() -> None:
    variants = [(h, p, o) for h, p, o in product([(F16,), (F32,), (F16, F16), (F16, F32)], [None, F16, F32],
                                                 [F16, F32])]
    names = {join_engine_name(*v) for v in variants}
    digests = {join_graph_bytes(*v) for v in variants}
    assert len(names) == len(digests) == len(variants)
    assert join_engine_name((F16, F16), F16, F16) == "text_join_fp16_fp16_pooled_fp16_to_fp16"
    assert join_graph_bytes((F16, F16), F16, F16) == join_graph_bytes((F16, F16), F16, F16)
    with pytest.raises(InputError, match="float16, float32"):
        join_graph_bytes((), None, F16)
    with pytest.raises(InputError, match="bfloat16"):
        join_engine_name(("bfloat16",), None, F16)


def test_variant_from_the_manifest_and_when_it_is_needed(tiny_export) -> None:
    xl = join_variant(ExportManifest.read(tiny_export("sdxl-tiny")))
    sd = join_variant(ExportManifest.read(tiny_export("sd15-tiny")))
    assert xl == JoinVariant((F32, F32), F32, F32) and xl.needed(1)
    assert sd == JoinVariant((F32,), None, F32) and not sd.needed(1) and sd.needed(2)
    assert JoinVariant((F32,), None, F16).needed(1)  # a cast is a join too
    # the build's shapes: hidden states at the text encoders' rows, keep at the UNet's
    shapes = {s.name: s for s in text_join_shapes(custom_profile(batch="1:1:2", chunks="1:2:3"),
                                                  ExportManifest.read(tiny_export("sdxl-tiny")))}
    assert list(shapes) == ["hidden_0", "hidden_1", "text_embeds", "keep"]
    assert shapes["hidden_0"].min[:2] == (2, 77) and shapes["hidden_0"].max[:2] == (12, 77)
    assert shapes["text_embeds"].opt[0] == 4 and shapes["keep"].min == (2,) and shapes["keep"].max == (4,)


def _joins(pipe: Pipeline) -> dict[str, object]:
    """The join graphs the pipeline loaded, by name."""
    return {k: v for k, v in pipe.device_graphs.loaded().items() if k.startswith("text_join")}


def _numpy_embeddings(pipe: Pipeline, texts: list[str], zero_first: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The reference: each encoder run on its tokenizer's chunks, read back, and joined by ``numpy_join`` (the
    first ``zero_first`` rows zeroed) into the UNet's dtype."""
    hidden, pooled = [], None
    for name, tok in zip(pipe.manifest.encoder_names, pipe.tokenizers, strict=True):
        ids = tok.encode_chunks(texts)
        ids = ids.reshape(-1, ids.shape[-1])
        feeds = {"input_ids": pipe.backend.to_device(ids), "attention_mask": pipe.backend.to_device(np.ones_like(ids))}
        out = pipe.engines[name]({k: v for k, v in feeds.items() if k in pipe.engines[name].inputs})
        hidden.append(pipe.backend.to_host(out["hidden_states"]).copy())
        if "text_embeds" in out:
            pooled = pipe.backend.to_host(out["text_embeds"]).copy()
    keep = np.ones(len(texts), np.float32)
    keep[:zero_first] = 0
    return numpy_join(hidden, pooled, keep, pipe.dtype.name)


@pytest.mark.parametrize("negative", [None, "blurry"])  # None: SDXL's zeroed negatives
def test_sdxl_embeddings_on_the_device_equal_the_numpy_join(tiny_export, negative: str | None) -> None:
    with Pipeline.load(tiny_export("sdxl-tiny"), backend="ort-cpu") as pipe:
        dev = pipe.encode_prompt(["a ship", LONG], negative, guided=True)
        assert len(_joins(pipe)) == 1
        texts = [negative or "", negative or "", "a ship", LONG]
        want_h, want_p = _numpy_embeddings(pipe, texts, 2 if negative is None else 0)
        assert want_p is not None
        np.testing.assert_array_equal(_bits(pipe.backend.to_host(dev.hidden)), _bits(want_h))
        np.testing.assert_array_equal(_bits(pipe.backend.to_host(dev.pooled)), _bits(want_p))
        width = pipe.engines["unet"].inputs["encoder_hidden_states"].shape[-1]
        k = pipe.tokenizers[0].encode_chunks([LONG]).shape[1]
        assert k > 1 and pipe.backend.to_host(dev.hidden).shape == (4, 77 * k, width)
        zeroed = not pipe.backend.to_host(dev.pooled)[:2].any()
        assert zeroed == (negative is None)
    assert pipe.device_graphs.loaded() == {}  # released with the pipeline


def test_a_long_prompt_gives_the_image_of_the_numpy_join(tiny_export) -> None:
    """SD1.5, a prompt of several chunks: the device join's image is, to the bit, the image of the embeddings
    joined by numpy and passed in as prompt_embeds."""
    kw = {"steps": 3, "seed": 4}
    with Pipeline.load(tiny_export("sd15-tiny"), backend="ort-cpu") as pipe:
        assert pipe.tokenizers[0].encode_chunks([LONG]).shape[1] > 1
        dev = pipe(LONG, negative_prompt="rain", **kw)
        assert list(_joins(pipe)) == ["text_join_fp32_to_fp32"]
        joined, _ = _numpy_embeddings(pipe, ["rain", LONG], 0)
        ref = pipe(prompt_embeds=joined[1:], negative_prompt_embeds=joined[:1], **kw)
        short = pipe("word0", negative_prompt="rain", **kw)  # one chunk: the encoder's output as it is, no join
    assert np.array_equal(np.asarray(dev.images[0]), np.asarray(ref.images[0]))
    assert not np.array_equal(np.asarray(dev.images[0]), np.asarray(short.images[0]))


def test_a_backend_that_cannot_load_the_graph_is_an_error_naming_it(tiny_export) -> None:
    """No host join: a join graph the backend cannot load (a TensorRT folder without it) is an ArtifactError
    naming the graph and what it does, with the backend's own reason."""
    with Pipeline.load(tiny_export("sdxl-tiny"), backend="ort-cpu") as pipe:
        pipe.device_graphs.clear()
        load = pipe.backend.load

        def without_join(path: str | bytes, name: str):
            if isinstance(path, bytes) and name.startswith("text_join"):
                raise ArtifactError(f"{name}: no prebuilt engine for this graph")
            return load(path, name)

        pipe.backend.load = without_join  # type: ignore[method-assign]
        with pytest.raises(ArtifactError, match=r"prompt embeddings are joined on the device by the graph "
                                                r"text_join_fp32_fp32_pooled_fp32_to_fp32.*no prebuilt engine"):
            pipe.encode_prompt("a ship", guided=True)
        pipe.backend.load = load  # type: ignore[method-assign]
        assert pipe.encode_prompt("a ship", guided=True).pooled is not None  # the pipeline is still usable
