"""Test helper: a diffusers-format model's weights in the original LDM single-file layout.

A hand-written reverse mapping (diffusers / transformers names -> CompVis LDM, Stability generative-models and
OpenCLIP names), written from those codebases' module layouts and independent of diffusers' own converter,
so that a round trip through the converter is checked against something it did not produce.

Works on meta tensors too, so full-size key/shape tables cost no memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdrt.export.loading import LoadedModel
from sdrt.export.presets import get_preset

_RESNET = {  # diffusers ResnetBlock2D -> LDM ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # the rest (norm1, conv1, norm2, conv2) is named alike
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _sub(rest: str, table: dict[str, str]) -> str:
    """Rename the leading module of ``rest`` (e.g. ``conv1.weight``) through ``table``."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel -> ``model.diffusion_model.*`` (openaimodel.UNetModel)."""
    per = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        parts = key.split(".")
        if parts[0] == "time_embedding":
            new = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]] + "." + parts[2]
        elif parts[0] == "add_embedding":
            new = {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}[parts[1]] + "." + parts[2]
        elif parts[0] == "conv_in":
            new = "input_blocks.0.0." + parts[1]
        elif parts[0] == "conv_norm_out":
            new = "out.0." + parts[1]
        elif parts[0] == "conv_out":
            new = "out.2." + parts[1]
        elif parts[0] == "down_blocks":
            level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            first = 1 + level * (per + 1)  # input_blocks.0 is conv_in; each level: `per` layers + downsampler
            if kind == "resnets":
                new = f"input_blocks.{first + j}.0.{_sub(rest, _RESNET)}"
            elif kind == "attentions":
                new = f"input_blocks.{first + j}.1.{rest}"
            else:  # downsamplers.0.conv.*
                new = f"input_blocks.{first + per}.0.op.{rest.removeprefix('conv.')}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * j}.{_sub(rest, _RESNET)}"
            else:
                new = f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            first = level * (per + 1)
            if kind == "resnets":
                new = f"output_blocks.{first + j}.0.{_sub(rest, _RESNET)}"
            elif kind == "attentions":
                new = f"output_blocks.{first + j}.1.{rest}"
            else:  # the upsampler follows the last layer's resnet (and attention, if the level has one)
                assert level < levels - 1
                has_attn = config["up_block_types"][level].startswith("CrossAttn")
                new = f"output_blocks.{first + per}.{2 if has_attn else 1}.{rest}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + new] = t
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """AutoencoderKL -> ``first_stage_model.*`` (ldm.modules.diffusionmodules.model Encoder/Decoder)."""
    levels = len(config["block_out_channels"])
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            new = key
        else:
            side, block = parts[0], parts[1]  # encoder | decoder
            if block in ("conv_in", "conv_out"):
                new = key
            elif block == "conv_norm_out":
                new = f"{side}.norm_out.{parts[2]}"
            elif block == "mid_block":
                kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
                if kind == "resnets":
                    new = f"{side}.mid.block_{j + 1}.{_sub(rest, _VAE_RESNET)}"
                else:
                    new = f"{side}.mid.attn_1.{_sub(rest, _VAE_ATTN)}"
                    if t.ndim == 2:  # LDM's AttnBlock uses 1x1 convolutions where diffusers uses Linear
                        t = t[:, :, None, None]
            elif block == "down_blocks":
                i, kind, rest = int(parts[2]), parts[3], ".".join(parts[5:])
                if kind == "resnets":
                    new = f"encoder.down.{i}.block.{parts[4]}.{_sub(rest, _VAE_RESNET)}"
                else:  # downsamplers.0.conv.*
                    new = f"encoder.down.{i}.downsample.{rest}"
            elif block == "up_blocks":
                # the LDM decoder numbers its levels from the lowest resolution up: reversed
                i, kind, rest = levels - 1 - int(parts[2]), parts[3], ".".join(parts[5:])
                if kind == "resnets":
                    new = f"decoder.up.{i}.block.{parts[4]}.{_sub(rest, _VAE_RESNET)}"
                else:
                    new = f"decoder.up.{i}.upsample.{rest}"
            else:
                raise KeyError(f"no LDM name for VAE key {key}")
        out["first_stage_model." + new] = t
    return out


def _hf_clip_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-model keys without the ``text_model.`` prefix, whichever transformers version made them."""
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str, max_positions: int) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel -> ``{prefix}transformer.text_model.*`` (LDM's FrozenCLIPEmbedder wraps it as is)."""
    out = {f"{prefix}transformer.text_model.{k}": v for k, v in _hf_clip_keys(sd).items()}
    # Checkpoints made with older transformers carry the position_ids buffer; the converter must ignore it.
    out[f"{prefix}transformer.text_model.embeddings.position_ids"] = torch.arange(max_positions)[None]
    return out


