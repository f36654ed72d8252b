"""LoRA per request (runtime/lora_adapters.py) on a slotted export (``sdrt export --lora-slots``), against
diffusers with the same LoRA files loaded (``load_lora_weights``, ``set_adapters`` with the scales; ``fuse_lora`` as
a second reference) on the same seeded weights and initial latents: images within 1/255.

The LoRAs are random factors written in the kohya / A1111 and the diffusers / PEFT layouts
(tests/helpers/models.py ``make_lora``); LoCon files adapt convolutions too (``down`` a convolution with the
layer's kernel, ``up`` 1x1), on exports made with ``--lora-slots RANK:attn-ff-conv``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdrt.runtime.errors import ArtifactError, InputError
from sdrt.runtime.lora_adapters import AdapterLibrary, slots_of
from sdrt.runtime.pipeline import Pipeline

from .helpers.models import make_lora
from .helpers.pipelines import loaded_on, shared_pipeline
from .helpers.references import diffusers_scheduler

torch = pytest.importorskip("torch")
pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the test extra)")

ATTN = ("to_q", "to_k", "to_v", "to_out.0")
# what kohya's LoCon (networks.lora with conv_dim) and LyCORIS' locon adapt in a diffusers UNet: the transformers'
# linear layers and proj_in / proj_out (1x1 convolutions in SD 1.5), every Linear and Conv2d of the ResNet blocks
# (time_emb_proj is linear) and the down- and upsamplers' convolutions
CONVS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
LOCON = (*ATTN, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", *CONVS)
PROMPT = "a watercolor fox in the snow, highly detailed"
KW: dict[str, Any] = {"negative_prompt": "blurry", "height": 64, "width": 96, "steps": 6, "guidance_scale": 7.5,
                      "sampler": "ddim"}


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    """The presets' seeded modules (the weights the exports hold), built once."""
    from sdrt.export.loading import random_model

    return {p: random_model(p) for p in ("sd15-tiny", "sdxl-tiny")}


TEXT_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")


def _lora(tmp: Path, m: Any, layout: str, seed: int, rank: int = 2, alpha: float | None = None,
          targets: tuple[str, ...] = ATTN, text: bool = False, text_targets: tuple[str, ...] = TEXT_ATTN,
          text_2: bool = False, conv_rank: int | None = None) -> Path:
    return make_lora(tmp / f"{layout}-{seed}-r{rank}.safetensors", m.unet, m.text_encoders[0] if text else None,
                     layout, seed=seed, rank=rank, alpha=alpha, unet_targets=targets, text_targets=text_targets,
                     text_encoder_2=m.text_encoders[1] if text_2 else None, conv_rank=conv_rank)


def _latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, KW["height"] // 8, KW["width"] // 8), dtype=np.float32)


def _reference(m: Any, folder: Path, loras: list[tuple[Path, float]], fuse: bool = False) -> np.ndarray:
    """diffusers' pipeline over fresh copies of the seeded modules with ``loras`` loaded (and fused)."""
    import copy

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    common = {"vae": m.vae, "unet": copy.deepcopy(m.unet), "scheduler": diffusers_scheduler("ddim", m.scheduler_config),
              "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer")}
    te = [copy.deepcopy(t) for t in m.text_encoders]  # load_lora_weights adapts them in place
    if m.preset.family == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder=te[0], text_encoder_2=te[1],
                                         tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
                                         force_zeros_for_empty_prompt=True, **common)
    else:
        pipe = StableDiffusionPipeline(text_encoder=te[0], safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **common)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
        if fuse:
            pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=KW["negative_prompt"], height=KW["height"], width=KW["width"],
                   num_inference_steps=KW["steps"], guidance_scale=KW["guidance_scale"],
                   latents=torch.from_numpy(_latents()), output_type="np").images
    return (out[0] * 255).round().astype(np.int32)


