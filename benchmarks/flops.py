"""The physical floor: matrix FLOPs of each module over the device's measured matrix-multiply rate.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the diffusers / transformers
modules built on the ``meta`` device: shapes only, no weights allocated and nothing computed, so the
full SDXL UNet is counted in about a second. The modules are the model's own classes: a UNet with CLIP
encoders, or SD 3 / 3.5's MMDiT transformer with two projecting CLIP encoders, T5 and a 16-channel VAE.
The counter counts matrix products (mm, bmm, addmm, convolution, attention) at 2 FLOPs per multiply-add
and ignores elementwise work (normalization, activations, softmax), which is memory-bound and so belongs
to the other floor. Meta tensors matter for attention too: on CPU tensors the fused
``scaled_dot_product_attention`` kernel has no FLOP formula and counts 0, while on meta it decomposes into
the two matmuls and is counted.

The rate is measured in the run: a large square matmul of the run's precision (fp16 on a GPU, fp32 on
the CPU with the run's thread count), timed per product (CUDA events on a GPU), median of repeats,
rotating over several input pairs of random data (never zeros).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from sdrt.runtime.errors import InputError
from sdrt.runtime.families import Family, family_named


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per aten operator) of calling ``fn`` once, under ``torch.no_grad``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


# the denoiser classes counted (diffusers)
UNET, MMDIT, FLUX = "UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"
# the text encoder classes counted (transformers)
CLIP, CLIP_PROJ, T5 = "CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"


@dataclass(frozen=True)
class Architecture:
    """The configurations FLOPs are counted from (the same dictionaries the exporter builds from), as JSON
    strings (hashable, for the cache), and the classes they configure."""

    family: str  # a manifest family key (runtime/families)
    denoiser: str  # the UNet2DConditionModel or SD3Transformer2DModel config
    vae: str
    text_encoders: tuple[str, ...]  # those the model has, in the family's order (an export may leave T5 out)
    encoder_classes: tuple[str, ...]  # transformers' class of each: CLIP, CLIP_PROJ or T5
    refiner: bool = False
    denoiser_class: str = UNET

    @property
    def model_family(self) -> Family:
        return family_named(self.family, self.refiner)


def _encoder_class(fam: Family, name: str, config: dict[str, Any]) -> str:
    """An encoder's class: the one its config names (a diffusers folder's), else by the family: T5 for a
    ``t5`` tokenizer, CLIP with a projection where the family takes pooled embeddings from it."""
    named = [a for a in config.get("architectures") or [] if a in (CLIP, CLIP_PROJ, T5)]
    if named:
        return str(named[0])
    if fam.tokenizer_kind(name) == "t5":
        return T5
    return CLIP_PROJ if fam.pooled and name == fam.pooled_encoder else CLIP


def architecture_of_preset(name: str, encoders: tuple[str, ...] | None = None) -> Architecture:
    """A shipped preset's architecture (either table); ``encoders``: the components the model has (None:
    all)."""
    from sdrt.export.preset_tables import get_any_preset, is_flux_preset, is_sd3_preset

    p = get_any_preset(name)
    if is_flux_preset(name):  # CLIP's pooled output (no projection) and T5
        keep = [i for i, e in enumerate(family_named(p.family).encoders) if encoders is None or e in encoders]
        configs, classes = [p.config("clip"), p.config("t5")], [CLIP, T5]
        return Architecture(p.family, json.dumps(p.config("transformer")), json.dumps(p.config("vae")),
                            tuple(json.dumps(configs[i]) for i in keep), tuple(classes[i] for i in keep),
                            denoiser_class=FLUX)
    if is_sd3_preset(name):  # both CLIP encoders project (SD3 joins their pooled outputs), then T5
        fam = family_named(p.family)
        configs: list[dict[str, Any]] = [*p.config("clip"), p.config("t5")]
        classes = [T5 if fam.tokenizer_kind(e) == "t5" else CLIP_PROJ for e in fam.encoders]
        keep = [i for i, e in enumerate(fam.encoders) if encoders is None or e in encoders]
        return Architecture(p.family, json.dumps(p.config("transformer")), json.dumps(p.config("vae")),
                            tuple(json.dumps(configs[i]) for i in keep), tuple(classes[i] for i in keep),
                            denoiser_class=MMDIT)
    fam = family_named(p.family, p.refiner)
    return Architecture(p.family, json.dumps(p.unet), json.dumps(p.vae), tuple(json.dumps(t) for t in p.text_encoders),
                        tuple(_encoder_class(fam, e, t)
                              for e, t in zip(fam.encoders, p.text_encoders, strict=True)),
                        p.refiner)


def architecture_of_folder(folder: str | Path, family: str, refiner: bool = False,
                           encoders: tuple[str, ...] | None = None) -> Architecture:
    """From a diffusers folder's ``config.json`` files (the denoiser's in ``unet/`` or ``transformer/``);
    ``encoders``: the components the model has (None: every one of the family's the folder holds)."""
    f = Path(folder)

    def cfg(sub: str) -> str:
        path = f / sub / "config.json"
        if not path.is_file():
            raise InputError(f"{path} is missing: cannot count FLOPs without the model's configuration")
        return path.read_text()

    fam = family_named(family, refiner)
    names = [e for e in fam.encoders
             if (encoders is None and (f / e).is_dir()) or (encoders is not None and e in encoders)]
    sub = "unet" if (f / "unet").is_dir() else "transformer"
    denoiser = cfg(sub)
    cls = str(json.loads(denoiser).get("_class_name") or (UNET if sub == "unet" else MMDIT))
    texts = [cfg(e) for e in names]
    return Architecture(family, denoiser, cfg("vae"), tuple(texts),
                        tuple(_encoder_class(fam, e, json.loads(t))
                              for e, t in zip(names, texts, strict=True)),
                        refiner, cls)


def architecture_of_export(manifest: Any) -> tuple[Architecture | None, str | None]:
    """An export's architecture (its shipped preset's, or its diffusers folder's), counting only the text
    encoders it has, or the reason there is none."""
    try:
        from sdrt.export.preset_tables import preset_names

        encoders = tuple(e for e in manifest.model_family.encoders if e in manifest.components)
        if manifest.preset in preset_names():
            return architecture_of_preset(manifest.preset, encoders), None
        src = manifest.source
        if src.get("kind") == "diffusers" and Path(str(src.get("path"))).is_dir():
            return architecture_of_folder(src["path"], manifest.family, manifest.refiner, encoders), None
        return None, f"no architecture to count FLOPs from (preset {manifest.preset!r} is not shipped)"
    except ImportError as e:
        return None, f"FLOPs need torch, diffusers and transformers ({e})"


@lru_cache(maxsize=4)
def _meta_modules(arch: Architecture) -> tuple[Any, Any, list[Any]]:
    import diffusers
    import torch
    import transformers

    def clean(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if not k.startswith("_")}

    configs: dict[str, Any] = {CLIP: transformers.CLIPTextConfig, CLIP_PROJ: transformers.CLIPTextConfig,
                               T5: transformers.T5Config}
    with torch.device("meta"):
        denoiser_cls = getattr(diffusers, arch.denoiser_class)
        denoiser = denoiser_cls.from_config(clean(json.loads(arch.denoiser))).eval()
        vae = diffusers.AutoencoderKL.from_config(clean(json.loads(arch.vae))).eval()
        encoders = [getattr(transformers, cls)(configs[cls].from_dict(clean(json.loads(t)))).eval()
                    for cls, t in zip(arch.encoder_classes, arch.text_encoders, strict=True)]
    return denoiser, vae, encoders


def module_flops(arch: Architecture, height: int, width: int, batch_size: int, guided: bool,
                 text_len: int = 77) -> dict[str, int]:
    """FLOPs of one call of each stage for ``batch_size`` images at ``height`` x ``width`` pixels.

    ``text_encoder``: all prompts of a call (conditional and unconditional: 2 x batch when guided) through
    every text encoder the model has (CLIP at ``text_len`` tokens, T5 at the family's ``text_tokens``);
    ``unet_step``: one denoising step (the denoiser at 2 x batch when guided; an MMDiT's text tokens are
    CLIP's and T5's, 77 + 256, T5's zeros included where it was left out); ``vae_decoder``: the batch.
    """
    import torch

    denoiser, vae, encoders = _meta_modules(arch)
    fam = arch.model_family
    rows = 2 * batch_size if guided else batch_size
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = height // f, width // f
    lat = int(vae.config.latent_channels)
    t5_tokens = fam.text_tokens if any(fam.tokenizer_kind(e) == "t5" for e in fam.encoders) else 0
    with torch.device("meta"):
        text = 0
        for cls, enc in zip(arch.encoder_classes, encoders, strict=True):
            ids = torch.zeros(rows, fam.text_tokens if cls == T5 else text_len, dtype=torch.long)
            text += count_flops(partial(enc, ids))[0]
        t = torch.empty(rows)
        sample = torch.empty(rows, int(denoiser.config.in_channels), h, w)
        if arch.denoiser_class == FLUX:  # packed 2x2 patches as tokens, T5's tokens, rotary ids
            cfg = denoiser.config
            tokens = (h // 2) * (w // 2)
            packed = torch.empty(rows, tokens, int(cfg.in_channels))
            ehs = torch.empty(rows, fam.text_tokens, int(cfg.joint_attention_dim))
            pooled = torch.empty(rows, int(cfg.pooled_projection_dim))
            ids = {"img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(fam.text_tokens, 3)}
            if cfg.guidance_embeds:
                ids["guidance"] = torch.empty(rows)
            unet_step = count_flops(lambda: denoiser(hidden_states=packed, encoder_hidden_states=ehs,
                                                     pooled_projections=pooled, timestep=t, **ids))[0]
        elif arch.denoiser_class == MMDIT:
            cfg = denoiser.config
            ehs = torch.empty(rows, text_len + t5_tokens, int(cfg.joint_attention_dim))
            pooled = torch.empty(rows, int(cfg.pooled_projection_dim))
            unet_step = count_flops(lambda: denoiser(hidden_states=sample, encoder_hidden_states=ehs,
                                                     pooled_projections=pooled, timestep=t))[0]
        else:
            ehs = torch.empty(rows, text_len, int(denoiser.config.cross_attention_dim))
            kwargs: dict[str, Any] = {}
            if fam.time_ids:  # the family's added conditioning: the pooled embedding and time ids
                proj = int(encoders[-1].config.projection_dim)
                kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(rows, proj),
                                               "time_ids": torch.empty(rows, fam.time_ids)}
            unet_step = count_flops(lambda: denoiser(sample, t, ehs, **kwargs))[0]
        z = torch.empty(batch_size, lat, h, w)
        decoder = count_flops(lambda: vae.decode(z))[0]
    return {"text_encoder": int(text), "unet_step": int(unet_step), "vae_decoder": int(decoder)}


def floor_ms(flops: dict[str, int], tflops: float, steps: int) -> dict[str, float]:
    """The least time each stage can take at ``tflops`` (TFLOP/s), and a whole image's sum."""
    ms = {k: v / (tflops * 1e12) * 1e3 for k, v in flops.items()}
    ms["total"] = ms["text_encoder"] + steps * ms["unet_step"] + ms["vae_decoder"]
    return ms


def matmul_rate(device: str, dtype: str, n: int, *, warmup: int = 3, repeats: int = 10,
                pairs: int = 3) -> dict[str, Any]:
    """Measure the dense matrix-multiply rate: ``n`` x ``n`` products of random ``dtype`` data.

    ``device`` is ``"cuda"`` (timed with CUDA events) or ``"cpu"`` (host clock; threads as set by the
    caller). Returns {"tflops", "ms_p50", "n", "dtype", "device", "method"}.
    """
    import time

    import torch

    from .stats import percentile

    dt = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    ins = [(torch.randn(n, n, device=device, dtype=dt, generator=g),
            torch.randn(n, n, device=device, dtype=dt, generator=g)) for _ in range(pairs)]
    out = torch.empty(n, n, device=device, dtype=dt)
    for i in range(warmup):
        torch.matmul(*ins[i % pairs], out=out)
    times: list[float] = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for i, (a, b) in enumerate(events):
            a.record()
            torch.matmul(*ins[i % pairs], out=out)
            b.record()
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in events]
        method = "torch.matmul timed with CUDA events, median"
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(*ins[i % pairs], out=out)
            times.append((time.perf_counter() - t0) * 1e3)
        method = f"torch.matmul timed with the host clock, median, {torch.get_num_threads()} threads"
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("the matmul produced non-finite values; the rate measurement is void")
    ms = percentile(times, 50)
    return {"device": device, "dtype": dtype, "n": n, "ms_p50": ms,
            "tflops": 2 * n**3 / (ms * 1e-3) / 1e12, "method": method}
