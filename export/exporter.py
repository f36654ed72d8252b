"""``export_model``: a loaded model -> a verified ONNX folder in Optimum's layout plus ``sdrt.json``.

Layout: model_index.json, text_encoder/ [text_encoder_2/], unet/ (model.onnx + model.onnx_data),
vae_decoder/, vae_encoder/, tokenizer/ [tokenizer_2/], scheduler/, sdrt.json. The folder is written
under a temporary name and renamed only once every component passed its parity gate.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from sdrt import __version__
from sdrt.runtime.atomic import atomic_dir, check_output_dir
from sdrt.runtime.compel_prompts import MASK_INPUT
from sdrt.runtime.errors import InputError
from sdrt.runtime.feature_cache import DEEP_FEATURE, SHALLOW_UNET
from sdrt.runtime.inpaint import MASKED_ENCODER
from sdrt.runtime.manifest import (
    MANIFEST_NAME,
    ExportManifest,
    ShapeLimits,
    export_entries,
    pooled_encoder,
    tokenizer_of,
)

from . import wrappers
from .controlnet_loading import LoadedControlNet, check_pairing
from .controlnet_specs import controlnet_specs
from .loading import LoadedModel
from .lora_slots import Layer, SlotPlan, Slotted, slot_layers, slotted, split_inert
from .onnx_export import ComponentSpec, export_group, share_groups

MIN_OPSET = 17
TEXT_LEN = 77


def check_clip_skip(model: LoadedModel, clip_skip: int) -> None:
    """``clip_skip`` must leave a transformer layer's output in every text encoder (InputError if not)."""
    penultimate = model.preset.model_family.penultimate
    for enc in model.text_encoders:
        layers = int(enc.config.num_hidden_layers)
        # hidden_states holds the embeddings, then one entry per layer; SDXL starts from the penultimate
        most = layers - (2 if penultimate else 1)
        if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 0 <= clip_skip <= most:
            raise InputError(
                f"clip skip {clip_skip!r} is beyond this model's text encoder ({layers} layers"
                f"{', conditioned on the penultimate' if penultimate else ''}): use 0 to {most}",
                cli=f"--clip-skip {clip_skip!r} is beyond this model's text encoder ({layers} layers): use 0 to {most}")


def _slotted(spec: ComponentSpec, layers: list[tuple[str, Layer]], rank: int,
             inert: Sequence[str] = ()) -> ComponentSpec:
    """``spec`` whose ``layers`` take LoRA factors as inputs after its own (export/lora_slots.py)."""
    return slotted(spec, layers, rank, inert)


