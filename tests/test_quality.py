"""The shapes model (sdrt.quality): its data set, the score that reads pictures back, the committed weights,
and what sdrt's runtime makes of them, held to diffusers' own pipeline on the same weights and noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sdrt.quality import LORA_FILE, MODEL_DIR, score, shapes, suite

# what sdrt's fp32 images may score below the diffusers pipeline's score recorded at training: the same
# weights and noise, so they differ by float rounding only; a lost prompt or two of the 30 is the margin
MARGIN_FP32 = 2 / suite.N_PROMPTS
MARGIN_FP16 = 3 / suite.N_PROMPTS  # fp16 graphs against sdrt's fp32 images


# -- the data set ------------------------------------------------------------------------------------------

def test_the_data_set_is_seeded_and_draws_what_the_caption_says() -> None:
    a, caps = shapes.batch(5, 8)
    b, caps_b = shapes.batch(5, 8)
    assert np.array_equal(a, b) and caps == caps_b and a.shape == (8, 64, 64, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, shapes.batch(6, 8)[0])
    scene = shapes.Scene("square", "blue", "top left", "white", half=0.17)
    img = shapes.render(scene)
    # hand-computed: the square's centre at (0.28 * 64, 0.28 * 64) = (17.92, 17.92), half side 0.9 * 0.17 * 64
    assert tuple(img[18, 18]) == shapes.COLOURS["blue"]
    assert tuple(img[2, 2]) == tuple(img[60, 60]) == shapes.BACKGROUNDS["white"]
    assert tuple(img[18, 29]) == shapes.BACKGROUNDS["white"]  # 11.1 px right of the centre: outside (half 9.8)
    assert scene.caption == "a blue square at the top left on a white background"
    assert shapes.Scene("circle", "orange", "center", "gray").caption == \
        "an orange circle in the center on a gray background"


def test_captions_parse_back_and_other_text_does_not() -> None:
    for s in shapes.scenes(11, 200):
        assert shapes.parse(s.caption).attributes() == s.attributes()  # type: ignore[union-attr]
    assert shapes.parse("  A Red   Circle at the top left on a white background.") is not None
    for text in ("a cat", "a red circle", "a red circle at the center on a white background",
                 "a pink circle in the center on a white background"):
        assert shapes.parse(text) is None, text


# -- the score -----------------------------------------------------------------------------------------------

def test_the_score_reads_every_drawn_picture_right() -> None:
    """The ceiling: pictures drawn by the renderer from seeds training never used, read without a miss."""
    ceiling = suite.ceiling(n=150)
    assert ceiling.overall == 1.0 and set(ceiling.accuracy.values()) == {1.0}
    # and the size: the LoRA's large variant apart from the base's shapes
    for large in (False, True):
        scenes = shapes.scenes(31, 60, large=large)
        readings = [score.read(shapes.render(s)) for s in scenes]
        assert all(r.large == large for r in readings)
        assert all(r.attributes() == s.attributes() for r, s in zip(readings, scenes))


def test_the_score_sees_what_is_wrong() -> None:
    scene = shapes.Scene("triangle", "green", "bottom right", "black")
    reading = score.read(shapes.render(scene))
    assert reading.attributes() == scene.attributes()
    for wrong in (shapes.Scene("circle", "green", "bottom right", "black"),
                  shapes.Scene("triangle", "red", "bottom right", "black"),
                  shapes.Scene("triangle", "green", "top left", "black"),
                  shapes.Scene("triangle", "green", "bottom right", "white")):
        grades = suite.grade(scene, score.read(shapes.render(wrong)))
        assert sum(grades.values()) == 3, (wrong, grades)  # exactly the changed attribute is marked wrong
    blank = np.full((64, 64, 3), 128, np.uint8)
    nothing = score.read(blank)
    assert nothing.shape is None and nothing.background == "gray"
    assert suite.grade(scene, nothing) == {"shape": False, "colour": False, "position": False, "background": False}
    # whatever a broken setting makes (noise, flat blends, stripes), the score reads it without failing
    rng = np.random.default_rng(0)
    odd = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), np.full((64, 64, 3), 7, np.uint8),
           np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)),
           np.tile((np.arange(64) % 2 * 255).astype(np.uint8)[:, None, None], (1, 64, 3))]
    for img in odd:
        assert score.read(img).background in shapes.BACKGROUNDS
    # a picture of another size is read at the data set's
    big = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(shapes.render(scene)).resize((128, 128)))
    assert score.read(big).attributes() == scene.attributes()


def test_a_report_counts_attributes_and_whole_pictures() -> None:
    scenes = [shapes.Scene("circle", "red", "center", "white"), shapes.Scene("square", "blue", "top left", "gray")]
    images = [shapes.render(scenes[0]), shapes.render(shapes.Scene("square", "red", "top left", "gray"))]
    r = suite.report(scenes, images)
    assert r.n == 2 and r.overall == 0.5 and r.accuracy == {"shape": 1.0, "colour": 0.5, "position": 1.0,
                                                            "background": 1.0}
    assert suite.Report.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="one image per scene"):
        suite.report(scenes, images[:1])


# -- the committed model ------------------------------------------------------------------------------------

def test_the_committed_model_is_a_small_safetensors_diffusers_folder() -> None:
    from sdrt.quality import train

    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors", ".txt"}  # nothing pickled
    assert sum(p.stat().st_size for p in files) < 8 << 20
    index = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    record = json.loads((MODEL_DIR / "training.json").read_text())
    assert record["version"] == train.VERSION and record["data_seed"] == train.DATA_SEED
    assert record["diffusers_score"]["n"] == suite.N_PROMPTS


def test_the_tokenizer_gives_each_caption_word_clip_s_own_token(tmp_path: Path) -> None:
    """The model's cut-down vocabulary against transformers' CLIPTokenizer on CLIP's full one."""
    from transformers import CLIPTokenizer

    from sdrt.export.tokenizer_assets import write_clip_tokenizer

    write_clip_tokenizer(tmp_path / "clip", "<|endoftext|>")
    full = CLIPTokenizer.from_pretrained(str(tmp_path / "clip"))
    ours = CLIPTokenizer.from_pretrained(str(MODEL_DIR / "tokenizer"))
    for caption in [s.caption for s in suite.suite()]:
        assert ours.tokenize(caption) == full.tokenize(caption)