_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def openclip_to_ldm(
    sd: dict[str, torch.Tensor], prefix: str, *, projection: torch.Tensor, unused_layers: int = 0
) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> OpenCLIP's ``{prefix}model.*`` (fused q/k/v, [hidden, proj] text projection).

    ``projection`` is HF's ``text_projection.weight`` ([proj, hidden]); OpenCLIP multiplies by its transpose.
    ``unused_layers`` appends that many extra resblocks, as SD 2.x files hold the layer after the penultimate.
    """
    hf = _hf_clip_keys(sd)
    p = prefix + "model."
    out: dict[str, torch.Tensor] = {
        p + "token_embedding.weight": hf["embeddings.token_embedding.weight"],
        p + "positional_embedding": hf["embeddings.position_embedding.weight"],
        p + "ln_final.weight": hf["final_layer_norm.weight"],
        p + "ln_final.bias": hf["final_layer_norm.bias"],
        p + "text_projection": projection.T.contiguous(),
        p + "logit_scale": torch.tensor(4.6052, device=projection.device),
    }
    layers = sorted({int(k.split(".")[2]) for k in hf if k.startswith("encoder.layers.")})
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"{p}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            qkv = [hf[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            for old, new in _OPENCLIP_LAYER.items():
                out[f"{dst}{new}.{kind}"] = hf[f"{src}{old}.{kind}"]
    g = torch.Generator().manual_seed(len(layers))
    for n in range(len(layers), len(layers) + unused_layers):
        template = f"{p}transformer.resblocks.{layers[-1]}."
        for key in [k for k in out if k.startswith(template)]:
            t = out[key]
            extra = torch.empty_like(t) if t.is_meta else torch.randn(t.shape, generator=g, dtype=t.dtype)
            out[key.replace(template, f"{p}transformer.resblocks.{n}.")] = extra
    return out


def ldm_state_dict(model: LoadedModel) -> dict[str, torch.Tensor]:
    """All of ``model``'s weights under the key names of the family's original single-file checkpoint."""
    preset, family = model.preset, model.preset.family
    out = unet_to_ldm(model.unet.state_dict(), preset.unet)
    out.update(vae_to_ldm(model.vae.state_dict(), preset.vae))
    encoders = [e.state_dict() for e in model.text_encoders]
    positions = [cfg["max_position_embeddings"] for cfg in preset.text_encoders]
    if family == "sd1":
        out.update(clip_to_ldm(encoders[0], "cond_stage_model.", positions[0]))
    elif family == "sd2":
        hidden, proj = preset.text_encoders[0]["hidden_size"], preset.text_encoders[0]["projection_dim"]
        # SD 2.x's encoder has no projection module; the file still holds OpenCLIP's, unused
        if next(iter(encoders[0].values())).is_meta:
            unused = torch.empty(proj, hidden, device="meta")
        else:
            unused = torch.randn(proj, hidden, generator=torch.Generator().manual_seed(0))
        out.update(openclip_to_ldm(encoders[0], "cond_stage_model.", projection=unused, unused_layers=1))
    elif preset.refiner:  # the refiner's one encoder, OpenCLIP bigG, where the base keeps its CLIP ViT-L
        out.update(
            openclip_to_ldm(
                encoders[0], "conditioner.embedders.0.", projection=encoders[0]["text_projection.weight"]
            )
        )
    elif family == "sdxl":
        out.update(clip_to_ldm(encoders[0], "conditioner.embedders.0.", positions[0]))
        out.update(
            openclip_to_ldm(
                encoders[1], "conditioner.embedders.1.", projection=encoders[1]["text_projection.weight"]
            )
        )
    else:
        raise ValueError(f"no LDM layout for family {family}")
    # The LDM wrapper's noise schedule buffers: present in real files, ignored by every loader.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    out["betas"] = betas
    out["alphas_cumprod"] = torch.cumprod(1 - betas, dim=0)
    return out


def write_ldm_checkpoint(
    model: LoadedModel, path: Path, *, dtype: torch.dtype = torch.float32, pickled_extra: object = None
) -> dict[str, torch.Tensor]:
    """Write ``model`` as an LDM single file: ``.safetensors``, or a pickle (``.ckpt``) wrapped as Lightning
    does (``{"state_dict": ...}``), with ``pickled_extra`` stored beside it. Floating-point tensors are stored
    in ``dtype`` (released checkpoints are mostly fp16). Returns the state dict written."""
    sd = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().clone().contiguous()
        for k, v in ldm_state_dict(model).items()
    }
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 1, "hyper_parameters": pickled_extra}, path)
    return sd


def meta_model(preset_name: str) -> LoadedModel:
    """A preset's modules on the meta device: every name and shape, no memory, for full-size key tables."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    preset = get_preset(preset_name)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**preset.config("unet"))
        vae = AutoencoderKL(**preset.config("vae"))
        encoders: list[torch.nn.Module] = [
            (CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel)(CLIPTextConfig(**c))
            for name, c in zip(preset.encoder_names, preset.text_encoders, strict=True)
        ]
    return LoadedModel(preset, unet, vae, encoders, preset.config("scheduler"))


