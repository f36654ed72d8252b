"""SDXL base + refiner (an ensemble of expert denoisers), and the refiner as img2img, against diffusers.

References: diffusers' StableDiffusionXLPipeline(denoising_end=f, output_type="latent") followed by
StableDiffusionXLImg2ImgPipeline(denoising_start=f, image=latents) on the same synthetic weights (the tiny
base and refiner, fp32) and initial latents; StableDiffusionXLImg2ImgPipeline for the refiner alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.export.loading import random_model
from sdrt.runtime.errors import InputError
from sdrt.runtime.pipeline import GenerationRequest, Pipeline

from .helpers.pipelines import module_cache

BASE, REFINER = "sdxl-tiny", "sdxl-refiner-tiny"
PROMPT = "a lighthouse on a cliff at dawn, oil painting"


def _scheduler(sampler: str, config: dict):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if sampler == "dpmpp-2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    return EulerDiscreteScheduler.from_config(config)


_REF: dict[str, object] = module_cache({})


def _diffusers(folder_base: Path, folder_refiner: Path):
    if not _REF:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
        from transformers import CLIPTokenizer

        b, r = random_model(BASE), random_model(REFINER)
        base = StableDiffusionXLPipeline(
            vae=b.vae, text_encoder=b.text_encoders[0], text_encoder_2=b.text_encoders[1],
            tokenizer=CLIPTokenizer.from_pretrained(folder_base / "tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(folder_base / "tokenizer_2"), unet=b.unet,
            scheduler=_scheduler("euler", b.scheduler_config), force_zeros_for_empty_prompt=True)
        refiner = StableDiffusionXLImg2ImgPipeline(
            vae=r.vae, text_encoder=None, text_encoder_2=r.text_encoders[0], tokenizer=None,
            tokenizer_2=CLIPTokenizer.from_pretrained(folder_refiner / "tokenizer_2"), unet=r.unet,
            scheduler=_scheduler("euler", r.scheduler_config), requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False)
        for p in (base, refiner):
            p.set_progress_bar_config(disable=True)
        _REF.update(base=base, refiner=refiner, base_cfg=b.scheduler_config, refiner_cfg=r.scheduler_config)
    return _REF


@pytest.fixture(scope="module")
def folders(tiny_export) -> tuple[Path, Path]:
    return tiny_export(BASE), tiny_export(REFINER)


@pytest.fixture(scope="module")
def pipes(folders):
    with Pipeline.load(folders[0], backend="ort-cpu") as base, Pipeline.load(folders[1], backend="ort-cpu") as ref:
        yield base, ref


def _u8(images) -> np.ndarray:
    return np.stack([np.asarray(i) for i in images]).astype(np.int32)


@pytest.mark.parametrize(("sampler", "fraction", "steps"), [("euler", 0.8, 10), ("euler", 0.6, 8),
                                                           ("dpmpp-2m", 0.8, 10), ("dpmpp-2m", 0.7, 9)])
def test_base_then_refiner_matches_diffusers(folders, pipes, sampler: str, fraction: float, steps: int) -> None:
    ref = _diffusers(*folders)
    ref["base"].scheduler = _scheduler(sampler, ref["base_cfg"])
    ref["refiner"].scheduler = _scheduler(sampler, ref["refiner_cfg"])
    height, width = 64, 80
    latents = np.random.default_rng(5).standard_normal((1, 4, height // 8, width // 8), dtype=np.float32)
    kw = {"negative_prompt": "blurry", "height": height, "width": width, "num_inference_steps": steps,
          "guidance_scale": 6.0}
    with torch.no_grad():
        handoff = ref["base"](PROMPT, latents=torch.from_numpy(latents), denoising_end=fraction,
                              output_type="latent", **kw).images
        kw.pop("height"), kw.pop("width")
        want = ref["refiner"](PROMPT, image=handoff, denoising_start=fraction, output_type="np", **kw).images
    base, refiner = pipes
    res = base(PROMPT, negative_prompt="blurry", height=height, width=width, steps=steps, guidance_scale=6.0,
               sampler=sampler, latents=latents, refiner=refiner, refiner_start=fraction)
    got = _u8(res.images)
    want_u8 = (want * 255).round().astype(np.int32)
    assert got.shape == want_u8.shape == (1, height, width, 3)
    diff = np.abs(got - want_u8).max()
    assert diff <= 1, f"{sampler} at {fraction}: {diff}/255"
    assert want_u8.std() > 5
    cut = int(np.sum(base.plan(sampler, steps).timesteps >= round(1000 * (1 - fraction))))
    assert len(res.timings["base_steps_ms"]) == cut and len(res.timings["refiner_steps_ms"]) == steps - cut
    assert res.timings["clock"] == "host"  # ort-cpu: the synchronized host clock
    assert res.loop == (f"base {cut} steps: engines run step by step; refiner {steps - cut} steps (from "
                        f"{fraction} of the schedule): engines run step by step")


def _img2img_reference(folders, monkeypatch, strength: float, steps: int, scores: tuple[float, float]):
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as mod
    from PIL import Image

    real = mod.retrieve_latents  # sdrt's img2img starts from the latent mean: make diffusers do the same
    monkeypatch.setattr(mod, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": real(out, generator, "argmax"))
    ref = _diffusers(*folders)
    ref["refiner"].scheduler = _scheduler("euler", ref["refiner_cfg"])
    init = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    noise = torch.randn((1, 4, 8, 12), generator=torch.Generator().manual_seed(11))  # diffusers' first draw
    with torch.no_grad():
        want = ref["refiner"](PROMPT, image=init, strength=strength, num_inference_steps=steps, guidance_scale=5.0,
                              generator=torch.Generator().manual_seed(11), aesthetic_score=scores[0],
                              negative_aesthetic_score=scores[1], output_type="np").images
    return init, noise.numpy(), (want * 255).round().astype(np.int32)


@pytest.mark.parametrize("scores", [(6.0, 2.5), (3.0, 8.0)])
def test_refiner_as_img2img_matches_diffusers(folders, pipes, monkeypatch, scores) -> None:
    """The refiner alone on an image, strength 0.3, with the default and with changed aesthetic scores."""
    init, noise, want = _img2img_reference(folders, monkeypatch, 0.3, 10, scores)
    _, refiner = pipes
    kw = {} if scores == (6.0, 2.5) else {"aesthetic_score": scores[0], "negative_aesthetic_score": scores[1]}
    res = refiner(PROMPT, image=init, strength=0.3, steps=10, guidance_scale=5.0, sampler="euler", latents=noise,
                  **kw)
    diff = np.abs(_u8(res.images) - want).max()
    assert diff <= 1, f"refiner img2img {scores}: {diff}/255"
    assert len(res.timings["unet_steps_ms"]) == 3


def test_aesthetic_scores_change_the_image(pipes) -> None:
    from PIL import Image

    _, refiner = pipes
    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kw = {"image": init, "strength": 0.5, "steps": 6, "sampler": "euler", "seed": 1, "guidance_scale": 5.0}
    a = _u8(refiner(PROMPT, **kw).images)
    b = _u8(refiner(PROMPT, aesthetic_score=1.0, negative_aesthetic_score=9.0, **kw).images)
    assert np.abs(a - b).max() > 2
    for bad in (-1.0, 11.0, float("nan"), "6"):
        with pytest.raises(InputError, match="aesthetic_score must be a number from 0 to 10"):
            refiner(PROMPT, aesthetic_score=bad, **kw)


def test_refiner_manifest_and_graph_contract(folders, pipes) -> None:
    import json

    data = json.loads((folders[1] / "sdrt.json").read_text())
    assert data["refiner"] is True and data["family"] == "sdxl" and data["latent_scaling"] == pytest.approx(0.13025)
    assert set(data["components"]) == {"text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    unet_inputs = {t["name"]: t["shape"] for t in data["components"]["unet"]["inputs"]}
    assert unet_inputs["time_ids"] == ["batch", 5] and unet_inputs["encoder_hidden_states"][-1] == 32
    assert sorted(p.name for p in folders[1].iterdir() if p.is_dir()) == [
        "scheduler", "text_encoder_2", "tokenizer_2", "unet", "vae_decoder", "vae_encoder"]
    index = json.loads((folders[1] / "model_index.json").read_text())
    assert index["requires_aesthetics_score"] is True and "text_encoder" not in index
    # a manifest written before refiners existed still loads, as a base model
    from sdrt.runtime.manifest import ExportManifest

    old = json.loads((folders[0] / "sdrt.json").read_text())
    old.pop("refiner"), old.pop("latent_scaling")
    m = ExportManifest.from_dict(old)
    assert m.refiner is False and m.latent_scaling is None and m.encoder_names == ("text_encoder", "text_encoder_2")


def test_refiner_detected_in_a_diffusers_folder(folders, tmp_path) -> None:
    import json

    from sdrt.export.exporter import component_specs
    from sdrt.export.loading import load_model

    ref = _diffusers(*folders)["refiner"]
    ref.save_pretrained(tmp_path / "refiner")
    index = json.loads((tmp_path / "refiner" / "model_index.json").read_text())
    assert index["requires_aesthetics_score"] is True and index["text_encoder"] == [None, None]
    for strip in (False, True):  # by the config flag; without it, by the missing first encoder
        if strip:
            del index["requires_aesthetics_score"]
            (tmp_path / "refiner" / "model_index.json").write_text(json.dumps(index))
        m = load_model(tmp_path / "refiner")
        assert m.preset.refiner and m.preset.family == "sdxl" and len(m.text_encoders) == 1
        assert m.preset.encoder_names == ("text_encoder_2",)
        torch.testing.assert_close(m.unet.state_dict()["add_embedding.linear_1.weight"],
                                   ref.unet.state_dict()["add_embedding.linear_1.weight"])
        specs = {s.name: s for s in component_specs(m)}
        assert "text_encoder" not in specs and {n: sh for n, _, sh in specs["unet"].inputs}["time_ids"] == (
            "batch", 5)


def test_refiner_detected_in_a_single_file(tmp_path) -> None:
    from sdrt.export.loading import load_model

    from .helpers.ldm_layout import write_ldm_checkpoint

    src = random_model(REFINER)
    sd = write_ldm_checkpoint(src, tmp_path / "refiner.safetensors")
    assert "conditioner.embedders.0.model.token_embedding.weight" in sd
    assert not any(k.startswith("conditioner.embedders.1.") for k in sd)
    assert sd["model.diffusion_model.label_emb.0.0.weight"].shape[1] == 5 * 8 + 32
    m = load_model(tmp_path / "refiner.safetensors")
    assert m.preset.name == REFINER and m.preset.refiner
    for got, want in ((m.unet, src.unet), (m.text_encoders[0], src.text_encoders[0]), (m.vae, src.vae)):
        g, w = got.state_dict(), want.state_dict()
        assert set(g) == set(w)
        for k in w:
            torch.testing.assert_close(g[k], w[k], msg=k)


MiB = 2**20


def _peak_tracker(cudart) -> list[int]:
    """Record the fake device's peak of live bytes. Before each allocation the queued work runs, frees
    included: a stream-ordered allocator reuses memory freed earlier on the same stream."""
    peak = [0]
    malloc = cudart.cudaMallocAsync

    def tracked(n, stream):
        cudart._drain()
        res = malloc(n, stream)
        peak[0] = max(peak[0], sum(cudart.live.values()))
        return res

    cudart.cudaMallocAsync = tracked
    return peak


def _build_pair(tiny_export, tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """Engine folders of the tiny base and refiner on the fake builder; each engine's scratch need is large
    (base 8 MiB, refiner 24 MiB) so that it dominates the I/O buffers (a few KiB at this size)."""
    from sdrt.export.profiles import custom_profile
    from sdrt.export.trt_build import BuildOptions, build_engines

    from .helpers import trt_fakes

    real = trt_fakes.fake_plan
    need = {"scratch": 0}
    monkeypatch.setattr(trt_fakes, "fake_plan", lambda model, scratch=0, profile=None: real(
        model, scratch=need["scratch"], profile=profile))
    out = {}
    for name, preset, scratch in (("base", BASE, 8 * MiB), ("refiner", REFINER, 24 * MiB)):
        need["scratch"] = scratch
        out[name] = tmp_path / name
        build_engines(tiny_export(preset), out[name], custom_profile(batch="1:1:2", height="64:64:96",
                                                                     width="64:80:96"), BuildOptions())
    return out["base"], out["refiner"]


def test_base_and_refiner_share_one_scratch_block_on_tensorrt(tiny_export, tmp_path, monkeypatch,
                                                              fake_gpu) -> None:
    """Logic check on the TensorRT fakes: with share_with, the refiner joins the base's device, stream and
    scratch block. Peak device memory of base + refiner is one scratch block (the larger, 24 MiB) plus the
    I/O buffers, not two blocks; without sharing it is both blocks. The images equal ort-cpu's."""
    cudart, _ = fake_gpu
    base_dir, ref_dir = _build_pair(tiny_export, tmp_path, monkeypatch)
    kw = {"negative_prompt": "blurry", "steps": 6, "sampler": "euler", "seed": 2, "height": 64, "width": 80,
          "guidance_scale": 6.0, "refiner_start": 0.7}

    peak = _peak_tracker(cudart)
    base = Pipeline.load(base_dir, backend="tensorrt")
    refiner = Pipeline.load(ref_dir, backend="tensorrt", share_with=base)
    assert refiner.backend.scratch is base.backend.scratch and base.backend.scratch.size == 24 * MiB
    got = base(PROMPT, refiner=refiner, **kw)
    shared_peak = peak[0]
    scratch_blocks = [n for n in cudart.live.values() if n >= 8 * MiB]
    assert scratch_blocks == [24 * MiB]  # one block, the larger need
    assert 24 * MiB <= shared_peak < 24 * MiB + 1 * MiB, shared_peak / MiB
    refiner.close()
    assert base.backend.scratch.size == 24 * MiB and not base.closed  # the base keeps running
    again = base(PROMPT, steps=3, seed=1, height=64, width=80)
    assert len(again.images) == 1
    base.close()
    assert cudart.alive() == {"allocations": 0, "streams": 0, "graphs": 0, "events": 0}

    peak[0] = 0
    with Pipeline.load(base_dir, backend="tensorrt") as b2, Pipeline.load(ref_dir, backend="tensorrt") as r2:
        b2(PROMPT, refiner=r2, **kw)
        assert peak[0] >= (24 + 8) * MiB  # two backends, two blocks

    with Pipeline.load(tiny_export(BASE), backend="ort-cpu") as b3, \
            Pipeline.load(tiny_export(REFINER), backend="ort-cpu") as r3:
        want = b3(PROMPT, refiner=r3, **kw)
    assert np.abs(_u8(got.images) - _u8(want.images)).max() <= 1 and _u8(want.images).std() > 1


