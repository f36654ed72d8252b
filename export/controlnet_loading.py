"""Load a ControlNet into PyTorch and check that it pairs with the model it is exported with.

Sources, all offline:

1. a diffusers ``ControlNetModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``; the
   ``.bin`` only with ``allow_pickle``);
2. a single ``.safetensors`` file in the original ``control_model.*`` layout (A1111's), converted with
   diffusers' single-file code and a shipped preset (``controlnet_single_file``), or Stability's SD 3.5
   ControlNet file, its architecture read from its shapes (``sd3_controlnet_single_file``);
3. synthetic weights of a preset (``random_controlnet``), or a copy of a UNet's encoder
   (``controlnet_from_unet``, diffusers' ``ControlNetModel.from_unet``), for tests and the demo.

``check_pairing`` refuses a ControlNet of another family or architecture than the UNet before any
export work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.errors import ArtifactError, InputError, UnsafeCheckpointError

from .controlnet_presets import get_controlnet_preset
from .diffusers_config import class_name
from .loading import LoadedModel, folder_digest, randomize_norms

CONTROLNET_CLASS = "ControlNetModel"
SD3_CONTROLNET_CLASS = "SD3ControlNetModel"  # SD 3 / 3.5's (export/sd3_controlnet.py pairs and exports it)
FLUX_CONTROLNET_CLASS = "FluxControlNetModel"  # FLUX.1's (export/flux_controlnet.py pairs and exports it)
CONTROLNET_CLASSES = (CONTROLNET_CLASS, SD3_CONTROLNET_CLASS, FLUX_CONTROLNET_CLASS)


@dataclass
class LoadedControlNet:
    """A diffusers ControlNetModel in float32, eval mode, and where it came from."""

    controlnet: torch.nn.Module
    source: dict[str, Any] = field(default_factory=dict)  # kind, path, sha256 (as LoadedModel.source)
    name: str = "controlnet"  # for messages: the path or preset it came from

    @property
    def residuals(self) -> int:
        """How many residuals it gives the UNet: one per down-block output, then the mid block's."""
        return len(self.controlnet.controlnet_down_blocks) + 1


def random_controlnet(preset_name: str, seed: int = 0) -> LoadedControlNet:
    """Synthetic weights in a ControlNet preset's architecture. The residual convolutions, zero in a fresh
    ControlNet (so it starts as a no-op), get random weights, so the residuals are those of a trained net."""
    import diffusers

    preset = get_controlnet_preset(preset_name)
    torch.manual_seed(seed)
    net = getattr(diffusers, preset.model_class)(**preset.config())
    _randomize_zero_convs(net, seed)
    return LoadedControlNet(net.eval(), {"kind": "random", "preset": preset_name, "seed": seed}, preset_name)


def controlnet_from_unet(model: LoadedModel, seed: int = 0) -> LoadedControlNet:
    """A ControlNet copying ``model``'s UNet encoder (diffusers' ``from_unet``), its zero convolutions
    made random as in ``random_controlnet``."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(model.unet)
    _randomize_zero_convs(net, seed)
    return LoadedControlNet(net.eval(), {"kind": "from_unet", "preset": model.preset.name, "seed": seed},
                            f"ControlNet from the {model.preset.name} UNet")


def _randomize_zero_convs(net: torch.nn.Module, seed: int) -> None:
    if hasattr(net, "controlnet_single_blocks"):  # a FLUX ControlNet: its per-block linears, the control latents'
        zero = [*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder]
    elif hasattr(net, "controlnet_blocks"):  # an SD3 ControlNet: its per-block linears, the control latents' embedding
        zero = [*net.controlnet_blocks, net.pos_embed_input.proj]
    else:
        zero = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero:
            conv.reset_parameters()
    randomize_norms(net, seed)


def load_controlnet(path: str | Path, *, allow_pickle: bool = False, unet_config: Mapping[str, Any] | None = None,
                    transformer_config: Mapping[str, Any] | None = None) -> LoadedControlNet:
    """A ControlNet from a diffusers folder or a single ``.safetensors`` file (InputError/ArtifactError if
    ``path`` is neither, or is a whole model). ``unet_config``: the UNet it will be exported with, whose
    encoder a single file's architecture is matched against first (beyond the shipped presets).
    ``transformer_config``: the SD 3 / 3.5 transformer it will be exported with; a single file must then be
    Stability's SD 3.5 ControlNet layout (an SD3ControlNetModel), whose head width is the transformer's."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{p} does not exist; pass --controlnet a diffusers ControlNet folder (config.json + "
                            "diffusion_pytorch_model.safetensors) or a ControlNet .safetensors file")
    if p.is_dir():
        return _controlnet_folder(p, allow_pickle)
    from .sd3_controlnet_single_file import is_sd3_file, load_sd3_controlnet_single_file

    if transformer_config is not None:
        return load_sd3_controlnet_single_file(p, transformer_config)
    if is_sd3_file(p):
        if unet_config is not None:
            raise InputError(
                f"{p.name} is an SD 3 / 3.5 ControlNet (Stability's SD 3.5 layout, an {SD3_CONTROLNET_CLASS}), but "
                f"the model is {family_words(unet_config)}: a ControlNet works only with the model family it was "
                "trained for; pass a ControlNet made for this model's family, or export an SD 3.5 model with it")
        return load_sd3_controlnet_single_file(p)
    from .controlnet_single_file import load_controlnet_single_file

    return load_controlnet_single_file(p, allow_pickle=allow_pickle, unet_config=unet_config)


