"""Clip skip chosen at export (``sdrt export --clip-skip N``) against diffusers' ``clip_skip``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdrt.cli import main
from sdrt.export.exporter import export_model
from sdrt.export.loading import load_model
from sdrt.runtime.errors import InputError
from sdrt.runtime.pipeline import Pipeline

from .helpers.references import diffusers_pipe

PROMPT = "a portrait of an astronaut, oil painting"


def _export(tmp_path_factory, preset: str, clip_skip: int):
    out = tmp_path_factory.mktemp("clipskip") / f"{preset}-skip{clip_skip}"
    export_model(load_model(random_preset=preset), out, fp16=False, clip_skip=clip_skip)
    return out


@pytest.mark.parametrize(("preset", "clip_skip"), [("sd15-tiny", 1), ("sd15-tiny", 2), ("sdxl-tiny", 1)])
def test_embeddings_match_diffusers(tmp_path_factory, tiny_export, preset: str, clip_skip: int) -> None:
    folder = _export(tmp_path_factory, preset, clip_skip)
    assert json.loads((folder / "sdrt.json").read_text())["clip_skip"] == clip_skip
    pipe, _ = diffusers_pipe(preset, tiny_export(preset, "fp32"))
    enc = pipe.text_encoder
    added = not hasattr(enc, "text_model")
    if added:
        # diffusers reads text_encoder.text_model.final_layer_norm, which transformers 5's CLIPTextModel
        # holds itself: give diffusers' own code that path (a plain attribute, not a registered submodule), for
        # this test only: the pipeline is shared, and diffusers' LoRA loader finds no layer through it
        object.__setattr__(enc, "text_model", enc)
    try:
        with torch.no_grad():
            if preset.startswith("sdxl"):
                theirs, _, _, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False,
                                                     clip_skip=clip_skip)
                plain = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)[0]
            else:
                theirs = pipe.encode_prompt(PROMPT, "cpu", 1, False, clip_skip=clip_skip)[0]
                plain = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    finally:
        if added:
            del enc.__dict__["text_model"]
    assert not hasattr(enc, "text_model") or not added
    with Pipeline.load(folder, backend="ort-cpu") as ours:
        emb = ours.encode_prompt(PROMPT, guided=False)
        hidden = ours.backend.to_host(emb.hidden)
        assert ours.manifest.clip_skip == clip_skip
    np.testing.assert_allclose(hidden, theirs.numpy(), rtol=0, atol=1e-4 * float(theirs.abs().max()))
    assert not np.allclose(hidden, plain.numpy(), atol=1e-3)  # the skip changes the conditioning


@pytest.mark.parametrize(("preset", "too_deep"), [("sd15-tiny", 3), ("sdxl-tiny", 2), ("sd15-tiny", -1)])
def test_beyond_the_encoder_is_an_error(tmp_path, preset: str, too_deep: int) -> None:
    model = load_model(random_preset=preset)
    with pytest.raises(InputError, match=r"clip skip .* beyond .*\(3 layers.*use 0 to"):
        export_model(model, tmp_path / "out", clip_skip=too_deep)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_cli_clip_skip_error_exits_1(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--random", "sd15-tiny", "--out", str(tmp_path / "o"), "--clip-skip", "9"]) == 1
    assert "--clip-skip 9 is beyond" in capsys.readouterr().err