# -- sdrt on the committed model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_images(shapes_export) -> list:
    from sdrt.runtime.pipeline import Pipeline

    with Pipeline.load(shapes_export("fp32"), backend="ort-cpu") as pipe:
        return suite.images_pipeline(pipe, suite.suite())


def test_sdrt_reaches_the_score_training_recorded(fp32_images: list) -> None:
    trained = suite.Report.from_dict(json.loads((MODEL_DIR / "training.json").read_text())["diffusers_score"])
    got = suite.report(suite.suite(), fp32_images)
    assert got.overall >= trained.overall - MARGIN_FP32, (got.summary(), trained.summary())
    assert got.overall >= 0.5, got.summary()  # the model draws what is asked, most of the time


def test_sdrt_images_match_diffusers_on_the_trained_weights(fp32_images: list) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(MODEL_DIR, torch_dtype=torch.float32, local_files_only=True)
    scenes = suite.suite(4)
    want = suite.images_diffusers(ref, scenes)
    for i, w in enumerate(want):
        diff = np.abs(np.asarray(fp32_images[i], np.int16) - w.astype(np.int16))
        assert diff.max() <= 2, (i, int(diff.max()))


def test_an_fp16_export_loses_at_most_a_stated_margin(shapes_export, fp32_images: list) -> None:
    from sdrt.runtime.pipeline import Pipeline

    with Pipeline.load(shapes_export("fp16"), backend="ort-cpu") as pipe:
        fp16 = suite.report(suite.suite(), suite.images_pipeline(pipe, suite.suite()))
    fp32 = suite.report(suite.suite(), fp32_images)
    assert fp16.overall >= fp32.overall - MARGIN_FP16, (fp16.summary(), fp32.summary())


# -- the demo and sdrt bench --quality -----------------------------------------------------------------------

def test_demo_draws_the_prompt_and_scores_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from sdrt.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--backend", "ort-cpu"]) == 0
    out = capsys.readouterr().out
    img = Image.open(tmp_path / "demo" / "demo.png")
    assert img.size == (64, 64)
    asked = shapes.parse("a red circle at the top left on a white background")
    reading = score.read(img)  # the score again, on the file written
    right = sum(g for g in suite.grade(asked, reading).values())  # type: ignore[arg-type]
    assert f"score: {right} of 4 asked attributes shown" in out
    assert f"the picture shows: {reading.describe()}" in out
    assert right == 4, out  # the default prompt and seed: the demo shows a picture that matches it
    # a second run reuses the export of the same weights
    assert main(["demo", "--out", str(tmp_path / "demo"), "--backend", "ort-cpu", "--steps", "2",
                 "--prompt", "a cat"]) == 0
    out = capsys.readouterr().out
    assert f"reusing {tmp_path / 'demo' / 'shapes-onnx'}" in out and "score: none" in out