@pytest.fixture
def no_engine_runs(monkeypatch):
    """Counts engine runs: a refused call must refuse before any."""
    from sdrt.runtime.engine import Engine

    runs = [0]
    real = Engine.__call__

    def counted(self, feeds):
        runs[0] += 1
        return real(self, feeds)

    monkeypatch.setattr(Engine, "__call__", counted)
    return runs


def test_refiner_start_outside_the_schedule_is_refused(pipes, no_engine_runs) -> None:
    base, refiner = pipes
    for bad in (0, 0.0, 1, 1.0, 1.5, -0.2, float("nan"), True, "0.8"):
        with pytest.raises(InputError, match=r"refiner_start .* is outside \(0, 1\)"):
            base(PROMPT, refiner=refiner, refiner_start=bad, steps=4, height=64, width=64)
    with pytest.raises(InputError, match="leaves the base 0 and the refiner 4 of the 4 steps"):
        base(PROMPT, refiner=refiner, refiner_start=0.05, steps=4, height=64, width=64)
    with pytest.raises(InputError, match="refiner_start needs a refiner"):
        base(PROMPT, refiner_start=0.8, steps=4)
    with pytest.raises(InputError, match=r"reference_image conditions an editing model .* ensemble \(SDXL\)"):
        base(PROMPT, refiner=refiner, reference_image=np.zeros((64, 64, 3), np.uint8), steps=4, height=64, width=64)
    assert no_engine_runs[0] == 0


