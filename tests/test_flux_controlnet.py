"""FLUX.1 ControlNets on ort-cpu against diffusers' ``FluxControlNetPipeline``: ``flux-dev-tiny``'s seeded weights
with seeded ``FluxControlNetModel``s, the same latents, images within 1/255.

One export holds three nets: two of InstantX's layout (``flux-controlnet-tiny``, seeds 0 and 1) and a Union net
(``flux-controlnet-union-tiny``: a control mode's embedding joins the text tokens). Each is one double- and one
single-stream block, so the transformer's two single blocks both read the one single sample (diffusers'
interval); a direct check covers the interval at other counts. One net at two scales, two summed as diffusers'
``FluxMultiControlNetModel`` sums them inside a window, the Union net at two modes. diffusers encodes the control
image by sampling the VAE's latent distribution; sdrt takes its mean, so the reference is made to as well
(``mean_vae``). Refusals come before any work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import CompatibilityError, InputError
from sdrt.runtime.pipeline import Pipeline

from .helpers.controlnets import (
    assert_engines_give_ort_cpu_images,
    assert_folder_loads_as_its_class,
    compare_with_nets,
)
from .helpers.inputs import control_image
from .helpers.pipelines import loaded_on, module_cache, shared_pipeline
from .helpers.references import assert_diffusers_images, flux_packed, flux_pipeline

PROMPT = "a red fox in the snow"
PRESET = "flux-dev-tiny"
NETS = (("flux-controlnet-tiny", 0), ("flux-controlnet-tiny", 1), ("flux-controlnet-union-tiny", 2))
_REFS: dict[tuple[int, ...], object] = module_cache({})


def _nets(which: tuple[int, ...]) -> list:
    from sdrt.export.controlnet_loading import random_controlnet

    return [random_controlnet(NETS[j][0], seed=NETS[j][1]) for j in which]


@pytest.fixture(scope="session")
def cn_export(tmp_path_factory: pytest.TempPathFactory, export_cache: dict[tuple[str, str], Path]) -> Path:
    key = (f"{PRESET}-controlnets", "fp32")
    if key not in export_cache:
        from sdrt.export.flux_export import export_flux
        from sdrt.export.flux_loading import load_flux

        out = tmp_path_factory.mktemp("exports") / key[0]
        export_flux(load_flux(random_preset=PRESET), out, controlnets=_nets((0, 1, 2)))
        export_cache[key] = out
    return export_cache[key]


def _pipeline(folder: Path, modules, which: tuple[int, ...]):
    """diffusers' FLUX ControlNet pipeline over ``modules`` (FluxModules) and the ``which`` nets of NETS."""
    from diffusers import FluxControlNetPipeline, FluxMultiControlNetModel

    from sdrt.export.flux_presets import get_flux_preset

    nets = [n.controlnet for n in _nets(which)]
    return flux_pipeline(FluxControlNetPipeline, modules, folder, get_flux_preset(PRESET).scheduler,
                         controlnet=FluxMultiControlNetModel(nets) if len(nets) > 1 else nets[0])


def _reference(folder: Path, which: tuple[int, ...]):
    """diffusers' pipeline over the same seeded modules (fresh ones: the export's are its own)."""
    if which not in _REFS:
        from sdrt.export.flux_presets import build_modules, get_flux_preset

        _REFS[which] = _pipeline(folder, build_modules(get_flux_preset(PRESET), seed=0), which)
    return _REFS[which]


def _compare(folder: Path, scales: list[float], *, nets: tuple[int, ...] = (0,), start: float = 0.0,
             end: float = 1.0, mode: int | None = None, guidance: float = 3.5, steps: int = 4, ref=None,
             pipe: Pipeline | None = None, tokens: int = 512, exported: int = len(NETS),
             loras=None) -> np.ndarray:
    """sdrt's image against diffusers' with the ``nets`` of the export given (``ref``, ``pipe``: another
    reference and sdrt pipeline than ``folder``'s; ``exported``: how many of NETS the export holds; ``loras``: the
    call's)."""
    modes = None if mode is None else [mode if NETS[j][0].endswith("union-tiny") else None for j in range(exported)]
    return compare_with_nets(
        _reference(folder, nets) if ref is None else ref, shared_pipeline(folder) if pipe is None else pipe, PROMPT,
        nets, scales, exported, start=start, end=end, steps=steps, guidance=guidance, ref_latents=flux_packed,
        what=f"nets {nets} scales {scales} window [{start}, {end}] mode {mode} loras {loras}",
        ref_kw={"control_mode": mode, "max_sequence_length": tokens},
        call_kw={"control_modes": modes, "max_sequence_length": tokens, "loras": loras})