def _sdrt(folder: Path, loras: list[tuple[str | Path, float]] | None, backend: str = "ort-cpu") -> np.ndarray:
    res = shared_pipeline(folder, backend)(PROMPT, latents=_latents(), loras=loras, **KW)
    return np.asarray(res.images[0]).astype(np.int32)


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    diff = int(np.abs(got - want).max())
    assert diff <= 1, f"{what}: max abs difference {diff}/255 from diffusers"
    assert want.std() > 5


@pytest.mark.parametrize(("layout", "alpha"), [("kohya", 4.0), ("diffusers", None)])
def test_one_lora_matches_diffusers(slotted_export, models, tmp_path: Path, layout: str, alpha: float | None) -> None:
    m, folder = models["sd15-tiny"], slotted_export("sd15-tiny")
    path = _lora(tmp_path, m, layout, seed=1, alpha=alpha)
    want = _reference(m, folder, [(path, 0.8)])
    got = _sdrt(folder, [(path, 0.8)])
    _close(got, want, f"{layout} LoRA at 0.8")
    plain = _sdrt(folder, None)
    assert np.abs(plain - want).max() > 3  # the LoRA moved the image: the comparison means something


def test_stacked_loras_match_diffusers_set_adapters_and_fuse(slotted_export, models, tmp_path: Path) -> None:
    """Two LoRAs of different ranks and layouts, each at its own scale (ranks 2 + 4 in slots of 8)."""
    m, folder = models["sd15-tiny"], slotted_export("sd15-tiny")
    a = _lora(tmp_path, m, "kohya", seed=2, rank=2, alpha=1.0)
    b = _lora(tmp_path, m, "diffusers", seed=3, rank=4)
    got = _sdrt(folder, [(a, 0.8), (b, -0.5)])
    _close(got, _reference(m, folder, [(a, 0.8), (b, -0.5)]), "stacked, set_adapters")
    _close(got, _reference(m, folder, [(a, 0.8), (b, -0.5)], fuse=True), "stacked, fuse_lora")


def test_sdxl_lora_matches_diffusers(slotted_export, models, tmp_path: Path) -> None:
    m, folder = models["sdxl-tiny"], slotted_export("sdxl-tiny")
    path = _lora(tmp_path, m, "diffusers", seed=4, rank=4)
    _close(_sdrt(folder, [(path, 1.0)]), _reference(m, folder, [(path, 1.0)]), "SDXL LoRA")