def test_refiner_as_base_and_base_as_refiner_are_refused(pipes, no_engine_runs) -> None:
    from sdrt.runtime.refiner import refine

    base, refiner = pipes
    with pytest.raises(InputError, match="is an SDXL refiner: it refines, it does not generate from noise"):
        refiner(PROMPT, steps=4)
    with pytest.raises(InputError, match="is an SDXL refiner, passed as the base model"):
        refine(refiner, base, GenerationRequest(PROMPT, steps=4))
    with pytest.raises(InputError, match=r"\(sdxl-tiny\) is not an SDXL refiner"):
        base(PROMPT, refiner=base, steps=4)
    with pytest.raises(InputError, match="aesthetic_score and negative_aesthetic_score condition an SDXL refiner"):
        base(PROMPT, aesthetic_score=6.0, steps=4)
    assert no_engine_runs[0] == 0


def test_a_refiner_of_another_family_or_latent_format_is_refused(tiny_export, pipes, tmp_path,
                                                                  no_engine_runs) -> None:
    import json
    import shutil

    base, _ = pipes
    latent_format = r"uses another latent format .* scaling 0.18215, against 4 at 1/8, scaling 0.13025"
    with Pipeline.load(tiny_export("sd15-tiny"), backend="ort-cpu") as sd15, \
            pytest.raises(InputError, match=latent_format):
        base(PROMPT, refiner=sd15, steps=4)
    # a refiner of a larger family: its second encoder is 64 wide (the manifest records the graphs' widths)
    wide = tmp_path / "wide-refiner"
    shutil.copytree(tiny_export(REFINER), wide)
    data = json.loads((wide / "sdrt.json").read_text())
    for t in data["components"]["text_encoder_2"]["outputs"]:
        t["shape"][-1] = 64
    (wide / "sdrt.json").write_text(json.dumps(data))
    family = "text encoder width of 64, the base .* 32 on its second encoder: they are of different model families"
    with Pipeline.load(wide, backend="ort-cpu") as other, pytest.raises(InputError, match=family):
        base(PROMPT, refiner=other, steps=4)
    assert no_engine_runs[0] == 0


