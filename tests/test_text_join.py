"""The prompt embeddings' join graph (runtime/text_join.py): bit for bit the host join, and the pipeline's
embeddings and images unchanged by moving the join onto the device."""

from __future__ import annotations

import logging
from itertools import product

import numpy as np
import pytest

from sdrt.export.profiles import custom_profile, text_join_shapes
from sdrt.runtime.conditioning import TextConditioning
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
    """The join graphs the pipeline loaded, by name (None: its backend has none)."""
    return {k: v for k, v in pipe.device_graphs.loaded().items() if k.startswith("text_join")}


def _host_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TextConditioning, "_join_graph", lambda self, hidden, pooled: None)


@pytest.mark.parametrize("negative", [None, "blurry"])  # None: SDXL's zeroed negatives
def test_sdxl_embeddings_on_the_device_equal_the_host_join(tiny_export, monkeypatch: pytest.MonkeyPatch,
                                                           negative: str | None) -> None:
    with Pipeline.load(tiny_export("sdxl-tiny"), backend="ort-cpu") as pipe:
        dev = pipe.encode_prompt(["a ship", LONG], negative, guided=True)
        assert len(_joins(pipe)) == 1 and None not in _joins(pipe).values()
        with monkeypatch.context() as m:
            _host_only(m)
            host = pipe.encode_prompt(["a ship", LONG], negative, guided=True)
        for a, b in ((dev.hidden, host.hidden), (dev.pooled, host.pooled)):
            np.testing.assert_array_equal(pipe.backend.to_host(a), pipe.backend.to_host(b))
        width = pipe.engines["unet"].inputs["encoder_hidden_states"].shape[-1]
        k = pipe.tokenizers[0].encode_chunks([LONG]).shape[1]
        assert k > 1 and pipe.backend.to_host(dev.hidden).shape == (4, 77 * k, width)
        zeroed = not pipe.backend.to_host(dev.pooled)[:2].any()
        assert zeroed == (negative is None)
    assert pipe.device_graphs.loaded() == {}  # released with the pipeline


def test_a_long_prompt_gives_the_image_of_the_host_join(tiny_export, monkeypatch: pytest.MonkeyPatch) -> None:
    """SD1.5, a prompt of several chunks: the device join's image is the host join's, to the bit."""
    kw = {"steps": 3, "seed": 4, "negative_prompt": "rain"}
    with Pipeline.load(tiny_export("sd15-tiny"), backend="ort-cpu") as pipe:
        assert pipe.tokenizers[0].encode_chunks([LONG]).shape[1] > 1
        dev = pipe(LONG, **kw)
        assert list(_joins(pipe)) == ["text_join_fp32_to_fp32"]
        with monkeypatch.context() as m:
            _host_only(m)
            host = pipe(LONG, **kw)
        short = pipe("word0", **kw)  # one chunk: the encoder's output as it is, no join loaded
    assert np.array_equal(np.asarray(dev.images[0]), np.asarray(host.images[0]))
    assert not np.array_equal(np.asarray(dev.images[0]), np.asarray(short.images[0]))


def test_a_backend_without_the_graph_joins_on_the_host_and_says_so_once(tiny_export, caplog) -> None:
    with Pipeline.load(tiny_export("sdxl-tiny"), backend="ort-cpu") as pipe:
        want = pipe.encode_prompt("a ship", guided=True)
        pipe.device_graphs.clear()
        load = pipe.backend.load

        def old_folder(path: str | bytes, name: str):
            if isinstance(path, bytes) and name.startswith("text_join"):
                raise ArtifactError(f"{name}: no prebuilt engine for this graph")
            return load(path, name)

        pipe.backend.load = old_folder  # type: ignore[method-assign]
        with caplog.at_level(logging.INFO, logger="sdrt.runtime.device_graphs"):
            got = [pipe.encode_prompt("a ship", guided=True) for _ in range(2)]
        assert caplog.text.count("joined on the host") == 1
        for g in got:
            np.testing.assert_array_equal(pipe.backend.to_host(g.hidden), pipe.backend.to_host(want.hidden))
            np.testing.assert_array_equal(pipe.backend.to_host(g.pooled), pipe.backend.to_host(want.pooled))