def test_one_net_at_two_scales(cn_export, mean_vae) -> None:
    """The net conditions the image (each scale as diffusers'; scale 0.4 and 1.5 differ by more than rounding)."""
    weak = _compare(cn_export, [0.4])
    strong = _compare(cn_export, [1.5], steps=4)
    assert np.abs(weak - strong).max() > 5


def test_two_nets_summed_in_a_window(cn_export, mean_vae) -> None:
    _compare(cn_export, [0.7, 0.4], nets=(0, 1), start=0.2, end=0.8, steps=5)


def test_union_net_modes(cn_export, mean_vae) -> None:
    """A Union net's mode is an input per call: two modes, each diffusers' image, and different (16 text tokens,
    so that the mode's token, which joins them, weighs in the tiny net's attention)."""
    a = _compare(cn_export, [1.5], nets=(2,), mode=0, steps=3, tokens=16)
    b = _compare(cn_export, [1.5], nets=(2,), mode=2, steps=3, tokens=16)
    assert np.abs(a - b).max() > 1


def test_graphs_gated_and_recorded(cn_export) -> None:
    """Each graph passed its parity gate against PyTorch; sdrt.json names the nets, a Union net's mode count, and
    the samples the transformer reads."""
    from sdrt.runtime.manifest import ExportManifest

    m = ExportManifest.read(cn_export)
    assert m.controlnets == ("controlnet_0", "controlnet_1", "controlnet_2")
    for name in (*m.controlnets, "unet_control"):
        par = m.components[name].parity
        assert par is not None and par.rel_err <= par.bound, name
    assert [r.get("num_mode") for r in m.source["controlnets"]] == [None, None, 3]
    pipe = shared_pipeline(cn_export)
    assert set(pipe.engines["controlnet_0"].outputs) == {"block_0", "single_block_0"}
    assert "controlnet_mode" in pipe.engines["controlnet_2"].inputs
    assert "controlnet_mode" not in pipe.engines["controlnet_0"].inputs


def _lora_reference(folder: Path, modules, which: tuple[int, ...], lora: Path):  # type: ignore[no-untyped-def]
    """diffusers' FLUX ControlNet pipeline over ``modules`` and the ``which`` nets with ``lora`` loaded at 0.8
    (``load_lora_weights`` + ``set_adapters``: the transformer and CLIP adapted, not the net)."""
    ref = _pipeline(folder, modules, which)
    ref.load_lora_weights(str(lora), adapter_name="style")
    ref.set_adapters(["style"], adapter_weights=[0.8])
    return ref


def _slots(manifest, component: str) -> dict:  # type: ignore[no-untyped-def]
    from sdrt.runtime.lora_adapters import slots_of

    return slots_of({i.name: i for i in manifest.components[component].inputs})


