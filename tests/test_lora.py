"""LoRA parsing and merge arithmetic, checked against diffusers' own LoRA loading (PEFT) on the tiny
SD 1.5 UNet and text encoder: random A/B matrices written in the kohya/A1111 and the diffusers key
layouts, loaded with ``pipe.load_lora_weights`` and fused, then compared weight by weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.errors import InputError
from sdrt.runtime.lora_files import LoraSpec, lora_deltas, parse_lora, read_lora

from .helpers.models import TE_TARGETS, UNET_TARGETS, lora_targets, make_lora
from .helpers.references import diffusers_fused

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    from sdrt.export.loading import load_model

    return load_model(random_preset="sd15-tiny")


def _merged(module, loras, component):  # type: ignore[no-untyped-def]
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    deltas, report = lora_deltas(loras, component, {k: v.shape for k, v in sd.items()})
    return {k: sd[k] + deltas[k] if k in deltas else sd[k] for k in sd}, report


def _compare(merged: dict[str, np.ndarray], reference) -> None:  # type: ignore[no-untyped-def]
    """Every parameter equal to diffusers' fused one (float32 rounding apart)."""
    ref = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    assert set(ref) == set(merged)
    for k, v in merged.items():
        np.testing.assert_allclose(v, ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize(("layout", "alpha"), [("kohya", 4.0), ("kohya", None), ("diffusers", None)])
def test_single_lora_matches_diffusers(tiny, tmp_path: Path, layout: str, alpha: float | None) -> None:  # type: ignore[no-untyped-def]
    path = make_lora(tmp_path / f"{layout}.safetensors", tiny.unet, tiny.text_encoders[0], layout, seed=1, alpha=alpha)
    lf = read_lora(path)
    assert lf.layout == layout
    ref_unet, ref_te = diffusers_fused(tiny.unet, tiny.text_encoders[0], tiny.vae, [(path, 0.8)])
    unet, report = _merged(tiny.unet, [(lf, 0.8)], "unet")
    assert report.unmatched == ()
    n_unet = len(lora_targets(tiny.unet, UNET_TARGETS))
    assert len(report.matched) == n_unet
    _compare(unet, ref_unet)
    te, report = _merged(tiny.text_encoders[0], [(lf, 0.8)], "text_encoder")
    assert len(report.matched) == len(lora_targets(tiny.text_encoders[0], TE_TARGETS)) and report.unmatched == ()
    _compare(te, ref_te)
    # the merge moved the weights by a visible amount (the test would pass vacuously otherwise)
    base = tiny.unet.state_dict()
    moved = [k for k in unet if not np.allclose(unet[k], base[k].numpy())]
    assert len(moved) == n_unet


def test_stacked_loras_in_both_layouts_match_diffusers(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = make_lora(tmp_path / "a.safetensors", tiny.unet, tiny.text_encoders[0], "kohya", seed=2, alpha=1.0)
    b = make_lora(tmp_path / "b.safetensors", tiny.unet, tiny.text_encoders[0], "diffusers", seed=3)
    ref_unet, ref_te = diffusers_fused(tiny.unet, tiny.text_encoders[0], tiny.vae, [(a, 0.8), (b, 0.5)])
    loras = [(read_lora(a), 0.8), (read_lora(b), 0.5)]
    unet, _ = _merged(tiny.unet, loras, "unet")
    _compare(unet, ref_unet)
    te, _ = _merged(tiny.text_encoders[0], loras, "text_encoder")
    _compare(te, ref_te)


def test_merge_by_hand() -> None:
    """W' = W + s * (alpha / r) * up @ down, for a Linear and a 3x3 conv."""
    g = np.random.default_rng(0)
    down, up = g.standard_normal((2, 5)).astype(np.float32), g.standard_normal((3, 2)).astype(np.float32)
    cd, cu = g.standard_normal((2, 4, 3, 3)).astype(np.float32), g.standard_normal((6, 2, 1, 1)).astype(np.float32)
    _, mods = parse_lora({
        "lora_unet_a_b.lora_down.weight": down, "lora_unet_a_b.lora_up.weight": up,
        "lora_unet_a_b.alpha": np.array(1.0, np.float32),
        "lora_unet_c.lora_down.weight": cd, "lora_unet_c.lora_up.weight": cu,
    })
    from sdrt.runtime.lora_files import LoraFile

    lf = LoraFile("x.safetensors", "kohya", tuple(mods), "")
    deltas, report = lora_deltas([(lf, 0.5)], "unet", {"a.b.weight": (3, 5), "c.weight": (6, 4, 3, 3), "c.bias": (6,)})
    np.testing.assert_allclose(deltas["a.b.weight"], 0.5 * 0.5 * up @ down, rtol=1e-6)
    expect = 0.5 * np.einsum("or,rikl->oikl", cu[:, :, 0, 0], cd)  # no alpha: scale 1
    np.testing.assert_allclose(deltas["c.weight"], expect, rtol=1e-5)
    assert report.matched == ("a.b.weight", "c.weight")


def test_lora_spec_parse() -> None:
    assert LoraSpec.parse("a.safetensors:0.8") == LoraSpec(Path("a.safetensors"), 0.8)
    assert LoraSpec.parse("dir/b.safetensors") == LoraSpec(Path("dir/b.safetensors"), 1.0)
    assert LoraSpec.parse("c.safetensors:-1.5e-1").scale == pytest.approx(-0.15)
    assert LoraSpec.parse("C:/loras/x.safetensors").path == Path("C:/loras/x.safetensors")


def test_legacy_diffusers_layout_names() -> None:
    z = np.zeros((2, 4), np.float32)
    layout, mods = parse_lora({
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": z,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": z.T.copy(),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": z,
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": z.T.copy(),
    })
    assert layout == "diffusers-legacy"
    assert {m.module for m in mods} == {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
                                        "text_model.encoder.layers.0.self_attn.q_proj"}


def test_unsupported_and_broken_files(tmp_path: Path) -> None:
    z = np.zeros((2, 2), np.float32)
    with pytest.raises(InputError, match="a LoHa file .*it reads plain LoRA and LoCon"):
        parse_lora({"lora_unet_x.hada_w1_a": z})
    with pytest.raises(InputError, match="no LoRA weights"):
        parse_lora({"something": z})
    with pytest.raises(InputError, match="needs both"):
        parse_lora({"lora_unet_x.lora_down.weight": z})
    with pytest.raises(InputError, match="another architecture"):
        _, mods = parse_lora({"lora_unet_x.lora_down.weight": z, "lora_unet_x.lora_up.weight": z})
        mods[0].delta((3, 3))
    with pytest.raises(InputError, match=".safetensors files only"):
        (tmp_path / "a.pt").write_bytes(b"x")
        read_lora(tmp_path / "a.pt")


def test_peft_metadata_alpha() -> None:
    import json

    a, b = np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)
    _, mods = parse_lora({"unet.m.lora_A.weight": a, "unet.m.lora_B.weight": b},
                         {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.r": 2})})
    assert mods[0].scaling == 4.0