def test_feed_forward_slots_take_kohya_s_usual_targets(slotted_export, models, tmp_path: Path) -> None:
    """``attn-ff`` slots also adapt the feed-forward layers (and linear proj_in / proj_out: SDXL's; SD 1.5's
    are 1x1 convolutions, which have no slot)."""
    m, folder = models["sdxl-tiny"], slotted_export("sdxl-tiny", "8:attn-ff")
    targets = (*ATTN, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
    path = _lora(tmp_path, m, "kohya", seed=5, rank=3, alpha=2.0, targets=targets)
    _close(_sdrt(folder, [(path, 0.7)]), _reference(m, folder, [(path, 0.7)]), "attn-ff LoRA")
    with pytest.raises(InputError, match="no slot for.*ff.net"):  # the attention-only export has no slot for them
        shared_pipeline(slotted_export("sdxl-tiny"))(PROMPT, steps=1, loras=[(path, 1.0)])


@pytest.mark.parametrize(("locon_layout", "linear_layout"), [("kohya", "diffusers"), ("diffusers", "kohya")])
def test_locon_matches_diffusers_stacked_with_a_linear_lora(slotted_export, models, tmp_path: Path, locon_layout: str,
                                                            linear_layout: str) -> None:
    """A LoCon file (kohya's ``lora_unet_..._resnets_0_conv1.lora_down.weight`` [r, in, 3, 3], or PEFT's Conv2d
    ``lora_A`` / 1x1 ``lora_B``) on an ``attn-ff-conv`` export, its 3x3 convolutions at their own rank (kohya's
    conv_dim), stacked with an attention-only LoRA on the slots' rank axis: diffusers' image with both loaded."""
    from sdrt.runtime.manifest import ExportManifest

    m, folder = models["sd15-tiny"], slotted_export("sd15-tiny", "8:attn-ff-conv")
    unet = ExportManifest.read(folder).components["unet"]
    slots = slots_of({i.name: i for i in unet.inputs})
    assert slots["down_blocks.0.downsamplers.0.conv"].kernel == (3, 3)  # stride 2: the slot's down convolves so too
    assert slots["down_blocks.0.attentions.0.proj_in"].kernel == (1, 1) and not slots["mid_block.resnets.0.time_emb_proj"].kernel
    assert unet.parity is not None and unet.parity.rel_err <= unet.parity.bound  # gated with random factors
    kohya = locon_layout == "kohya"
    locon = _lora(tmp_path, m, locon_layout, seed=30, rank=2, conv_rank=4 if kohya else 3, targets=LOCON,
                  alpha=1.0 if kohya else None)
    linear = _lora(tmp_path, m, linear_layout, seed=31, rank=3, alpha=None if kohya else 2.0)
    loras: list[tuple[str | Path, float]] = [(locon, 0.8), (linear, -0.5)]
    want = _reference(m, folder, [(locon, 0.8), (linear, -0.5)])
    _close(_sdrt(folder, loras), want, f"{locon_layout} LoCon + {linear_layout} LoRA")
    # the convolutions alone move the image: their slots take part (tmp_path / "conv": another file name)
    (tmp_path / "conv").mkdir()
    convs = _lora(tmp_path / "conv", m, locon_layout, seed=32, rank=2, targets=CONVS, alpha=1.0 if kohya else None)
    assert np.abs(_sdrt(folder, [(convs, 0.8)]) - _sdrt(folder, None)).max() > 3


def test_locon_refusals_name_what_is_allowed(slotted_export, models, tmp_path: Path) -> None:
    """Ranks past the slot at a convolution, a LyCORIS LoHa file, a LoCon whose kernel is not the layer's, a
    target set that does not exist: refused before any work, naming the allowed values."""
    from safetensors.numpy import save_file

    from sdrt.export.lora_slots import SlotPlan

    m, folder = models["sd15-tiny"], slotted_export("sd15-tiny", "8:attn-ff-conv")
    pipe = shared_pipeline(folder)
    wide = _lora(tmp_path, m, "kohya", seed=33, rank=1, conv_rank=5, targets=CONVS, alpha=1.0)
    with pytest.raises(InputError, match=r"add rank 10 at down_blocks\.0\.resnets\.0\.conv1, over this export's slot "
                                         "rank 8"):
        pipe(PROMPT, steps=1, loras=[(wide, 1.0), (wide, 0.5)])
    g = np.random.default_rng(0)
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    loha = {f"{key}.hada_w{i}_{ab}": g.standard_normal((4, 32) if ab == "a" else (32, 4)).astype(np.float32)
            for i in (1, 2) for ab in "ab"} | {f"{key}.alpha": np.array(4.0, np.float32)}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    with pytest.raises(InputError, match="a LoHa file .*it reads plain LoRA and LoCon: kohya / LyCORIS lora_down / "
                                         "lora_up .*or diffusers / PEFT lora_A / lora_B"):
        pipe(PROMPT, steps=1, loras=[(tmp_path / "loha.safetensors", 1.0)])
    flat = {f"{key}.lora_down.weight": np.zeros((2, 32), np.float32),  # a linear down for a 3x3 convolution
            f"{key}.lora_up.weight": np.zeros((32, 2, 1, 1), np.float32)}
    save_file(flat, str(tmp_path / "flat.safetensors"))
    with pytest.raises(InputError, match=r"the layer is a 3x3 convolution 32 -> 32 \(factors \(2, 32, 3, 3\) and "
                                         r"\(32, 2, 1, 1\)\): the LoRA was trained for another architecture"):
        pipe(PROMPT, steps=1, loras=[(tmp_path / "flat.safetensors", 1.0)])
    with pytest.raises(InputError, match="targets 'conv' is not one of attn, attn-ff, attn-ff-conv"):
        SlotPlan.parse("8:conv")


@pytest.mark.parametrize(("layout", "preset", "slots", "text_targets"), [
    ("kohya", "sd15-tiny", "8", TEXT_ATTN),
    ("kohya", "sd15-tiny", "8:attn-ff", (*TEXT_ATTN, "fc1", "fc2")),  # kohya trains the MLP too
    ("diffusers", "sdxl-tiny", "8", TEXT_ATTN),
])
def test_text_encoder_layers_match_diffusers(slotted_export, models, tmp_path: Path, layout: str, preset: str,
                                             slots: str, text_targets: tuple[str, ...]) -> None:
    """A LoRA that also trains the text encoder (as most kohya LoRAs do): its text-encoder layers are the text
    encoders' slots, so the conditioning changes as diffusers' ``load_lora_weights`` changes it."""
    m, folder = models[preset], slotted_export(preset, slots)
    path = _lora(tmp_path, m, layout, seed=16, alpha=1.0 if layout == "kohya" else None, text=True,
                 text_targets=text_targets)
    want = _reference(m, folder, [(path, 0.8)])
    _close(_sdrt(folder, [(path, 0.8)]), want, f"{layout} LoRA with text-encoder layers on {preset} ({slots})")
    (tmp_path / "unet-only").mkdir()
    unet_only = _lora(tmp_path / "unet-only", m, layout, seed=16, alpha=1.0 if layout == "kohya" else None)
    assert np.abs(_sdrt(folder, [(unet_only, 0.8)]) - want).max() > 3  # the text encoder's part mattered
    # the staged API applies them too: encode_prompt(loras=...) then denoise(loras=...)
    pipe = shared_pipeline(folder)
    emb = pipe.encode_prompt(PROMPT, KW["negative_prompt"], loras=[(path, 0.8)])
    plan = pipe.plan(KW["sampler"], KW["steps"])
    lat = pipe.prepare_latents(plan, KW["height"], KW["width"], latents=_latents())
    lat = pipe.denoise(emb, lat, plan, guidance_scale=KW["guidance_scale"], loras=[(path, 0.8)])
    staged = np.asarray(pipe.decode(lat)[0]).astype(np.int32)
    _close(staged, want, "staged")


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_sdxl_lora_adapting_both_text_encoders_matches_diffusers(slotted_export, models, tmp_path: Path,
                                                                 layout: str) -> None:
    """SDXL's second text encoder's slots, with a LoRA that adapts both encoders (kohya's ``lora_te1_`` /
    ``lora_te2_``, PEFT's ``text_encoder.`` / ``text_encoder_2.``): diffusers' image with the same file."""
    m, folder = models["sdxl-tiny"], slotted_export("sdxl-tiny")
    alpha = 2.0 if layout == "kohya" else None
    both = _lora(tmp_path, m, layout, seed=40, rank=3, alpha=alpha, text=True, text_2=True)
    want = _reference(m, folder, [(both, 0.9)])
    _close(_sdrt(folder, [(both, 0.9)]), want, f"SDXL {layout} LoRA of both text encoders")
    # the same factors without the second encoders part (drawn last, so the rest is the same): another image
    (tmp_path / "first").mkdir()
    first = _lora(tmp_path / "first", m, layout, seed=40, rank=3, alpha=alpha, text=True)
    assert np.abs(_sdrt(folder, [(first, 0.9)]) - want).max() > 3


def test_no_lora_gives_the_plain_exports_image(slotted_export, tiny_export) -> None:
    plain = np.asarray(shared_pipeline(tiny_export("sd15-tiny"))(PROMPT, latents=_latents(), **KW).images[0])
    slotted = _sdrt(slotted_export("sd15-tiny"), None)
    assert int(np.abs(slotted - plain.astype(np.int32)).max()) <= 1


def test_a_named_lora_comes_from_the_folder(slotted_export, models, tmp_path: Path) -> None:
    m, folder = models["sd15-tiny"], slotted_export("sd15-tiny")
    lib = tmp_path / "loras"
    lib.mkdir()
    path = _lora(lib, m, "kohya", seed=6, alpha=2.0)
    path.rename(lib / "watercolor.safetensors")
    with Pipeline.load(folder, backend="ort-cpu", lora_dir=lib) as pipe:
        assert pipe.loras.names() == ["watercolor"]
        named = pipe(PROMPT, latents=_latents(), loras=[("watercolor", 0.6)], **KW)
        with pytest.raises(InputError, match=r"unknown LoRA 'sketch': give one of the LoRAs in .*: watercolor"):
            pipe(PROMPT, steps=1, loras=[("sketch", 1.0)])
    by_path = _sdrt(folder, [(lib / "watercolor.safetensors", 0.6)])
    assert np.array_equal(np.asarray(named.images[0]).astype(np.int32), by_path)


def test_bad_requests_are_refused_before_work(slotted_export, tiny_export, models, tmp_path: Path) -> None:
    m, folder = models["sd15-tiny"], slotted_export("sd15-tiny")
    pipe = shared_pipeline(folder)
    big = _lora(tmp_path, m, "diffusers", seed=7, rank=6)
    with pytest.raises(InputError, match="add rank 12 at .* over this export's slot rank 8"):
        pipe(PROMPT, steps=1, loras=[(big, 1.0), (big, 0.5)])
    text = _lora(tmp_path, m, "kohya", seed=8, text=True, text_targets=(*TEXT_ATTN, "fc1", "fc2"))
    with pytest.raises(InputError, match=r"no slot for \(text_encoder\.text_model_encoder_layers_0_mlp_fc"):
        pipe(PROMPT, steps=1, loras=[(text, 1.0)])  # the MLP has slots with attn-ff only
    conv = _lora(tmp_path, m, "kohya", seed=9, targets=(*ATTN, "resnets.0.conv1"))
    with pytest.raises(InputError, match="no slot for.*conv1.*RANK:attn-ff-conv. if it adapts convolutions"):
        pipe(PROMPT, steps=1, loras=[(conv, 1.0)])
    other = _lora(tmp_path, models["sdxl-tiny"], "diffusers", seed=10)
    with pytest.raises(InputError, match="another architecture|no slot for"):
        pipe(PROMPT, steps=1, loras=[(other, 1.0)])
    for bad, message in ((("x.safetensors", float("nan")), "scale must be"), ("a", "unknown LoRA 'a'"),
                         ((big, 11.0), "scale must be a number from -10 to 10")):
        with pytest.raises(InputError, match=message):
            pipe(PROMPT, steps=1, loras=[bad])
    with pytest.raises(InputError, match="loras must be a list"):
        pipe(PROMPT, steps=1, loras="style")
    with pytest.raises(ArtifactError, match="no LoRA slots.*--lora-slots RANK"):
        shared_pipeline(tiny_export("sd15-tiny"))(PROMPT, steps=1, loras=[(big, 1.0)])


def _sets(m: Any, tmp_path: Path, slots: str, seeds: tuple[int, int]) -> list[list[tuple[str | Path, float]] | None]:
    """Two LoRA sets and none: on an attn-ff-conv export a LoCon (convolution factors as graph inputs) and a LoCon
    stacked with an attention-only LoRA."""
    a = _lora(tmp_path, m, "kohya", seed=seeds[0], alpha=1.0)
    b = _lora(tmp_path, m, "diffusers", seed=seeds[1], rank=4)
    if slots.endswith("conv"):
        a = _lora(tmp_path, m, "kohya", seed=seeds[0] + 100, alpha=1.0, targets=LOCON, conv_rank=3)
        return [[(a, 0.8)], [(a, 0.5), (b, 0.6)], None]
    return [[(a, 0.8)], [(b, 0.6)], None]


@pytest.mark.parametrize("slots", ["8", "8:attn-ff-conv"])
def test_openvino_gives_ort_cpus_images(slotted_export, models, tmp_path: Path, slots: str) -> None:
    """OpenVINO takes the factors as inputs too (a convolution's weights included) and gives ort-cpu's images."""
    m, folder = models["sd15-tiny"], slotted_export("sd15-tiny", slots)
    path = _lora(tmp_path, m, "diffusers", seed=11, rank=4, targets=LOCON if slots.endswith("conv") else ATTN)
    with loaded_on(folder, "openvino") as pipe:
        want = _sdrt(folder, [(path, 0.9)])
        got = pipe(PROMPT, latents=_latents(), loras=[(path, 0.9)], **KW)
    assert int(np.abs(np.asarray(got.images[0]).astype(np.int32) - want).max()) <= 1


def test_the_export_records_its_slots(slotted_export) -> None:
    from sdrt.runtime.manifest import ExportManifest

    man = ExportManifest.read(slotted_export("sd15-tiny"))
    unet = man.components["unet"]
    slots = slots_of({i.name: i for i in unet.inputs})
    assert len(slots) == 4 * 2 * sum(1 for i in unet.inputs if i.name.endswith("attn1.to_q.down"))
    assert {s.rank for s in slots.values()} == {8} and man.source["lora_slots"] == {"rank": 8, "targets": "attn"}
    text = man.components["text_encoder"]
    text_slots = slots_of({i.name: i for i in text.inputs})
    assert text_slots and all(k.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj") for k in text_slots)
    assert text.parity is not None and text.parity.rel_err <= text.parity.bound
    assert unet.parity is not None and unet.parity.rel_err <= unet.parity.bound  # gated with random factors


def test_the_library_keeps_recent_adapters_within_its_bound(models, tmp_path: Path) -> None:
    m = models["sd15-tiny"]
    paths = [_lora(tmp_path, m, "diffusers", seed=20 + i, rank=4) for i in range(3)]
    one = AdapterLibrary().get(paths[0]).nbytes
    lib = AdapterLibrary(max_bytes=2 * one)
    for p in paths:
        lib.get(p)
    assert lib.cached_bytes == 2 * one  # the first was dropped
    # a file replaced under the same name is read again, not served from the cache
    before = lib.get(paths[1]).file.modules[0].down.copy()
    make_lora(paths[1], m.unet, None, "diffusers", seed=99, rank=4, unet_targets=ATTN)
    os.utime(paths[1], ns=(1, 1))  # a different mtime even where the clock is coarse
    assert not np.array_equal(lib.get(paths[1]).file.modules[0].down, before)
    assert lib.cached_bytes == 2 * one  # the old reading left the cache
    with pytest.raises(ArtifactError, match="does not exist"):
        AdapterLibrary(tmp_path / "nowhere")


@pytest.mark.parametrize(("cuda_graph", "slots"), [(False, "8"), (True, "8"), (True, "8:attn-ff-conv")])
def test_ort_cuda_code_path_gives_the_ort_cpu_images(slotted_export, models, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, cuda_graph: bool,
                                                     slots: str) -> None:
    """ort-cuda's code path (OrtValues, IO binding; with cuda_graph the composed UNet + step session, the factors
    among its fixed inputs) in CPU memory on the CPU EP: the ort-cpu images, two LoRA sets one after the other
    and none (LoCon sets on an attn-ff-conv export). Says nothing of a GPU."""
    m, folder = models["sd15-tiny"], slotted_export("sd15-tiny", slots)
    sets = _sets(m, tmp_path, slots, (12, 13))
    wants = [_sdrt(folder, s) for s in sets]
    with loaded_on(folder, "ort-cuda-path", monkeypatch, cuda_graph=cuda_graph) as pipe:
        for s, want in zip(sets, wants):
            got = np.asarray(pipe(PROMPT, latents=_latents(), loras=s, **KW).images[0]).astype(np.int32)
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("slots", ["8", "8:attn-ff-conv"])
def test_tensorrt_runs_the_slots_on_the_fakes(slotted_export, models, tmp_path: Path, fake_gpu, slots: str) -> None:
    """Logic check on the TensorRT fakes (tests/helpers/trt_fakes.py): the slotted UNet builds (its factor inputs
    static in the profile, a convolution's 4-D ones too), and the captured loop, which copies its conditioning
    into fixed buffers at each start, gives ort-cpu's images for two LoRA sets one after the other and for none.
    Says nothing of TensorRT's own parser (which takes Conv weights as tensors since TensorRT 8.5)."""
    from sdrt.export.profiles import custom_profile
    from sdrt.export.trt_build import BuildOptions, build_engines

    m, folder = models["sd15-tiny"], slotted_export("sd15-tiny", slots)
    sets = _sets(m, tmp_path, slots, (14, 15))
    out = tmp_path / "engines"
    manifest = build_engines(folder, out, custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96"),
                             BuildOptions(workspace_gb=1))
    unet = next(r for r in manifest.engines if r.component == "unet")
    slot = next(s for s in unet.shapes if s.name.endswith("attn1.to_q.down"))
    assert slot.min == slot.max == (8, slot.min[1])
    if slots.endswith("conv"):
        conv = next(s for s in unet.shapes if s.name == "lora.down_blocks.0.resnets.0.conv1.down")
        assert conv.min == conv.max == (8, 32, 3, 3)
    wants = [_sdrt(folder, s) for s in sets]
    with Pipeline.load(out, backend="tensorrt") as pipe:
        for s, want in zip(sets, wants):
            got = pipe(PROMPT, latents=_latents(), loras=s, **KW)
            assert got.loop == "captured CUDA graphs"
            assert int(np.abs(np.asarray(got.images[0]).astype(np.int32) - want).max()) <= 1


def test_the_slots_benchmark_runs_onnxruntimes_adapter_beside_plain_inputs(slotted_export, tiny_export,
                                                                            tmp_path: Path) -> None:
    """``python -m sdrt.benchmarks.lora_slots`` on ort-cpu, on an export with convolution slots too: the plain UNet,
    the slotted one without and with a LoCon, and the same factors as an ``onnxruntime.LoraAdapter`` made active per
    run, which computes what the factors fed as inputs compute. Times are recorded, not judged; the host's other
    work meanwhile is recorded beside them."""
    import json

    from sdrt.benchmarks import lora_slots

    out = tmp_path / "slots.json"
    assert lora_slots.main(["--plain", str(tiny_export("sd15-tiny", "fp32")), "--slotted",
                            str(slotted_export("sd15-tiny", "8:attn-ff-conv")), "--size", "64", "--repeats", "1",
                            "--lora-rank", "4", "--backends", "ort-cpu", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert 0 < doc["conv_slots"] < doc["slots"]
    host = next(r for r in rows if r["config"] == "host")
    assert host["other_cpu"] is None or host["busy"] == (host["other_cpu"] > 0.1)
    configs = [r["config"] for r in rows]
    assert configs[:4] == ["plain", "slotted, no LoRA", "slotted, one LoRA (rank 4)",
                           "slotted, one LoRA (rank 4, ORT LoraAdapter)"]
    adapter = next(r for r in rows if r["config"] == "ORT LoraAdapter: write + load")
    assert adapter["max_abs_diff_vs_inputs"] <= 1e-5 and adapter["switch_ms"] > 0
    assert all(len(r["unet_ms"]) == 1 for r in rows[:4])
