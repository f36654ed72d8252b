"""Stability's SD 3.5 ControlNet single files (``sd3.5_large_controlnet_canny.safetensors``, ``_depth``, ``_blur``)
converted offline to a diffusers ``SD3ControlNetModel``.

The files hold Stability's own names for the single-stream blocks (``transformer_blocks.i.attn.qkv``, ``attn.proj``,
``mlp.fc1`` / ``fc2``, ``adaLN_modulation.1``), and diffusers' for the rest (``controlnet_blocks.i``,
``pos_embed_input.proj``, ``time_text_embed.*``), plus a scalar ``control_type`` (which preprocessing the net was
trained on; no weight). The architecture is read from the tensor shapes: the width from the per-block linears,
the depth from the block count, the patch size and extra conditioning channels from the control latents'
embedding, the pooled width from the text embedder. The head width is in no shape: it is the paired
transformer's (64 in every SD 3 / 3.5 model, the default without one), as are the fields no weight records
(``sample_size``, ``pos_embed_max_size``, ...). These nets have no position embedding of their own (they take the
transformer's) and read no text states. Only the safetensors header and tensors are read; nothing is unpickled.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.errors import ArtifactError, InputError

from .controlnet_loading import LoadedControlNet
from .loading import sha256_file

_QKV = re.compile(r"transformer_blocks\.(\d+)\.attn\.qkv\.weight")
# Stability's name inside a block -> diffusers' (the fused qkv is split apart separately)
_BLOCK_NAMES = {"attn.proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
                "adaLN_modulation.1": "norm1.linear"}
_IGNORED = ("control_type",)  # the preprocessing the net was trained for (0 blur, 1 canny, 2 depth); no weight
_EXPECTED = ("Stability's SD 3.5 ControlNet layout (pos_embed_input.proj.*, controlnet_blocks.N.*, "
             "transformer_blocks.N.attn.qkv.*, time_text_embed.*)")
_HEAD_DIM = 64  # every SD 3 / 3.5 transformer's, and diffusers' conversion script's


def is_sd3_controlnet_keys(keys: Any) -> bool:
    """Tensor names of an SD 3.5 ControlNet in Stability's layout."""
    return "pos_embed_input.proj.weight" in keys and "transformer_blocks.0.attn.qkv.weight" in keys


def is_sd3_file(path: Path) -> bool:
    """Whether ``path`` is a readable .safetensors file in Stability's SD 3.5 ControlNet layout (header only)."""
    try:
        return is_sd3_controlnet_keys(_header(path))
    except (InputError, ArtifactError):
        return False


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's name and shape, from the safetensors header alone."""
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{path.name}: an SD 3 / 3.5 ControlNet loads from a .safetensors file (Stability's SD 3.5 "
                         "ControlNet files) or a diffusers SD3ControlNetModel folder; convert it to one of those")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()  # safe_open is no mapping
            return {k: tuple(f.get_slice(k).get_shape()) for k in names}
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path.name} is not a readable .safetensors file ({e}); it may be truncated") from e


