"""LoRA for the transformer families (SD 3 / 3.5, FLUX.1) on ort-cpu, against diffusers on the same seeded weights
and initial latents: images within 1/255.

Slots (``--lora-slots RANK:attn-ff``: every linear layer of the transformer's blocks, and the CLIP encoders'
attention and MLP) with LoRA files in each layout people have:

- diffusers / PEFT (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, written by diffusers'
  ``save_lora_weights``, with an alpha in its metadata): diffusers' ``load_lora_weights`` + ``set_adapters``;
- kohya's layout of Stability's MMDiT (``lora_unet_joint_blocks_0_x_block_attn_qkv``: q, k, v fused), which
  diffusers' SD 3 loader does not read: the reference adds the LoRA's products to the weights in Stability's layout
  and takes them to diffusers' names with diffusers' own single-file converter
  (``convert_sd3_transformer_checkpoint_to_diffusers``);
- kohya's and ComfyUI's layouts of Black Forest Labs' FLUX.1 (``lora_unet_double_blocks_0_img_attn_qkv``,
  ``diffusion_model.single_blocks.0.linear1``: q, k, v and the MLP's input fused): diffusers'
  ``_convert_kohya_flux_lora_to_diffusers`` (through ``FluxPipeline.lora_state_dict``), which splits ``linear1``
  at FLUX.1's 3072-wide offsets: the tiny model's ``linear1`` factors are laid out at those offsets for it and its
  parts cut back to the tiny widths (the layout trick of tests/test_flux_single_file.py).

The LoRAs are random factors on every linear layer of the blocks, chosen here as "every ``nn.Linear`` under
``transformer_blocks`` / ``single_transformer_blocks``" (not from sdrt's target patterns).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdrt.runtime.errors import InputError

from .helpers.pipelines import LOOP_WORDS, loaded_on_any, shared_pipeline

torch = pytest.importorskip("torch")
pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the test extra)")

SD3, FLUX = "sd35-medium-tiny", "flux-dev-tiny"
SLOTS = "8:attn-ff"
PROMPT = "a watercolor fox in the snow, highly detailed"
SD3_KW: dict[str, Any] = {"height": 64, "width": 96, "steps": 4, "guidance_scale": 5.0}
FLUX_KW: dict[str, Any] = {"height": 64, "width": 96, "steps": 3, "guidance_scale": 3.5}
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def slotted(tmp_path_factory: pytest.TempPathFactory, export_cache: dict[tuple[str, str], Path]):
    """slotted(family) -> an export of the family's tiny preset (seed 0, fp32; SD 3 without T5, with first-block
    caching's cached step) with slots."""

    def get(family: str) -> Path:
        key = (f"{family}-lora-slots-{SLOTS}", "fp32")
        if key not in export_cache:
            from sdrt.export.lora_slots import SlotPlan

            out = tmp_path_factory.mktemp("exports") / key[0].replace(":", "-")
            if family == "sd3":
                from sdrt.export.sd3_export import export_sd3
                from sdrt.export.sd3_loading import load_sd3

                export_sd3(load_sd3(random_preset=SD3), out, fp16=False, without_t5=True,
                           lora_slots=SlotPlan.parse(SLOTS), block_cache=True)  # the cached step slotted too
            else:
                from sdrt.export.flux_export import export_flux
                from sdrt.export.flux_loading import load_flux

                export_flux(load_flux(random_preset=FLUX), out, lora_slots=SlotPlan.parse(SLOTS))
            export_cache[key] = out
        return export_cache[key]

    return get


def _modules(family: str) -> Any:
    """The preset's seeded modules (the export's weights), fresh."""
    if family == "sd3":
        from sdrt.export.sd3_presets import build_modules, get_sd3_preset

        return build_modules(get_sd3_preset(SD3), seed=0)
    from sdrt.export.flux_presets import build_modules as flux_modules
    from sdrt.export.flux_presets import get_flux_preset

    return flux_modules(get_flux_preset(FLUX), seed=0)


def _encoders(family: str, m: Any) -> dict[str, Any]:
    """The CLIP encoders a LoRA adapts, by diffusers' component name."""
    return {"text_encoder": m.text_encoders[0], "text_encoder_2": m.text_encoders[1]} if family == "sd3" \
        else {"text_encoder": m.clip}


def _block_linears(transformer: Any) -> list[tuple[str, Any]]:
    """Every linear layer of the transformer's blocks, by diffusers' module name."""
    return [(n, mod) for n, mod in transformer.named_modules() if isinstance(mod, torch.nn.Linear)
            and n.startswith(("transformer_blocks.", "single_transformer_blocks."))]


def _text_linears(encoder: Any) -> list[tuple[str, Any]]:
    return [(n, mod) for n, mod in encoder.named_modules() if isinstance(mod, torch.nn.Linear)
            and n.rsplit(".", 1)[-1] in TEXT]


def _factors(g: np.random.Generator, w: Any, rank: int) -> tuple[np.ndarray, np.ndarray]:
    down = (g.standard_normal((rank, w.shape[1])) * 0.2).astype(np.float32)
    up = (g.standard_normal((w.shape[0], rank)) * 0.2).astype(np.float32)
    return down, up


def _clip_name(name: str) -> str:
    """A CLIP module as LoRA files name it (transformers 5's CLIP models have no ``text_model`` level)."""
    return name if name.startswith("text_model.") else f"text_model.{name}"


