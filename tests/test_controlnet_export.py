"""ControlNet export: the ``controlnet_j`` graphs and ``unet_control`` against diffusers run in the test,
the manifest fields, the residual axes, and the refusals of ControlNets that do not pair."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sdrt.cli import main
from sdrt.export.controlnet_loading import check_pairing, controlnet_from_unet, random_controlnet
from sdrt.export.loading import random_model
from sdrt.runtime.errors import InputError
from sdrt.runtime.manifest import MANIFEST_NAME, ExportManifest


def _run(folder: Path, component: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(folder / component / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def _inputs(preset: str, b: int, h: int, w: int, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = random_model(preset)
    cross = int(m.unet.config.cross_attention_dim)
    x = {
        "sample": torch.randn(b, 4, h, w, generator=g),
        "timestep": torch.tensor([981.0, 21.0][:b]),
        "encoder_hidden_states": torch.randn(b, 77, cross, generator=g),
        # an edge-map-like control image: mostly black, white strokes
        "controlnet_cond": ((torch.rand(b, 8 * h, 8 * w, 3, generator=g) > 0.8) * 255).to(torch.uint8),
    }
    if preset.startswith("sdxl"):
        x["text_embeds"] = torch.randn(b, 32, generator=g)
        x["time_ids"] = torch.tensor([[512.0, 512, 0, 0, 512, 512]] * b)
    return x


def _diffusers_residuals(net: torch.nn.Module, x: dict[str, torch.Tensor], scale: torch.Tensor
                         ) -> list[torch.Tensor]:
    """diffusers' ControlNet on the control image as its image processor gives it (do_normalize=False:
    [0, 1] NCHW), each residual times its column of ``scale`` [B, R]."""
    cond = x["controlnet_cond"].permute(0, 3, 1, 2).float() / 255.0
    kw = {}
    if "text_embeds" in x:
        kw["added_cond_kwargs"] = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    with torch.no_grad():
        down, mid = net(x["sample"], x["timestep"], x["encoder_hidden_states"], cond, return_dict=False, **kw)
    return [r * scale[:, i].view(-1, 1, 1, 1) for i, r in enumerate((*down, mid))]


def _rel(a: np.ndarray, b: torch.Tensor) -> float:
    ref = b.numpy().astype(np.float64)
    return float(np.abs(a.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("preset", ["sd15-tiny", "sdxl-tiny"])
def test_controlnet_graph_matches_diffusers(tiny_controlnet_export, preset: str) -> None:
    folder = tiny_controlnet_export(preset, "fp32", 2 if preset == "sd15-tiny" else 1)
    net = random_controlnet(preset.removesuffix("-tiny") + "-controlnet-tiny", seed=1).controlnet
    # a non-square size the downsampling does not divide: residuals are ceil(h / 2^k)
    x = _inputs(preset, 2, 12, 9)
    r = len(net.controlnet_down_blocks) + 1
    assert r == (13 if preset == "sd15-tiny" else 10)
    scale = torch.tensor([[0.0] * r, [0.1 * (i + 1) for i in range(r)]])  # an uncond row off, a ramp
    ref = _diffusers_residuals(net, x, scale)
    feed = {k: v.numpy() for k, v in x.items()}
    feed["conditioning_scale"] = scale.numpy().astype(np.float32)
    out = _run(folder, "controlnet_0", feed)
    assert list(out) == [f"down_{i}" for i in range(r - 1)] + ["mid"]
    for (name, o), t in zip(out.items(), ref):
        assert o.shape == tuple(t.shape), name
        assert np.abs(o[0]).max() == 0.0  # the zero row
        assert _rel(o, t) < 1e-4, name
    # spatial sizes follow ceil(h / 2^k): 12x9 -> 6x5 -> 3x3 (-> 2x2: SD 1.5's fourth level)
    sizes = [(12, 9), (6, 5), (3, 3), (2, 2)][: len(net.config.block_out_channels)]
    assert {o.shape[2:] for o in out.values()} == set(sizes)


def test_unet_control_sums_two_nets_as_diffusers(tiny_controlnet_export) -> None:
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    model = random_model("sd15-tiny")
    nets = [random_controlnet("sd15-controlnet-tiny", seed=s).controlnet for s in (1, 2)]
    x = _inputs("sd15-tiny", 2, 10, 14, seed=3)
    r = 13
    scales = [torch.full((2, r), 0.8), torch.full((2, r), 0.5)]
    res = [_diffusers_residuals(n, x, s) for n, s in zip(nets, scales)]
    summed = [a + b for a, b in zip(*res)]
    with torch.no_grad():
        ref = model.unet(x["sample"], x["timestep"], x["encoder_hidden_states"], return_dict=False,
                         down_block_additional_residuals=tuple(summed[:-1]),
                         mid_block_additional_residual=summed[-1])[0]
        plain = model.unet(x["sample"], x["timestep"], x["encoder_hidden_states"], return_dict=False)[0]
    base = {k: x[k].numpy() for k in ("sample", "timestep", "encoder_hidden_states")}
    names = [f"down_{i}" for i in range(r - 1)] + ["mid"]
    feed = dict(base)
    for j, rj in enumerate(res):
        feed.update({f"controlnet_{j}_{n}": t.numpy() for n, t in zip(names, rj)})
    out = _run(folder, "unet_control", feed)["out_sample"]
    assert _rel(out, ref) < 1e-4
    assert _rel(out, plain) > 0.05  # the residuals matter: this is not the plain UNet's output
    # zero residuals: the plain UNet's output, and the plain graph is untouched by the ControlNets
    zero = dict(base, **{k: np.zeros_like(v) for k, v in feed.items() if k.startswith("controlnet_")})
    assert _rel(_run(folder, "unet_control", zero)["out_sample"], plain) < 1e-4
    plain_graph = _run(folder, "unet", base)["out_sample"]
    assert _rel(plain_graph, plain) < 1e-4
    sess = ort.InferenceSession(str(folder / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["sample", "timestep", "encoder_hidden_states"]


def test_manifest_lists_the_controlnets_and_their_sources(tiny_controlnet_export) -> None:
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    raw = json.loads((folder / MANIFEST_NAME).read_text())
    assert raw["controlnets"] == ["controlnet_0", "controlnet_1"]
    assert raw["source"]["controlnets"] == [{"kind": "random", "preset": "sd15-controlnet-tiny", "seed": 1},
                                            {"kind": "random", "preset": "sd15-controlnet-tiny", "seed": 2}]
    man = ExportManifest.read(folder)
    assert man.controlnets == ("controlnet_0", "controlnet_1")
    assert list(man.components) == ["text_encoder", "unet", "controlnet_0", "controlnet_1", "unet_control",
                                    "vae_decoder", "vae_encoder"]
    for name in ("controlnet_0", "controlnet_1"):
        assert (folder / name / "model.onnx").is_file()
        c = man.components[name]
        assert [t.name for t in c.inputs] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond",
                                              "conditioning_scale"]
        assert c.inputs[3].dtype == "uint8" and c.inputs[3].shape == ("batch", "image_height", "image_width", 3)
        assert c.inputs[4].dtype == "float32" and c.inputs[4].shape == ("batch", 13)
        assert c.parity is not None and c.parity.rel_err < 1e-4
    uc = man.components["unet_control"]
    assert [t.name for t in uc.inputs][:3] == ["sample", "timestep", "encoder_hidden_states"]
    assert [t.name for t in uc.inputs][3:5] == ["controlnet_0_down_0", "controlnet_0_down_1"]
    assert [t.name for t in uc.inputs][-1] == "controlnet_1_mid"
    assert len(uc.inputs) == 3 + 2 * 13
    assert uc.inputs[-1].shape == ("batch", 64, "height/8", "width/8")
    assert (folder / "unet_control" / "model.onnx_data").is_file()
    # an older manifest, without the field, still loads
    del raw["controlnets"]
    assert ExportManifest.from_dict(raw).controlnets == ()


def test_sdxl_unet_control_inputs_follow_the_plain_unet(tiny_controlnet_export) -> None:
    man = ExportManifest.read(tiny_controlnet_export("sdxl-tiny", "fp32", 1))
    plain = [t.name for t in man.components["unet"].inputs]
    uc = [t.name for t in man.components["unet_control"].inputs]
    assert plain == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert uc[:5] == plain and uc[5:] == [f"controlnet_0_down_{i}" for i in range(9)] + ["controlnet_0_mid"]
    cn = [t.name for t in man.components["controlnet_0"].inputs]
    assert cn[-2:] == ["text_embeds", "time_ids"]


def test_from_unet_controlnet_pairs_and_wrong_family_is_refused() -> None:
    sd15, sdxl = random_model("sd15-tiny"), random_model("sdxl-tiny")
    check_pairing(sd15, [controlnet_from_unet(sd15)])  # diffusers' from_unet: pairs by construction
    check_pairing(sdxl, [random_controlnet("sdxl-controlnet-tiny")])
    with pytest.raises(InputError, match=r"SDXL .*ControlNet, but the model \(sd15-tiny\) is SD 1.x"):
        check_pairing(sd15, [random_controlnet("sdxl-controlnet-tiny")])


def test_cli_refuses_an_sdxl_controlnet_with_an_sd15_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    out = tmp_path / "o"
    rc = main(["export", "--random", "sd15-tiny", "--random-controlnet", "sdxl-controlnet-tiny", "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "SDXL" in err and "sd15-tiny" in err and "trained for" in err
    assert not out.exists()


# -- loading: diffusers folders and original-layout single files ------------------------------------------

def _write_single_file(net: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    from .helpers.ldm_layout import controlnet_to_ldm

    sd = controlnet_to_ldm(net.state_dict(), dict(net.config))
    assert all(k.startswith("control_model.") for k in sd) and "control_model.input_hint_block.14.weight" in sd
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("preset", ["sd15-controlnet-tiny", "sdxl-controlnet-tiny"])
def test_single_file_loads_the_same_tensors_as_diffusers(tmp_path: Path, preset: str) -> None:
    from sdrt.export.controlnet_loading import load_controlnet

    ref = random_controlnet(preset, seed=5).controlnet
    path = _write_single_file(ref, tmp_path / "control_tiny.safetensors")
    unet = random_model(preset.replace("-controlnet", "")).unet.config
    for kw in ({}, {"unet_config": unet}):  # by the shipped presets, and by the model's UNet
        got = load_controlnet(path, **kw)
        assert got.source["kind"] == "single_file" and len(got.source["sha256"]) == 64
        sd, want = got.controlnet.state_dict(), ref.state_dict()
        assert sorted(sd) == sorted(want)
        assert all(torch.equal(sd[k], want[k]) for k in want)
        assert dict(got.controlnet.config)["conditioning_embedding_out_channels"] == [4, 8, 8, 16]


@pytest.mark.parametrize("preset", ["sd15-controlnet", "sdxl-controlnet"])
def test_full_size_original_layout_is_recognised_by_shape(preset: str) -> None:
    """The real architectures' key and shape tables (meta tensors: no memory) pick their preset."""
    from diffusers import ControlNetModel

    from sdrt.export.controlnet_presets import get_controlnet_preset
    from sdrt.export.controlnet_single_file import choose_architecture

    from .helpers.ldm_layout import controlnet_to_ldm

    cfg = get_controlnet_preset(preset).config()
    with torch.device("meta"):
        net = ControlNetModel(**cfg)
    cn = {k.removeprefix("control_model."): v for k, v in controlnet_to_ldm(net.state_dict(), cfg).items()}
    assert len(net.controlnet_down_blocks) == (12 if preset == "sd15-controlnet" else 9)
    label, chosen = choose_architecture(cn, "x.safetensors")
    assert label == preset
    assert chosen["cross_attention_dim"] == (768 if preset == "sd15-controlnet" else 2048)
    assert chosen["conditioning_embedding_out_channels"] == [16, 32, 96, 256]