def test_cli_generate_with_a_refiner(folders, tmp_path, capsys) -> None:
    from sdrt.cli import main

    base_dir, ref_dir = (str(f) for f in folders)
    out = tmp_path / "x.png"
    args = ["--prompt", PROMPT, "--steps", "5", "--seed", "4", "--height", "64", "--width", "80", "--backend",
            "ort-cpu", "--sampler", "euler"]
    assert main(["generate", base_dir, "--refiner", ref_dir, "--refiner-start", "0.6", "--aesthetic-score", "7",
                 *args, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "refiner sdxl-refiner-tiny" in printed and "denoising, base (3 steps)" in printed
    assert "denoising, refiner (2 steps)" in printed
    with Pipeline.load(folders[0], backend="ort-cpu") as b, Pipeline.load(folders[1], backend="ort-cpu") as r:
        want = b(PROMPT, refiner=r, refiner_start=0.6, aesthetic_score=7.0, steps=5, seed=4, height=64, width=80,
                 sampler="euler")
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want.images[0]))
    bad = tmp_path / "no.png"
    assert main(["generate", base_dir, "--refiner", ref_dir, "--refiner-start", "1.5", *args, "-o", str(bad)]) == 1
    assert "--refiner-start 1.5 is outside (0, 1)" in capsys.readouterr().err
    assert main(["generate", ref_dir, *args, "-o", str(bad)]) == 1
    assert "this folder as --refiner" in capsys.readouterr().err
    assert main(["generate", base_dir, "--refiner", base_dir, *args, "-o", str(bad)]) == 1
    assert "is not an SDXL refiner; pass a refiner export, or leave --refiner out" in capsys.readouterr().err
    assert main(["generate", base_dir, "--refiner-start", "0.8", *args, "-o", str(bad)]) == 1
    assert "--refiner-start needs a refiner" in capsys.readouterr().err
    assert not bad.exists()


