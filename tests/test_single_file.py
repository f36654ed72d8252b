"""Single-file LDM checkpoints: detection, offline conversion, and refusal of what cannot be read.

The reference is ``ldm_layout``: a hand-written diffusers -> LDM mapping applied to synthetic weights. Loading
the file it writes must give back every original tensor exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdrt.export.loading import LoadedModel, load_model, random_model
from sdrt.export.presets import get_preset
from sdrt.export.single_file import detect_preset, load_single_file
from sdrt.runtime.errors import ArtifactError, InputError, UnsafeCheckpointError

from .helpers.ldm_layout import ldm_state_dict, meta_model, write_ldm_checkpoint

TINY = ["sd15-tiny", "sd21-tiny", "sdxl-tiny"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every load here must work with networking unavailable."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted during an offline load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[LoadedModel, Path]]:
    folder = tmp_path_factory.mktemp("ldm")
    out = {}
    for name in TINY:
        model = random_model(name, seed=3)
        path = folder / f"{name}.safetensors"
        write_ldm_checkpoint(model, path)
        out[name] = (model, path)
    return out


def _components(m: LoadedModel) -> dict[str, torch.nn.Module]:
    return {"unet": m.unet, "vae": m.vae, **{f"text_encoder_{i}": e for i, e in enumerate(m.text_encoders)}}


def assert_same_weights(expected: LoadedModel, got: LoadedModel, cast: torch.dtype | None = None) -> None:
    """Every tensor of every component equal; ``cast``: the file held them rounded to that dtype."""
    want, have = _components(expected), _components(got)
    assert want.keys() == have.keys()
    for part in want:
        assert type(have[part]) is type(want[part]), part
        a, b = want[part].state_dict(), have[part].state_dict()
        assert a.keys() == b.keys(), (part, sorted(set(a) ^ set(b))[:5])
        for key, ref in a.items():
            if cast is not None and ref.is_floating_point():
                ref = ref.to(cast).float()
            assert b[key].dtype == ref.dtype, (part, key, b[key].dtype)
            assert torch.equal(b[key], ref), (part, key)
        assert not have[part].training, part


@pytest.mark.parametrize("name", TINY)
def test_round_trip_gives_every_tensor_back(checkpoints: dict, name: str) -> None:
    model, path = checkpoints[name]
    got = load_model(path)
    preset = get_preset(name)
    assert got.preset == preset
    assert got.preset.family == {"sd15-tiny": "sd1", "sd21-tiny": "sd2", "sdxl-tiny": "sdxl"}[name]
    assert got.scheduler_config == preset.scheduler
    assert got.prediction_type == preset.prediction_type
    assert got.tokenizer_dirs == [None] * len(preset.text_encoders)
    assert got.source == {
        "kind": "single_file",
        "path": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    assert_same_weights(model, got)


@pytest.mark.parametrize("name", TINY)
def test_arch_that_agrees_with_the_file(checkpoints: dict, name: str) -> None:
    model, path = checkpoints[name]
    got = load_model(path, arch=name)
    assert got.preset.name == name
    assert_same_weights(model, got)


def test_fp16_file_loads_as_fp32(tmp_path: Path) -> None:
    model = random_model("sdxl-tiny", seed=5)
    path = tmp_path / "half.safetensors"
    write_ldm_checkpoint(model, path, dtype=torch.float16)
    assert_same_weights(model, load_model(path), cast=torch.float16)


# --- pickles -----------------------------------------------------------------------------------------


def test_ckpt_needs_allow_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    write_ldm_checkpoint(random_model("sd15-tiny"), path)
    with pytest.raises(UnsafeCheckpointError, match="--allow-pickle"):
        load_model(path)
    with pytest.raises(UnsafeCheckpointError, match="--allow-pickle"):
        load_single_file(path)


@pytest.mark.parametrize(
    "extra", [None, argparse.Namespace(lr=1e-4)], ids=["tensors-only", "trainer-objects"]
)
def test_ckpt_with_allow_pickle(tmp_path: Path, caplog: pytest.LogCaptureFixture, extra: object) -> None:
    """A Lightning-style pickle; one holding more than tensors needs the full unpickler, with a warning."""
    model = random_model("sd15-tiny", seed=7)
    path = tmp_path / "model.ckpt"
    write_ldm_checkpoint(model, path, pickled_extra=extra)
    with caplog.at_level(logging.WARNING, logger="sdrt.export.single_file"):
        got = load_model(path, allow_pickle=True)
    assert got.preset.name == "sd15-tiny"
    assert_same_weights(model, got)
    assert ("unpickling it in full" in caplog.text) == (extra is not None)


def test_garbage_ckpt_with_allow_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x00not a pickle at all" * 50)
    with pytest.raises(ArtifactError, match="model.ckpt"):
        load_model(path, allow_pickle=True)


# --- refusals ----------------------------------------------------------------------------------------


def test_garbage_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"these bytes are no safetensors header" * 100)
    with pytest.raises(ArtifactError, match="not a readable .safetensors"):
        load_model(path)


def test_truncated_safetensors(checkpoints: dict, tmp_path: Path) -> None:
    data = checkpoints["sd15-tiny"][1].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="cut.safetensors"):
        load_model(path)


def test_unknown_key_layout(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"backbone.layer1.weight": torch.zeros(4, 4), "betas": torch.zeros(4)}, str(path))
    with pytest.raises(ArtifactError, match=r"SD 1\.x.*SD 2\.x.*SDXL") as e:
        load_model(path)
    assert "unrecognised key layout: backbone.layer1.weight;" in str(e.value)


# roots of the CLIP text encoders in SD 1.x and SDXL files
_CLIP_ROOT = {"sd15-tiny": "cond_stage_model.transformer.", "sdxl-tiny": "conditioner.embedders.0.transformer."}


def _rename_clip(sd: dict[str, torch.Tensor], root: str, new: str) -> dict[str, torch.Tensor]:
    """``root + "text_model." + rest`` -> ``root + new + rest``; other keys as they are."""
    old = root + "text_model."
    return {(root + new + k.removeprefix(old) if k.startswith(old) else k): v for k, v in sd.items()}


@pytest.mark.parametrize("name", ["sd15-tiny", "sdxl-tiny"])
def test_clip_keys_without_text_model_load_to_the_same_tensors(checkpoints: dict, tmp_path: Path, name: str) -> None:
    """Converters that save a flattened CLIPTextModel (transformers >= 5.6) under the LDM root write
    ``cond_stage_model.transformer.encoder.layers...``; diffusers' own conversion script reads that too."""
    model, full = checkpoints[name]
    from safetensors.torch import load_file

    sd = _rename_clip(load_file(str(full)), _CLIP_ROOT[name], "")
    assert not any(k.startswith(_CLIP_ROOT[name] + "text_model.") for k in sd)
    path = tmp_path / "flat.safetensors"
    save_file(sd, str(path))
    assert_same_weights(model, load_model(path))
    if name == "sd15-tiny":
        # diffusers' converter (scripts/convert_original_stable_diffusion_to_diffusers.py) on the same keys
        from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_clip_checkpoint
        from transformers import CLIPTextModel

        theirs = convert_ldm_clip_checkpoint(sd, text_encoder=CLIPTextModel(model.text_encoders[0].config))
        want = model.text_encoders[0].state_dict()
        assert theirs.state_dict().keys() == want.keys()
        assert all(torch.equal(theirs.state_dict()[k], v) for k, v in want.items())