@pytest.mark.slow  # about 1.5 min on 2 busy cores
def test_diffusers_folder_loads_and_exports_from_the_cli(tmp_path: Path) -> None:
    from sdrt.export.controlnet_loading import load_controlnet

    ref = random_controlnet("sd15-controlnet-tiny", seed=4).controlnet
    folder = tmp_path / "cn"
    ref.save_pretrained(folder)
    got = load_controlnet(folder).controlnet.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
    single = _write_single_file(random_controlnet("sd15-controlnet-tiny", seed=6).controlnet, tmp_path / "c.safetensors")
    out = tmp_path / "o"
    rc = main(["export", "--random", "sd15-tiny", "--controlnet", str(folder), "--controlnet", str(single),
               "--fp32", "--out", str(out)])
    assert rc == 0
    man = ExportManifest.read(out)
    assert man.controlnets == ("controlnet_0", "controlnet_1")
    assert [s["kind"] for s in man.source["controlnets"]] == ["diffusers", "single_file"]
    assert man.source["controlnets"][1]["path"] == str(single)
    # controlnet_0 is the folder's net: its graph gives that net's residuals
    x = _inputs("sd15-tiny", 1, 8, 8)
    scale = torch.ones(1, 13)
    feed = {k: v.numpy() for k, v in x.items()} | {"conditioning_scale": scale.numpy()}
    mid = _run(out, "controlnet_0", feed)["mid"]
    assert _rel(mid, _diffusers_residuals(ref, x, scale)[-1]) < 1e-4