def test_stages_composed_by_hand_equal_the_call(pipes) -> None:
    """The README's hand-composed hand-off (public stages only) gives the call's image."""
    base, refiner = pipes
    whole = base(PROMPT, steps=8, sampler="dpmpp-2m", seed=3, height=64, width=80, refiner=refiner,
                 refiner_start=0.8)
    emb = base.encode_prompt(PROMPT, guided=True)
    plan = base.plan("dpmpp-2m", 8)
    lat = base.denoise(emb, base.prepare_latents(plan, 64, 80, seed=3), plan, end=0.8)
    rplan = refiner.plan("dpmpp-2m", 8)
    rplan = refiner.plan("dpmpp-2m", 8, fresh_from=int((rplan.timesteps >= round(1000 * (1 - 0.8))).sum()))
    rlat = refiner.latents_from(lat, base)
    assert rlat.x0 is None and lat.x0 is not None  # the multistep history stays with the base
    rlat = refiner.denoise(refiner.encode_prompt(PROMPT, guided=True), rlat, rplan, start=0.8)
    images, nonfinite = refiner.decode(rlat)
    assert nonfinite == [False] and np.array_equal(np.asarray(images[0]), np.asarray(whole.images[0]))


def test_a_crop_box_goes_with_the_latents_to_the_refiner(pipes) -> None:
    """Latents prepared with ``padding_mask_crop`` keep their box when the refiner takes them over: its decode
    pastes the pictures back into the original (the original's size, untouched outside the box), as the base's
    decode of the same latents does."""
    from PIL import Image

    base, refiner = pipes
    rng = np.random.default_rng(5)
    original = Image.fromarray(rng.integers(0, 256, (96, 112, 3), dtype=np.uint8))
    mask = np.zeros((96, 112), np.uint8)
    mask[30:50, 40:70] = 255
    plan = base.plan("dpmpp-2m", 4, strength=0.6)
    lat = base.prepare_latents(plan, 64, 64, seed=1, image=original, mask_image=Image.fromarray(mask),
                               padding_mask_crop=4)
    rlat = refiner.latents_from(lat, base)
    assert rlat.crop is lat.crop is not None
    (from_base,), _ = base.decode(lat)
    (from_refiner,), _ = refiner.decode(rlat)
    for im in (from_base, from_refiner):
        assert im.size == original.size
        outside = np.ones((96, 112), bool)
        x1, y1, x2, y2 = lat.crop.box
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(np.asarray(im)[outside], np.asarray(original)[outside])