def controlnet_class(path: Path) -> str | None:
    """The diffusers ControlNet class a folder's config.json names (one of CONTROLNET_CLASSES), else None."""
    name = class_name(path / "config.json")
    return name if name in CONTROLNET_CLASSES else None


def is_controlnet_folder(path: Path) -> bool:
    return controlnet_class(path) is not None


def _controlnet_folder(path: Path, allow_pickle: bool) -> LoadedControlNet:
    import diffusers

    if (path / "model_index.json").is_file():
        raise InputError(
            f"{path} is a whole model (it holds model_index.json), not a ControlNet; pass it as --model, and "
            "as --controlnet a ControlNet folder (config.json with _class_name ControlNetModel)",
            cli=f"{path} is a whole model (it holds model_index.json), not a ControlNet: pass it as --model PATH, "
                "and as --controlnet a ControlNet folder or .safetensors file")
    if not is_controlnet_folder(path):
        raise ArtifactError(f"{path} is not a diffusers ControlNet folder: its config.json is missing or does not "
                            f"name {' or '.join(CONTROLNET_CLASSES)}; pass a ControlNet folder or a ControlNet "
                            ".safetensors file")
    has_safetensors = any(path.glob("diffusion_pytorch_model*.safetensors"))
    if not has_safetensors:
        if not any(path.glob("diffusion_pytorch_model*.bin")):
            raise ArtifactError(f"{path} has no diffusion_pytorch_model.safetensors; copy the weights next to "
                                "its config.json")
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{path} holds its weights only as a pickle (diffusion_pytorch_model.bin): loading it runs "
                "arbitrary code from the file. Prefer a .safetensors version; if you trust its origin, pass "
                "--allow-pickle.")
    try:
        cls = getattr(diffusers, controlnet_class(path) or CONTROLNET_CLASS)
        net = cls.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32,
                                  use_safetensors=has_safetensors)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot load the ControlNet folder {path}: {e}") from e
    return LoadedControlNet(net.float().eval(), {"kind": "diffusers", "path": str(path),
                                                 "sha256": folder_digest(path)}, str(path))


# -- pairing -------------------------------------------------------------------------------------------

def family_words(cfg: Any) -> str:
    """The family a UNet or ControlNet config belongs to, in words, for refusals."""
    if cfg.get("num_single_layers") is not None:  # double- and single-stream blocks: FLUX.1 (FluxControlNetModel)
        return "FLUX.1"
    if cfg.get("cross_attention_dim") is None:  # no UNet encoder: an SD3 ControlNet (SD3ControlNetModel)
        return "SD 3 / 3.5"
    cross = int(cfg.cross_attention_dim if not isinstance(cfg, dict) else cfg["cross_attention_dim"])
    add = cfg.get("addition_embed_type")
    if add == "text_time":
        return f"SDXL (cross-attention width {cross}, text/time addition embedding)"
    return f"{'SD 2.x' if cross == 1024 else 'SD 1.x' if cross == 768 else 'SD 1.x/2.x-like'} (cross-attention width {cross})"


def with_article(words: str) -> str:
    """``family_words`` with its article: "an SD 1.x ...", "a FLUX.1"."""
    return f"{'an' if words.startswith('SD') else 'a'} {words}"


def _as_list(v: Any, n: int) -> list[Any]:
    return [v] * n if isinstance(v, (int, str)) or v is None else list(v)


def check_pairing(model: LoadedModel, nets: list[LoadedControlNet]) -> None:
    """Each ControlNet must copy the UNet's encoder: same family (cross-attention width, SDXL addition
    embedding), block types and widths. Raises InputError naming both sides and the fix."""
    u = model.unet.config
    if nets and int(u.in_channels) != int(model.vae.config.latent_channels):
        raise InputError(
            f"the model's UNet takes {u.in_channels} input channels (an inpainting UNet); ControlNets with an "
            "inpainting model are not supported yet: export an ordinary (4-channel) model with --controlnet, or "
            "the inpainting model without it")
    levels = len(u.block_out_channels)
    for j, cn in enumerate(nets):
        c = cn.controlnet.config
        what = f"ControlNet {j + 1} ({cn.name})"
        unet_family, cn_family = family_words(u), family_words(c)
        if (c.get("cross_attention_dim") is None or int(c.cross_attention_dim) != int(u.cross_attention_dim)
                or c.get("addition_embed_type") != u.get("addition_embed_type")
                or c.get("projection_class_embeddings_input_dim") != u.get("projection_class_embeddings_input_dim")):
            raise InputError(
                f"{what} is {with_article(cn_family)} ControlNet, but the model ({model.preset.name}) is {unet_family}: "
                "a ControlNet works only with the model family it was trained for; pass a ControlNet made for "
                "this model's family, or export a model of the ControlNet's family with it")
        diffs = []
        for label, cv, uv in (
            ("block widths", list(c.block_out_channels), list(u.block_out_channels)),
            ("down block types", list(c.down_block_types), list(u.down_block_types)),
            ("layers per block", c.layers_per_block, u.layers_per_block),
            ("transformer layers per block", _as_list(c.transformer_layers_per_block, levels),
             _as_list(u.transformer_layers_per_block, levels)),
            ("latent channels", int(c.in_channels), int(u.in_channels)),
        ):
            if cv != uv:
                diffs.append(f"{label} {cv} in the ControlNet, {uv} in the UNet")
        if diffs:
            raise InputError(
                f"{what} does not match the model's UNet ({model.preset.name}): {'; '.join(diffs)}. A ControlNet "
                "copies its UNet's encoder, so it pairs only with that architecture: pass a ControlNet made for "
                "this model")