# -- refusals ----------------------------------------------------------------------------------------

def test_block_widths_that_differ_from_the_unet_are_refused() -> None:
    from diffusers import ControlNetModel

    from sdrt.export.controlnet_loading import LoadedControlNet
    from sdrt.export.controlnet_presets import get_controlnet_preset

    cfg = get_controlnet_preset("sd15-controlnet-tiny").config()
    cfg["block_out_channels"] = [32, 32, 64, 128]
    odd = LoadedControlNet(ControlNetModel(**cfg), {"kind": "test"}, "odd")
    with pytest.raises(InputError, match=r"block widths \[32, 32, 64, 128\] in the ControlNet, \[32, 32, 64, 64\] in the UNet"):
        check_pairing(random_model("sd15-tiny"), [odd])


def test_inpainting_unet_with_a_controlnet_is_refused(tmp_path: Path) -> None:
    from sdrt.export.exporter import export_model

    model = random_model("sd15-inpaint-tiny")
    with pytest.raises(InputError, match="inpainting .*not supported yet"):
        export_model(model, tmp_path / "o", controlnets=[random_controlnet("sd15-controlnet-tiny")])
    assert not (tmp_path / "o").exists()  # refused before any export work


def test_a_controlnet_passed_as_model_and_a_model_passed_as_controlnet(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    from sdrt.export.controlnet_loading import load_controlnet
    from sdrt.export.loading import load_model

    net = random_controlnet("sd15-controlnet-tiny").controlnet
    folder = tmp_path / "cn"
    net.save_pretrained(folder)
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "is a ControlNet" in err and f"--controlnet {folder}" in err
    single = _write_single_file(net, tmp_path / "cn.safetensors")
    with pytest.raises(InputError, match="is a ControlNet .*pass it as --controlnet"):
        load_model(single)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model_index.json").write_text("{}")
    with pytest.raises(InputError, match="is a whole model .*pass it as --model"):
        load_controlnet(model_dir)
    whole = tmp_path / "whole.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)}, str(whole))
    with pytest.raises(InputError, match="is a whole model .*pass it as --model"):
        load_controlnet(whole)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SDRT_SKIP_SLOW") == "1", reason="SDRT_SKIP_SLOW=1")
def test_full_size_sd15_controlnet_export(tmp_path: Path) -> None:
    """The real SD 1.5 ControlNet architecture (synthetic weights), fp16, through the parity gate: the
    ControlNet component alone (the whole model beside it would double the memory)."""
    from sdrt.export.controlnet_specs import controlnet_spec
    from sdrt.export.onnx_export import export_component

    net = random_controlnet("sd15-controlnet").controlnet
    spec = controlnet_spec("controlnet_0", net, sdxl=False, pooled=768)
    comp = export_component(spec, "fp16", tmp_path / "controlnet_0", opset=17, parity_shape=(2, 32, 40))
    assert comp.parity is not None and comp.parity.rel_err <= 1e-2
    assert len(comp.outputs) == 13 and comp.outputs[-1].shape == ("batch", 1280, "height/8", "width/8")
    assert 0.65e9 < comp.size_bytes < 0.8e9  # 361M fp16 parameters


def test_overhead_benchmark_runs_both_graphs_on_the_same_inputs() -> None:
    from sdrt.benchmarks.controlnet_overhead import measure

    r = measure("tiny", pixels=64, nets=2, repeats=1, warmup=0, threads=1, progress=lambda msg: None)
    assert r["residual_inputs"] == 2 * 13
    assert r["max_abs_diff_zero_residuals"] == 0.0  # zero residuals add exactly nothing
    assert r["unet_ms"] > 0 and r["unet_control_ms"] > 0
    # the ratio is of the unrounded medians; the ms figures are rounded to 0.1 ms (5% of a tiny UNet's 8 ms at
    # most), so the ratio lies within what their rounding allows, and itself within its own rounding
    lo = (r["unet_control_ms"] - 0.05) / (r["unet_ms"] + 0.05) - 5e-4
    hi = (r["unet_control_ms"] + 0.05) / (r["unet_ms"] - 0.05) + 5e-4
    assert lo <= r["ratio"] <= hi, r


def test_a_shuffle_controlnet_pools_its_residuals_in_the_graph(tmp_path: Path) -> None:
    """global_pool_conditions: diffusers mean-pools each residual; the graph gives [B, C, 1, 1], which
    unet_control broadcasts in its sum."""
    from diffusers import ControlNetModel

    from sdrt.export.controlnet_loading import LoadedControlNet
    from sdrt.export.controlnet_presets import get_controlnet_preset
    from sdrt.export.exporter import component_specs
    from sdrt.export.onnx_export import export_component

    cfg = get_controlnet_preset("sd15-controlnet-tiny").config()
    cfg["global_pool_conditions"] = True
    torch.manual_seed(0)
    net = ControlNetModel(**cfg)
    net.controlnet_mid_block.reset_parameters()  # zero in a fresh net
    specs = {s.name: s for s in component_specs(random_model("sd15-tiny"),
                                                 controlnets=[LoadedControlNet(net.eval(), {}, "shuffle")])}
    comp = export_component(specs["controlnet_0"], "fp32", tmp_path / "controlnet_0", opset=17,
                            parity_shape=(2, 8, 12))
    assert comp.outputs[-1].shape == ("batch", 64, 1, 1)
    assert specs["unet_control"].inputs[-1] == ("controlnet_0_mid", "float", ("batch", 64, 1, 1))
    x = _inputs("sd15-tiny", 2, 8, 12)
    scale = torch.full((2, 13), 0.7)
    cond = x["controlnet_cond"].permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():  # diffusers pools (its own code path), then the test scales
        _, mid = net(x["sample"], x["timestep"], x["encoder_hidden_states"], cond, return_dict=False)
    feed = {k: v.numpy() for k, v in x.items()} | {"conditioning_scale": scale.numpy()}
    got = _run(tmp_path, "controlnet_0", feed)["mid"]
    assert got.shape == (2, 64, 1, 1) and _rel(got, mid * 0.7) < 1e-4
