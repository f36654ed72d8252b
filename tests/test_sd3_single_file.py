"""SD 3 / 3.5 single files in Stability's layout (``export/sd3_single_file.py``).

The files are written here from the tiny presets' seeded modules by ``tests/helpers/sd3_layout.py``, a
hand-written inverse of diffusers' converters; the first tests prove that inverse right (diffusers' own
converters give every tensor back, bit for bit). Full-size layouts are checked on meta tensors: key names and
shapes only. Nothing is fetched and nothing is unpickled.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.cli import main
from sdrt.export.sd3_export import export_sd3
from sdrt.export.sd3_loading import is_sd3_source, load_sd3
from sdrt.export.sd3_model import LoadedSd3
from sdrt.export.sd3_presets import Sd3Modules, build_modules, get_sd3_preset
from sdrt.export.sd3_single_file import detect_sd3_preset, load_sd3_single_file
from sdrt.runtime.errors import ArtifactError, InputError, UnsafeCheckpointError

from .helpers.sd3_layout import (
    ENCODER_PREFIXES,
    MMDIT,
    encoder_file,
    sd3_state_dict,
    transformer_to_sd3,
    write,
)

TINY = ["sd3-tiny", "sd35-medium-tiny"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every load here must work with networking unavailable."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted during an offline load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def seeded() -> dict[str, Sd3Modules]:
    return {name: build_modules(get_sd3_preset(name), seed=3) for name in TINY}


def _files(folder: Path, mods: Sd3Modules, stem: str) -> dict[str, Path]:
    """The bundled file, the bare file (MMDiT + VAE) and Stability's three separate encoder files."""
    return {
        "bundled": write(sd3_state_dict(mods), folder / f"{stem}.safetensors"),
        "bare": write(sd3_state_dict(mods, encoders=False), folder / f"{stem}-bare.safetensors"),
        "no_t5": write(sd3_state_dict(mods, t5=False), folder / f"{stem}-incl-clips.safetensors"),
        **{
            n: write(encoder_file(e), folder / f"{stem}-{n}.safetensors")
            for n, e in zip(("clip_l", "clip_g", "t5"), mods.text_encoders, strict=True)
        },
    }


@pytest.fixture(scope="module")
def files(
    seeded: dict[str, Sd3Modules], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Path]]:
    folder = tmp_path_factory.mktemp("sd3-single")
    return {name: _files(folder, mods, name) for name, mods in seeded.items()}


def _pairs(want: Sd3Modules, got: Sd3Modules) -> list[tuple[str, torch.nn.Module, torch.nn.Module | None]]:
    return [
        ("transformer", want.transformer, got.transformer),
        ("vae", want.vae, got.vae),
        *(
            (f"text encoder {i + 1}", w, g)
            for i, (w, g) in enumerate(zip(want.text_encoders, got.text_encoders, strict=True))
            if w is not None
        ),
    ]


def assert_same_modules(want: Sd3Modules, got: Sd3Modules, cast: torch.dtype | None = None) -> None:
    """Every tensor equal, bit for bit (``cast``: the file held them rounded to that dtype), but CLIP-L's
    projection, which SD3 does not use: diffusers' converter (as Stability's code) makes it the identity."""
    for part, w, g in _pairs(want, got):
        assert g is not None, part
        sw, sg = w.state_dict(), g.state_dict()
        assert sw.keys() == sg.keys(), part
        for k, t in sw.items():
            assert sg[k].dtype == torch.float32, (part, k)
            if part == "text encoder 1" and k == "text_projection.weight":
                assert torch.equal(sg[k], torch.eye(t.shape[0])), k
                continue
            expected = t.to(cast).float() if cast is not None else t
            assert torch.equal(sg[k], expected), f"{part}: {k} differs"
        assert not g.training


# --- the inverse layout, proved against diffusers' converters ------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_inverse_layout_round_trips_through_diffusers(seeded: dict[str, Sd3Modules], name: str) -> None:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    mods = seeded[name]
    sd = mods.transformer.state_dict()
    stability = transformer_to_sd3(sd)
    parts = (
        "joint_blocks.",
        "pos_embed",
        "x_embedder.",
        "t_embedder.",
        "y_embedder.",
        "context_embedder.",
        "final_layer.",
    )
    assert all(k.startswith(tuple(MMDIT + p for p in parts)) for k in stability)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(stability))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    vae = mods.vae.state_dict()
    ldm = {k: v for k, v in sd3_state_dict(mods).items() if k.startswith("first_stage_model.")}
    vae_back = convert_ldm_vae_checkpoint(ldm, dict(mods.vae.config))
    assert vae_back.keys() == vae.keys()
    assert all(torch.equal(vae_back[k], vae[k]) for k in vae)