def peft_lora(folder: Path, family: str, seed: int, rank: int, alpha: float | None = None) -> Path:
    """A diffusers / PEFT LoRA of every block linear and the CLIP encoders' attention and MLP, written by diffusers'
    own ``save_lora_weights`` (``alpha``: the transformer's ``lora_alpha`` in the file's metadata)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    m, g = _modules(family), np.random.default_rng(seed)
    layers: dict[str, dict[str, Any]] = {}
    targets: list[str] = []
    for comp, mod, named in [("transformer", m.transformer, _block_linears(m.transformer)),
                             *((c, e, _text_linears(e)) for c, e in _encoders(family, m).items())]:
        part = layers.setdefault(comp, {})
        for name, lin in named:
            down, up = _factors(g, lin.weight, rank)
            key = name if comp == "transformer" else _clip_name(name)
            part[f"{key}.lora_A.weight"], part[f"{key}.lora_B.weight"] = torch.from_numpy(down), torch.from_numpy(up)
            if comp == "transformer":
                targets.append(name)
    # diffusers' loader takes every component's LoraConfig from the metadata once the file has some
    meta = None if alpha is None else {"r": rank, "lora_alpha": alpha, "target_modules": targets}
    text = None if alpha is None else {"r": rank, "lora_alpha": alpha, "target_modules": list(TEXT)}
    folder.mkdir(parents=True, exist_ok=True)
    name = f"peft-{family}-{seed}.safetensors"
    if family == "sd3":
        StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=layers["transformer"],
                                                   text_encoder_lora_layers=layers["text_encoder"],
                                                   text_encoder_2_lora_layers=layers["text_encoder_2"],
                                                   transformer_lora_adapter_metadata=meta,
                                                   text_encoder_lora_adapter_metadata=text,
                                                   text_encoder_2_lora_adapter_metadata=text, weight_name=name)
    else:
        FluxPipeline.save_lora_weights(folder, transformer_lora_layers=layers["transformer"],
                                       text_encoder_lora_layers=layers["text_encoder"],
                                       transformer_lora_adapter_metadata=meta,
                                       text_encoder_lora_adapter_metadata=text, weight_name=name)
    return folder / name


def _save(path: Path, sd: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def _kohya_text(sd: dict[str, np.ndarray], deltas: dict[str, dict[str, np.ndarray]], m: Any, family: str,
                g: np.random.Generator, rank: int, alpha: float) -> None:
    """kohya's ``lora_te1_`` / ``lora_te2_`` layers of the CLIP encoders, and their products by module name."""
    for i, (comp, enc) in enumerate(_encoders(family, m).items()):
        for name, lin in _text_linears(enc):
            down, up = _factors(g, lin.weight, rank)
            key = f"lora_te{i + 1}_" + _clip_name(name).replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = np.array(alpha, np.float32)
            deltas.setdefault(comp, {})[f"{name}.weight"] = (alpha / rank) * up @ down


# -- SD 3 / 3.5 -------------------------------------------------------------------------------------------

_SD3_LORA_LAYERS = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")


def sd3_kohya_lora(path: Path, seed: int, rank: int, alpha: float,
                   text: bool = True) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    """A kohya LoRA of the MMDiT in Stability's layout (every linear layer of the joint blocks, q, k, v fused) and
    of both CLIP encoders; with the products it adds (unscaled), by the weight they add to: Stability's
    ``joint_blocks.*`` names for the transformer, module names for the encoders."""
    from .helpers.sd3_layout import MMDIT, transformer_to_sd3

    m, g = _modules("sd3"), np.random.default_rng(seed)
    stability = transformer_to_sd3(m.transformer.state_dict())
    sd: dict[str, np.ndarray] = {}
    deltas: dict[str, dict[str, np.ndarray]] = {"transformer": {}}
    for key, w in stability.items():
        name = key.removeprefix(MMDIT).removesuffix(".weight")
        if not (name.startswith("joint_blocks.") and key.endswith(".weight") and name.endswith(_SD3_LORA_LAYERS)):
            continue
        down, up = _factors(g, w, rank)
        kohya = "lora_unet_" + name.replace(".", "_")
        sd[f"{kohya}.lora_down.weight"], sd[f"{kohya}.lora_up.weight"] = down, up
        sd[f"{kohya}.alpha"] = np.array(alpha, np.float32)
        deltas["transformer"][key] = (alpha / rank) * up @ down
    if text:
        _kohya_text(sd, deltas, m, "sd3", g, rank, alpha)
    return _save(path, sd), deltas


def _sd3_reference(folder: Path, peft: list[tuple[Path, float]] = (), merged: tuple[dict, float] | None = None,
                   fuse: bool = False, modules: Any = None) -> np.ndarray:
    """diffusers' StableDiffusion3Pipeline (without T5, as the export) over fresh seeded modules: PEFT files loaded
    with their scales (``set_adapters``; ``fuse``: then ``fuse_lora``), or kohya products added in Stability's layout
    and taken to diffusers' names by diffusers' single-file converter (``merged``: the products and the scale)."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer

    from sdrt.export.sd3_presets import get_sd3_preset

    from .helpers.sd3_layout import transformer_to_sd3

    m = _modules("sd3") if modules is None else modules  # (a streamed model's weights, held)
    if merged is not None:
        deltas, scale = merged
        stability = transformer_to_sd3(m.transformer.state_dict())
        for key, d in deltas["transformer"].items():
            stability[key] = stability[key] + scale * torch.from_numpy(d)
        m.transformer.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(stability)))
        _add(_encoders("sd3", m), deltas, scale)
    clip_l, clip_g, _ = m.text_encoders
    pipe = StableDiffusion3Pipeline(
        transformer=m.transformer, vae=m.vae,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(get_sd3_preset(SD3).scheduler),
        text_encoder=clip_l, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=clip_g, tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        text_encoder_3=None, tokenizer_3=None)
    _load(pipe, peft, fuse)
    latents = _latents(16)
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt="blurry", height=SD3_KW["height"], width=SD3_KW["width"],
                   num_inference_steps=SD3_KW["steps"], guidance_scale=SD3_KW["guidance_scale"],
                   latents=torch.from_numpy(latents), output_type="np").images
    return (out[0] * 255).round().astype(np.int32)


def _add(encoders: dict[str, Any], deltas: dict[str, dict[str, np.ndarray]], scale: float) -> None:
    """The products added to the encoders' weights (by parameter name), at ``scale``."""
    with torch.no_grad():
        for comp, enc in encoders.items():
            params = dict(enc.named_parameters())
            for name, d in deltas.get(comp, {}).items():
                params[name].add_(scale * torch.from_numpy(d))


