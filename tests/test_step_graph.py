"""The on-device step graph, run by onnxruntime on CPU, against the float64 numpy reference.

Bounds (elementwise; u32 = 2^-24, u16 = 2^-11 unit roundoffs):
- Every output is a short sum of products. With M its magnitude in float64 (the same sum with every
  term replaced by its absolute value, including the guidance terms |u| + |g| (|c| + |u|)), the float32
  graph is within ``K * u32 * M`` of the reference: first-order rounding analysis, K = 16 covers the
  longest chain (coefficient to float32, guidance Sub/Mul/Add, the x0 Mul/Add, four Adds, the s_next Mul).
- The float16 graph takes float16 inputs (the reference gets the same values, upcast), computes in
  float32 and rounds each output once, so it adds at most half an fp16 ulp: ``u16 * |ref| + 2^-24``
  (the second term for subnormals) on top of the float32 bound.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sdrt.runtime.errors import InputError
from sdrt.runtime.samplers import COLUMNS, SAMPLERS, guide, make_plan, model_input, step_reference
from sdrt.runtime.step_graph import (
    IR_VERSION,
    OPSET,
    build_input_graph,
    build_step_graph,
    cast_graph_bytes,
    noise_graph_bytes,
)

CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading",
          "set_alpha_to_one": False, "clip_sample": False}
B, LATENT = 2, (4, 8, 8)
K, U32, U16 = 16, 2.0**-24, 2.0**-11
GUIDANCE = 7.5
DTYPES = {"fp32": np.float32, "fp16": np.float16}


def session(guided: bool, dtype) -> ort.InferenceSession:
    model = build_step_graph(guided, dtype)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(sess, x, unet_out, coeffs, x0_prev, noise, guided: bool):
    feeds = {"latents": x, "unet_out": unet_out, "coeffs": coeffs, "x0_prev": x0_prev, "noise": noise}
    if guided:
        feeds["guidance"] = np.array(GUIDANCE, dtype=np.float32)
    return sess.run(["latents_next", "x0", "unet_in_next"], feeds)


def magnitudes(row, x, unet_out, x0_prev, noise, guided: bool):
    """|terms| summed, in float64, for x0, x_next and unet_in_next (see the module docstring)."""
    _, p, q, a, b, c, d, s_next = np.abs(row)
    if guided:
        u, cond = np.abs(np.split(unet_out, 2))
        m = u + GUIDANCE * (cond + u)
    else:
        m = np.abs(unet_out)
    x0 = p * np.abs(x) + q * m
    x_next = a * np.abs(x) + b * x0 + c * np.abs(x0_prev) + d * np.abs(noise)
    return x0, x_next, s_next * x_next


def assert_within(got: np.ndarray, ref: np.ndarray, mag: np.ndarray, dtype) -> None:
    bound = K * U32 * mag
    if dtype == np.float16:
        bound = U16 * np.abs(ref) + 2 * bound + 2.0**-24
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err <= bound), f"worst error/bound {np.max(err / bound):.3g}"


# -- interface --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
def test_interface(guided, dtype):
    model = build_step_graph(guided, dtype)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == IR_VERSION and model.opset_import[0].version == OPSET
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def io(values):
        return {v.name: (v.type.tensor_type.elem_type,
                         [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values}

    rows = ["2B" if guided else "B", "C", "H", "W"]
    latent = (elem, ["B", "C", "H", "W"])
    expected_in = {"latents": latent, "unet_out": (elem, rows), "coeffs": (onnx.TensorProto.FLOAT, [len(COLUMNS)]),
                   "x0_prev": latent, "noise": latent}
    if guided:
        expected_in["guidance"] = (onnx.TensorProto.FLOAT, [])
    assert io(model.graph.input) == expected_in
    assert io(model.graph.output) == {"latents_next": latent, "x0": latent, "unet_in_next": (elem, rows)}


@pytest.mark.parametrize("dtype", [np.float64, np.int8, "bfloat16", None])
def test_bad_dtype(dtype):
    with pytest.raises(InputError, match="float16 or float32"):
        build_step_graph(True, dtype)


# -- every row of every sampler's table -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_step_matches_reference(sampler, guided, dtype):
    plan = make_plan(sampler, 10, CONFIG, prediction_type="v_prediction" if guided else "epsilon")
    sess = session(guided, dtype)
    rng = np.random.default_rng(0)
    rows = 2 * B if guided else B
    for i in range(plan.steps):
        # Latents at the sampler's own scale (VE for Euler: std up to init_noise_sigma), in graph dtype.
        x = (rng.standard_normal((B, *LATENT)) / plan.table[i, 0]).astype(dtype)
        unet_out, x0_prev, noise = (rng.standard_normal((n, *LATENT)).astype(dtype) for n in (rows, B, B))
        got = run(sess, x, unet_out, plan.coeffs(i), x0_prev, noise, guided)
        wide = [v.astype(np.float64) for v in (x, unet_out, x0_prev, noise)]
        m = guide(wide[1], GUIDANCE) if guided else wide[1]
        x_next, x0 = step_reference(plan, i, wide[0], m, wide[2], wide[3])
        unet_in = model_input(plan, i + 1, x_next) if i + 1 < plan.steps else x_next
        mags = magnitudes(plan.table[i], *wide, guided)
        assert_within(got[0], x_next, mags[1], dtype)
        assert_within(got[1], x0, mags[0], dtype)
        for half in np.split(got[2], 2) if guided else [got[2]]:
            assert_within(half, unet_in, mags[2], dtype)


# -- the loop: UNet -> step graph -> UNet with no host arithmetic ----------------------------------


def unet(x_in: np.ndarray, t: float) -> np.ndarray:
    """A stand-in guided UNet on 2B rows: uncond and cond halves answer differently."""
    uncond, cond = np.split(x_in.astype(np.float64), 2)
    return np.concatenate([np.tanh(0.8 * uncond + np.sin(t / 137.0)), np.tanh(0.7 * cond + np.cos(t / 91.0))])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_loop_wiring(sampler):
    """25 guided float32 steps fed back as the pipeline will (unet_in_next -> UNet -> step graph,
    x0 -> x0_prev). Each step is checked against the reference started from the graph's own state:
    how a sampler compounds rounding over steps is its own sensitivity (large for LCM at guidance 7.5
    with this stand-in UNet), not the graph's error.
    """
    plan = make_plan(sampler, 25, CONFIG)
    sess = session(True, np.float32)
    rng = np.random.default_rng(1)
    x = (plan.init_noise_sigma * rng.standard_normal((B, *LATENT))).astype(np.float32)
    unet_in = np.concatenate([model_input(plan, 0, x)] * 2).astype(np.float32)
    x0 = np.zeros_like(x)
    for i in range(plan.steps):
        for half in np.split(unet_in, 2):  # the graph's unet_in_next is this step's UNet input
            assert_within(half, model_input(plan, i, x.astype(np.float64)), np.abs(plan.table[i, 0] * x), np.float32)
        out = unet(unet_in, plan.timesteps[i]).astype(np.float32)
        noise = rng.standard_normal((B, *LATENT)).astype(np.float32)
        wide = [v.astype(np.float64) for v in (x, out, x0, noise)]
        x_ref, x0_ref = step_reference(plan, i, wide[0], guide(wide[1], GUIDANCE), wide[2], wide[3])
        x, x0, unet_in = run(sess, x, out, plan.coeffs(i), x0, noise, True)
        mags = magnitudes(plan.table[i], *wide, True)
        assert_within(x, x_ref, mags[1], np.float32)
        assert_within(x0, x0_ref, mags[0], np.float32)


# -- guidance rescale (the sampler_step_cfg_rescale variant) ---------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("rescale", [0.0, 0.7, 1.0])
def test_rescale_variant_matches_reference(rescale, dtype):
    """guidance = [scale, phi]; the outputs follow samplers.guide(out, scale, phi) then step_reference.
    Bound: the std ratio adds a few float32 roundings per element (reductions of 256 terms), so a
    relative 1e-5 of the magnitude (fp16: plus the one output rounding)."""
    plan = make_plan("dpmpp-2m", 10, CONFIG, prediction_type="v_prediction")
    model = build_step_graph(True, dtype, rescale=True)
    g_in = next(i for i in model.graph.input if i.name == "guidance")
    assert [d.dim_value for d in g_in.type.tensor_type.shape.dim] == [2]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    for i in (0, 4, 9):
        x = rng.standard_normal((B, *LATENT)).astype(dtype)
        out = np.concatenate([rng.standard_normal((B, *LATENT)), 1.7 * rng.standard_normal((B, *LATENT))]).astype(dtype)
        x0_prev, noise = (rng.standard_normal((B, *LATENT)).astype(dtype) for _ in range(2))
        got = sess.run(["latents_next", "x0"], {"latents": x, "unet_out": out, "coeffs": plan.coeffs(i),
                                                "x0_prev": x0_prev, "noise": noise,
                                                "guidance": np.array([GUIDANCE, rescale], np.float32)})
        wide = [v.astype(np.float64) for v in (x, out, x0_prev, noise)]
        x_ref, x0_ref = step_reference(plan, i, wide[0], guide(wide[1], GUIDANCE, rescale), wide[2], wide[3])
        mags = magnitudes(plan.table[i], *wide, True)
        for g, ref, mag in ((got[0], x_ref, mags[1]), (got[1], x0_ref, mags[0])):
            bound = 1e-5 * mag + (2.0**-11 * np.abs(ref) if dtype == np.float16 else 0.0)
            assert np.all(np.abs(g.astype(np.float64) - ref) <= bound)
    if rescale:  # the variant does rescale: the plain guided step differs
        plain = make_plan("dpmpp-2m", 10, CONFIG, prediction_type="v_prediction")
        assert not np.allclose(step_reference(plain, 9, wide[0], guide(wide[1], GUIDANCE), wide[2], wide[3])[1],
                               x0_ref)


def test_rescale_needs_guided():
    with pytest.raises(InputError, match="guided"):
        build_step_graph(False, np.float32, rescale=True)


# -- the first UNet input ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
@pytest.mark.parametrize("concat", [False, True], ids=["plain", "concat"])
def test_input_graph_is_the_first_rows_model_input(guided, dtype, concat):
    """s_0 x, rows doubled when guided and a 9-channel UNet's extra channels appended, as the host made it
    (samplers.model_input in float64, then rounded once to the UNet dtype), every sampler's first row."""
    rng = np.random.default_rng(5)
    sess = ort.InferenceSession(build_input_graph(guided, dtype, concat).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    x = (rng.standard_normal((B, *LATENT)) * 14.6).astype(dtype)
    extra = rng.standard_normal((2 * B if guided else B, LATENT[0] + 1, *LATENT[1:])).astype(dtype)
    for sampler in SAMPLERS:
        plan = make_plan(sampler, 6, CONFIG)
        s0 = np.array([plan.table[0, 0]], np.float32)
        feeds = {"latents": x, "scale": s0, **({"unet_extra": extra} if concat else {})}
        (got,) = sess.run(["unet_in"], feeds)
        ref = model_input(plan, 0, x.astype(np.float64))
        ref = np.concatenate([ref, ref]) if guided else ref
        ref = np.concatenate([ref, extra.astype(np.float64)], axis=1) if concat else ref
        assert got.dtype == dtype and got.shape == ref.shape
        # one float32 product (s rounded to float32, then the product) rounded once more to fp16 when fp16
        bound = 2 * U32 * np.abs(ref) + (U16 * np.abs(ref) + 2.0**-24 if dtype == np.float16 else 0)
        assert np.all(np.abs(got.astype(np.float64) - ref) <= bound), sampler


@pytest.mark.parametrize(("src", "dst"), [(np.float16, np.float32), (np.float32, np.float16)])
def test_cast_graph_is_numpys_cast(src, dst):
    """The latents' cast between a UNet's and a VAE's precision, as numpy's astype (round to nearest even)."""
    x = np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32) * 100
    x = x.astype(src)
    sess = ort.InferenceSession(cast_graph_bytes(src, dst), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["latents_cast"], {"latents": x})
    assert got.dtype == dst
    np.testing.assert_array_equal(got, x.astype(dst))