def test_clip_keys_of_another_layout_are_named(checkpoints: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    sd = _rename_clip(load_file(str(checkpoints["sd15-tiny"][1])), _CLIP_ROOT["sd15-tiny"], "clip.")
    path = tmp_path / "other.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ArtifactError) as e:
        load_model(path)
    first = min(k for k in sd if k.startswith("cond_stage_model."))
    assert first.startswith("cond_stage_model.transformer.clip.")
    assert (f"other.safetensors has an unrecognised key layout: {first} (sdrt reads "
            "cond_stage_model.transformer.text_model.*); ") in str(e.value)


def test_single_diffusers_component(tmp_path: Path) -> None:
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in random_model("sd15-tiny").vae.state_dict().items()}, str(path))
    with pytest.raises(ArtifactError, match="model_index.json"):
        load_model(path)


def test_checkpoint_without_vae(tmp_path: Path) -> None:
    sd = write_ldm_checkpoint(random_model("sd15-tiny"), tmp_path / "full.safetensors")
    path = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, str(path))
    with pytest.raises(ArtifactError, match=r"no VAE \(first_stage_model"):
        load_model(path)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_v.weight",
            "cannot convert holey.safetensors as sd21-tiny .* incomplete",
        ),
        (
            "cond_stage_model.model.transformer.resblocks.1.mlp.c_fc.weight",
            r"text encoder 1 lacks 1 .*encoder\.layers\.1\.mlp\.fc1\.weight",
        ),
    ],
    ids=["unet", "text-encoder"],
)
def test_checkpoint_missing_a_tensor(tmp_path: Path, key: str, message: str) -> None:
    """diffusers leaves what it finds no weight for uninitialised; the loader must refuse, not run it."""
    sd = write_ldm_checkpoint(random_model("sd21-tiny"), tmp_path / "full.safetensors")
    del sd[key]
    path = tmp_path / "holey.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ArtifactError, match=message):
        load_model(path)


