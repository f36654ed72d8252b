"""``sdrt bench`` on SD 3 / 3.5 (an MMDiT model): the tiny preset end to end beside diffusers'
StableDiffusion3Pipeline on ort-cpu and openvino, the flow sampler as the default, and the floor's FLOP
count of the transformer, the three text encoders and the 16-channel VAE, checked by hand and by an
independent count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sdrt.benchmarks import schema
from sdrt.benchmarks.bench import BenchConfig, model_samplers, run_bench
from sdrt.benchmarks.flops import architecture_of_preset, count_flops, module_flops
from sdrt.cli import main
from sdrt.runtime.errors import InputError

HEIGHT, WIDTH = 64, 80  # non-square, whole 16-pixel patches: 4 x 5 image tokens


def _openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def sd3_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's folder: its result (run.json) and, in work/, the export and the baseline's diffusers
    folder."""
    return tmp_path_factory.mktemp("bench-sd3")


@pytest.fixture(scope="module")
def sd3_run(sd3_work: Path) -> dict[str, Any]:
    """The command a user types, on the tiny preset: no --samplers (the model's default), guided."""
    work = sd3_work
    out = work / "run.json"
    backends = "ort-cpu,openvino" if _openvino() else "ort-cpu"
    args = ["bench", "--preset", "sd3-tiny", "--backends", backends, "--resolutions", f"{HEIGHT}x{WIDTH}",
            "--steps", "2", "--warmup", "0", "--repeats", "1", "--rounds", "1", "--threads", "1", "--matmul-size", "128",
            "--work-dir", str(work / "work"), "--no-bf16-baseline", "-o", str(out)]
    if _openvino():
        args += ["--openvino-precision", "fp32"]  # f32 inference: the image comparison is exact-ish
    assert main(args) == 0
    return schema.load(out)


def _one(doc: dict[str, Any], backend: str) -> dict[str, Any]:
    (m,) = [m for m in doc["measurements"] if m["backend"] == backend]
    return m


def test_sd3_preset_runs_beside_diffusers_with_the_flow_sampler(sd3_run: dict[str, Any]) -> None:
    doc = sd3_run
    assert schema.problems(doc) == []
    assert doc["config"]["preset"] == "sd3-tiny" and doc["model"]["family"] == "sd3"
    assert doc["config"]["samplers"] == ["flow-euler"]  # the model's default, not the workload's dpmpp-2m
    assert doc["model"]["export_s"] is not None and "transformer" not in doc["model"]["components"]
    assert "text_encoder_3" in doc["model"]["components"]  # T5 is measured, as in the full model
    expected = {"ort-cpu", "torch-cpu"} | ({"openvino"} if _openvino() else set())
    assert {m["backend"] for m in doc["measurements"]} == expected
    base = _one(doc, "torch-cpu")
    assert "diffusers" in {b["name"]: b for b in doc["backends"]}["torch-cpu"]["versions"]
    for m in doc["measurements"]:
        assert m["status"] == "ok", m["reason"]
        assert m["sampler"] == "flow-euler" and (m["height"], m["width"]) == (HEIGHT, WIDTH)
        assert m["guided"] and m["unet_batch"] == 2 and len(m["raw"]["unet_steps_ms"][0]) == 2
        assert m["flops"] == doc["model"]["flops"][f"{HEIGHT}x{WIDTH}-b1"]
        assert m["floor_ms"]["unet_step"] > 0 and 0 < m["of_floor"]["unet_step"]
        if m is not base:
            assert m["baseline"] == "torch-cpu" and m["vs_baseline"]["its"] > 0
    # the same weights and starting latents on both sides, a deterministic sampler: the same picture
    assert _one(doc, "ort-cpu")["image_vs_baseline"]["max_abs"] <= 1
    if _openvino():
        assert _one(doc, "openvino")["image_vs_baseline"]["max_abs"] <= 2


def test_sd3_run_records_the_floor_of_every_encoder(sd3_run: dict[str, Any]) -> None:
    flops = module_flops(architecture_of_preset("sd3-tiny"), HEIGHT, WIDTH, 1, guided=True)
    assert sd3_run["model"]["flops"][f"{HEIGHT}x{WIDTH}-b1"] == flops
    (ceiling,) = sd3_run["ceilings"]
    m = _one(sd3_run, "ort-cpu")
    floor = flops["text_encoder"] / (ceiling["tflops"] * 1e12) * 1e3
    assert m["floor_ms"]["text_encoder"] == pytest.approx(floor)