def _meta_modules(name: str) -> Sd3Modules:
    """A full-size preset's modules on the meta device: names and shapes, no memory."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    p = get_sd3_preset(name)
    with torch.device("meta"):
        clips = [CLIPTextModelWithProjection(CLIPTextConfig(**c)) for c in p.config("clip")]
        return Sd3Modules(
            SD3Transformer2DModel(**p.config("transformer")),
            (clips[0], clips[1], T5EncoderModel(T5Config(**p.config("t5")))),
            AutoencoderKL(**p.config("vae")),
        )


FULL = ["sd3-medium", "sd35-medium", "sd35-large"]


@pytest.fixture(scope="module")
def full_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    return {n: {k: tuple(v.shape) for k, v in sd3_state_dict(_meta_modules(n)).items()} for n in FULL}


@pytest.mark.parametrize("name", FULL)
def test_full_size_layouts_detect_and_round_trip(name: str, full_shapes: dict) -> None:
    """Each full-size preset from its file's shapes; diffusers' own model-type probe agrees, and its converter
    takes the full-size layout back to the diffusers names and shapes."""
    from diffusers.loaders.single_file_utils import (
        convert_sd3_transformer_checkpoint_to_diffusers,
        infer_diffusers_model_type,
    )

    shapes = full_shapes[name]
    assert detect_sd3_preset(shapes).name == name
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert infer_diffusers_model_type(meta) == name.replace("-", "_").replace("sd3_medium", "sd3")
    sd = _meta_modules(name).transformer.state_dict()
    back = convert_sd3_transformer_checkpoint_to_diffusers(
        {k: v for k, v in meta.items() if k.startswith(MMDIT)}
    )
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_arch_selects_what_shapes_cannot_tell(full_shapes: dict) -> None:
    assert detect_sd3_preset(full_shapes["sd35-large"], arch="sd35-large-turbo").name == "sd35-large-turbo"
    with pytest.raises(
        InputError,
        match=r"--arch sd3-medium does not fit .*it fits sd35-medium.*dual-attention "
        r"blocks 0-12 in the file, \[\] in sd3-medium",
    ):
        detect_sd3_preset(full_shapes["sd35-medium"], arch="sd3-medium")


# --- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_bundled_file_loads_the_seeded_modules(seeded: dict, files: dict, name: str) -> None:
    path = files[name]["bundled"]
    assert is_sd3_source(path, None)
    got = load_sd3(path)
    assert got.preset.name == name and got.has_t5
    assert got.tokenizer_dirs == (None, None, None)  # the tiny presets: the shipped tokenizers
    assert got.source["kind"] == "single_file" and got.source["path"] == str(path)
    assert_same_modules(seeded[name], got.modules)


@pytest.mark.parametrize("name", TINY)
def test_separate_encoder_files(seeded: dict, files: dict, name: str) -> None:
    """A file without text encoders, and Stability's clip_l / clip_g / t5xxl files (transformers' layouts)."""
    f = files[name]
    got = load_sd3_single_file(f["bare"], clip_l=f["clip_l"], clip_g=f["clip_g"], t5=f["t5"])
    assert_same_modules(seeded[name], got.modules)
    assert got.source["t5xxl"] == str(f["t5"])


def test_t5_file_beside_a_file_with_clips(seeded: dict, files: dict) -> None:
    """sd3_medium_incl_clips.safetensors + t5xxl_fp16.safetensors; the same T5 holding only
    encoder.embed_tokens."""
    f = files["sd3-tiny"]
    assert_same_modules(seeded["sd3-tiny"], load_sd3_single_file(f["no_t5"], t5=f["t5"]).modules)
    t5 = encoder_file(seeded["sd3-tiny"].text_encoders[2])
    t5["encoder.embed_tokens.weight"] = t5.pop("shared.weight")
    other = write(t5, f["t5"].with_name("t5-embed-tokens.safetensors"))
    assert_same_modules(seeded["sd3-tiny"], load_sd3_single_file(f["no_t5"], t5=other).modules)


def test_flattened_clip_file_and_bundled_prefix(seeded: dict, files: dict, tmp_path: Path) -> None:
    """A CLIP file saved by transformers >= 5.6 (no ``text_model.``) and one keeping the bundled prefix."""
    mods = seeded["sd3-tiny"]
    flat = {k.removeprefix("text_model."): v for k, v in encoder_file(mods.text_encoders[0]).items()}
    prefixed = encoder_file(mods.text_encoders[1], ENCODER_PREFIXES[1])
    got = load_sd3_single_file(
        files["sd3-tiny"]["bare"],
        clip_l=write(flat, tmp_path / "l.safetensors"),
        clip_g=write(prefixed, tmp_path / "g.safetensors"),
        t5=files["sd3-tiny"]["t5"],
    )
    assert_same_modules(mods, got.modules)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_half_precision_file_loads_as_fp32(seeded: dict, tmp_path: Path, dtype: torch.dtype) -> None:
    path = write(sd3_state_dict(seeded["sd35-medium-tiny"]), tmp_path / "half.safetensors", dtype=dtype)
    assert_same_modules(seeded["sd35-medium-tiny"], load_sd3(path).modules, cast=dtype)


def test_without_t5_leaves_it_unread(files: dict) -> None:
    got = load_sd3_single_file(files["sd3-tiny"]["bundled"], without_t5=True)
    assert not got.has_t5
    got = load_sd3_single_file(files["sd3-tiny"]["no_t5"], without_t5=True)
    assert not got.has_t5


def test_export_gives_the_preset_images(seeded: dict, files: dict, tmp_path: Path) -> None:
    """``sdrt export --model file.safetensors`` and the export of the seeded modules (CLIP-L's projection the
    identity, as SD3 runs it) generate the same image."""
    from sdrt.runtime.pipeline import Pipeline

    mods = build_modules(get_sd3_preset("sd3-tiny"), seed=3)
    with torch.no_grad():
        mods.text_encoders[0].text_projection.weight.copy_(torch.eye(16))
    preset = get_sd3_preset("sd3-tiny")
    export_sd3(LoadedSd3(preset, mods, preset.config("scheduler")), tmp_path / "preset", fp16=False)
    argv = [
        "export",
        "--model",
        str(files["sd3-tiny"]["bare"]),
        "--out",
        str(tmp_path / "file"),
        "--fp32",
        "--clip-l",
        str(files["sd3-tiny"]["clip_l"]),
        "--clip-g",
        str(files["sd3-tiny"]["clip_g"]),
        "--t5",
        str(files["sd3-tiny"]["t5"]),
    ]
    assert main(argv) == 0
    latents = np.random.default_rng(0).standard_normal((1, 16, 8, 12), dtype=np.float32)
    images = []
    for folder in ("preset", "file"):
        pipe = Pipeline.load(tmp_path / folder, backend="ort-cpu")
        try:
            res = pipe(
                "a red fox in the snow",
                negative_prompt="blurry",
                height=64,
                width=96,
                steps=4,
                guidance_scale=5.0,
                latents=latents,
            )
            images.append(np.asarray(res.images[0]).astype(np.int32))
        finally:
            pipe.close()
    assert images[0].std() > 5
    assert np.array_equal(images[0], images[1])


# --- refusals, before any work ---------------------------------------------------------------------


def test_file_without_encoders_names_the_flags(files: dict) -> None:
    with pytest.raises(
        InputError,
        match=r"does not bundle its CLIP-L and CLIP-G and T5-XXL text encoders; pass "
        r"them as separate files: --clip-l FILE --clip-g FILE --t5 FILE .*--without-t5",
    ):
        load_sd3(files["sd3-tiny"]["bare"])
    with pytest.raises(
        InputError, match=r"does not bundle its CLIP-G text encoder; pass it .*: --clip-g FILE"
    ):
        load_sd3_single_file(files["sd3-tiny"]["bare"], clip_l=files["sd3-tiny"]["clip_l"], without_t5=True)


def test_missing_t5_needs_without_t5(files: dict, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(
        InputError, match=r"does not bundle the T5-XXL text encoder; pass it as --t5 FILE .*--without-t5"
    ):
        load_sd3_single_file(files["sd3-tiny"]["no_t5"])
    assert main(["export", "--model", str(files["sd3-tiny"]["no_t5"]), "--out", str(tmp_path / "o")]) == 1
    assert "--without-t5" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_not_an_sd3_file(tmp_path: Path, files: dict) -> None:
    sd1 = write(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
        },
        tmp_path / "sd1.safetensors",
    )
    assert not is_sd3_source(sd1, None)
    with pytest.raises(ArtifactError, match=r"not an SD 3 / 3.5 single file"):
        load_sd3_single_file(sd1)
    with pytest.raises(InputError, match=r"--clip-l .*not a CLIP-L text encoder in transformers' layout"):
        load_sd3_single_file(
            files["sd3-tiny"]["bare"], clip_l=sd1, clip_g=files["sd3-tiny"]["clip_g"], without_t5=True
        )
    mmdit_only = {
        k: v
        for k, v in sd3_state_dict(build_modules(get_sd3_preset("sd3-tiny"))).items()
        if k.startswith(MMDIT)
    }
    with pytest.raises(ArtifactError, match=r"no VAE \(first_stage_model\.\*\)"):
        load_sd3_single_file(write(mmdit_only, tmp_path / "mmdit.safetensors"))


def test_pickles_are_refused_unread(files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unpickle(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", unpickle)
    for name in ("sd3.5_medium.ckpt", "t5xxl.bin"):
        (tmp_path / name).write_bytes(b"\x80\x04not read")
    with pytest.raises(UnsafeCheckpointError, match=r"--t5 t5xxl.bin is a pickled file.*\.safetensors"):
        load_sd3_single_file(files["sd3-tiny"]["no_t5"], t5=tmp_path / "t5xxl.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"sd3.5_medium.ckpt is a pickled file"):
        load_sd3_single_file(tmp_path / "sd3.5_medium.ckpt")


def test_full_size_t5_needs_tokenizers(
    full_shapes: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only the tiny presets' T5 tokenizer ships: a real file's T5 needs --tokenizers (or --without-t5);
    refused from the header alone, before any tensor is read."""
    from sdrt.export import sd3_single_file as sf

    monkeypatch.setattr(sf, "file_shapes", lambda path, what="": full_shapes["sd35-medium"])
    monkeypatch.setattr(sf, "_convert", lambda *a: pytest.fail("converted before the refusal"))
    with pytest.raises(InputError, match=r"pass --tokenizers DIR.*tokenizer_3/.*or --without-t5"):
        sf.load_sd3_single_file(tmp_path / "sd3.5_medium.safetensors")
    (tmp_path / "toks" / "tokenizer").mkdir(parents=True)
    with pytest.raises(InputError, match=r"--tokenizers .* has no tokenizer_3/"):
        sf.load_sd3_single_file(tmp_path / "sd3.5_medium.safetensors", tokenizers=tmp_path / "toks")