def _with_ema(tmp_path: Path, model: LoadedModel, name: str, ldm_names: bool = True) -> Path:
    """A training export: the UNet plus its EMA copy (2x the weights, so the two are told apart), under
    LDM's EMA names (the dots after ``model.`` dropped) or, ``ldm_names=False``, names that miss some."""
    sd = write_ldm_checkpoint(model, tmp_path / f"{name}-plain.safetensors")
    unet = "model.diffusion_model."
    for k, v in list(sd.items()):
        if k.startswith(unet):
            flat = "".join(k.split(".")[1:]) if ldm_names else k[len(unet):].replace(".", "")
            sd["model_ema." + flat] = 2 * v
    sd["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


def _doubled_unet(model: LoadedModel) -> LoadedModel:
    import copy

    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.unet.parameters():
            p.mul_(2)
    return ema


def test_ema_weights_load_by_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Both copies in the file: the EMA one loads (diffusers' extract_ema=True), and the log says so."""
    model = random_model("sd15-tiny", seed=11)
    path = _with_ema(tmp_path, model, "with-ema")
    with caplog.at_level(logging.WARNING, logger="sdrt.export.single_file"):
        got = load_model(path)
    assert_same_weights(_doubled_unet(model), got)
    assert "using the EMA ones" in caplog.text and got.source["unet_weights"] == "EMA"


def test_no_ema_loads_the_raw_weights(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = random_model("sd15-tiny", seed=11)
    path = _with_ema(tmp_path, model, "with-ema")
    with caplog.at_level(logging.WARNING, logger="sdrt.export.single_file"):
        got = load_model(path, ema=False)
    assert_same_weights(model, got)
    assert "using the non-EMA ones" in caplog.text and got.source["unet_weights"] == "non-EMA"


def test_incomplete_ema_copies_are_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """EMA keys that do not cover the UNet (here: misnamed) fall back to the non-EMA weights, said in the log."""
    model = random_model("sd15-tiny", seed=11)
    path = _with_ema(tmp_path, model, "odd-ema", ldm_names=False)
    with caplog.at_level(logging.WARNING, logger="sdrt.export.single_file"):
        got = load_model(path)
    assert_same_weights(model, got)
    assert "not an EMA copy of every UNet weight" in caplog.text and got.source["unet_weights"] == "non-EMA"


def test_ema_matches_diffusers_extract_ema(tmp_path: Path) -> None:
    """The same UNet weights as diffusers' own LDM conversion with extract_ema=True."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors.torch import load_file

    model = random_model("sd15-tiny", seed=11)
    path = _with_ema(tmp_path, model, "with-ema")
    theirs = convert_ldm_unet_checkpoint(load_file(str(path)), dict(model.unet.config), extract_ema=True)
    ours = load_model(path).unet.state_dict()
    assert set(theirs) <= set(ours)
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v.float(), rtol=0, atol=0, msg=k)


def test_arch_of_another_family(checkpoints: dict) -> None:
    path = checkpoints["sd15-tiny"][1]
    with pytest.raises(InputError, match=r"sd21-tiny.*SD 2\.x.*SD 1\.x.*sd15-tiny"):
        load_model(path, arch="sd21-tiny")


def test_arch_of_another_size(checkpoints: dict) -> None:
    path = checkpoints["sdxl-tiny"][1]
    with pytest.raises(InputError, match=r"--arch sdxl does not fit.*sdxl-tiny.*UNet block channels"):
        load_model(path, arch="sdxl")


def test_unknown_arch(checkpoints: dict) -> None:
    with pytest.raises(InputError, match="unknown preset"):
        load_model(checkpoints["sd15-tiny"][1], arch="sd3")


def test_architecture_no_preset_has(tmp_path: Path) -> None:
    """A UNet whose input channels no shipped preset has (7: neither 4 nor an inpainting model's 9) is
    named as such, not half-loaded; 9 channels are the inpainting preset of the same architecture."""
    shapes = {k: tuple(v.shape) for k, v in ldm_state_dict(meta_model("sd15-tiny")).items()}
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    shapes[conv_in] = (shapes[conv_in][0], 9, *shapes[conv_in][2:])
    assert detect_preset(shapes).name == "sd15-inpaint-tiny"
    shapes[conv_in] = (shapes[conv_in][0], 7, *shapes[conv_in][2:])
    with pytest.raises(ArtifactError, match=r"UNet in/out channels \[7, 4\]"):
        detect_preset(shapes)


# --- full-size layouts, from key names and shapes only -----------------------------------------------


def _full_size_shapes(preset_name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in ldm_state_dict(meta_model(preset_name)).items()}


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_full_size_detection(name: str) -> None:
    assert detect_preset(_full_size_shapes(name)).name == name


def test_full_size_sd2_defaults_to_768_v_and_says_how_to_choose(caplog: pytest.LogCaptureFixture) -> None:
    shapes = _full_size_shapes("sd21")
    # OpenCLIP ViT-H: the file holds all 24 resblocks; the penultimate-layer encoder uses 23
    assert sum(k.endswith("resblocks.23.ln_1.weight") for k in shapes) == 1
    with caplog.at_level(logging.WARNING, logger="sdrt.export.single_file"):
        assert detect_preset(shapes, name="v2-1.safetensors").name == "sd21-768"
    assert "--arch sd21" in caplog.text and "v2-1.safetensors" in caplog.text
    caplog.clear()
    assert detect_preset(shapes, arch="sd21").name == "sd21"
    assert detect_preset(shapes, arch="sd21-768").name == "sd21-768"
    assert not caplog.records
