"""Single files streamed (export/lazy_convert.py, with ``stream`` in export/flux_single_file.py and
export/sd3_single_file.py): the transformer and T5 of a FLUX.1 or SD 3 / 3.5 single file are not loaded but
converted by diffusers' converters recorded on lazy tensors and replayed one weight at a time.

Streaming is forced on tiny files written here (``tests/helpers/flux_layout.py``, ``sd3_layout.py``; their
inverse layouts are proved against diffusers' converters in tests/test_flux_single_file.py and
tests/test_sd3_single_file.py). Checked: every streamed weight equals, bit for bit, what the whole-file path
builds with diffusers' ``from_single_file`` and creators (FLUX.1: also the weights the file was written from);
the streamed graph on ort-cpu equals that diffusers module within the fp32 gate's bound; the file's tensors of a
streamed part are read one at a time, only while the graph's external data is written, never by the whole-file
reader; a conversion that cannot be replayed or that does not fit the architecture is refused before any read.
"""

from __future__ import annotations

import json
import os
import struct
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from sdrt.export import checkpoint_files, flux_single_file, lazy_convert, sd3_single_file
from sdrt.export.flux_loading import load_flux, weight_shapes
from sdrt.export.flux_presets import build_modules as build_flux
from sdrt.export.flux_presets import get_flux_preset
from sdrt.export.flux_single_file import to_diffusers
from sdrt.export.flux_specs import streamed_transformer_spec, transformer_spec
from sdrt.export.onnx_export import check_parity
from sdrt.export.sd3_loading import load_sd3
from sdrt.export.sd3_model import weight_shapes as sd3_weight_shapes
from sdrt.export.sd3_presets import build_modules as build_sd3
from sdrt.export.sd3_presets import get_sd3_preset
from sdrt.export.sd3_specs import streamed_t5_spec, t5_spec
from sdrt.export.sd3_specs import streamed_transformer_spec as sd3_streamed_spec
from sdrt.export.sd3_specs import transformer_spec as sd3_spec
from sdrt.export.streamed import export_streamed
from sdrt.runtime.errors import ArtifactError

from .helpers.flux_layout import ae_file, bfl_file, comfy_file, transformer_to_bfl
from .helpers.sd3_layout import MMDIT, encoder_file, sd3_state_dict, transformer_to_sd3, write

SD3, FLUX = "sd35-medium-tiny", "flux-dev-tiny"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SD 3.5 Medium's tiny structure (dual-attention blocks) bundled in bf16, and bare in fp16 with Stability's
    separate encoder files (T5 holding ``encoder.embed_tokens`` only); FLUX.1 [dev]'s tiny structure as BFL's
    bf16 transformer file with the separate parts, and as ComfyUI's all-in-one file."""
    d = tmp_path_factory.mktemp("streamed-single")
    sd3, flux = build_sd3(get_sd3_preset(SD3), seed=3), build_flux(get_flux_preset(FLUX), seed=0)
    t5 = encoder_file(sd3.text_encoders[2])
    t5["encoder.embed_tokens.weight"] = t5.pop("shared.weight")
    bf16, fp16 = torch.bfloat16, torch.float16
    return {
        "modules": {"sd3": sd3, "flux": flux},
        "sd3": (write(sd3_state_dict(sd3), d / "sd3.5_medium.safetensors", bf16), {}),
        "sd3-separate": (write(sd3_state_dict(sd3, encoders=False), d / "sd3.5_medium-bare.safetensors", fp16), {
            "clip_l": write(encoder_file(sd3.text_encoders[0]), d / "clip_l.safetensors"),
            "clip_g": write(encoder_file(sd3.text_encoders[1]), d / "clip_g.safetensors"),
            "t5": write(t5, d / "t5xxl_fp16.safetensors", fp16)}),
        "flux-bfl": (write(bfl_file(flux), d / "flux1-dev.safetensors", bf16), {
            "vae": write(ae_file(flux.vae), d / "ae.safetensors"),
            "clip_l": write(encoder_file(flux.clip), d / "flux-clip_l.safetensors"),
            "t5": write(encoder_file(flux.t5), d / "flux-t5xxl.safetensors", bf16)}),
        "flux-aio": (write(comfy_file(flux), d / "flux1-dev-aio.safetensors"), {}),
    }


def _load(files: dict[str, Any], case: str, stream: bool) -> Any:
    path, extra = files[case]
    return (load_sd3 if case.startswith("sd3") else load_flux)(path, stream=stream, **extra)