def test_base_and_refiner_are_timed_on_the_base_backends_clock_on_tensorrt(tiny_export, tmp_path, monkeypatch,
                                                                          fake_gpu) -> None:
    """Logic check on the TensorRT fakes: every stage of a base + refiner call (both text encoders, both
    models' steps, the decode) is timed by CUDA events on the shared stream (the fake device advances 0.25 ms
    per queued operation), the result says so, and Result.loop says how each model's loop ran, a capture
    fallback's reason included."""
    from .helpers.trt_fakes import refuse_enqueue_in_capture

    cudart, _ = fake_gpu
    base_dir, ref_dir = _build_pair(tiny_export, tmp_path, monkeypatch)
    elapsed: list[float] = []
    read = cudart.cudaEventElapsedTime

    def recorded(start, end):
        res = read(start, end)
        elapsed.append(res[1])
        return res

    cudart.cudaEventElapsedTime = recorded
    kw = {"steps": 6, "sampler": "euler", "seed": 2, "height": 64, "guidance_scale": 6.0, "refiner_start": 0.7}
    with Pipeline.load(base_dir, backend="tensorrt") as base, \
            Pipeline.load(ref_dir, backend="tensorrt", share_with=base) as refiner:
        cut = int(np.sum(base.plan("euler", 6).timesteps >= round(1000 * (1 - 0.7))))
        res = base(PROMPT, refiner=refiner, width=80, **kw)
        t = res.timings
        assert t["clock"] == "device"
        # the clock's intervals, in order: base text, latents, base set-up, base steps, refiner text,
        # hand-off + refiner set-up, refiner steps, decode
        assert len(elapsed) == 3 + cut + 2 + (6 - cut) + 1
        assert t["base_text_encoder_ms"] == elapsed[0] and t["base_steps_ms"] == elapsed[3:3 + cut]
        assert t["refiner_text_encoder_ms"] == elapsed[3 + cut] and t["refiner_steps_ms"] == elapsed[5 + cut:-1]
        assert t["vae_decoder_ms"] == elapsed[-1] and len(t["refiner_steps_ms"]) == 6 - cut
        assert t["text_encoder_ms"] == elapsed[0] + elapsed[3 + cut]
        figures = [t["base_text_encoder_ms"], t["refiner_text_encoder_ms"], t["vae_decoder_ms"], *t["unet_steps_ms"]]
        assert all(f > 0 and (f / 0.25) == round(f / 0.25) for f in figures), figures  # device time, not host
        assert res.loop == (f"base {cut} steps: captured CUDA graphs; refiner {6 - cut} steps (from 0.7 of the "
                            "schedule): captured CUDA graphs")

        refuse_enqueue_in_capture(monkeypatch, cudart)
        fallback = base(PROMPT, refiner=refiner, width=96, **kw)  # a new size: both loops capture anew, and fail
        why = "engines run directly (CUDA graph capture failed: RuntimeError: enqueueV3: operation not permitted"
        head, tail = fallback.loop.split("; refiner ")
        assert head.startswith(f"base {cut} steps: {why}") and tail.startswith(f"{6 - cut} steps (from 0.7 of the "
                                                                              f"schedule): {why}")
        assert len(fallback.images) == 1 and fallback.timings["clock"] == "device"

    # two devices (no share_with): the base's events would not see the refiner's stream, so the host clock
    with Pipeline.load(base_dir, backend="tensorrt") as b2, Pipeline.load(ref_dir, backend="tensorrt") as r2:
        assert b2(PROMPT, refiner=r2, width=80, **kw).timings["clock"] == "host"


