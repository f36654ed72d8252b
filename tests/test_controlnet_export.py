"""ControlNet export: the ``controlnet_j`` graphs and ``unet_control`` against diffusers run in the test,
the manifest fields, the residual axes, and the refusals of ControlNets that do not pair."""

from __future__ import annotations

import json
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