def _parts(case: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """(streamed name, whole-file module attribute) of the transformer and of T5."""
    if case.startswith("sd3"):
        return ("transformer", "transformer"), ("text_encoder_3", "text_encoders")
    return ("transformer", "transformer"), ("text_encoder_2", "t5")


def _module(modules: Any, attr: str) -> torch.nn.Module:
    return modules.text_encoders[2] if attr == "text_encoders" else getattr(modules, attr)


@pytest.mark.parametrize("case", ["sd3", "sd3-separate", "flux-bfl", "flux-aio"])
def test_streamed_weights_equal_the_whole_file_conversion(files: dict, case: str) -> None:
    """Every weight the streamed parts give equals the whole-file path's (diffusers' from_single_file and
    creators), bit for bit, float32; FLUX.1's also equal the weights the file was written from (rounded as the
    file stored them). Small parts (CLIP, VAE) are loaded either way; the tiny files are not streamed unless
    asked (they are under a billion parameters)."""
    streamed, whole = _load(files, case, True), _load(files, case, False)
    assert not whole.streamed
    seeded = files["modules"]["flux"] if case.startswith("flux") else None
    for name, attr in _parts(case):
        assert _module(streamed.modules, attr) is None and _module(whole.modules, attr) is not None
        weights = streamed.streamed[name].weights
        ref = _module(whole.modules, attr).state_dict()
        ref.pop("encoder.embed_tokens.weight", None)  # T5's tied embedding: streamed once, as shared.weight
        for k, want in ref.items():
            got = weights(k)
            assert got.dtype == torch.float32 and torch.equal(got, want), f"{case} {name}: {k} differs"
            if seeded is not None:
                origin = _module(seeded, attr).state_dict()[k]
                cast = torch.float32 if case == "flux-aio" else torch.bfloat16
                assert torch.equal(got, origin.to(cast).float()), f"{case} {name}: {k} is not the file's"


class _Reads:
    """Counts the streamed parts' reads of source tensors and how many of them are held at once (by their
    storage: a view or a numpy array of a tensor keeps it)."""

    def __init__(self, real: Any) -> None:
        self.real, self.keys, self.held, self.most_held = real, [], 0, 0

    def read(self, path: Path, key: str) -> torch.Tensor:
        t = self.real(path, key)
        self.keys.append(key)
        self.held += 1
        self.most_held = max(self.most_held, self.held)
        weakref.finalize(t.untyped_storage(), self._freed)
        return t

    def _freed(self) -> None:
        self.held -= 1


CASES = [  # (file, part, tokens, parity latents)
    ("sd3", "transformer", 85, (1, 8, 12)),
    ("flux-aio", "transformer", 16, (1, 8, 12)),
    ("sd3-separate", "text_encoder_3", 16, (1, 8, 12)),
]


@pytest.mark.parametrize(("case", "part", "tokens", "shape"), CASES)
def test_streamed_graph_equals_diffusers_reading_one_tensor_at_a_time(
    files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, part: str, tokens: int, shape: tuple
) -> None:
    """The part exported streamed from the file: nothing of it is read at load, nor by the whole-file reader;
    its source tensors are read one at a time (at most the one being converted and the last one kept) while the
    external data is written; the graph on ort-cpu equals the whole-file path's diffusers module."""
    reads, whole_reads = _Reads(lazy_convert.read_tensor), []
    monkeypatch.setattr(lazy_convert, "read_tensor", reads.read)
    real_whole = checkpoint_files.read_tensors

    def whole(path: Path, names: dict[str, str]) -> dict[str, torch.Tensor]:
        whole_reads.extend(names)
        return real_whole(path, names)

    for module in (checkpoint_files, sd3_single_file, flux_single_file):
        monkeypatch.setattr(module, "read_tensors", whole)
    model = _load(files, case, True)
    assert reads.keys == []  # the load records the conversion; it reads nothing of the streamed parts
    st = model.streamed[part]
    if part == "transformer":
        spec = (sd3_streamed_spec if case.startswith("sd3") else streamed_transformer_spec)(st.config, tokens)
    else:
        spec = streamed_t5_spec(st.config, tokens)
    comp = export_streamed(spec, st.weights, "fp32", tmp_path / part)
    path, _ = files[case]
    source = files[case][1].get("t5", path) if part != "transformer" else path
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as f:
        keys = [k for k in f.keys() if part != "transformer" or k.startswith(MMDIT)]  # noqa: SIM118
    assert sorted(set(reads.keys)) == sorted(keys)  # every tensor of the part, each from the file itself
    assert len(reads.keys) <= len(keys) * 4  # a fused tensor read again for at most its four parts
    assert reads.most_held <= 2
    assert not set(whole_reads) & set(keys)  # the whole-file reader never touched the streamed part
    reference = _module(_load(files, case, False).modules, _parts(case)[0 if part == "transformer" else 1][1])
    if part == "transformer":
        cspec = (sd3_spec if case.startswith("sd3") else transformer_spec)(reference, tokens)
    else:
        cspec = t5_spec(reference, tokens)
    par = check_parity(cspec, comp.precision, tmp_path / part / "model.onnx", shape)
    assert par.rel_err <= par.bound


def test_conversions_that_cannot_be_streamed_are_refused_before_any_read(
    files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operation the recorder cannot replay is named; a file whose MMDiT lacks a tensor (the converter's
    KeyError), a T5 file lacking one (the converter passes it by) and a file holding one of another shape are
    refused from their headers, no tensor read."""
    monkeypatch.setattr(lazy_convert, "read_tensor", lambda *a: pytest.fail("a tensor was read"))
    path, _ = files["sd3"]
    lazy = lazy_convert.lazy_tensors(path, {MMDIT + "pos_embed": "a"})
    with pytest.raises(ArtifactError, match=r"applied mul to a lazy tensor, which sdrt cannot replay"):
        lazy_convert.record(lambda sd: {"b": sd["a"] * 2}, lazy)
    with pytest.raises(ArtifactError, match=r"applied __setitem__ to a lazy tensor"):
        lazy_convert.record(lambda sd: sd["a"].__setitem__(0, 1.0) or sd, lazy)
    sd = sd3_state_dict(files["modules"]["sd3"])
    missing = {k: v for k, v in sd.items() if k != MMDIT + "joint_blocks.1.x_block.attn.qkv.bias"}
    with pytest.raises(ArtifactError, match=r"cannot convert the MMDiT of missing.safetensors \(KeyError: "
                                            r"'joint_blocks.1.x_block.attn.qkv.bias'\)"):
        load_sd3(write(missing, tmp_path / "missing.safetensors"), stream=True)
    bare, extra = files["sd3-separate"]
    t5 = {k: v for k, v in encoder_file(files["modules"]["sd3"].text_encoders[2]).items()
          if k != "encoder.final_layer_norm.weight"}
    with pytest.raises(ArtifactError, match=r"t5-short.safetensors: the T5-XXL text encoder converts to weights that "
                                            r"do not fit its architecture \(1 missing \(e.g. "
                                            r"encoder.final_layer_norm.weight\)\)"):
        load_sd3(bare, **{**extra, "t5": write(t5, tmp_path / "t5-short.safetensors")}, stream=True)
    wrong = {**sd, MMDIT + "final_layer.linear.bias": torch.zeros(3)}
    with pytest.raises(ArtifactError, match=r"wrong.safetensors: the MMDiT converts to weights that do not fit its "
                                            r"architecture \(proj_out.bias is \[3\], not \[64\]\)"):
        load_sd3(write(wrong, tmp_path / "wrong.safetensors"), stream=True)


def _sparse_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A .safetensors file of these bf16 shapes whose data is a hole (a sparse file: no disk, nothing to read)."""
    header, offset = {}, 0
    for k, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[k] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + offset)
    return path


@pytest.mark.parametrize("name", ["flux-dev", "sd35-large", "sd35-medium"])
def test_full_size_files_record_to_the_architecture(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full-size layouts (FLUX.1 [dev]'s 23.8 GB transformer; SD 3.5 Large's and Medium's MMDiT, dual-attention
    blocks included): diffusers' converters record on them with no operation the recorder lacks (at FLUX.1's
    width, no fitting), into every name and shape the streamed architecture needs; nothing is read."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    monkeypatch.setattr(lazy_convert, "read_tensor", lambda *a: pytest.fail("a tensor was read"))
    flux = name.startswith("flux")
    p = get_flux_preset(name) if flux else get_sd3_preset(name)
    with torch.device("meta"):
        module = (FluxTransformer2DModel if flux else SD3Transformer2DModel)(**p.config("transformer"))
    layout = (transformer_to_bfl if flux else transformer_to_sd3)(module.state_dict())
    path = _sparse_file(tmp_path / f"{name}.safetensors", {k: tuple(v.shape) for k, v in layout.items()})
    expected = (weight_shapes(p.config("transformer"), p.config("t5")) if flux
                else sd3_weight_shapes(p.config("transformer"), None))["transformer"]
    convert = to_diffusers if flux else convert_sd3_transformer_checkpoint_to_diffusers
    lazy = lazy_convert.lazy_tensors(path, {k: k for k in layout})
    recorded = lazy_convert.record(convert, lazy)
    lazy_convert.check_shapes(recorded, expected, "transformer", path.name)
    assert set(recorded) == set(expected)