def test_flops_from_the_baseline_folder_and_without_t5(sd3_run: dict[str, Any], sd3_work: Path) -> None:
    """The architecture read from a diffusers SD3 folder's config.json files (the run's baseline folder)
    counts as the preset's; an export without T5 drops T5's FLOPs from the text stage, and the transformer
    still takes 77 + 256 tokens (zeros in T5's place)."""
    from sdrt.benchmarks.flops import architecture_of_folder

    (folder,) = (sd3_work / "work").glob("diffusers-sd3-tiny-*")
    full = module_flops(architecture_of_preset("sd3-tiny"), HEIGHT, WIDTH, 1, guided=True)
    assert module_flops(architecture_of_folder(folder, "sd3"), HEIGHT, WIDTH, 1, guided=True) == full
    clips = ("text_encoder", "text_encoder_2")
    for arch in (architecture_of_folder(folder, "sd3", encoders=clips),
                 architecture_of_preset("sd3-tiny", clips)):
        no_t5 = module_flops(arch, HEIGHT, WIDTH, 1, guided=True)
        assert no_t5["unet_step"] == full["unet_step"] and no_t5["vae_decoder"] == full["vae_decoder"]
        assert 0 < no_t5["text_encoder"] < full["text_encoder"]


def test_mmdit_step_flops_by_hand() -> None:
    """The sd3-tiny transformer's step, every matrix product written out: 2 FLOPs per multiply-add of each
    linear layer (rows x in x out), the patch convolution, and the joint attention's two matmuls over the
    image and text tokens together. Batch 1 guided: 2 rows; 64 x 80 pixels: 4 x 5 = 20 image tokens; 77 + 256
    text tokens."""
    rows, dim, heads, head_dim, joint, pooled, layers = 2, 16, 2, 8, 48, 32, 2
    n_img, n_txt = (HEIGHT // 16) * (WIDTH // 16), 77 + 256
    seq = n_img + n_txt

    def lin(m: int, k: int, n: int) -> int:
        return 2 * m * k * n

    total = 2 * rows * n_img * 16 * (16 * 2 * 2)  # patch embedding: Conv2d(16, 16, kernel 2, stride 2)
    total += lin(rows, 256, dim) + lin(rows, dim, dim)  # timestep embedding (256 sinusoids, two linears)
    total += lin(rows, pooled, dim) + lin(rows, dim, dim)  # pooled text projection
    total += lin(rows * n_txt, joint, dim)  # context embedder
    for i in range(layers):
        last = i == layers - 1  # the last block's context stream only feeds attention (context_pre_only)
        # adaLN modulations: 6 x dim for the image stream, for the context 6 x (2 x in the last block)
        total += lin(rows, dim, 6 * dim) + lin(rows, dim, (2 if last else 6) * dim)
        total += 3 * lin(rows * n_img, dim, dim) + 3 * lin(rows * n_txt, dim, dim)  # q, k, v of both streams
        total += 2 * (2 * rows * heads * seq * seq * head_dim)  # Q K^T and P V over the joint sequence
        total += lin(rows * n_img, dim, dim)  # output projections
        total += 2 * lin(rows * n_img, dim, 4 * dim)  # feed-forward: dim -> 4 dim -> dim
        if not last:
            total += lin(rows * n_txt, dim, dim) + 2 * lin(rows * n_txt, dim, 4 * dim)  # the context's
    total += lin(rows, dim, 2 * dim)  # the final adaLN
    total += lin(rows * n_img, dim, 2 * 2 * 16)  # the projection back to 2 x 2 patches of 16 channels
    counted = module_flops(architecture_of_preset("sd3-tiny"), HEIGHT, WIDTH, 1, guided=True)
    assert counted["unet_step"] == total


@pytest.mark.parametrize("preset", ["sd3-tiny", "sd35-medium-tiny"])
def test_sd3_flops_match_an_independent_count_on_the_real_modules(preset: str) -> None:
    """The bench counts on meta-device modules built from the preset's configs; here the real seeded modules
    run (the math attention kernel: the fused CPU one has no FLOP formula) and are counted."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sdrt.export.sd3_presets import build_modules, get_sd3_preset

    p = get_sd3_preset(preset)
    mods = build_modules(p, seed=0)
    clip_l, clip_g, t5 = mods.text_encoders
    assert t5 is not None
    tr = p.transformer
    h, w = HEIGHT // 8, WIDTH // 8
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        text = sum(count_flops(lambda enc=enc, n=n: enc(torch.zeros(2, n, dtype=torch.long)))[0]
                   for enc, n in ((clip_l, 77), (clip_g, 77), (t5, p.t5_tokens)))
        step = count_flops(lambda: mods.transformer(
            hidden_states=torch.randn(2, 16, h, w),
            encoder_hidden_states=torch.randn(2, 77 + 256, tr["joint_attention_dim"]),
            pooled_projections=torch.randn(2, tr["pooled_projection_dim"]),
            timestep=torch.tensor([500.0, 500.0])))[0]
        decoder = count_flops(lambda: mods.vae.decode(torch.randn(1, 16, h, w)))[0]
    assert module_flops(architecture_of_preset(preset), HEIGHT, WIDTH, 1, guided=True) == {
        "text_encoder": text, "unet_step": step, "vae_decoder": decoder}


def test_full_size_sd35_medium_flops_are_counted_on_meta() -> None:
    """The full architecture is counted without weights: the transformer at 512 px, guided, is about 4.9
    TFLOP (2.5B parameters over 2 x (1024 + 333) tokens, the adaLN modulations per row only, plus attention);
    T5-XXL over 2 x 256 tokens about 4.8 TFLOP."""
    f = module_flops(architecture_of_preset("sd35-medium"), 512, 512, 1, guided=True)
    assert 4.5e12 < f["unet_step"] < 5.3e12
    assert 4.5e12 < f["text_encoder"] < 5.5e12
    unguided = module_flops(architecture_of_preset("sd35-medium"), 512, 512, 1, guided=False)
    assert unguided["unet_step"] * 2 == f["unet_step"] and unguided["vae_decoder"] == f["vae_decoder"]


def test_flow_model_samplers_default_and_refusal(tmp_path: Path) -> None:
    assert model_samplers(BenchConfig(preset="sd3-tiny")) == ("flow-euler",)
    assert model_samplers(BenchConfig(preset="sd15-tiny")) == ("dpmpp-2m",)
    asked = BenchConfig(preset="sd35-medium", samplers=("flow-dpmpp-2m",))
    assert model_samplers(asked) == ("flow-dpmpp-2m",)
    cfg = BenchConfig(preset="sd3-tiny", samplers=("dpmpp-2m",), backends=("ort-cpu",),
                      work_dir=str(tmp_path))
    with pytest.raises(InputError, match="'dpmpp-2m' does not serve sd3-tiny.*flow-euler, flow-dpmpp-2m"):
        run_bench(cfg)
    assert list(tmp_path.iterdir()) == []  # refused before any export or measurement
    with pytest.raises(InputError, match="not there yet for SD 3 / 3.5"):
        run_bench(BenchConfig(preset="sd3-tiny", workload="controlnet", backends=("ort-cpu",),
                              work_dir=str(tmp_path)))


def test_one_lookup_over_both_preset_tables() -> None:
    from sdrt.export.preset_tables import get_any_preset, is_sd3_preset, preset_names

    assert get_any_preset("sd35-medium").transformer["qk_norm"] == "rms_norm"
    assert get_any_preset("sd15-tiny").name == "sd15-tiny"
    assert is_sd3_preset("sd3-tiny") and not is_sd3_preset("sdxl-tiny")
    assert {"sd15", "sdxl-tiny", "sd3-medium", "sd35-large-turbo"} <= set(preset_names())
    with pytest.raises(InputError, match="unknown preset 'sd4'.*sd15.*sd35-medium"):
        get_any_preset("sd4")


def test_without_t5_leaves_t5_out_on_both_sides(tmp_path: Path) -> None:
    """``--without-t5``: the preset exported without T5 (the full-size 3.5 Medium's way onto a 24 GB machine)
    and diffusers run with ``text_encoder_3=None``: the same picture, and no T5 in the text stage's floor."""
    out = tmp_path / "run.json"
    assert main(["bench", "--preset", "sd3-tiny", "--without-t5", "--backends", "ort-cpu", "--resolutions",
                 f"{HEIGHT}x{WIDTH}", "--steps", "2", "--warmup", "0", "--repeats", "1", "--rounds", "1",
                 "--threads", "1", "--matmul-size", "128", "--work-dir", str(tmp_path / "work"),
                 "--no-bf16-baseline", "-o", str(out)]) == 0
    doc = schema.load(out)
    assert schema.problems(doc) == []
    assert "text_encoder_3" not in doc["model"]["components"] and doc["model"]["source"]["t5"] is False
    (folder,) = (tmp_path / "work").glob("diffusers-sd3-tiny-*")
    assert not (folder / "text_encoder_3").exists()  # the baseline leaves T5 out too
    clips = module_flops(architecture_of_preset("sd3-tiny", ("text_encoder", "text_encoder_2")), HEIGHT, WIDTH, 1,
                         guided=True)
    assert doc["model"]["flops"][f"{HEIGHT}x{WIDTH}-b1"] == clips
    m = _one(doc, "ort-cpu")
    assert m["status"] == "ok", m["reason"]
    assert m["image_vs_baseline"]["max_abs"] <= 1


def test_without_t5_refused_where_it_means_nothing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="sd15-tiny is an SD 1.x model: it has no optional T5"):
        run_bench(BenchConfig(preset="sd15-tiny", without_t5=True, backends=("ort-cpu",), work_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []  # before any export
    with pytest.raises(InputError, match="export it with `sdrt export ... --without-t5`"):
        BenchConfig(artifact=str(tmp_path), without_t5=True)