def controlnet_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """ControlNetModel -> ``control_model.*`` (lllyasviel's cldm.ControlNet, as A1111 saves it): the UNet
    encoder under the UNet's LDM names, the zero convolutions as ``zero_convs.i.0`` and
    ``middle_block_out.0``, and the conditioning embedding as ``input_hint_block`` (conv, SiLU, conv, ...)."""
    own: dict[str, torch.Tensor] = {}
    encoder: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        parts = key.split(".")
        if parts[0] == "controlnet_down_blocks":
            own[f"zero_convs.{parts[1]}.0.{parts[2]}"] = t
        elif parts[0] == "controlnet_mid_block":
            own[f"middle_block_out.0.{parts[1]}"] = t
        elif parts[0] == "controlnet_cond_embedding":
            blocks = len({k.split(".")[2] for k in sd if k.startswith("controlnet_cond_embedding.blocks.")})
            if parts[1] == "conv_in":
                idx = 0
            elif parts[1] == "blocks":
                idx = 2 * (int(parts[2]) + 1)
            else:  # conv_out
                idx = 2 * (blocks + 1)
            own[f"input_hint_block.{idx}.{parts[-1]}"] = t
        else:
            encoder[key] = t
    out = {k.replace("model.diffusion_model.", "control_model.", 1): v
           for k, v in unet_to_ldm(encoder, config).items()}
    out.update({"control_model." + k: v for k, v in own.items()})
    return out


def sd3_controlnet_to_stability(sd: dict[str, torch.Tensor], layers: int,
                                control_type: float = 1.0) -> dict[str, torch.Tensor]:
    """SD3ControlNetModel (single-stream blocks, no position embedding of its own) -> Stability's SD 3.5 ControlNet
    file layout, each name spelled out: per block the fused ``attn.qkv`` (q, k, v stacked on the output rows),
    ``attn.proj``, ``mlp.fc1`` / ``fc2`` and ``adaLN_modulation.1``; ``controlnet_blocks``, ``pos_embed_input`` and
    ``time_text_embed`` under diffusers' names; and the scalar ``control_type``. Every diffusers tensor used once."""
    out: dict[str, torch.Tensor] = {"control_type": torch.tensor(control_type)}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return sd[name]

    for i in range(layers):
        d, s = f"transformer_blocks.{i}.", f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{s}attn.qkv.{kind}"] = torch.cat([take(f"{d}attn.to_q.{kind}"), take(f"{d}attn.to_k.{kind}"),
                                                    take(f"{d}attn.to_v.{kind}")], dim=0)
            out[f"{s}attn.proj.{kind}"] = take(f"{d}attn.to_out.0.{kind}")
            out[f"{s}mlp.fc1.{kind}"] = take(f"{d}ff.net.0.proj.{kind}")
            out[f"{s}mlp.fc2.{kind}"] = take(f"{d}ff.net.2.{kind}")
            out[f"{s}adaLN_modulation.1.{kind}"] = take(f"{d}norm1.linear.{kind}")
            out[f"controlnet_blocks.{i}.{kind}"] = take(f"controlnet_blocks.{i}.{kind}")
    for kind in ("weight", "bias"):
        out[f"pos_embed_input.proj.{kind}"] = take(f"pos_embed_input.proj.{kind}")
        for emb in ("timestep_embedder", "text_embedder"):
            for lin in ("linear_1", "linear_2"):
                name = f"time_text_embed.{emb}.{lin}.{kind}"
                out[name] = take(name)
    assert used == set(sd), f"diffusers tensors left out of the layout: {sorted(set(sd) - used)}"
    return {k: v.contiguous() for k, v in out.items()}