def component_specs(model: LoadedModel, vae_fp32: bool | None = None, clip_skip: int = 0,
                    controlnets: Sequence[LoadedControlNet] = (), deepcache: bool = False,
                    lora_slots: SlotPlan | None = None) -> list[ComponentSpec]:
    """The components of ``model``; ``vae_fp32`` overrides the preset's VAE precision; ``clip_skip``
    conditions on an earlier text encoder layer (diffusers' ``clip_skip``); ``controlnets`` add
    ``controlnet_0``.. and ``unet_control`` after the plain ``unet``; ``deepcache``: the UNet also returns
    DeepCache's deep feature, and ``unet_shallow`` (runtime/feature_cache.py) follows it (with ``controlnets`` too,
    ``unet_control`` returns the feature and ``unet_shallow`` takes each net's ``down_0`` residual); ``lora_slots``: the
    UNet's targeted layers take LoRA factors as inputs (export/lora_slots.py)."""
    p = model.preset
    vae32 = p.vae_fp32 if vae_fp32 is None else vae_fp32
    fam = p.model_family
    specs: list[ComponentSpec] = []
    for name, enc in zip(p.encoder_names, model.text_encoders, strict=True):
        pooled = pooled_encoder(name)
        hidden = int(enc.config.hidden_size)
        outs: list[tuple[str, str, tuple[int | str, ...]]] = [("hidden_states", "float", ("batch", TEXT_LEN, hidden))]
        if pooled:
            outs.append(("text_embeds", "float", ("batch", int(enc.config.projection_dim))))
        # an attention mask beside the ids: compel's default downweighting hides a fragment with it
        text_example = wrappers.clip_ids_example(int(enc.config.vocab_size), TEXT_LEN, mask=True)

        text_spec = ComponentSpec(
            name=name,
            module=wrappers.TextEncoder(enc, penultimate=fam.penultimate, pooled=pooled, clip_skip=clip_skip),
            weights=enc,
            inputs=[("input_ids", "int32", ("batch", TEXT_LEN)), (MASK_INPUT, "int32", ("batch", TEXT_LEN))],
            outputs=outs,
            example=text_example,
            refittable=True,
        )
        if lora_slots is not None:
            layers = slot_layers(enc, lora_slots, text=True)
            used, inert = split_inert(text_spec.module, text_example(torch.Generator().manual_seed(0), 1, 8, 8), layers)
            text_spec = _slotted(text_spec, used, lora_slots.rank, inert)
        specs.append(text_spec)

    cross = int(model.unet.config.cross_attention_dim)
    in_ch = int(model.unet.config.in_channels)
    unet_inputs: list[tuple[str, str, tuple[int | str, ...]]] = [
        ("sample", "float", ("batch", in_ch, "height", "width")),
        ("timestep", "float32", ("batch",)),
        ("encoder_hidden_states", "float", ("batch", "sequence", cross)),
    ]
    pooled_dim = int(model.text_encoders[-1].config.projection_dim)
    # the family's added time ids (SDXL: [h, w, crop_top, crop_left, target_h, target_w]; its refiner:
    # [h, w, crop_top, crop_left, aesthetic]), with the pooled text embedding
    time_ids = fam.export_time_ids(1024)
    added = fam.pooled and bool(time_ids)
    if added:
        unet_inputs += [("text_embeds", "float", ("batch", pooled_dim)),
                        ("time_ids", "float", ("batch", len(time_ids)))]
    cond_dim = model.unet.config.get("time_cond_proj_dim")  # LCM-distilled: the guidance embedding's width
    if cond_dim:
        unet_inputs.append(("timestep_cond", "float", ("batch", int(cond_dim))))

    def unet_example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        args = [
            torch.randn(b, in_ch, h, w, generator=g),
            torch.rand(b, generator=g) * 999,
            torch.randn(b, TEXT_LEN, cross, generator=g),
        ]
        if added:
            args += [torch.randn(b, pooled_dim, generator=g), torch.tensor([time_ids] * b)]
        if cond_dim:
            args.append(torch.randn(b, int(cond_dim), generator=g))
        return tuple(args)

    out_ch = int(model.unet.config.out_channels)
    out_sample = ("out_sample", "float", ("batch", out_ch, "height", "width"))
    unet_spec = ComponentSpec(
        name="unet",
        module=wrappers.UNet(model.unet, sdxl=added, time_cond=bool(cond_dim)),
        weights=model.unet,
        inputs=unet_inputs,
        outputs=[out_sample],
        example=unet_example,
        refittable=True,
    )
    if deepcache:
        deep = deep_channels(model.unet)
        feature = (DEEP_FEATURE, "float", ("batch", deep, "height", "width"))
        unet_spec = replace(
            unet_spec, module=wrappers.UNet(model.unet, sdxl=added, time_cond=bool(cond_dim), deep_feature=True),
            outputs=[out_sample, feature])
    # unet_control: the UNet's inputs, then residuals (and, with deepcache, the deep feature among its outputs)
    control = controlnet_specs(model, controlnets, unet_spec, deep_feature=deepcache)
    if lora_slots is not None:
        layers = slot_layers(model.unet, lora_slots)
        unet_spec = _slotted(unet_spec, layers, lora_slots.rank)
        # unet_control's factors come after the residuals, under the UNet's names: the loop feeds both alike
        control = [_slotted(c, layers, lora_slots.rank) if c.name == "unet_control" else c for c in control]
    specs.append(unet_spec)
    specs += control
    if deepcache:

        # the UNet's inputs that the shallow path reads (SDXL's last up block does not cross-attend)
        keep = [i for i, (n, _, _) in enumerate(unet_inputs)
                if n != "encoder_hidden_states" or wrappers.UNetShallow.reads_text(model.unet)]
        # with ControlNets: the residuals of the skips the shallow path reads, under unet_control's input names
        skip_res = shallow_residuals(control, len(controlnets))

        def shallow_example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
            args = unet_example(g, b, h, w)
            sides = {"batch": b, "height": h, "width": w}
            res = [torch.randn(*(sides[d] if isinstance(d, str) else d for d in shape), generator=g)
                   for _, _, shape in skip_res]
            return (*(args[i] for i in keep), torch.randn(b, deep, h, w, generator=g), *res)

        shallow_spec = ComponentSpec(
            name=SHALLOW_UNET,
            module=wrappers.UNetShallow(model.unet, sdxl=added, time_cond=bool(cond_dim), nets=len(controlnets)),
            weights=model.unet,
            inputs=[*(unet_inputs[i] for i in keep), feature, *skip_res],
            outputs=[out_sample],
            example=shallow_example,
            refittable=True,
        )
        if lora_slots is not None:
            # the slotted layers the shallow path runs (its last up block's), under the UNet's input names, so the
            # loop feeds them the call's factors as it feeds the UNet's
            used, _ = split_inert(shallow_spec.module, shallow_example(torch.Generator().manual_seed(0), 1, 8, 8),
                                  slot_layers(model.unet, lora_slots))
            shallow_spec = _slotted(shallow_spec, used, lora_slots.rank)
        specs.append(shallow_spec)

    lat = int(model.vae.config.latent_channels)
    f = 2 ** (len(model.vae.config.block_out_channels) - 1)

    def dec_example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        # latents of a plausible scale: unit variance after the VAE's scaling
        return (torch.randn(b, lat, h, w, generator=g),)

    def enc_example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, 256, (b, h * f, w * f, 3), generator=g, dtype=torch.uint8),)

    specs.append(ComponentSpec(
        name="vae_decoder",
        module=wrappers.VaeDecoder(model.vae),
        weights=model.vae,
        inputs=[("latent_sample", "float", ("batch", lat, "height", "width"))],
        outputs=[("images", "uint8", ("batch", "image_height", "image_width", 3)), ("finite", "bool", ("batch",))],
        example=dec_example,
        fp16_overflows=vae32,
    ))
    specs.append(ComponentSpec(
        name="vae_encoder",
        module=wrappers.VaeEncoder(model.vae),
        weights=model.vae,
        inputs=[("image", "uint8", ("batch", "image_height", "image_width", 3))],
        outputs=[("latent", "float", ("batch", lat, "height", "width"))],
        example=enc_example,
        fp16_overflows=vae32,
    ))
    if in_ch == 2 * lat + 1:  # an inpainting UNet: it also takes the masked image's latents

        def masked_example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
            mask = (torch.rand(b, h * f, w * f, 1, generator=g) < 0.5).to(torch.uint8)
            return (*enc_example(g, b, h, w), mask)

        specs.append(ComponentSpec(
            name=MASKED_ENCODER,
            module=wrappers.VaeEncoderMasked(model.vae),
            weights=model.vae,
            inputs=[("image", "uint8", ("batch", "image_height", "image_width", 3)),
                    ("mask", "uint8", ("batch", "image_height", "image_width", 1))],
            outputs=[("latent", "float", ("batch", lat, "height", "width"))],
            example=masked_example,
            fp16_overflows=vae32,
        ))
    return specs