def _load(pipe: Any, loras: list[tuple[Any, float]], fuse: bool = False) -> None:
    names = []
    for i, (lora, _) in enumerate(loras):
        pipe.load_lora_weights(lora if isinstance(lora, dict) else str(lora), adapter_name=f"l{i}")
        names.append(f"l{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
        if fuse:
            pipe.fuse_lora(adapter_names=names, lora_scale=1.0)


def _latents(channels: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, channels, 8, 12), dtype=np.float32)


def _sdrt(folder: Path, loras: list[tuple[Path, float]] | None, family: str) -> np.ndarray:
    kw = SD3_KW if family == "sd3" else FLUX_KW
    extra = {"negative_prompt": "blurry"} if family == "sd3" else {}
    res = shared_pipeline(folder)(PROMPT, latents=_latents(16), loras=loras, **kw, **extra)
    return np.asarray(res.images[0]).astype(np.int32)


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    diff = int(np.abs(got - want).max())
    assert diff <= 1, f"{what}: max abs difference {diff}/255 from diffusers"
    assert want.std() > 5


def test_sd3_peft_loras_match_diffusers_stacked(slotted, tmp_path: Path) -> None:
    """diffusers' own files (every block linear, both CLIP encoders' attention and MLP): one at 0.8, its alpha in
    the metadata; then two stacked at ranks 3 + 4 in slots of 8, scales of both signs (``set_adapters``, and
    ``fuse_lora`` as a second reference)."""
    folder = slotted("sd3")
    a = peft_lora(tmp_path, "sd3", seed=1, rank=3, alpha=6.0)
    b = peft_lora(tmp_path, "sd3", seed=2, rank=4)
    one = _sdrt(folder, [(a, 0.8)], "sd3")
    _close(one, _sd3_reference(folder, [(a, 0.8)]), "SD 3 PEFT LoRA")
    assert np.abs(one - _sdrt(folder, None, "sd3")).max() > 3  # the LoRA moved the image
    both = _sdrt(folder, [(a, 0.8), (b, -0.5)], "sd3")
    _close(both, _sd3_reference(folder, [(a, 0.8), (b, -0.5)]), "SD 3 PEFT LoRAs stacked")
    _close(both, _sd3_reference(folder, [(a, 0.8), (b, -0.5)], fuse=True), "SD 3 PEFT LoRAs stacked, fused")


def test_sd3_kohya_lora_matches_diffusers_single_file_converter(slotted, tmp_path: Path) -> None:
    """kohya's file in Stability's layout (q, k, v fused; the last block's pre-only context modulation; SD 3.5's
    second attention) and its CLIP layers: diffusers' pipeline over the weights with its products added in
    Stability's layout and converted by diffusers."""
    folder = slotted("sd3")
    path, deltas = sd3_kohya_lora(tmp_path / "kohya.safetensors", seed=3, rank=4, alpha=2.0)
    assert any(".attn2." in k for k in deltas["transformer"]) and deltas["text_encoder_2"]
    _close(_sdrt(folder, [(path, 0.7)], "sd3"), _sd3_reference(folder, merged=(deltas, 0.7)), "SD 3 kohya LoRA")


def test_sd3_slotted_export_without_lora_is_the_plain_model(slotted) -> None:
    folder = slotted("sd3")
    _close(_sdrt(folder, None, "sd3"), _sd3_reference(folder), "SD 3 slotted, no LoRA")


def test_sd3_cached_step_takes_the_slots_of_its_first_block(slotted, tmp_path: Path) -> None:
    """First-block caching's cached step has slots for the layers it runs (its first block's: gated against
    PyTorch with random factors at export), and a cached call with a LoRA feeds them."""
    from sdrt.runtime.lora_adapters import slots_of
    from sdrt.runtime.manifest import ExportManifest

    folder = slotted("sd3")
    man = ExportManifest.read(folder)
    cached = slots_of({i.name: i for i in man.components["unet_shallow"].inputs})
    full = slots_of({i.name: i for i in man.components["unet"].inputs})
    assert cached and set(cached) < set(full) and all(k.startswith("transformer_blocks.0.") for k in cached)
    par = man.components["unet_shallow"].parity
    assert par is not None and par.rel_err <= par.bound
    a = peft_lora(tmp_path, "sd3", seed=25, rank=2)
    kw = {**SD3_KW, "steps": 4, "negative_prompt": "blurry"}
    pipe = shared_pipeline(folder)
    cached_run = pipe(PROMPT, latents=_latents(16), loras=[(a, 0.8)], cache="first-block", cache_interval=2, **kw)
    assert "2 of 4 steps ran the full transformer" in cached_run.loop
    plain = pipe(PROMPT, latents=_latents(16), cache="first-block", cache_interval=2, **kw)
    assert np.abs(np.asarray(cached_run.images[0]).astype(int) - np.asarray(plain.images[0]).astype(int)).max() > 3