def check_sd3_controlnet_file(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The shapes of an SD 3.5 ControlNet file in Stability's layout (reading only its header); InputError for a
    ControlNet of another family or a whole model, ArtifactError for anything else, naming what was expected."""
    from .controlnet_single_file import is_controlnet_keys

    p = Path(path)
    shapes = _header(p)
    if is_sd3_controlnet_keys(shapes):
        return shapes
    if is_controlnet_keys(shapes):
        raise InputError(
            f"{p.name} is an SD 1.x / SDXL ControlNet (control_model.* layout, a ControlNetModel), but the model is "
            "SD 3 / 3.5: a ControlNet works only with the model family it was trained for; pass an SD 3 / 3.5 "
            "ControlNet (Stability's SD 3.5 ControlNet .safetensors or a diffusers SD3ControlNetModel folder)")
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "text_encoders.")) for k in shapes):
        raise InputError(f"{p.name} is a whole model, not a ControlNet; pass it as --model, and as --controlnet an "
                         "SD 3 / 3.5 ControlNet file or folder")
    if "pos_embed_input.proj.weight" in shapes and "transformer_blocks.0.attn.to_q.weight" in shapes:
        raise InputError(f"{p.name} holds an SD3 ControlNet in diffusers' layout without its config.json; pass the "
                         "folder that holds both (config.json + diffusion_pytorch_model.safetensors)")
    raise ArtifactError(f"{p.name} is not an SD 3 / 3.5 ControlNet: expected {_EXPECTED}, found "
                        f"{', '.join(sorted(shapes)[:3]) or 'no tensors'}")


def infer_sd3_controlnet_config(shapes: Mapping[str, tuple[int, ...]],
                                transformer_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``SD3ControlNetModel`` config of Stability-layout tensors (their shapes; see the module docstring), the
    fields no shape records taken from ``transformer_config`` (the transformer it pairs with) where given."""
    tr = dict(transformer_config or {})
    lacking = [k for k in ("pos_embed_input.proj.weight", "time_text_embed.text_embedder.linear_1.weight",
                           "controlnet_blocks.0.weight") if k not in shapes]
    if lacking or len(shapes["pos_embed_input.proj.weight"]) != 4:
        raise ArtifactError(f"the ControlNet lacks {', '.join(lacking) or 'a 4-d pos_embed_input.proj.weight'}: "
                            f"expected {_EXPECTED}; the file may be incomplete")
    inner = int(shapes["pos_embed_input.proj.weight"][0])
    patch = int(shapes["pos_embed_input.proj.weight"][2])
    cond_in = int(shapes["pos_embed_input.proj.weight"][1])
    layers = sum(1 for k in shapes if _QKV.fullmatch(k))
    in_ch = int(tr.get("in_channels", 16))
    head = int(tr.get("attention_head_dim", _HEAD_DIM))
    if cond_in < in_ch or inner % head:
        raise ArtifactError(f"the ControlNet's control embedding takes {cond_in} channels to width {inner}, which "
                            f"does not fit a transformer of {in_ch} latent channels and heads of {head}")
    return {
        "sample_size": int(tr.get("sample_size", 128)), "patch_size": patch, "in_channels": in_ch,
        "num_layers": layers, "attention_head_dim": head, "num_attention_heads": inner // head,
        "joint_attention_dim": None, "caption_projection_dim": int(tr.get("caption_projection_dim", inner)),
        "pooled_projection_dim": int(shapes["time_text_embed.text_embedder.linear_1.weight"][1]),
        "out_channels": int(tr.get("out_channels", in_ch)), "pos_embed_max_size": tr.get("pos_embed_max_size"),
        "extra_conditioning_channels": cond_in - in_ch, "dual_attention_layers": (), "qk_norm": None,
        "pos_embed_type": None, "use_pos_embed": False, "force_zeros_for_pooled_projection": False,
    }


def convert_sd3_controlnet(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stability's names -> diffusers' (the fused qkv split in three along its output rows); ``control_type``
    dropped; anything else passes through under its own name (and fails the shape check if unknown)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in _IGNORED:
            continue
        m = re.fullmatch(r"(transformer_blocks\.\d+)\.(.+)\.(weight|bias)", k)
        if m is None:
            out[k] = v
            continue
        block, name, kind = m.groups()
        if name == "attn.qkv":
            for part, t in zip(("to_q", "to_k", "to_v"), torch.chunk(v, 3, dim=0), strict=True):
                out[f"{block}.attn.{part}.{kind}"] = t.clone()
        else:
            out[f"{block}.{_BLOCK_NAMES.get(name, name)}.{kind}"] = v
    return out


def load_sd3_controlnet_single_file(path: str | Path,
                                    transformer_config: Mapping[str, Any] | None = None) -> LoadedControlNet:
    """Stability's SD 3.5 ControlNet file as a diffusers ``SD3ControlNetModel`` (float32, eval), its architecture
    inferred from the tensor shapes (``transformer_config``: the transformer it pairs with, for the head width and
    the fields no weight records). InputError/ArtifactError naming what was expected for any other file."""
    from diffusers import SD3ControlNetModel
    from safetensors import safe_open

    p = Path(path)
    shapes = check_sd3_controlnet_file(p)
    cfg = infer_sd3_controlnet_config(shapes, transformer_config)
    with torch.device("meta"):
        net = SD3ControlNetModel(**cfg)
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in convert_sd3_controlnet(
        {k: torch.empty(s, device="meta") for k, s in shapes.items()}).items()}
    diffs = [f"{k} missing" for k in want if k not in have]
    diffs += [f"{k} {list(have[k])} in the file, {list(s)} expected" for k, s in want.items()
              if k in have and have[k] != s]
    diffs += [f"{k} unexpected" for k in have if k not in want]
    if diffs:
        raise ArtifactError(f"{p.name} does not fit an SD3 ControlNet in {_EXPECTED} ({len(diffs)} differences, "
                            f"e.g. {'; '.join(diffs[:3])}); convert it to a diffusers SD3ControlNetModel folder "
                            "and pass that")
    with safe_open(str(p), framework="pt") as f:  # float32 one tensor at a time: no second copy of a half file
        names = f.keys()
        tensors = {k: f.get_tensor(k).float() for k in names if k not in _IGNORED}
    net.load_state_dict(convert_sd3_controlnet(tensors), strict=True, assign=True)
    net = net.eval()
    return LoadedControlNet(net, {"kind": "single_file", "path": str(p), "sha256": sha256_file(p)}, p.name)