def shallow_residuals(control: Sequence[ComponentSpec], nets: int) -> list[tuple[str, str, tuple[int | str, ...]]]:
    """The ControlNet residual inputs of DeepCache's shallow path: for each of ``nets`` nets, the first
    ``UNetShallow.SKIPS`` of its down residuals, as ``unet_control`` (among ``control``) names and shapes them."""
    if not nets:
        return []
    unet_control = next(c for c in control if c.name == "unet_control")
    wanted = {f"controlnet_{j}_down_{k}" for j in range(nets) for k in range(wrappers.UNetShallow.SKIPS)}
    return [i for i in unet_control.inputs if i[0] in wanted]


def deep_channels(unet: torch.nn.Module) -> int:
    """The channels of DeepCache's deep feature: what the last layer of the last up block reads beside the skip
    connection from ``conv_in``."""
    return int(unet.up_blocks[-1].resnets[-1].conv1.in_channels) - int(unet.conv_in.out_channels)


def tool_versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import transformers

    return {
        "sdrt": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def _model_index(model: LoadedModel) -> dict[str, object]:
    """Optimum's model_index.json, so other ONNX tooling can read the folder."""
    import diffusers

    fam = model.preset.model_family
    stem = f"ORT{fam.diffusers_pipeline}"
    idx: dict[str, object] = {
        "_class_name": f"{stem}Pipeline",
        "_diffusers_version": diffusers.__version__,
        "requires_safety_checker": False,
        "scheduler": ["diffusers", model.scheduler_config.get("_class_name", "PNDMScheduler")],
        "text_encoder": ["onnxruntime", "ORTModelTextEncoder"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["onnxruntime", "ORTModelUnet"],
        "vae_decoder": ["onnxruntime", "ORTModelVaeDecoder"],
        "vae_encoder": ["onnxruntime", "ORTModelVaeEncoder"],
    }
    if int(model.unet.config.in_channels) == 2 * int(model.vae.config.latent_channels) + 1:
        idx["_class_name"] = f"{stem}InpaintPipeline"
    if "text_encoder_2" in fam.encoders:
        idx["text_encoder_2"] = ["onnxruntime", "ORTModelTextEncoder"]
        idx["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    if "text_encoder" not in fam.encoders:
        del idx["text_encoder"], idx["tokenizer"]
    if fam.pooled:  # diffusers' SDXL configs say whether an empty negative prompt is zeros or encoded
        idx["force_zeros_for_empty_prompt"] = fam.zero_negatives
    if not fam.generates:  # diffusers' refiner config: an img2img pipeline with aesthetic scores
        idx["_class_name"] = f"{stem}Img2ImgPipeline"
        idx["requires_aesthetics_score"] = True
    return idx


EXPORT_KIND = "an sdrt export"


def check_export_dir(out: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an ``out`` that an export must not replace (see ``check_output_dir``), before any work: a
    previous export is replaced whole, so one that also holds files its sdrt.json does not name is refused
    (unless ``overwrite``)."""
    return check_output_dir(out, marker=MANIFEST_NAME, overwrite=overwrite, what=EXPORT_KIND, owned=export_entries)


def export_model(
    model: LoadedModel,
    out: str | Path,
    *,
    overwrite: bool = False,
    fp16: bool = True,
    opset: int = MIN_OPSET,
    vae_fp32: bool | None = None,
    parity_shape: tuple[int, int, int] | None = None,
    progress: Callable[[str], None] = lambda msg: None,
    clip_skip: int = 0,
    controlnets: Sequence[LoadedControlNet] = (),
    deepcache: bool = False,
    lora_slots: SlotPlan | None = None,
    release: bool = False,
) -> ExportManifest:
    """Export every component of ``model`` into ``out`` (atomically) and return its manifest.

    ``vae_fp32``: keep the VAE in fp32 in an fp16 export (default: the preset's choice, True for SDXL,
    whose VAE overflows in fp16). ``clip_skip``: diffusers' option, fixed in the text encoder graphs and
    recorded in the manifest (0: the model's own layer; 1 is A1111's "Clip skip 2"). ``controlnets``: each
    becomes ``controlnet_j`` (in order), and ``unet_control`` takes all their residuals; the plain ``unet``
    is exported as without them. A ControlNet that does not pair with the model's UNet is refused first.
    ``deepcache``: also export DeepCache's shallow path (``unet_shallow``), the UNet returning the deep feature
    it reuses (``Pipeline(..., cache="deepcache")``; runtime/feature_cache.py). ``lora_slots``: the UNet takes
    LoRA factors as inputs, so calls can carry LoRAs (``Pipeline(..., loras=...)``; export/lora_slots.py).
    ``release``: ``model`` (and ``controlnets``) are given up to save memory: each module's weights are freed
    (moved to the meta device) once its last graph is exported, before ONNX Runtime checks it, and an fp16 export
    casts the modules in place instead of copying them; neither can be used after. The files are the same.

    ``out`` may be new, empty or a previous sdrt export holding only what its sdrt.json names (replaced
    whole when the export succeeds); any other folder is refused unless ``overwrite``, a file or the current
    folder always.
    """
    from .tokenizer_assets import write_clip_tokenizer

    out = check_export_dir(out, overwrite=overwrite)
    check_clip_skip(model, clip_skip)
    controlnets = list(controlnets)
    check_pairing(model, controlnets)
    if opset < MIN_OPSET:
        raise InputError(f"opset {opset} is too old; sdrt exports opset {MIN_OPSET} or newer (e.g. --opset 17)")
    precision = "fp16" if fp16 else "fp32"
    p = model.preset
    f = 2 ** (len(model.vae.config.block_out_channels) - 1)
    latent = p.default_size // f
    if parity_shape is None:
        # batch 2 (a guided step), non-square to exercise both dynamic spatial axes; capped for CPU time
        side = min(latent, 32)
        parity_shape = (2, side, side + 8)
    with atomic_dir(out, marker=MANIFEST_NAME, overwrite=overwrite, what=EXPORT_KIND, owned=export_entries) as tmp:
        components = {}
        inert: dict[str, list[str]] = {}
        specs = component_specs(model, vae_fp32, clip_skip, controlnets, deepcache, lora_slots)
        for spec in specs:
            if isinstance(spec.module, Slotted) and spec.module.inert:
                inert[spec.name] = list(spec.module.inert)
        # the components that share a module (the UNet's graphs) go together, so it can be freed after them
        for group in share_groups(specs):
            components.update(export_group([(spec, tmp / spec.name) for spec in group], precision, opset=opset,
                                           parity_shape=parity_shape, progress=progress, release=release))
        for i, (enc_name, pad) in enumerate(zip(p.encoder_names, p.pad_tokens, strict=True)):
            src = model.tokenizer_dirs[i] if i < len(model.tokenizer_dirs) else None
            write_clip_tokenizer(tmp / tokenizer_of(enc_name), pad_token=pad, source=src)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(_model_index(model), indent=2))
        manifest = ExportManifest(
            family=p.family,
            preset=p.name,
            prediction_type=model.prediction_type,
            components=components,
            latent_channels=int(model.vae.config.latent_channels),
            vae_scale_factor=f,
            default_size=p.default_size,
            text_max_length=TEXT_LEN,
            limits=ShapeLimits(),
            source={**model.source, **({"controlnets": [dict(c.source) for c in controlnets]} if controlnets else {}),
                    **({"lora_slots": {"rank": lora_slots.rank, "targets": lora_slots.targets,
                                       **({"inert": inert} if inert else {})}} if lora_slots else {})},
            tools=tool_versions(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            clip_skip=clip_skip,
            controlnets=tuple(f"controlnet_{j}" for j in range(len(controlnets))),
            refiner=p.refiner,
            latent_scaling=float(model.vae.config.scaling_factor),
        )
        manifest.write(tmp)
    return manifest
