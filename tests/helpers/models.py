"""Tiny models and hand-built artifacts: the tiny presets, a manifest's I/O contract, LoRA files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdrt.runtime.manifest import Component, ExportManifest, TensorSpec

TINY = ("sd15-tiny", "sd21-tiny", "sdxl-tiny")

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "resnets.0.conv1")  # the last: a 3x3 conv (LoCon)
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def export_manifest(family: str = "sd1", cross: int = 768, sdxl: bool = False) -> ExportManifest:
    """A manifest with the exporter's I/O contract (no graphs needed for shape arithmetic)."""
    T = TensorSpec
    unet_in = [T("sample", "float16", ("batch", 4, "height", "width")), T("timestep", "float32", ("batch",)),
               T("encoder_hidden_states", "float16", ("batch", "sequence", cross))]
    if sdxl:
        unet_in += [T("text_embeds", "float16", ("batch", 1280)), T("time_ids", "float16", ("batch", 6))]
    comps = {
        "text_encoder": Component("text_encoder/model.onnx", "fp16", (T("input_ids", "int32", ("batch", 77)),), ()),
        "unet": Component("unet/model.onnx", "fp16", tuple(unet_in), ()),
        "vae_decoder": Component("vae_decoder/model.onnx", "fp32" if sdxl else "fp16",
                                 (T("latent_sample", "float32", ("batch", 4, "height", "width")),), ()),
        "vae_encoder": Component("vae_encoder/model.onnx", "fp16",
                                 (T("image", "uint8", ("batch", "image_height", "image_width", 3)),), ()),
    }
    if sdxl:
        comps["text_encoder_2"] = comps["text_encoder"]
    return ExportManifest(family=family, preset=family, prediction_type="epsilon", components=comps,
                          latent_channels=4, vae_scale_factor=8, default_size=512, text_max_length=77)


def lora_targets(module, suffixes):  # type: ignore[no-untyped-def]
    import torch

    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.endswith(suffixes)]


def make_lora(path: Path, unet, text_encoder, layout: str, seed: int, rank: int = 2,  # type: ignore[no-untyped-def]
              alpha: float | None = None, unet_targets: tuple[str, ...] = UNET_TARGETS,
              text_targets: tuple[str, ...] = TE_TARGETS, text_encoder_2=None, conv_rank: int | None = None) -> Path:
    """A LoRA with random down/up matrices for every attention, feed-forward and one conv per block (the UNet's
    ``unet_targets``; no text-encoder part where ``text_encoder`` is None; ``text_encoder_2``: SDXL's second, named
    ``lora_te1_`` / ``lora_te2_`` by kohya then, ``text_encoder_2.`` by PEFT). A convolution's factors are LoCon's:
    ``down`` [r, in, kh, kw], ``up`` [out, r, 1, 1]; ``conv_rank``: the rank of the convolutions wider than 1x1
    (kohya's ``conv_dim``; default ``rank``)."""
    from safetensors.numpy import save_file

    g = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}
    two = text_encoder_2 is not None
    parts = [("unet", unet, unet_targets)]
    if text_encoder is not None:
        parts.append(("text_encoder", text_encoder, text_targets))
    if two:
        parts.append(("text_encoder_2", text_encoder_2, text_targets))
    kohya = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if two else "lora_te_", "text_encoder_2": "lora_te2_"}
    for comp, module, suffixes in parts:
        for name, m in lora_targets(module, suffixes):
            if comp != "unet" and not name.startswith("text_model."):
                name = f"text_model.{name}"  # transformers 5's CLIPTextModel has no text_model level; files name it
            w = m.weight
            r = conv_rank if conv_rank is not None and w.ndim == 4 and tuple(w.shape[2:]) != (1, 1) else rank
            down = (g.standard_normal((r, w.shape[1], *w.shape[2:])) * 0.2).astype(np.float32)
            up = (g.standard_normal((w.shape[0], r, *((1, 1) if w.ndim == 4 else ()))) * 0.2).astype(np.float32)
            if layout == "kohya":
                key = kohya[comp] + name.replace(".", "_")
                sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
                if alpha is not None:
                    sd[f"{key}.alpha"] = np.array(alpha, dtype=np.float32)
            else:
                key = f"{comp}.{name}"
                sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = down, up
    save_file(sd, str(path))
    return path