@pytest.mark.parametrize(("src", "dst"), [(np.float32, np.float32), (np.float32, np.float16), (np.float16, np.float16)])
def test_noise_graph_is_the_schedulers_add_noise(src, dst):
    """img2img's start: ka image + kn noise over every row (one encoded image), as SamplerPlan.add_noise in
    float64, within one float32 rounding of each product and sum (and one fp16 rounding of the result)."""
    rng = np.random.default_rng(4)
    img = (rng.standard_normal((1, *LATENT)) * 5).astype(src)
    noise = rng.standard_normal((3, *LATENT)).astype(np.float32)
    sess = ort.InferenceSession(noise_graph_bytes(src, dst), providers=["CPUExecutionProvider"])
    for sampler in ("ddim", "euler"):
        plan = make_plan(sampler, 10, CONFIG, strength=0.6)
        coeffs = np.asarray(plan.noise_coeffs, np.float32)
        (got,) = sess.run(["latents"], {"image_latents": img, "noise": noise, "coeffs": coeffs})
        ref = plan.add_noise(np.repeat(img.astype(np.float64), 3, axis=0), noise.astype(np.float64))
        mag = np.abs(plan.noise_coeffs[0] * img.astype(np.float64)) + np.abs(plan.noise_coeffs[1] * noise)
        bound = 4 * U32 * mag + (U16 * np.abs(ref) + 2.0**-24 if dst == np.float16 else 0)
        assert got.dtype == dst and got.shape == ref.shape
        assert np.all(np.abs(got.astype(np.float64) - ref) <= bound), sampler