@pytest.fixture(scope="module")
def slotted_cn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sdrt export --random flux-dev-tiny --random-controlnet flux-controlnet-tiny --lora-slots 8:attn-ff``."""
    from sdrt.cli import main

    from .test_lora_transformers import FLUX, SLOTS

    assert FLUX == PRESET and NETS[0][1] == 0  # the CLI's --seed, which seeds the model and the net alike
    out = tmp_path_factory.mktemp("exports") / "slotted-cn"
    assert main(["export", "--random", PRESET, "--random-controlnet", NETS[0][0], "--lora-slots", SLOTS,
                 "--out", str(out)]) == 0
    return out


def test_lora_slots_beside_a_controlnet(cn_export, slotted_cn: Path, mean_vae, tmp_path: Path) -> None:
    """``sdrt export --random-controlnet NET --lora-slots 8:attn-ff``: ``unet_control`` takes the transformer's
    slots under the same names (the net none), so a call's LoRA reaches both denoisers. A PEFT file at 0.8 with the
    net against diffusers' FluxControlNetPipeline with it loaded (``load_lora_weights`` + ``set_adapters``, which
    adapt the transformer and CLIP, not the net); no LoRA: the plain ControlNet export's image; the LoRA without a
    control image: diffusers' FluxPipeline with it loaded, as the slotted export without nets."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the test extra)")
    from diffusers import FluxPipeline

    from sdrt.export.flux_presets import build_modules, get_flux_preset
    from sdrt.runtime.manifest import ExportManifest

    from .test_lora_transformers import peft_lora

    out = slotted_cn
    m = ExportManifest.read(out)
    assert m.controlnets == ("controlnet_0",)
    assert _slots(m, "unet") and _slots(m, "unet_control") == _slots(m, "unet") and not _slots(m, "controlnet_0")
    lora = peft_lora(tmp_path, "flux", seed=8, rank=3, alpha=1.5)
    ref = _lora_reference(out, build_modules(get_flux_preset(PRESET), seed=0), (0,), lora)
    kw = {"exported": 1, "steps": 3}
    styled = _compare(out, [0.8], ref=ref, loras=[(lora, 0.8)], **kw)
    bare = _compare(out, [0.8], **kw)  # the slotted export without a LoRA: diffusers' image without it
    plain = _compare(cn_export, [0.8], steps=3)  # the plain ControlNet export, the same net and call
    assert np.abs(bare - plain).max() <= 1 and np.abs(styled - bare).max() > 3  # the LoRA moved the image
    # no control image: the transformer alone (unet) with the LoRA, against diffusers' FluxPipeline over the
    # reference's modules (the LoRA loaded in them)
    plain_ref = FluxPipeline(**{k: v for k, v in ref.components.items() if k != "controlnet"})
    plain_ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(4).standard_normal((1, 16, 8, 12), dtype=np.float32)
    with torch.no_grad():
        want = plain_ref(PROMPT, height=64, width=96, num_inference_steps=3, guidance_scale=3.5,
                         latents=flux_packed(latents), output_type="np").images
    got = shared_pipeline(out)(PROMPT, height=64, width=96, steps=3, guidance_scale=3.5, latents=latents,
                               loras=[(lora, 0.8)])
    assert_diffusers_images(got.images, want, "the slotted ControlNet export's LoRA without a control image")