def test_sd3_refusals_name_the_problem(slotted, tmp_path: Path) -> None:
    """Ranks past the slots, layers without a slot (the embedders; T5's, kohya's ``lora_te3_``; another family's),
    factors of another width, a target set the family has not, a streamed transformer: refused before any work."""
    from sdrt.export.lora_slots import SlotPlan
    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3
    from sdrt.runtime.families import family_named

    pipe = shared_pipeline(slotted("sd3"))
    big = peft_lora(tmp_path, "sd3", seed=4, rank=5)
    with pytest.raises(InputError, match=r"add rank 10 at transformer_blocks\.0\..*over this export's slot rank 8"):
        pipe(PROMPT, steps=1, loras=[(big, 1.0), (big, 0.5)])
    g = np.random.default_rng(5)
    width = int(_modules("sd3").transformer.config.joint_attention_dim)
    outside = _save(tmp_path / "embedder.safetensors", {
        "lora_unet_context_embedder.lora_down.weight": g.standard_normal((2, width)).astype(np.float32),
        "lora_unet_context_embedder.lora_up.weight": g.standard_normal((8, 2)).astype(np.float32)})
    with pytest.raises(InputError, match=r"no slot for \(unet\.context_embedder\): its slots are the transformer's "):
        pipe(PROMPT, steps=1, loras=[(outside, 1.0)])
    t5 = _save(tmp_path / "t5.safetensors", {
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": np.zeros((2, 8), np.float32),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": np.zeros((8, 2), np.float32)})
    with pytest.raises(InputError, match="T5 encoder .text_encoder_3: sdrt gives T5 no LoRA slots"):
        pipe(PROMPT, steps=1, loras=[(t5, 1.0)])
    flux = flux_kohya_lora(tmp_path / "flux.safetensors", seed=6, rank=2, alpha=1.0, layout="kohya", text=False)[0]
    with pytest.raises(InputError, match=r"no slot for \(unet\.double_blocks_0_"):
        pipe(PROMPT, steps=1, loras=[(flux, 1.0)])
    other = _save(tmp_path / "wide.safetensors", {  # SD 3 Medium's width, not the tiny preset's
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((2, 1536), np.float32),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((1536, 2), np.float32)})
    with pytest.raises(InputError, match="to_q has factors .* trained for another architecture"):
        pipe(PROMPT, steps=1, loras=[(other, 1.0)])
    with pytest.raises(InputError, match="transformer blocks hold no convolutions; use attn or attn-ff"):
        family_named("sd3").lora_targets(SlotPlan.parse("8:attn-ff-conv").targets)
    with pytest.raises(InputError, match="transformer blocks hold no convolutions"):
        export_sd3(load_sd3(random_preset=SD3), tmp_path / "out", lora_slots=SlotPlan.parse("8:attn-ff-conv"))
    assert not (tmp_path / "out").exists()


# -- FLUX.1 -----------------------------------------------------------------------------------------------

_FLUX_LORA_LAYERS = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin", "txt_attn.qkv",
                     "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin", "linear1", "linear2", "modulation.lin")
FULL = 3072  # the width diffusers' FLUX.1 converter splits linear1 at


def flux_kohya_lora(path: Path, seed: int, rank: int, alpha: float, layout: str,
                    text: bool = True) -> tuple[Path, dict[str, Any]]:
    """A LoRA of FLUX.1 in Black Forest Labs' layout (every linear layer of the double and single blocks: fused qkv,
    fused linear1) and of CLIP: kohya's keys (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_te1_``) or
    ComfyUI's (``diffusion_model.double_blocks.0.img_attn.qkv``; CLIP's as kohya's); with the state dict diffusers
    converts it from: ``linear1``'s factors laid out at FLUX.1's 3072-wide offsets (``_unpad`` cuts them back)."""
    from .helpers.flux_layout import transformer_to_bfl

    m, g = _modules("flux"), np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}
    padded: dict[str, np.ndarray] = {}
    width = int(m.transformer.inner_dim)
    for key, w in transformer_to_bfl(m.transformer.state_dict()).items():
        name = key.removesuffix(".weight")
        if not (name.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight")
                and name.endswith(_FLUX_LORA_LAYERS)):
            continue
        down, up = _factors(g, w, rank)
        stem = "lora_unet_" + name.replace(".", "_") if layout == "kohya" else f"diffusion_model.{name}"
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down, up
        sd[f"{stem}.alpha"] = np.array(alpha, np.float32)
        kohya = "lora_unet_" + name.replace(".", "_")
        padded.update({f"{kohya}.lora_down.weight": down, f"{kohya}.alpha": np.array(alpha, np.float32),
                       f"{kohya}.lora_up.weight": _pad(up, width) if name.endswith("linear1") else up})
    clip: dict[str, np.ndarray] = {}
    if text:
        _kohya_text(clip, {}, m, "flux", g, rank, alpha)
    return _save(path, {**sd, **clip}), {**padded, **clip}


def _pad(up: np.ndarray, width: int) -> np.ndarray:
    """linear1's up [3 width + mlp, r] at FLUX.1's offsets: q, k, v at 0, 3072, 6144, the MLP's 4 width at 9216."""
    out = np.zeros((3 * FULL + 4 * FULL, up.shape[1]), up.dtype)
    for i in range(3):
        out[i * FULL: i * FULL + width] = up[i * width: (i + 1) * width]
    out[3 * FULL: 3 * FULL + up.shape[0] - 3 * width] = up[3 * width:]
    return out