def test_bench_quality_records_every_setting_and_the_curve(tmp_path: Path) -> None:
    from sdrt.benchmarks import quality

    doc = quality.run_quality(tmp_path / "work", prompts=3, curve_steps=(1, 4), samplers=("ddim", "euler"),
                              log=lambda m: None, cache_settings=((1, "uniform"), (3, "uniform"), (3, "nonuniform")))
    by = {s["name"]: s for s in doc["settings"]}
    assert set(by) == {s.name for s in quality.SETTINGS}
    for name in ("ort-cpu fp32", "ort-cpu fp16", "openvino f32", "diffusers fp32 (PyTorch)"):
        assert by[name]["status"] == "ok" and by[name]["score"]["n"] == 3 and by[name]["s_per_image"] > 0, by[name]
    assert by["ort-cuda fp16"]["status"] == "skipped" and "GPU" in by["ort-cuda fp16"]["reason"]
    bf16 = by["openvino bf16"]
    assert bf16["status"] == "ok" or "no bf16" in bf16["reason"], bf16
    assert [(c["sampler"], c["steps"]) for c in doc["curve"]] == [("ddim", 1), ("ddim", 4), ("euler", 1),
                                                                 ("euler", 4)]
    assert doc["ceiling"]["overall"] == 1.0
    # DeepCache rows: interval 1 runs every step in full, so it scores what the uncached setting scores
    cache = {(c["interval"], c["schedule"]): c for c in doc["cache"]}
    assert cache[(1, "uniform")]["score"] == by["ort-cpu fp32"]["score"]
    assert [cache[k]["full_steps"] for k in ((1, "uniform"), (3, "uniform"), (3, "nonuniform"))] == [20, 7, 7]
    # ort-cpu fp32 at the suite's own settings scores what the suite's images score (the same computation)
    from sdrt.runtime.pipeline import Pipeline

    with Pipeline.load(tmp_path / "work" / "shapes-fp32", backend="ort-cpu") as pipe:
        assert suite.score_pipeline(pipe, n=3).to_dict() == by["ort-cpu fp32"]["score"]
    json_path, png = quality.save(doc, tmp_path / "q.json")
    assert json.loads(json_path.read_text())["schema"] == quality.SCHEMA
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = quality.text_table(doc)
    assert "ort-cuda fp16" in table and "skipped" in table and "ddim" in table and "nonuniform" in table


def test_bench_quality_refuses_what_does_not_apply_before_work(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from sdrt.cli import main

    assert main(["bench", "--quality", "--preset", "sd15-tiny", "-o", str(tmp_path / "q.json")]) == 1
    assert "--quality runs the shapes model" in capsys.readouterr().err
    assert main(["bench", "--quality", "--samplers", "heun", "-o", str(tmp_path / "q.json")]) == 1
    assert "unknown sampler 'heun'" in capsys.readouterr().err
    (tmp_path / "mine.json").write_text("{}")
    assert main(["bench", "--quality", "-o", str(tmp_path / "mine.json")]) == 1
    assert "is not an sdrt quality result" in capsys.readouterr().err
    (tmp_path / "q.png").write_text("my plot")
    assert main(["bench", "--quality", "-o", str(tmp_path / "q.json")]) == 1
    assert "q.png exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json", "q.png"]


def test_the_lora_merged_at_export_draws_what_it_was_trained_on(tmp_path: Path, fp32_images: list) -> None:
    """The LoRA's effect on the pictures, not only its arithmetic: merged by `sdrt export --lora`, sdrt on
    ort-cpu draws large shapes as often as diffusers' load_lora_weights + fuse_lora did when it was trained."""
    from sdrt.cli import main
    from sdrt.runtime.pipeline import Pipeline

    effect = json.loads(LORA_FILE.with_suffix(".json").read_text())["effect"]
    out = tmp_path / "shapes-large"
    assert main(["export", "--model", str(MODEL_DIR), "--lora", str(LORA_FILE), "--fp32", "--out", str(out)]) == 0
    with Pipeline.load(out, backend="ort-cpu") as pipe:
        styled = suite.images_pipeline(pipe, suite.suite())
    assert suite.large_share(fp32_images) == effect["large_share_without"] == 0.0
    assert suite.large_share(styled) >= effect["large_share_with"] - MARGIN_FP32
    assert effect["large_share_with"] >= 0.8  # the LoRA does what it was trained to
    with_lora = suite.report(suite.suite(), styled)
    assert with_lora.overall >= effect["score_with"]["overall"] - MARGIN_FP32, with_lora.summary()