def test_contradictions_and_misplaced_options(
    files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = files["sd3-tiny"]
    with pytest.raises(InputError, match="--t5 and --without-t5"):
        load_sd3_single_file(f["bundled"], t5=f["t5"], without_t5=True)
    cases = [
        (
            ["--random", "sd3-tiny", "--clip-l", str(f["clip_l"])],
            "--clip-l goes with an SD 3 / 3.5 single file",
        ),
        (["--random", "sd15-tiny", "--t5", str(f["t5"])], "--t5 goes with an SD 3 / 3.5 single file"),
        (
            ["--model", str(f["bundled"]), "--arch", "sd35-medium-tiny"],
            "--arch sd35-medium-tiny does not fit",
        ),
    ]
    folder = tmp_path / "sd3-folder"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    cases.append((["--model", str(folder), "--clip-g", str(f["clip_g"])],
                  "--clip-g goes with an SD 3 / 3.5 single .safetensors file only"))
    for argv, message in cases:
        assert main(["export", *argv, "--out", str(tmp_path / "o")]) == 1
        assert message in capsys.readouterr().err


def test_component_without_config_names_the_folder_not_a_family(tmp_path: Path) -> None:
    """FLUX.1's loader reads components through the same function: the message names the folder and the fix,
    not one family."""
    from sdrt.export.sd3_loading import component_config

    (tmp_path / "model" / "transformer").mkdir(parents=True)
    with pytest.raises(InputError) as e:
        component_config(tmp_path / "model" / "transformer")
    msg = str(e.value)
    assert "transformer/config.json is missing" in msg and str(tmp_path / "model") in msg
    assert "SD3" not in msg and "copy the whole folder again" in msg