def _unpad(sd: dict[str, Any], width: int) -> dict[str, Any]:
    """diffusers' conversion of the padded file with the single blocks' q, k, v and MLP ups cut to the tiny widths."""
    out = {}
    for k, v in sd.items():
        if k.startswith("transformer.single_transformer_blocks.") and k.endswith("lora_B.weight") and (
                ".attn.to_" in k or ".proj_mlp." in k):
            v = v[: width if ".attn.to_" in k else 4 * width]
        out[k] = v
    return out


def _flux_reference(folder: Path, loras: list[tuple[Any, float]] = (), modules: Any = None) -> np.ndarray:
    """diffusers' FluxPipeline over fresh seeded modules with ``loras`` (files, or converted state dicts) loaded at
    their scales (``set_adapters``)."""
    from diffusers import FluxPipeline

    pipe = _flux_pipe(folder, loras, modules)
    b, c, h, w = 1, 16, 8, 12
    packed = FluxPipeline._pack_latents(torch.from_numpy(_latents(16)), b, c, h, w)
    with torch.no_grad():
        out = pipe(PROMPT, height=FLUX_KW["height"], width=FLUX_KW["width"], num_inference_steps=FLUX_KW["steps"],
                   guidance_scale=FLUX_KW["guidance_scale"], latents=packed, output_type="np").images
    return (out[0] * 255).round().astype(np.int32)


def _flux_pipe(folder: Path, loras: list[tuple[Any, float]] = (), modules: Any = None) -> Any:
    """diffusers' FluxPipeline over fresh seeded modules (or ``modules``) with ``loras`` loaded at their scales."""
    from diffusers import FluxPipeline
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer, T5TokenizerFast

    from sdrt.export.flux_presets import get_flux_preset

    m = _modules("flux") if modules is None else modules  # (a streamed model's weights, held)
    pipe = FluxPipeline(transformer=m.transformer, vae=m.vae,
                        scheduler=FlowMatchEulerDiscreteScheduler.from_config(get_flux_preset(FLUX).scheduler),
                        text_encoder=m.clip, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                        text_encoder_2=m.t5, tokenizer_2=T5TokenizerFast.from_pretrained(folder / "tokenizer_2"))
    pipe.set_progress_bar_config(disable=True)
    _load(pipe, list(loras))
    return pipe


def _converted(padded: dict[str, np.ndarray]) -> dict[str, Any]:
    """diffusers' own conversion of a kohya FLUX.1 state dict (the padded layout), cut back to the tiny widths."""
    from diffusers import FluxPipeline

    sd = FluxPipeline.lora_state_dict({k: torch.from_numpy(v) for k, v in padded.items()})
    sd = sd[0] if isinstance(sd, tuple) else sd
    return _unpad(dict(sd), int(_modules("flux").transformer.inner_dim))


@pytest.mark.parametrize("layout", ["kohya", "comfy"])
def test_flux_kohya_lora_matches_diffusers(slotted, tmp_path: Path, layout: str) -> None:
    """Black Forest Labs' layout (fused qkv, fused linear1, modulation) and CLIP's kohya layers, against diffusers'
    kohya converter and loader; the ComfyUI spelling gives the same image."""
    folder = slotted("flux")
    path, padded = flux_kohya_lora(tmp_path / f"{layout}.safetensors", seed=7, rank=4, alpha=2.0, layout=layout)
    got = _sdrt(folder, [(path, 0.8)], "flux")
    _close(got, _flux_reference(folder, [(_converted(padded), 0.8)]), f"FLUX.1 {layout} LoRA")
    assert np.abs(got - _sdrt(folder, None, "flux")).max() > 3


def test_flux_peft_and_kohya_stacked_match_diffusers(slotted, tmp_path: Path) -> None:
    """diffusers' own file (its alpha in the metadata) alone, then stacked with a kohya file (ranks 3 + 4 of 8)."""
    folder = slotted("flux")
    a = peft_lora(tmp_path, "flux", seed=8, rank=3, alpha=1.5)
    b, padded = flux_kohya_lora(tmp_path / "b.safetensors", seed=9, rank=4, alpha=4.0, layout="kohya")
    _close(_sdrt(folder, [(a, 0.9)], "flux"), _flux_reference(folder, [(a, 0.9)]), "FLUX.1 PEFT LoRA")
    _close(_sdrt(folder, [(a, 0.9), (b, -0.6)], "flux"), _flux_reference(folder, [(a, 0.9), (_converted(padded), -0.6)]),
           "FLUX.1 PEFT + kohya LoRAs stacked")


def test_flux_first_block_cache_with_a_lora_matches_diffusers(tmp_path: Path) -> None:
    """First-block caching (``--feature-cache``) beside slots: the cached step runs the first block with the call's
    factors, so a fixed schedule with a LoRA gives diffusers' image with the file loaded and its first-block cache
    hooks deciding by the same schedule."""
    from diffusers import FluxPipeline
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry

    from sdrt.export.flux_export import export_flux
    from sdrt.export.flux_loading import load_flux
    from sdrt.export.lora_slots import SlotPlan
    from sdrt.runtime.feature_cache import CachePolicy

    out = tmp_path / "fbc"
    export_flux(load_flux(random_preset=FLUX), out, lora_slots=SlotPlan.parse(SLOTS), block_cache=True)
    a = peft_lora(tmp_path, "flux", seed=24, rank=3)
    policy, steps = CachePolicy("first-block", interval=2), 6
    pipe = _flux_pipe(out, [(a, 0.8)])
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    head = HookRegistry.check_if_exists_or_initialize(pipe.transformer.transformer_blocks[0]).get_hook(
        "fbc_leader_block_hook")
    plan = iter(policy.full_steps(steps))
    head._should_compute_remaining_blocks = lambda residual: bool(next(plan))
    packed = FluxPipeline._pack_latents(torch.from_numpy(_latents(16)), 1, 16, 8, 12)
    with torch.no_grad():
        want = pipe(PROMPT, height=64, width=96, num_inference_steps=steps, guidance_scale=3.5, latents=packed,
                    output_type="np").images
    want = (want[0] * 255).round().astype(np.int32)
    res = shared_pipeline(out)(PROMPT, height=64, width=96, steps=steps, guidance_scale=3.5, latents=_latents(16),
                               loras=[(a, 0.8)], cache="first-block", cache_interval=2)
    assert "3 of 6 steps ran the full transformer" in res.loop, res.loop
    _close(np.asarray(res.images[0]).astype(np.int32), want, "FLUX.1 first-block cache with a LoRA")


