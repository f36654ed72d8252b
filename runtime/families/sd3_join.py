"""SD3's text join on the host (numpy): the three encoders' outputs -> the transformer's text inputs.

As diffusers' ``StableDiffusion3Pipeline.encode_prompt``: the two CLIP encoders' penultimate hidden states
joined on the channel axis ([B, 77, 768 + 1280]), zero-padded on channels to T5's width, then T5's states
appended on the token axis ([B, 77 + 256, 4096]); without T5, zeros [B, t5_tokens, joint_attention_dim] take
its place (and the CLIP states are padded to that width). The pooled embedding is both CLIP encoders'
``text_embeds`` joined ([B, 768 + 1280]).

A first, host-side form for parity with diffusers; the shared pipeline joins on the device with a small ONNX
graph (``runtime/text_join.py``), which knows neither the padding nor the token-axis join yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError


def sd3_join(clip_hidden: Sequence[np.ndarray], clip_pooled: Sequence[np.ndarray], t5_hidden: np.ndarray | None,
             *, joint_dim: int, t5_tokens: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(``encoder_hidden_states`` [B, 77 + T, joint_dim], ``pooled_projections`` [B, sum P]).

    ``clip_hidden``: each CLIP encoder's penultimate hidden states [B, 77, C_j]; ``clip_pooled``: their
    ``text_embeds`` [B, P_j]; ``t5_hidden``: T5's last hidden state [B, T, joint_dim], or None for a model
    run without T5 (then T = ``t5_tokens``, diffusers' ``max_sequence_length``). The result's dtype is
    numpy's for the concatenation of the inputs given (diffusers' zeros take the CLIP encoder's dtype).
    """
    clip = np.concatenate(list(clip_hidden), axis=-1)
    rows, _, width = clip.shape
    if t5_hidden is None:
        t5 = np.zeros((rows, t5_tokens, joint_dim), clip.dtype)
    else:
        t5 = t5_hidden
        if t5.ndim != 3 or t5.shape[0] != rows or t5.shape[-1] != joint_dim:
            raise InputError(f"T5's hidden states are {t5.shape}; the join needs [{rows}, tokens, {joint_dim}]")
    if width > joint_dim:
        raise InputError(f"the CLIP encoders' joined width {width} exceeds the transformer's joint_attention_dim "
                         f"{joint_dim}: these encoders do not belong to this transformer")
    clip = np.pad(clip, ((0, 0), (0, 0), (0, joint_dim - width)))
    hidden = np.concatenate([clip, t5], axis=1)
    pooled = np.concatenate(list(clip_pooled), axis=-1)
    return hidden, pooled