def test_base_and_refiner_read_compels_syntax(folders, pipes) -> None:
    """``prompt_syntax="compel"`` reaches both models: the refiner's conditioning is compel's (its one encoder's
    penultimate states and pooled projection, compel's default DownweightMode.MASK) and the call gives the image
    of the stages composed by hand with that conditioning."""
    pytest.importorskip("compel", reason="the reference for compel's syntax (pip install compel==2.5.1)")
    from compel import Compel, ReturnedEmbeddingsType
    from transformers import CLIPTokenizer

    base, refiner = pipes
    prompt = '("a lighthouse++", "a cliff at dawn-").blend(0.6, 0.4)'
    ref = Compel(tokenizer=CLIPTokenizer.from_pretrained(folders[1] / "tokenizer_2"),
                 text_encoder=random_model(REFINER).text_encoders[0].eval(), truncate_long_prompts=False,
                 returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                 requires_pooled=True)
    with torch.no_grad():
        want, want_pooled = ref(["", prompt])
    emb_r = refiner.encode_prompt(prompt, "", guided=True, prompt_syntax="compel")
    np.testing.assert_allclose(refiner.backend.to_host(emb_r.hidden), want.numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(refiner.backend.to_host(emb_r.pooled), want_pooled.numpy(), rtol=0, atol=2e-5)
    whole = base(prompt, negative_prompt="", steps=6, sampler="euler", seed=3, height=64, width=64,
                 refiner=refiner, refiner_start=0.7, prompt_syntax="compel")
    plan = base.plan("euler", 6)
    lat = base.denoise(base.encode_prompt(prompt, "", guided=True, prompt_syntax="compel"),
                       base.prepare_latents(plan, 64, 64, seed=3), plan, end=0.7)
    rplan = refiner.plan("euler", 6)
    rplan = refiner.plan("euler", 6, fresh_from=int((rplan.timesteps >= round(1000 * (1 - 0.7))).sum()))
    images, _ = refiner.decode(refiner.denoise(emb_r, refiner.latents_from(lat, base), rplan, start=0.7))
    assert np.array_equal(np.asarray(images[0]), np.asarray(whole.images[0]))


def test_an_allocation_failure_in_the_refiner_names_the_request_and_what_to_lower(pipes, monkeypatch) -> None:
    """A DeviceMemoryError from the refiner's UNet comes out of a base + refiner call as a single call's does:
    the request, a rough need from the refiner's sizes, and what to lower."""
    from sdrt.runtime.errors import DeviceMemoryError

    base, refiner = pipes

    def full(feeds):
        raise DeviceMemoryError("unet: out of memory")

    monkeypatch.setattr(refiner.engines["unet"], "run", full)
    with pytest.raises(DeviceMemoryError) as err:
        base(PROMPT, refiner=refiner, steps=10, height=64, width=64, seed=1)
    text = str(err.value)
    assert text.startswith("64x64, 1 image, guided (the UNet runs 2 x batch rows) does not fit in ort-cpu's memory "
                           "(unet: out of memory)")
    assert "Lower height and width" in text