@pytest.mark.slow  # a streamed export and its reduced-depth gate: over 1 min on 2 busy cores
def test_flux_slots_on_a_streamed_transformer(tmp_path: Path) -> None:
    """A streamed FLUX.1 transformer with slots, gated on its reduced-depth copy with random factors: a kohya file
    per request against diffusers over the same synthetic weights, held."""
    from sdrt.export.flux_export import export_flux
    from sdrt.export.flux_loading import load_flux
    from sdrt.export.lora_slots import SlotPlan

    path, padded = flux_kohya_lora(tmp_path / "k.safetensors", seed=23, rank=4, alpha=2.0, layout="kohya")
    model = load_flux(random_preset=FLUX, stream=True)
    base = copy.deepcopy(model.held())
    out = tmp_path / "streamed"
    export_flux(model, out, lora_slots=SlotPlan.parse(SLOTS), block_cache=True)  # the cached step slotted too
    _close(_sdrt(out, [(path, 0.8)], "flux"), _flux_reference(out, [(_converted(padded), 0.8)], modules=base),
           "FLUX.1 streamed slots")
    from sdrt.runtime.lora_adapters import slots_of
    from sdrt.runtime.manifest import ExportManifest

    cached = ExportManifest.read(out).components["unet_shallow"]
    assert cached.parity is not None and slots_of({i.name: i for i in cached.inputs})
    # the loop feeds the cached step the call's factors (its gate checked them against PyTorch)
    run = shared_pipeline(out)(PROMPT, latents=_latents(16), loras=[(path, 0.8)], cache="first-block",
                               cache_interval=2, **FLUX_KW)
    assert "of 3 steps ran the full transformer" in run.loop


def test_flux_slotted_export_without_lora_is_the_plain_model(slotted) -> None:
    folder = slotted("flux")
    _close(_sdrt(folder, None, "flux"), _flux_reference(folder), "FLUX.1 slotted, no LoRA")