@pytest.mark.parametrize("backend", ["ort-cuda-path", "openvino", "tensorrt"])
def test_lora_slots_beside_a_controlnet_on_other_backends(slotted_cn: Path, mean_vae, request: pytest.FixtureRequest,
                                                          tmp_path: Path, backend: str) -> None:
    """The slotted ControlNet export on ort-cuda's code path (on the CPU EP), openvino (fp32) and the TensorRT fakes
    (the captured step: net, unet_control with the factors, step graph): a PEFT file at 0.8 with the net against
    diffusers' FluxControlNetPipeline with it loaded. None says anything of a GPU."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the test extra)")
    from sdrt.export.flux_presets import build_modules, get_flux_preset

    from .helpers.pipelines import loaded_on_any
    from .test_lora_transformers import peft_lora

    lora = peft_lora(tmp_path, "flux", seed=8, rank=3, alpha=1.5)
    ref = _lora_reference(slotted_cn, build_modules(get_flux_preset(PRESET), seed=0), (0,), lora)
    with loaded_on_any(slotted_cn, backend, request, tmp_path / "engines", cfg=False) as pipe:
        _compare(slotted_cn, [0.8], ref=ref, pipe=pipe, loras=[(lora, 0.8)], exported=1, steps=3)


@pytest.mark.parametrize(("double", "single", "samples"), [(3, 5, (2, 2)), (4, 2, (1, 3)), (2, 3, (2, 0))])
def test_transformer_reads_samples_at_diffusers_interval(double: int, single: int, samples: tuple[int, int]) -> None:
    """``FluxTransformerControl`` (samples on the patch grid, the unused ones left out, two nets summed) against
    ``FluxTransformer2DModel.forward`` given every sample, at block counts where the interval repeats samples, skips
    none and the transformer has more single samples than blocks would read."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from sdrt.export.flux_presets import get_flux_preset
    from sdrt.export.flux_wrappers import FluxTransformerControl, controlled_samples, image_ids

    cfg = {**get_flux_preset(PRESET).config("transformer"), "num_layers": double, "num_single_layers": single}
    torch.manual_seed(0)
    t = FluxTransformer2DModel(**cfg).eval()
    used = (controlled_samples(double, samples[0]), controlled_samples(single, samples[1]))
    g = torch.Generator().manual_seed(1)
    b, h, w, inner = 2, 4, 6, 16
    sample = torch.randn(b, 16, h, w, generator=g)
    ehs, pooled = torch.randn(b, 5, 48, generator=g), torch.randn(b, 16, generator=g)
    ts, guid = torch.rand(b, generator=g) * 1000, torch.full((b,), 3.5)
    nets = [([torch.randn(b, h * w // 4, inner, generator=g) for _ in range(samples[0])],
             [torch.randn(b, h * w // 4, inner, generator=g) for _ in range(samples[1])]) for _ in range(2)]
    with torch.no_grad():
        want = t(hidden_states=FluxPipeline._pack_latents(sample, b, 16, h, w), encoder_hidden_states=ehs,
                 pooled_projections=pooled, timestep=ts / 1000, guidance=guid, img_ids=image_ids(h, w, sample),
                 txt_ids=torch.zeros(5, 3),
                 controlnet_block_samples=[x + y for x, y in zip(nets[0][0], nets[1][0])] or None,
                 controlnet_single_block_samples=[x + y for x, y in zip(nets[0][1], nets[1][1])] or None,
                 return_dict=False)[0]
        want = FluxPipeline._unpack_latents(want, h * 8, w * 8, 8)
        grid = [[s.reshape(b, h // 2, w // 2, inner) for s in [*(d[k] for k in used[0]), *(sg[k] for k in used[1])]]
                for d, sg in nets]
        got = FluxTransformerControl(t, 2, used, samples)(sample, ts, ehs, pooled, guid, *grid[0], *grid[1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # a streamed export with slots: the graphs and their gates traced by the dynamo exporter
def test_lora_slots_beside_a_controlnet_on_a_streamed_transformer(tmp_path: Path, mean_vae) -> None:
    """A streamed transformer (every full-size model's way) with slots and a ControlNet: the streamed
    ``unet_control`` takes the slots too, gated on its reduced-depth copy with random factors and samples; a PEFT
    file at 0.8 with the net against diffusers' ControlNet pipeline over the same synthetic weights, held."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the test extra)")
    import copy

    from sdrt.export.flux_export import export_flux
    from sdrt.export.flux_loading import load_flux
    from sdrt.export.lora_slots import SlotPlan
    from sdrt.runtime.manifest import ExportManifest

    from .test_lora_transformers import SLOTS, peft_lora

    model = load_flux(random_preset=PRESET, seed=5, stream=True)
    held = copy.deepcopy(model.held())
    out = tmp_path / "streamed"
    export_flux(model, out, lora_slots=SlotPlan.parse(SLOTS), controlnets=_nets((0,)))
    m = ExportManifest.read(out)
    control = m.components["unet_control"]
    assert control.parity is not None and "reduced depth" in control.parity.reference
    assert control.parity.rel_err <= control.parity.bound
    assert _slots(m, "unet_control") and _slots(m, "unet_control") == _slots(m, "unet")
    lora = peft_lora(tmp_path, "flux", seed=8, rank=3, alpha=1.5)
    with Pipeline.load(out, backend="ort-cpu") as pipe:
        _compare(out, [0.8], ref=_lora_reference(out, held, (0,), lora), pipe=pipe, exported=1, steps=3,
                 loras=[(lora, 0.8)])


@pytest.mark.slow  # the streamed graphs traced by the dynamo exporter
def test_streamed_transformer(tmp_path: Path, mean_vae) -> None:
    """A streamed transformer (as every full-size model's is) gets a streamed ``unet_control``, gated on a
    reduced-depth copy; the images of all three nets' export, two of them run, are diffusers' on the same weights."""
    from sdrt.export.flux_export import export_flux
    from sdrt.export.flux_loading import load_flux
    from sdrt.runtime.manifest import ExportManifest

    model = load_flux(random_preset=PRESET, seed=3, stream=True)
    assert model.modules.transformer is None
    out = tmp_path / "streamed"
    export_flux(model, out, controlnets=_nets((0, 1, 2)))
    m = ExportManifest.read(out)
    assert m.controlnets == ("controlnet_0", "controlnet_1", "controlnet_2") and "unet" in m.source["streamed"]
    par = m.components["unet_control"].parity
    assert par is not None and "reduced depth" in par.reference and par.rel_err <= par.bound
    with Pipeline.load(out, backend="ort-cpu") as pipe:
        _compare(out, [0.8, 0.5], nets=(0, 1), steps=3, ref=_pipeline(out, model.held(), (0, 1)), pipe=pipe)
        _compare(out, [1.1], nets=(2,), mode=1, steps=3, ref=_pipeline(out, model.held(), (2,)), pipe=pipe)


def test_refusals_before_work(cn_export, flux_export, tmp_path: Path) -> None:
    from diffusers import FluxControlNetModel

    from sdrt.export.controlnet_loading import LoadedControlNet, check_pairing, random_controlnet
    from sdrt.export.controlnet_presets import flux_controlnet_config
    from sdrt.export.flux_export import export_flux
    from sdrt.export.flux_loading import load_flux
    from sdrt.export.loading import random_model
    from sdrt.export.sd3_controlnet import check_sd3_pairing
    from sdrt.export.sd3_presets import get_sd3_preset

    pipe = shared_pipeline(cn_export)
    img = control_image(3)
    with pytest.raises(InputError, match="guess_mode is not part of FLUX.1's ControlNet pipeline"):
        pipe(PROMPT, control_images=[img], guess_mode=True, steps=2)
    with pytest.raises(InputError, match=r"ControlNet 2 \(controlnet_2\) is a Union ControlNet of 3 control modes"):
        pipe(PROMPT, control_images=[None, None, img], steps=2)
    with pytest.raises(InputError, match=r"control_modes\[2\] is 3: ControlNet 2 .* has 3 control modes"):
        pipe(PROMPT, control_images=[None, None, img], control_modes=[None, None, 3], steps=2)
    with pytest.raises(InputError, match="takes no control mode"):
        pipe(PROMPT, control_images=[img], control_modes=[1], steps=2)
    with pytest.raises(InputError, match="control_modes applies to control images"):
        pipe(PROMPT, control_modes=[1], steps=2)
    with pytest.raises(InputError, match="4 control images for the 3 ControlNet"):
        pipe(PROMPT, control_images=[img] * 4, steps=2)
    plain = shared_pipeline(flux_export(PRESET))
    with pytest.raises(CompatibilityError, match="exported without ControlNets"):
        plain(PROMPT, control_images=[img], steps=2)
    # a FLUX ControlNet given to another family's export, and another family's to a FLUX export, before any work
    with pytest.raises(InputError, match=r"is a FLUX\.1 ControlNet, but the model \(sd15-tiny\) is SD 1\.x"):
        check_pairing(random_model("sd15-tiny"), [random_controlnet("flux-controlnet-tiny")])
    with pytest.raises(InputError, match=r"is a FLUX\.1 ControlNet \(FluxControlNetModel\), but the model "
                                         r"\(sd3-tiny\)"):
        check_sd3_pairing("sd3-tiny", get_sd3_preset("sd3-tiny").config("transformer"), 16,
                          [random_controlnet("flux-controlnet-tiny")])
    model = load_flux(random_preset=PRESET)
    with pytest.raises(InputError, match=r"is an SD 3 / 3\.5 ControlNet \(SD3ControlNetModel\), but the model "
                                         r"\(flux-dev-tiny\) is FLUX\.1"):
        export_flux(model, tmp_path / "a", controlnets=[random_controlnet("sd3-controlnet-tiny")])
    tr = model.preset.config("transformer")
    wide = {**flux_controlnet_config(tr, 1, 1), "attention_head_dim": 16, "axes_dims_rope": [4, 4, 8]}
    with pytest.raises(InputError, match="width 32 in the ControlNet, 16 in the transformer"):
        export_flux(model, tmp_path / "b", controlnets=[LoadedControlNet(FluxControlNetModel(**wide), name="wide")])
    pixels = {**flux_controlnet_config(tr, 1, 1), "conditioning_embedding_channels": 16}
    with pytest.raises(InputError, match="reads the control image as pixels"):
        export_flux(model, tmp_path / "c", controlnets=[LoadedControlNet(FluxControlNetModel(**pixels), name="px")])
    with pytest.raises(InputError, match=r"\[dev\]'s\), the transformer takes none"):
        export_flux(load_flux(random_preset="flux-schnell-tiny"), tmp_path / "d",
                    controlnets=[random_controlnet("flux-controlnet-tiny")])
    other = LoadedControlNet(FluxControlNetModel(**flux_controlnet_config(tr, 1, 0)), name="no-singles")
    with pytest.raises(InputError, match=r"give \[\(1, 1\), \(1, 0\)\] \(double, single\) block samples"):
        export_flux(model, tmp_path / "e", controlnets=[random_controlnet("flux-controlnet-tiny"), other])
    with pytest.raises(InputError, match="inpainting transformer"):
        export_flux(load_flux(random_preset="flux-fill-dev-tiny"), tmp_path / "f",
                    controlnets=[random_controlnet("flux-controlnet-tiny")])
    with pytest.raises(InputError, match="first-block caching"):
        export_flux(model, tmp_path / "g", block_cache=True, controlnets=[random_controlnet("flux-controlnet-tiny")])
    assert not any(tmp_path.iterdir())


def test_cli_generate_with_a_mode_and_export_refusals(cn_export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``sdrt generate --control-image --control-mode`` gives the Python call's image; ``sdrt export`` refuses a
    FLUX ControlNet single file before the model loads."""
    from PIL import Image

    from sdrt.cli import main

    edges, out = tmp_path / "edges.png", tmp_path / "out.png"
    control_image(5).save(edges)
    assert main(["generate", str(cn_export), "--prompt", PROMPT, "--steps", "2", "--seed", "4", "--guidance", "3",
                 "--backend", "ort-cpu", "--height", "64", "--width", "96", "--control-image", str(edges),
                 "--control-image", str(edges), "--control-image", str(edges), "--control-scale", "0.7",
                 "--control-mode", "1", "-o", str(out)]) == 0
    want = shared_pipeline(cn_export)(PROMPT, steps=2, seed=4, guidance_scale=3.0, height=64, width=96,
                                      control_images=[Image.open(edges)] * 3, control_scales=[0.7] * 3,
                                      control_modes=[None, None, 1]).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))

    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("the model loaded before the ControlNet was checked")

    monkeypatch.setattr("sdrt.export.flux_loading.load_flux", no_work)
    single = tmp_path / "flux-canny.safetensors"
    single.write_bytes(b"\0" * 16)
    capsys.readouterr()
    assert main(["export", "--random", PRESET, "--controlnet", str(single), "--out", str(tmp_path / "x")]) == 1
    assert "FLUX.1 ControlNets load from a diffusers folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_diffusers_folder_loads_as_its_class(tmp_path: Path) -> None:
    """A FluxControlNetModel folder (config.json + safetensors, as diffusers saves it) loads as that class, weight
    for weight."""
    assert_folder_loads_as_its_class(tmp_path, "flux-controlnet-union-tiny", "FluxControlNetModel")


@pytest.mark.parametrize("backend", ["ort-cuda-path", "openvino"])
def test_other_backends_give_the_ort_cpu_images(cn_export, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """ort-cuda's code path (OrtValues, IO binding) on the CPU EP, and openvino in fp32: the ort-cpu images with two
    nets, one of them the Union net. The first says nothing of a GPU."""
    kw = {"steps": 3, "seed": 8, "height": 64, "width": 96, "guidance_scale": 4.0,
          "control_images": [control_image(30), None, control_image(31)], "control_scales": [0.9, 1.0, 0.6],
          "control_modes": [None, None, 1]}
    want = np.asarray(shared_pipeline(cn_export)(PROMPT, **kw).images[0], np.int16)
    with loaded_on(cn_export, backend, monkeypatch) as pipe:
        got = np.asarray(pipe(PROMPT, **kw).images[0], np.int16)
    assert want.std() > 5 and np.abs(got - want).max() <= (2 if backend == "openvino" else 0)


def test_built_engines_run_the_nets_like_ort_cpu(cn_export, tmp_path: Path, fake_gpu) -> None:
    """Logic check on the TensorRT fakes: build_engines makes the nets and unet_control (their samples' patch-grid
    axes from the profile), and the captured step (nets, unet_control, step graph) gives the ort-cpu images, one
    net and two, one of them the Union net (its mode a fixed buffer of the capture). Says nothing of real
    TensorRT."""
    from sdrt.export.profiles import custom_profile

    imgs = [control_image(20), control_image(21)]
    assert_engines_give_ort_cpu_images(
        cn_export, tmp_path / "engines", custom_profile(batch="1:1:1", height="64:64:96", width="64:96:96", cfg=False),
        fake_gpu[0], {"controlnet_0", "controlnet_2", "unet_control", "unet"}, PROMPT,
        {"steps": 3, "seed": 5, "height": 64, "width": 96, "guidance_scale": 3.5},
        [{"control_images": [imgs[0]], "control_scales": [0.8]},
         {"control_images": [imgs[0], None, imgs[1]], "control_scales": [0.6, 1.0, 1.1],
          "control_end": [1.0, 1.0, 0.5], "control_modes": [None, None, 2]}])
