"""The physical floor: matrix FLOPs of each module over the device's measured matrix-multiply rate.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the diffusers / transformers
modules built on the ``meta`` device: shapes only, no weights allocated and nothing computed, so the
full SDXL UNet is counted in about a second. The counter counts matrix products (mm, bmm, addmm,
convolution, attention) at 2 FLOPs per multiply-add and ignores elementwise work (normalization,
activations, softmax), which is memory-bound and so belongs to the other floor. Meta tensors matter for
attention too: on CPU tensors the fused ``scaled_dot_product_attention`` kernel has no FLOP formula and
counts 0, while on meta it decomposes into the two matmuls and is counted.

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


@dataclass(frozen=True)
class Architecture:
    """The configurations FLOPs are counted from (the same dictionaries the exporter builds from)."""

    family: str  # a manifest family key (runtime/families)
    unet: str  # JSON of the UNet2DConditionModel config (a string: hashable, for the cache)
    vae: str
    text_encoders: tuple[str, ...]
    refiner: bool = False

    @property
    def model_family(self) -> Family:
        return family_named(self.family, self.refiner)


def architecture_of_preset(name: str) -> Architecture:
    from sdrt.export.presets import get_preset

    p = get_preset(name)
    return Architecture(p.family, json.dumps(p.unet), json.dumps(p.vae), tuple(json.dumps(t) for t in p.text_encoders),
                        p.refiner)


def architecture_of_folder(folder: str | Path, family: str, refiner: bool = False) -> Architecture:
    """From a diffusers folder's ``config.json`` files."""
    f = Path(folder)

    def cfg(sub: str) -> str:
        path = f / sub / "config.json"
        if not path.is_file():
            raise InputError(f"{path} is missing: cannot count FLOPs without the model's configuration")
        return path.read_text()

    encs = family_named(family, refiner).encoders
    return Architecture(family, cfg("unet"), cfg("vae"), tuple(cfg(e) for e in encs), refiner)



def architecture_of_export(manifest: Any) -> tuple[Architecture | None, str | None]:
    """An export's architecture (its shipped preset's, or its diffusers folder's), or the reason there is none."""
    try:
        from sdrt.export.presets import PRESETS

        if manifest.preset in PRESETS:
            return architecture_of_preset(manifest.preset), None
        src = manifest.source
        if src.get("kind") == "diffusers" and Path(str(src.get("path"))).is_dir():
            return architecture_of_folder(src["path"], manifest.family, manifest.refiner), None
        return None, f"no architecture to count FLOPs from (preset {manifest.preset!r} is not shipped)"
    except ImportError as e:
        return None, f"FLOPs need torch, diffusers and transformers ({e})"

@lru_cache(maxsize=4)
def _meta_modules(arch: Architecture) -> tuple[Any, Any, list[Any]]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def clean(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if not k.startswith("_")}

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(clean(json.loads(arch.unet))).eval()
        vae = AutoencoderKL.from_config(clean(json.loads(arch.vae))).eval()
        encoders = []
        fam = arch.model_family
        for name, t in zip(fam.encoders, arch.text_encoders, strict=True):
            cls = CLIPTextModelWithProjection if name == fam.pooled_encoder else CLIPTextModel
            encoders.append(cls(CLIPTextConfig.from_dict(clean(json.loads(t)))).eval())
    return unet, vae, encoders


def module_flops(arch: Architecture, height: int, width: int, batch_size: int, guided: bool,
                 text_len: int = 77) -> dict[str, int]:
    """FLOPs of one call of each stage for ``batch_size`` images at ``height`` x ``width`` pixels.

    ``text_encoder``: all prompts of a call (conditional and unconditional: 2 x batch when guided);
    ``unet_step``: one denoising step (the UNet at 2 x batch when guided); ``vae_decoder``: the batch.
    """
    import torch

    unet, vae, encoders = _meta_modules(arch)
    rows = 2 * batch_size if guided else batch_size
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = height // f, width // f
    lat = int(vae.config.latent_channels)
    with torch.device("meta"):
        ids = torch.zeros(rows, text_len, dtype=torch.long)
        text = 0
        for enc in encoders:
            text += count_flops(partial(enc, ids))[0]
        sample = torch.empty(rows, int(unet.config.in_channels), h, w)
        t = torch.empty(rows)
        ehs = torch.empty(rows, text_len, int(unet.config.cross_attention_dim))
        kwargs: dict[str, Any] = {}
        fam = arch.model_family
        if fam.time_ids:  # the family's added conditioning: the pooled embedding and time ids
            pooled = int(encoders[-1].config.projection_dim)
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(rows, pooled),
                                           "time_ids": torch.empty(rows, fam.time_ids)}
        unet_step = count_flops(lambda: unet(sample, t, ehs, **kwargs))[0]
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