def test_flux_refusals_name_the_problem(slotted, tmp_path: Path) -> None:
    """T5's layers (kohya's ``lora_te2_`` on FLUX.1), an SD 3 LoRA, the records of the export."""
    from sdrt.runtime.lora_adapters import slots_of
    from sdrt.runtime.manifest import ExportManifest

    folder = slotted("flux")
    pipe = shared_pipeline(folder)
    t5 = _save(tmp_path / "t5.safetensors", {
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": np.zeros((2, 8), np.float32),
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": np.zeros((8, 2), np.float32)})
    with pytest.raises(InputError, match="T5 encoder .text_encoder_2: sdrt gives T5 no LoRA slots"):
        pipe(PROMPT, steps=1, loras=[(t5, 1.0)])
    sd3 = sd3_kohya_lora(tmp_path / "sd3.safetensors", seed=10, rank=2, alpha=1.0, text=False)[0]
    with pytest.raises(InputError, match=r"no slot for \(unet\.joint_blocks_0_"):
        pipe(PROMPT, steps=1, loras=[(sd3, 1.0)])
    man = ExportManifest.read(folder)
    slots = slots_of({i.name: i for i in man.components["unet"].inputs})
    single = {k.split(".", 2)[2] for k in slots if k.startswith("single_transformer_blocks.0.")}
    assert single == {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"}
    assert man.source["lora_slots"] == {"rank": 8, "targets": "attn-ff"}
    assert "text_encoder_2" in man.components and not slots_of(
        {i.name: i for i in man.components["text_encoder_2"].inputs})  # T5: no slots
    assert json.loads((folder / "sdrt.json").read_text())["family"] == "flux"


# -- other backends ---------------------------------------------------------------------------------------

BACKENDS = ["ort-cuda-path", "openvino", "tensorrt"]
_BACKEND_REFS: dict[str, tuple[Path, np.ndarray, np.ndarray]] = {}


@pytest.fixture(scope="module")
def backend_case(slotted, tmp_path_factory: pytest.TempPathFactory):
    """backend_case(family) -> (a PEFT LoRA of the family, diffusers' image with it loaded at 0.8, diffusers' image
    without it): made once for every backend."""

    def get(family: str) -> tuple[Path, np.ndarray, np.ndarray]:
        if family not in _BACKEND_REFS:
            folder = slotted(family)
            lora = peft_lora(tmp_path_factory.mktemp("loras"), family, seed=26, rank=3, alpha=6.0)
            ref = _sd3_reference if family == "sd3" else _flux_reference
            _BACKEND_REFS[family] = (lora, ref(folder, [(lora, 0.8)]), ref(folder))
        return _BACKEND_REFS[family]

    return get


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_slots_on_other_backends_match_diffusers(slotted, backend_case, request: pytest.FixtureRequest,
                                                 tmp_path: Path, family: str, backend: str) -> None:
    """The slotted export on ort-cuda's code path (OrtValues, IO binding, on the CPU EP: says nothing of a GPU),
    openvino (fp32) and the TensorRT fakes (its captured loop, which copies the factors into fixed buffers at each
    start; says nothing of real TensorRT): a PEFT file of the transformer and the CLIP encoders at 0.8 against
    diffusers with it loaded, then no LoRA against diffusers' plain pipeline."""
    lora, want, plain = backend_case(family)
    kw = {**(SD3_KW if family == "sd3" else FLUX_KW), **({"negative_prompt": "blurry"} if family == "sd3" else {})}
    with loaded_on_any(slotted(family), backend, request, tmp_path / "engines", cfg=family == "sd3") as pipe:
        styled = pipe(PROMPT, latents=_latents(16), loras=[(lora, 0.8)], **kw)
        bare = pipe(PROMPT, latents=_latents(16), **kw)
    assert LOOP_WORDS[backend] in styled.loop, styled.loop  # ort-cuda: the factors among the composed session's inputs
    got = np.asarray(styled.images[0]).astype(np.int32)
    _close(got, want, f"{family} LoRA on {backend}")
    _close(np.asarray(bare.images[0]).astype(np.int32), plain, f"{family} slotted, no LoRA, on {backend}")
    assert np.abs(want - plain).max() > 3  # the LoRA moved the image


# -- merged at export (``sdrt export --lora``) ------------------------------------------------------------


def test_sd3_merged_export_matches_diffusers_fused(tmp_path: Path) -> None:
    """A PEFT file and a kohya file merged at export (``sdrt export --random sd35-medium-tiny --lora A:0.8 --lora
    B:0.7``): diffusers with the PEFT file loaded and fused over the weights with the kohya products added in
    Stability's layout."""
    from sdrt.cli import main

    a = peft_lora(tmp_path, "sd3", seed=11, rank=3, alpha=6.0)
    b, deltas = sd3_kohya_lora(tmp_path / "kohya.safetensors", seed=12, rank=2, alpha=1.0)
    out = tmp_path / "merged"
    assert main(["export", "--random", SD3, "--out", str(out), "--fp32", "--without-t5", "--lora", f"{a}:0.8",
                 "--lora", f"{b}:0.7"]) == 0
    want = _sd3_reference(out, [(a, 0.8)], merged=(deltas, 0.7), fuse=True)
    _close(_sdrt(out, None, "sd3"), want, "SD 3 merged export")
    from sdrt.runtime.manifest import ExportManifest

    assert [x["scale"] for x in ExportManifest.read(out).source["loras"]] == [0.8, 0.7]


@pytest.mark.slow  # a streamed export and its reduced-depth gate: about 1.5 min on 2 busy cores
def test_sd3_merged_into_a_streamed_transformer(tmp_path: Path) -> None:
    """A streamed transformer (a full-size model's way: never held) gets each weight's delta as the weight is read:
    the export (and its reduced-depth gate) against diffusers over the same synthetic weights, held, with the file
    loaded."""
    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3
    from sdrt.export.sd3_model import merge_sd3_loras
    from sdrt.runtime.lora_files import LoraSpec

    a = peft_lora(tmp_path, "sd3", seed=16, rank=2)
    model = load_sd3(random_preset=SD3, stream=True)
    assert "transformer" in model.streamed
    # the synthetic weights, read before the merge wraps their source (and adds to the encoders in place)
    base = copy.deepcopy(model.held(t5=False))
    reports = merge_sd3_loras(model, [LoraSpec(a, 0.9)])
    assert reports["unet"].matched and reports["text_encoder"].matched
    out = tmp_path / "streamed"
    export_sd3(model, out, fp16=False, without_t5=True)
    _close(_sdrt(out, None, "sd3"), _sd3_reference(out, [(a, 0.9)], modules=base), "SD 3 streamed merge")
    # a streamed transformer has no refit map: refit refuses rather than leave it as it is
    from sdrt.export.refit import RefitRequest, refit_folder
    from sdrt.runtime.errors import CompatibilityError

    with pytest.raises(CompatibilityError, match="adapts unet, which this export holds without a refit map"):
        refit_folder(out, RefitRequest(loras=(LoraSpec(a, 1.0),)), out=tmp_path / "refit")


@pytest.mark.slow  # a streamed export and its reduced-depth gate: about 1.5 min on 2 busy cores
def test_sd3_slots_on_a_streamed_transformer(tmp_path: Path) -> None:
    """A streamed transformer (a full-size model's way, traced in fake mode) takes the slots too, gated on its
    reduced-depth copy with random factors: a PEFT file per request against diffusers over the same synthetic
    weights, held."""
    from sdrt.export.lora_slots import SlotPlan
    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3
    from sdrt.runtime.manifest import ExportManifest

    a = peft_lora(tmp_path, "sd3", seed=22, rank=3, alpha=6.0)
    model = load_sd3(random_preset=SD3, stream=True)
    base = copy.deepcopy(model.held(t5=False))
    out = tmp_path / "streamed"
    export_sd3(model, out, fp16=False, without_t5=True, lora_slots=SlotPlan.parse(SLOTS))
    unet = ExportManifest.read(out).components["unet"]
    assert unet.parity is not None and "reduced depth" in unet.parity.reference
    _close(_sdrt(out, [(a, 0.8)], "sd3"), _sd3_reference(out, [(a, 0.8)], modules=base), "SD 3 streamed slots")


def test_flux_merged_export_matches_diffusers_fused(tmp_path: Path) -> None:
    """kohya's and PEFT's files merged at export, against diffusers with both loaded and fused."""
    from sdrt.cli import main

    a = peft_lora(tmp_path, "flux", seed=13, rank=3)
    b, padded = flux_kohya_lora(tmp_path / "b.safetensors", seed=14, rank=4, alpha=2.0, layout="kohya")
    out = tmp_path / "merged"
    assert main(["export", "--random", FLUX, "--out", str(out), "--fp32", "--lora", f"{a}:0.6", "--lora",
                 f"{b}:-0.8"]) == 0
    _close(_sdrt(out, None, "flux"), _flux_reference(out, [(a, 0.6), (_converted(padded), -0.8)]),
           "FLUX.1 merged export")


def test_merge_refuses_another_family_before_any_work(tmp_path: Path) -> None:
    from sdrt.export.flux_loading import load_flux, merge_flux_loras
    from sdrt.runtime.lora_files import LoraSpec

    sd3 = sd3_kohya_lora(tmp_path / "sd3.safetensors", seed=15, rank=2, alpha=1.0, text=False)[0]
    model = load_flux(random_preset=FLUX)
    before = {k: v.clone() for k, v in model.modules.transformer.state_dict().items()}
    with pytest.raises(InputError, match="adapts no weight of this FLUX.1 model"):
        merge_flux_loras(model, [LoraSpec(sd3, 1.0)])
    after = model.modules.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- sdrt refit --lora ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_refit_matches_diffusers(sd3_export, flux_export, tmp_path: Path, family: str) -> None:
    """``sdrt refit EXPORT --lora A --lora B --out COPY`` (the ONNX path of the TensorRT refit: the same arrays a
    refittable engine takes) on a plain export: a kohya file in the family's original layout and a PEFT file,
    stacked, against diffusers as in the merged tests. The T5 encoder is left as it is."""
    from sdrt.cli import main

    if family == "sd3":
        folder = sd3_export(SD3, t5=False)
        a = peft_lora(tmp_path, "sd3", seed=17, rank=3, alpha=6.0)
        b, deltas = sd3_kohya_lora(tmp_path / "kohya.safetensors", seed=18, rank=2, alpha=1.0)
    else:
        folder = flux_export(FLUX)
        a = peft_lora(tmp_path, "flux", seed=19, rank=3)
        b, padded = flux_kohya_lora(tmp_path / "b.safetensors", seed=20, rank=4, alpha=2.0, layout="kohya")
    out = tmp_path / "refit"
    assert main(["refit", str(folder), "--lora", f"{a}:0.8", "--lora", f"{b}:-0.7", "--out", str(out)]) == 0
    if family == "sd3":
        want = _sd3_reference(out, [(a, 0.8)], merged=(deltas, -0.7), fuse=True)
    else:
        want = _flux_reference(out, [(a, 0.8), (_converted(padded), -0.7)])
    _close(_sdrt(out, None, family), want, f"{family} refit")


# -- generate and serve ------------------------------------------------------------------------------------


def test_generate_and_serve_take_loras_by_name(slotted, tmp_path: Path) -> None:
    """``sdrt generate --lora-dir D --lora NAME:SCALE`` and ``sdrt serve --lora-dir D`` (the OpenAI API's ``loras``
    field, A1111's ``<lora:NAME:SCALE>`` tag) on a FLUX.1 export with slots give the image the bare pipeline gives
    with the same file (which the tests above check against diffusers); unknown names are a 422."""
    import httpx
    from PIL import Image

    from sdrt.cli import main
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.serve import create_app

    from .helpers.serve_live import LiveServer, pixels

    folder, loras = slotted("flux"), tmp_path / "loras"
    flux_kohya_lora(loras / "ink.safetensors", seed=21, rank=4, alpha=2.0, layout="kohya")
    kw = {"height": 64, "width": 64, "steps": 2, "guidance_scale": 3.5, "seed": 5}
    with Pipeline.load(folder, backend="ort-cpu", lora_dir=loras) as pipe:
        want = np.asarray(pipe(PROMPT, loras=[("ink", 0.7)], **kw).images[0])
        assert np.abs(want.astype(int) - np.asarray(pipe(PROMPT, **kw).images[0]).astype(int)).max() > 3
        png = tmp_path / "out.png"
        assert main(["generate", str(folder), "--prompt", PROMPT, "--height", "64", "--width", "64", "--steps", "2",
                     "--guidance", "3.5", "--seed", "5", "--lora-dir", str(loras), "--lora", "ink:0.7",
                     "--backend", "ort-cpu", "-o", str(png)]) == 0
        assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), want)
        app = create_app(pipe, max_batch=2, batch_window_ms=50, max_steps=4, max_pixels=128 * 128, warmup=False,
                         lora_dir=loras)
        with LiveServer(app) as server:
            body = {"prompt": PROMPT, "size": "64x64", "steps": 2, "seed": 5, "guidance_scale": 3.5}
            for extra in ({"loras": [{"name": "ink", "scale": 0.7}]},
                          {"prompt": f"{PROMPT} <lora:ink:0.7>", "prompt_syntax": "a1111"}):
                r = httpx.post(f"{server.url}/v1/images/generations", json={**body, **extra}, timeout=120)
                assert r.status_code == 200, r.text
                assert np.array_equal(pixels(r.json()["data"][0]["b64_json"]), want)
            r = httpx.post(f"{server.url}/v1/images/generations",
                           json={**body, "loras": [{"name": "nope", "scale": 1.0}]}, timeout=120)
            assert r.status_code == 422 and "nope" in r.text
