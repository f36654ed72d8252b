"""SD 3 / 3.5 ControlNets on ort-cpu against diffusers' ``StableDiffusion3ControlNetPipeline``: the tiny presets'
seeded weights with seeded ``SD3ControlNetModel``s, the same latents, images within 1/255.

Both layouts of SD3 ControlNet: InstantX's (``sd3-controlnet-tiny``: joint blocks reading the text states, zeros
for the pooled projections, the control latents without the VAE's shift), two of them summed as diffusers'
``SD3MultiControlNetModel`` sums them, and Stability's SD 3.5 layout (``sd35-controlnet-tiny``: single-stream
blocks, the transformer's position embedding, the pooled projections, the shift); two conditioning scales and a
control window. diffusers encodes the control image by sampling the VAE's latent distribution; sdrt takes its
mean, so the reference is made to as well. Refusals come before any work.
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
from .helpers.inputs import control_image, image_and_mask
from .helpers.pipelines import loaded_on, module_cache, shared_pipeline
from .helpers.references import assert_diffusers_images, sd3_pipeline

PROMPT = "a red fox in the snow"
NEGATIVE = "blurry"
NETS = {"sd3-tiny": ("sd3-controlnet-tiny", (0, 1)), "sd35-medium-tiny": ("sd35-controlnet-tiny", (0,))}
_REFS: dict[tuple[str, tuple[int, ...]], object] = module_cache({})


@pytest.fixture(scope="session")
def controlnet_export(tmp_path_factory: pytest.TempPathFactory, export_cache: dict[tuple[str, str], Path]):
    """controlnet_export(preset) -> an fp32 export without T5 of the preset with its tiny ControlNets (NETS)."""

    def get(preset: str) -> Path:
        key = (f"{preset}-no-t5-controlnets", "fp32")
        if key not in export_cache:
            from sdrt.export.controlnet_loading import random_controlnet
            from sdrt.export.sd3_export import export_sd3
            from sdrt.export.sd3_loading import load_sd3

            net, seeds = NETS[preset]
            out = tmp_path_factory.mktemp("exports") / key[0]
            export_sd3(load_sd3(random_preset=preset), out, fp16=False, without_t5=True,
                       controlnets=[random_controlnet(net, seed=s) for s in seeds])
            export_cache[key] = out
        return export_cache[key]

    return get


def _reference(preset: str, folder: Path, seeds: tuple[int, ...]):
    """diffusers' SD3 ControlNet pipeline over the same seeded modules (fresh ones: the export's are its own)."""
    key = (preset, seeds)
    if key not in _REFS:
        from diffusers import StableDiffusion3ControlNetPipeline

        from sdrt.export.controlnet_loading import random_controlnet
        from sdrt.export.sd3_presets import build_modules, get_sd3_preset

        p = get_sd3_preset(preset)
        nets = [random_controlnet(NETS[preset][0], seed=s).controlnet for s in seeds]
        _REFS[key] = sd3_pipeline(StableDiffusion3ControlNetPipeline, build_modules(p, seed=0), folder, p.scheduler,
                                  controlnet=nets if len(nets) > 1 else nets[0])
    return _REFS[key]


def _compare(controlnet_export, preset: str, scales: list[float], *, nets: tuple[int, ...] = (0,),
             start: float = 0.0, end: float = 1.0, guidance: float = 5.0, steps: int = 5, folder: Path | None = None,
             ref=None, exported: int | None = None, loaded=None, loras=None):
    """sdrt's image against diffusers' with the ``nets`` of the export given (``folder``, ``ref``: another export
    of ``exported`` nets and its reference, instead of ``controlnet_export(preset)``'s; ``loras``: the call's)."""
    folder = controlnet_export(preset) if folder is None else folder
    seeds = tuple(NETS[preset][1][j] for j in nets) if ref is None else ()
    ref = _reference(preset, folder, seeds) if ref is None else ref
    return compare_with_nets(
        ref, shared_pipeline(folder) if loaded is None else loaded, PROMPT, nets, scales,
        len(NETS[preset][1]) if exported is None else exported, start=start, end=end, steps=steps, guidance=guidance,
        ref_latents=torch.from_numpy, what=f"{preset} nets {nets} scales {scales} window [{start}, {end}]",
        ref_kw={"negative_prompt": NEGATIVE}, call_kw={"negative_prompt": NEGATIVE, "loras": loras})


@pytest.mark.parametrize("scale", [0.5, 1.3])
def test_instantx_layout_at_two_scales(controlnet_export, mean_vae, scale: float) -> None:
    _compare(controlnet_export, "sd3-tiny", [scale])


def test_scale_changes_the_image(controlnet_export, mean_vae) -> None:
    """The net conditions the image: scale 0 (diffusers' too) differs from scale 1.3 by more than rounding."""
    zero = _compare(controlnet_export, "sd3-tiny", [0.0], steps=3)
    strong = _compare(controlnet_export, "sd3-tiny", [1.3], steps=3)
    assert np.abs(zero - strong).max() > 5


def test_two_nets_summed_in_a_window(controlnet_export, mean_vae) -> None:
    _compare(controlnet_export, "sd3-tiny", [0.7, 0.4], nets=(0, 1), start=0.2, end=0.8)


def test_stability_layout(controlnet_export, mean_vae) -> None:
    _compare(controlnet_export, "sd35-medium-tiny", [0.8], guidance=4.0)


def _lora_reference(modules, folder: Path, scheduler: dict, net, lora: Path):  # type: ignore[no-untyped-def]
    """diffusers' SD3 ControlNet pipeline over ``modules`` and ``net`` with ``lora`` loaded at 0.8
    (``load_lora_weights`` + ``set_adapters``: the transformer and the text encoders adapted, not the net)."""
    from diffusers import StableDiffusion3ControlNetPipeline

    ref = sd3_pipeline(StableDiffusion3ControlNetPipeline, modules, folder, scheduler, controlnet=net.controlnet)
    ref.load_lora_weights(str(lora), adapter_name="style")
    ref.set_adapters(["style"], adapter_weights=[0.8])
    return ref


@pytest.fixture(scope="module")
def slotted_cn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sdrt export --random sd35-medium-tiny --random-controlnet sd35-controlnet-tiny --lora-slots 8:attn-ff
    --fp32 --without-t5`` (Stability's layout)."""
    from sdrt.cli import main

    from .test_lora_transformers import SD3, SLOTS

    net, seeds = NETS[SD3]
    assert seeds[0] == 0  # the CLI's --seed, which seeds the model and the net alike
    out = tmp_path_factory.mktemp("exports") / "slotted-cn"
    assert main(["export", "--random", SD3, "--random-controlnet", net, "--lora-slots", SLOTS, "--fp32",
                 "--without-t5", "--out", str(out)]) == 0
    return out


def test_lora_slots_beside_a_controlnet(controlnet_export, slotted_cn: Path, mean_vae, tmp_path: Path) -> None:
    """``sdrt export --random-controlnet NET --lora-slots 8:attn-ff`` (Stability's layout): ``unet_control`` takes
    the transformer's slots under the same names (the net none), so a call's LoRA reaches both denoisers. A PEFT
    file at 0.8 with the net against diffusers' ControlNet pipeline with it loaded (``load_lora_weights`` + ``set_adapters``, which adapt
    the transformer and the text encoders, not the net); no LoRA: the plain ControlNet export's image; the LoRA
    without a control image: diffusers' plain pipeline with it loaded, as the slotted export without nets."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the test extra)")
    from diffusers import StableDiffusion3Pipeline

    from sdrt.export.controlnet_loading import random_controlnet
    from sdrt.export.sd3_presets import build_modules, get_sd3_preset
    from sdrt.runtime.lora_adapters import slots_of
    from sdrt.runtime.manifest import ExportManifest

    from .test_lora_transformers import SD3, peft_lora

    net, seeds = NETS[SD3]
    out = slotted_cn
    m = ExportManifest.read(out)
    ins = {c: slots_of({i.name: i for i in m.components[c].inputs}) for c in ("unet", "unet_control", "controlnet_0")}
    assert ins["unet"] and ins["unet_control"] == ins["unet"] and not ins["controlnet_0"]
    lora = peft_lora(tmp_path, "sd3", seed=1, rank=3, alpha=6.0)
    p = get_sd3_preset(SD3)
    ref = _lora_reference(build_modules(p, seed=0), out, p.scheduler, random_controlnet(net, seed=seeds[0]), lora)
    kw = {"scales": [0.8], "guidance": 4.0, "folder": out, "exported": 1}
    styled = _compare(None, SD3, ref=ref, loras=[(lora, 0.8)], **kw)
    plain = _compare(controlnet_export, SD3, [0.8], guidance=4.0)  # the plain ControlNet export, against diffusers
    bare = _compare(None, SD3, ref=_reference(SD3, out, seeds), **kw)  # the slotted export without a LoRA
    assert np.abs(bare - plain).max() <= 1 and np.abs(styled - bare).max() > 3  # the LoRA moved the image
    # no control image: the transformer alone (unet) with the LoRA, against diffusers' plain pipeline over the
    # reference's modules (the LoRA loaded in them)
    plain_ref = StableDiffusion3Pipeline(**{k: v for k, v in ref.components.items() if k != "controlnet"})
    plain_ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(4).standard_normal((1, 16, 8, 12), dtype=np.float32)
    call = {"height": 64, "width": 96, "negative_prompt": NEGATIVE, "guidance_scale": 4.0}
    with torch.no_grad():
        want = plain_ref(PROMPT, num_inference_steps=5, latents=torch.from_numpy(latents), output_type="np",
                         **call).images
    got = shared_pipeline(out)(PROMPT, steps=5, latents=latents, loras=[(lora, 0.8)], **call)
    assert_diffusers_images(got.images, want, "the slotted ControlNet export's LoRA without a control image")


@pytest.mark.parametrize("backend", ["ort-cuda-path", "openvino", "tensorrt"])
def test_lora_slots_beside_a_controlnet_on_other_backends(slotted_cn: Path, mean_vae, request: pytest.FixtureRequest,
                                                          tmp_path: Path, backend: str) -> None:
    """The slotted ControlNet export on ort-cuda's code path (on the CPU EP), openvino (fp32) and the TensorRT fakes
    (the captured step: net, unet_control with the factors, step graph): a PEFT file at 0.8 with the net against
    diffusers' ControlNet pipeline with it loaded. None says anything of a GPU."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the test extra)")
    from sdrt.export.controlnet_loading import random_controlnet
    from sdrt.export.sd3_presets import build_modules, get_sd3_preset

    from .helpers.pipelines import loaded_on_any
    from .test_lora_transformers import SD3, peft_lora

    lora = peft_lora(tmp_path, "sd3", seed=1, rank=3, alpha=6.0)
    p = get_sd3_preset(SD3)
    ref = _lora_reference(build_modules(p, seed=0), slotted_cn, p.scheduler, random_controlnet(NETS[SD3][0], seed=0),
                          lora)
    with loaded_on_any(slotted_cn, backend, request, tmp_path / "engines") as pipe:
        _compare(None, SD3, [0.8], guidance=4.0, folder=slotted_cn, exported=1, ref=ref, loaded=pipe,
                 loras=[(lora, 0.8)])


def test_refusals_before_work(controlnet_export, sd3_export, tmp_path: Path) -> None:
    from diffusers import SD3ControlNetModel

    from sdrt.export.controlnet_loading import LoadedControlNet, check_pairing, random_controlnet
    from sdrt.export.controlnet_presets import sd3_controlnet_config
    from sdrt.export.loading import random_model
    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3

    pipe = shared_pipeline(controlnet_export("sd3-tiny"))
    img = control_image(3)
    with pytest.raises(InputError, match="guess_mode is not part of SD 3 / 3.5's ControlNet pipeline"):
        pipe(PROMPT, control_images=[img], guess_mode=True, steps=2)
    with pytest.raises(InputError, match="3 control images for the 2 ControlNet"):
        pipe(PROMPT, control_images=[img, img, img], steps=2)
    image, mask = image_and_mask()
    with pytest.raises(InputError, match="ControlNet with inpainting is not supported"):
        pipe(PROMPT, control_images=[img], image=image, mask_image=mask, steps=2)
    plain = shared_pipeline(sd3_export("sd3-tiny", True))
    with pytest.raises(CompatibilityError, match="exported without ControlNets"):
        plain(PROMPT, control_images=[img], steps=2)
    # a ControlNet of another family, either way round, before any export work
    model = load_sd3(random_preset="sd3-tiny")
    with pytest.raises(InputError, match=r"is an SD 1\.x.* ControlNet \(ControlNetModel\), but the model "
                                         r"\(sd3-tiny\) is SD 3 / 3\.5"):
        export_sd3(model, tmp_path / "a", controlnets=[random_controlnet("sd15-controlnet-tiny")])
    with pytest.raises(InputError, match="is an SD 3 / 3.5 ControlNet, but the model"):
        check_pairing(random_model("sd15-tiny"), [random_controlnet("sd3-controlnet-tiny")])
    cfg = {**sd3_controlnet_config(model.preset.config("transformer"), 1), "attention_head_dim": 16}
    with pytest.raises(InputError, match="width 32 in the ControlNet, 16 in the transformer"):
        export_sd3(model, tmp_path / "b", controlnets=[LoadedControlNet(SD3ControlNetModel(**cfg), name="wide")])
    with pytest.raises(InputError, match="inpainting"):
        export_sd3(load_sd3(random_preset="sd3-inpaint-tiny"), tmp_path / "c",
                   controlnets=[random_controlnet("sd3-controlnet-tiny")])
    assert not any(tmp_path.iterdir())


def test_cli_generate_and_export_refusal(controlnet_export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``sdrt generate --control-image`` gives the Python call's image; ``sdrt export`` refuses an SD3 ControlNet
    single file before the model loads."""
    from PIL import Image

    from sdrt.cli import main

    folder = controlnet_export("sd3-tiny")
    edges, out = tmp_path / "edges.png", tmp_path / "out.png"
    control_image(5).save(edges)
    assert main(["generate", str(folder), "--prompt", PROMPT, "--steps", "2", "--seed", "4", "--guidance", "5",
                 "--backend", "ort-cpu", "--height", "64", "--width", "96", "--control-image", str(edges),
                 "--control-scale", "0.7", "-o", str(out)]) == 0
    want = shared_pipeline(folder)(PROMPT, steps=2, seed=4, guidance_scale=5.0, height=64, width=96,
                                   control_images=[Image.open(edges)], control_scales=[0.7]).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))

    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("the model loaded before the ControlNet was checked")

    monkeypatch.setattr("sdrt.export.sd3_loading.load_sd3", no_work)
    single = tmp_path / "sd3-canny.safetensors"
    single.write_bytes(b"\0" * 16)
    capsys.readouterr()
    assert main(["export", "--random", "sd3-tiny", "--controlnet", str(single), "--out", str(tmp_path / "x")]) == 1
    assert "sd3-canny.safetensors is not a readable .safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_diffusers_folder_loads_as_its_class(tmp_path: Path) -> None:
    """An SD3ControlNetModel folder (config.json + safetensors, as diffusers saves it) loads as that class, weight
    for weight."""
    assert_folder_loads_as_its_class(tmp_path, "sd35-controlnet-tiny", "SD3ControlNetModel")


@pytest.mark.slow  # four graphs traced by the dynamo exporter (about 100 s here)
def test_streamed_transformer_with_two_layouts(tmp_path: Path, mean_vae) -> None:
    """A streamed transformer (as every full-size model's is) gets a streamed ``unet_control``, gated on a
    reduced-depth copy; a Stability-layout net takes the transformer's position embedding from the streamed
    weights. One export with a net of each layout, each run alone against diffusers on the same weights."""
    from diffusers import StableDiffusion3ControlNetPipeline

    from sdrt.export.controlnet_loading import random_controlnet
    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3
    from sdrt.runtime.manifest import ExportManifest

    model = load_sd3(random_preset="sd35-medium-tiny", seed=5, stream=True)
    assert model.modules.transformer is None
    layouts = ("sd35-controlnet-tiny", "sd3-controlnet-tiny")
    out = tmp_path / "streamed"
    export_sd3(model, out, fp16=False, without_t5=True, controlnets=[random_controlnet(n, seed=0) for n in layouts])
    m = ExportManifest.read(out)
    assert m.controlnets == ("controlnet_0", "controlnet_1") and "unet" in m.source["streamed"]
    par = m.components["unet_control"].parity
    assert par is not None and "reduced depth" in par.reference and par.rel_err <= par.bound
    mods = model.held(t5=False)
    for j, name in enumerate(layouts):
        ref = sd3_pipeline(StableDiffusion3ControlNetPipeline, mods, out, model.scheduler_config,
                           controlnet=random_controlnet(name, seed=0).controlnet)
        with Pipeline.load(out, backend="ort-cpu") as pipe:
            _compare(None, "sd35-medium-tiny", [0.9], nets=(j,), folder=out, ref=ref, exported=2, steps=3,
                     loaded=pipe)


@pytest.mark.slow  # a streamed export with slots: three graphs and their gates traced by the dynamo exporter
def test_lora_slots_beside_a_controlnet_on_a_streamed_transformer(tmp_path: Path, mean_vae) -> None:
    """A streamed transformer (every full-size model's way) with slots and a ControlNet: the streamed
    ``unet_control`` takes the slots too, gated on its reduced-depth copy with random factors and samples; a PEFT
    file at 0.8 with the net against diffusers' ControlNet pipeline over the same synthetic weights, held."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the test extra)")
    from sdrt.export.controlnet_loading import random_controlnet
    from sdrt.export.lora_slots import SlotPlan
    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3
    from sdrt.runtime.lora_adapters import slots_of
    from sdrt.runtime.manifest import ExportManifest

    from .test_lora_transformers import SD3, SLOTS, peft_lora

    net = random_controlnet(NETS[SD3][0], seed=0)
    model = load_sd3(random_preset=SD3, seed=5, stream=True)
    out = tmp_path / "streamed"
    export_sd3(model, out, fp16=False, without_t5=True, lora_slots=SlotPlan.parse(SLOTS), controlnets=[net])
    m = ExportManifest.read(out)
    control = m.components["unet_control"]
    assert control.parity is not None and "reduced depth" in control.parity.reference
    assert control.parity.rel_err <= control.parity.bound
    assert slots_of({i.name: i for i in control.inputs}) == slots_of({i.name: i for i in m.components["unet"].inputs})
    lora = peft_lora(tmp_path, "sd3", seed=1, rank=3, alpha=6.0)
    ref = _lora_reference(model.held(t5=False), out, model.scheduler_config, random_controlnet(NETS[SD3][0], seed=0),
                          lora)
    with Pipeline.load(out, backend="ort-cpu") as pipe:
        _compare(None, SD3, [0.8], folder=out, ref=ref, exported=1, guidance=4.0, steps=3, loaded=pipe,
                 loras=[(lora, 0.8)])


def test_built_engines_run_the_nets_like_ort_cpu(controlnet_export, tmp_path: Path, fake_gpu) -> None:
    """Logic check on the TensorRT fakes: build_engines makes the nets and unet_control (their samples' patch-grid
    axes from the profile), and the captured step (nets, unet_control, step graph) gives the ort-cpu images, one
    net and both. Says nothing of real TensorRT."""
    from sdrt.export.profiles import custom_profile

    imgs = [control_image(20), control_image(21)]
    assert_engines_give_ort_cpu_images(
        controlnet_export("sd3-tiny"), tmp_path / "engines",
        custom_profile(batch="1:1:1", height="64:64:96", width="64:96:96"), fake_gpu[0],
        {"controlnet_0", "controlnet_1", "unet_control", "unet"}, PROMPT,
        {"negative_prompt": NEGATIVE, "steps": 3, "seed": 5, "height": 64, "width": 96, "guidance_scale": 4.0},
        [{"control_images": [imgs[0]], "control_scales": [0.8]},
         {"control_images": imgs, "control_scales": [0.6, 1.1], "control_end": [1.0, 0.5]}])


@pytest.mark.parametrize("backend", ["ort-cuda-path", "openvino"])
def test_other_backends_give_the_ort_cpu_images(controlnet_export, monkeypatch: pytest.MonkeyPatch,
                                                backend: str) -> None:
    """ort-cuda's code path (OrtValues, IO binding) on the CPU EP, and openvino in fp32: the ort-cpu images with
    both nets. The first says nothing of a GPU."""
    folder = controlnet_export("sd3-tiny")
    kw = {"negative_prompt": NEGATIVE, "steps": 3, "seed": 8, "height": 64, "width": 96, "guidance_scale": 4.0,
          "control_images": [control_image(30), control_image(31)], "control_scales": [0.9, 0.5]}
    want = np.asarray(shared_pipeline(folder)(PROMPT, **kw).images[0], np.int16)
    with loaded_on(folder, backend, monkeypatch) as pipe:
        got = np.asarray(pipe(PROMPT, **kw).images[0], np.int16)
    assert want.std() > 5 and np.abs(got - want).max() <= (2 if backend == "openvino" else 0)


@pytest.mark.parametrize("key", ["sd1", "sdxl", "sd3", "flux"])
def test_guess_mode_is_declared_as_diffusers_pipelines_have_it(key: str) -> None:
    """``Family.control_guess_mode`` against the ``guess_mode`` parameter of the family's diffusers ControlNet
    pipeline (the families sdrt exports ControlNets for)."""
    import inspect

    import diffusers

    from sdrt.runtime.families import family_named

    fam = family_named(key)
    cls = getattr(diffusers, f"{fam.diffusers_pipeline}ControlNetPipeline")
    assert ("guess_mode" in inspect.signature(cls.__call__).parameters) == fam.control_guess_mode


def test_the_control_image_sets_a_size_of_whole_patches(controlnet_export) -> None:
    """Without height and width the output takes the control image's size rounded down to whole 16-pixel patches
    (90 x 70 -> 80 x 64), as the UNet families take it rounded to 8 (diffusers' SD3 ControlNet pipeline takes the
    model's default size instead)."""
    pipe = shared_pipeline(controlnet_export("sd3-tiny"))
    img = control_image(40)  # 90 x 70
    kw = {"steps": 2, "seed": 1, "guidance_scale": 1.0, "control_images": [img]}
    got = pipe(PROMPT, **kw).images[0]
    assert got.size == (80, 64)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(pipe(PROMPT, height=64, width=80, **kw).images[0]))


# -- Stability's SD 3.5 ControlNet single files ----------------------------------------------------------------

def _stability_file(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``sd35-controlnet-tiny`` seeded as the reference's, written in Stability's file layout (the test's own
    name table, tests/helpers/ldm_layout.py); returns the net."""
    from safetensors.torch import save_file

    from sdrt.export.controlnet_loading import random_controlnet

    from .helpers.ldm_layout import sd3_controlnet_to_stability

    net = random_controlnet("sd35-controlnet-tiny", seed=seed).controlnet
    sd = sd3_controlnet_to_stability(net.state_dict(), int(net.config.num_layers))
    save_file({k: v.to(dtype) for k, v in sd.items()}, str(path))
    return net


def test_stability_single_file_loads_the_diffusers_net(tmp_path: Path) -> None:
    """Stability's layout back to the diffusers state dict, tensor for tensor, and the preset's config (the
    architecture from the shapes, the head width and unrecorded fields from the paired transformer)."""
    from sdrt.export.controlnet_loading import load_controlnet
    from sdrt.export.sd3_presets import get_sd3_preset

    net = _stability_file(tmp_path / "sd3.5_tiny_controlnet_canny.safetensors", seed=2)
    tr = get_sd3_preset("sd35-medium-tiny").config("transformer")
    got = load_controlnet(tmp_path / "sd3.5_tiny_controlnet_canny.safetensors", transformer_config=tr)
    assert type(got.controlnet).__name__ == "SD3ControlNetModel" and got.source["kind"] == "single_file"

    def public(c: object) -> dict:
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(c).items() if not k.startswith("_")}

    assert public(got.controlnet.config) == public(net.config)
    want, have = net.state_dict(), got.controlnet.state_dict()
    assert have.keys() == want.keys()
    assert all(v.dtype == torch.float32 and torch.equal(v, want[k]) for k, v in have.items())


def test_stability_single_file_exports_the_folder_nets_images(tmp_path: Path, mean_vae) -> None:
    """``sdrt export --controlnet FILE`` of a Stability-layout file gives diffusers' images with that net."""
    from diffusers import StableDiffusion3ControlNetPipeline

    from sdrt.cli import main
    from sdrt.export.controlnet_loading import random_controlnet
    from sdrt.export.sd3_presets import build_modules, get_sd3_preset

    single = tmp_path / "canny.safetensors"
    _stability_file(single, seed=0, dtype=torch.float16)  # fp16 in the file, as Stability ships; fp32 loaded
    out = tmp_path / "exp"
    assert main(["export", "--random", "sd35-medium-tiny", "--controlnet", str(single), "--fp32", "--without-t5",
                 "--out", str(out)]) == 0
    p = get_sd3_preset("sd35-medium-tiny")
    net = random_controlnet("sd35-controlnet-tiny", seed=0).controlnet.half().float()  # the file's rounding
    ref = sd3_pipeline(StableDiffusion3ControlNetPipeline, build_modules(p, seed=0), out, p.scheduler, controlnet=net)
    with Pipeline.load(out, backend="ort-cpu") as pipe:
        _compare(None, "sd35-medium-tiny", [0.8], folder=out, ref=ref, exported=1, guidance=4.0, steps=3, loaded=pipe)


def test_single_file_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """Before the model loads: a file of no ControlNet layout, an SD 1.x (A1111-layout) ControlNet file with an SD3
    model; and an SD3 file with an SD 1.x model, before any export work. Each names what was expected."""
    from safetensors.torch import load_file, save_file

    from sdrt.cli import main
    from sdrt.export.controlnet_loading import load_controlnet, random_controlnet
    from sdrt.runtime.errors import ArtifactError

    from .helpers.ldm_layout import controlnet_to_ldm

    _stability_file(tmp_path / "sd35.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(other))
    sd15 = random_controlnet("sd15-controlnet-tiny").controlnet
    unet_file = tmp_path / "sd15.safetensors"
    save_file({k: v.contiguous() for k, v in controlnet_to_ldm(sd15.state_dict(), dict(sd15.config)).items()},
              str(unet_file))

    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("the model loaded before the ControlNet file was checked")

    monkeypatch.setattr("sdrt.export.sd3_loading.load_sd3", no_work)
    capsys.readouterr()
    for f, says in ((other, "other.safetensors is not an SD 3 / 3.5 ControlNet: expected Stability's SD 3.5"),
                    (unet_file, "sd15.safetensors is an SD 1.x / SDXL ControlNet (control_model.* layout")):
        assert main(["export", "--random", "sd3-tiny", "--controlnet", str(f), "--out", str(tmp_path / "x")]) == 1
        assert says in capsys.readouterr().err
    assert main(["export", "--random", "sd15-tiny", "--controlnet", str(tmp_path / "sd35.safetensors"),
                 "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "sd35.safetensors is an SD 3 / 3.5 ControlNet (Stability's SD 3.5 layout" in err and "SD 1.x" in err
    assert not (tmp_path / "x").exists()
    cut = {k: v for k, v in load_file(str(tmp_path / "sd35.safetensors")).items()
           if k != "transformer_blocks.1.mlp.fc2.bias"}
    save_file(cut, str(tmp_path / "cut.safetensors"))
    # an inpainting net's extra conditioning channels (in the control embedding's input): loaded, then refused
    sd = load_file(str(tmp_path / "sd35.safetensors"))
    w = sd["pos_embed_input.proj.weight"]
    sd["pos_embed_input.proj.weight"] = torch.cat([w, w[:, :1]], dim=1)
    save_file(sd, str(tmp_path / "inpaint.safetensors"))
    tr = {"attention_head_dim": 8, "in_channels": 16}
    net = load_controlnet(tmp_path / "inpaint.safetensors", transformer_config=tr)
    assert net.controlnet.config.extra_conditioning_channels == 1
    monkeypatch.undo()
    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3

    with pytest.raises(InputError, match="takes 1 extra conditioning channels"):
        export_sd3(load_sd3(random_preset="sd35-medium-tiny"), tmp_path / "y", controlnets=[net])
    assert not (tmp_path / "y").exists()
    with pytest.raises(ArtifactError, match=r"does not fit an SD3 ControlNet .* transformer_blocks\.1\.ff\.net\.2"
                                            r"\.bias missing"):
        load_controlnet(tmp_path / "cut.safetensors", transformer_config={"attention_head_dim": 8})
