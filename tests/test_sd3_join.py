"""SD3's host-side text join (``runtime/families/sd3_join.py``) against diffusers' own
``StableDiffusion3Pipeline.encode_prompt`` on the tiny preset's encoders.

The tokenizers are stand-ins (a fixed word -> id map; no T5 vocabulary ships with sdrt): what is under test is
the join of the encoders' outputs, and both sides see the same ids. The join is fed the encoders' outputs
computed here from those ids, so it must equal diffusers' result exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdrt.export.sd3_presets import build_modules, get_sd3_preset
from sdrt.runtime.errors import InputError
from sdrt.runtime.families.sd3_join import sd3_join


class _Tokenizer:
    """Enough of a transformers tokenizer for diffusers' SD3 prompt encoding: words -> ids, padded."""

    def __init__(self, vocab: int, max_length: int, bos: int | None, eos: int, pad: int) -> None:
        self.vocab, self.model_max_length, self.bos, self.eos, self.pad = vocab, max_length, bos, eos, pad

    def ids(self, text: str) -> list[int]:
        words = [3 + sum(map(ord, w)) * 7919 % (self.vocab - 10) for w in text.split()]
        return ([self.bos] if self.bos is not None else []) + words + [self.eos]

    def __call__(self, prompt: list[str], padding: str = "longest", max_length: int | None = None,
                 truncation: bool = False, return_tensors: str = "pt", **_: object) -> SimpleNamespace:
        rows = [self.ids(p) for p in prompt]
        n = max_length if padding == "max_length" else max(map(len, rows))
        rows = [(r[: n - 1] + [self.eos] if len(r) > n else r) + [self.pad] * max(0, n - len(r)) for r in rows]
        return SimpleNamespace(input_ids=torch.tensor(rows))


@pytest.fixture(scope="module")
def pipe_parts():
    preset = get_sd3_preset("sd3-tiny")
    mods = build_modules(preset, seed=0)
    toks = (_Tokenizer(49408, 77, 49406, 49407, 49407), _Tokenizer(49408, 77, 49406, 49407, 0),
            _Tokenizer(32128, preset.t5_tokens, None, 1, 0))
    return preset, mods, toks


def _pipeline(preset, mods, toks, with_t5: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    sched = {k: v for k, v in preset.config("scheduler").items() if k != "_class_name"}
    clip_l, clip_g, t5 = mods.text_encoders
    return StableDiffusion3Pipeline(
        transformer=mods.transformer, scheduler=FlowMatchEulerDiscreteScheduler(**sched), vae=mods.vae,
        text_encoder=clip_l, tokenizer=toks[0], text_encoder_2=clip_g, tokenizer_2=toks[1],
        text_encoder_3=t5 if with_t5 else None, tokenizer_3=toks[2] if with_t5 else None)


def _ours(prompts: list[str], mods, toks, preset, with_t5: bool) -> tuple[np.ndarray, np.ndarray]:
    """The encoders run here on the stand-in tokenizers' ids, then sdrt's join."""
    hidden, pooled = [], []
    with torch.inference_mode():
        for enc, tok in zip(mods.text_encoders[:2], toks[:2]):
            out = enc(tok(prompts, padding="max_length", max_length=77).input_ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].numpy())
            pooled.append(out.text_embeds.numpy())
        t5 = None
        if with_t5:
            ids = toks[2](prompts, padding="max_length", max_length=preset.t5_tokens).input_ids
            t5 = mods.text_encoders[2](ids)[0].numpy()
    joint = int(mods.transformer.config.joint_attention_dim)
    return sd3_join(hidden, pooled, t5, joint_dim=joint, t5_tokens=preset.t5_tokens)


@pytest.mark.parametrize("with_t5", [True, False])
def test_join_equals_diffusers_encode_prompt(pipe_parts, with_t5: bool) -> None:
    preset, mods, toks = pipe_parts
    pipe = _pipeline(preset, mods, toks, with_t5)
    prompts = ["a red cube on a table", "two birds"]
    with torch.inference_mode():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompts, None, None, device=torch.device("cpu"), do_classifier_free_guidance=True,
            max_sequence_length=preset.t5_tokens)
    hidden, pool = _ours(prompts, mods, toks, preset, with_t5)
    np.testing.assert_array_equal(hidden, embeds.numpy())
    np.testing.assert_array_equal(pool, pooled.numpy())
    assert hidden.shape == (2, 77 + preset.t5_tokens, int(mods.transformer.config.joint_attention_dim))
    # an empty negative prompt is encoded (SD3 does not zero it): the same join of "" gives diffusers' negatives
    neg_hidden, neg_pool = _ours(["", ""], mods, toks, preset, with_t5)
    np.testing.assert_array_equal(neg_hidden, neg.numpy())
    np.testing.assert_array_equal(neg_pool, neg_pooled.numpy())


def test_join_refuses_mismatched_widths() -> None:
    h = [np.zeros((1, 77, 16), np.float32)] * 2
    p = [np.zeros((1, 16), np.float32)] * 2
    with pytest.raises(InputError, match="joint_attention_dim 24"):
        sd3_join(h, p, None, joint_dim=24)
    with pytest.raises(InputError, match="T5's hidden states"):
        sd3_join(h, p, np.zeros((1, 5, 40), np.float32), joint_dim=48)
