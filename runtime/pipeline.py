"""``Pipeline``: text (and optionally an image) -> images, over engines on one backend.

The only module that knows both engines and samplers. The call is four public stages, each with data in
and out, which a caller may also run on their own::

    emb = pipe.encode_prompt("a cat", guided=True)            # -> PromptEmbeddings (or from_arrays)
    plan = pipe.plan("dpmpp-2m", 30)                          # -> SamplerPlan
    lat = pipe.prepare_latents(plan, 512, 512, seed=1)        # -> Latents (txt2img noise, or img2img)
    lat = pipe.denoise(emb, lat, plan, guidance_scale=7.5)    # -> Latents (optionally a window: start/end)
    images, nonfinite = pipe.decode(lat)

Load once, call many times; calls from several threads at once are safe: they are serialized by a
lock, since one pipeline drives one device. ``close()`` (or ``with Pipeline.load(...) as pipe:``)
releases every engine and device buffer; a closed pipeline refuses further calls.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from . import controlnet, inpaint, samplers
from .engine import Array, Backend, Engine
from .errors import ArtifactError, CompatibilityError, DeviceMemoryError, InputError, SdrtError
from .manifest import ExportManifest, tokenizer_of
from .step_loop import Clock, ControlFeeds, StepLoop
from .tokenizer import ClipTokenizer

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

CONTROL_UNET = "unet_control"  # the UNet taking ControlNet residuals (an export made with ControlNets)
BACKENDS = ("auto", "ort-cpu", "ort-cuda", "tensorrt", "openvino")
OUTPUTS = ("images", "latents")
SEED_MAX = 2**32 - 1  # seeds are 32-bit, as in the popular UIs, so any seed printed can be typed back
GUIDANCE_MAX = 100.0  # far above any useful scale (5-9 is typical); larger values only saturate the image
DEFAULT_STRENGTH = 0.8


@dataclass
class Result:
    images: list[Any]  # PIL images (empty when output="latents")
    timings: dict[str, Any]  # milliseconds per stage; "clock": "host" or "device"
    nonfinite: list[bool] = field(default_factory=list)  # per image: NaN/inf in the decoded pixels
    loop: str = ""  # how the denoising loop ran (step by step; tensorrt, ort-cuda: captured CUDA graphs or not, why)
    latents: np.ndarray | None = None  # the final latents [B, C, h, w] (output="latents")
    seed: list[int] | int | None = None  # the seed(s) used (drawn at random when the call gave none): pass
    # it back to reproduce the images


@dataclass(frozen=True)
class PromptEmbeddings:
    """Text conditioning for ``batch`` images, on the pipeline's device.

    ``hidden`` is [rows, tokens, C] and ``pooled`` [rows, P] (SDXL; else None); guided embeddings hold
    ``2 * batch`` rows, the unconditional (negative) rows first, as the UNet's guided batch takes them.
    """

    hidden: Array
    pooled: Array | None
    batch: int
    guided: bool


@dataclass(frozen=True)
class Latents:
    """The denoising state between stages, on the pipeline's device.

    ``x``: latents [B, C, h, w]; ``x0``: the sampler's previous x0 prediction (the history a multistep
    sampler continues from; None before the first step); ``step``: the plan row the next ``denoise``
    starts at; ``noise``: every step's fresh noise [steps, B, C, h, w] for ancestral samplers (host).
    """

    x: Array
    height: int
    width: int
    step: int = 0
    x0: Array | None = None
    noise: np.ndarray | None = None
    seed: list[int] | int | None = None
    # the float32 starting latents before the cast to the UNet's dtype, where they were made on the host:
    # the first UNet input is computed from them where the backend has no first-input graph
    start: np.ndarray | None = field(default=None, repr=False, compare=False)
    inpaint: inpaint.InpaintState | None = field(default=None, repr=False, compare=False)  # the mask conditioning


def make_backend(name: str, folder: Path, threads: int | None = None, cuda_graph: bool | None = None,
                 device_id: int = 0, precision: str | None = None, share: Backend | None = None) -> Backend:
    """``cuda_graph`` None: the backend's default (tensorrt: on; ort-cuda: off). ``precision``: openvino's
    inference precision (``auto``, ``bf16``, ``fp32``); None: its default, ``auto``. Other backends compute
    in their graphs' (or engines') precision and refuse it. ``share``: a tensorrt backend whose device,
    stream and scratch block a second model uses (other backends have nothing to share: each ONNX Runtime
    session keeps its own arena)."""
    from .ort_backend import OrtBackend, cuda_available

    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    engine_folder = (folder / "sdrt-engines.json").is_file()
    if engine_folder and name in ("ort-cpu", "ort-cuda"):
        raise _engine_folder_error(folder, name)
    if name == "auto":
        if engine_folder:
            name = "tensorrt"
        elif cuda_available():
            name = "ort-cuda"
        else:  # measured: OpenVINO (bf16 where the CPU has it) is 2.25x ort-cpu on a full-size UNet step
            from .ov_backend import available as openvino_available

            name = "openvino" if openvino_available() else "ort-cpu"
    if cuda_graph and name in ("ort-cpu", "openvino"):
        raise InputError(f"cuda_graph needs a GPU backend (ort-cuda or tensorrt); the backend here is {name}")
    if precision is not None and name != "openvino":
        raise InputError(
            f"precision={precision!r} sets the openvino backend's inference precision; the backend here is {name}, "
            "which computes in its graphs' precision (choose that at export or build): leave precision out, or "
            "use backend=\"openvino\"",
            cli=f"--precision sets the openvino backend's inference precision; the backend here is {name}, which "
                "computes in its graphs' precision (chosen at `sdrt export`, --fp32 or the fp16 default): leave "
                "--precision out, or use --backend openvino")
    if name == "openvino":
        if engine_folder:
            raise _engine_folder_error(folder, name)
        from .ov_backend import OvBackend

        return OvBackend(threads=threads, precision=precision or "auto")
    if name == "tensorrt":
        from .trt_backend import TrtBackend

        shared = share if isinstance(share, TrtBackend) else None
        return TrtBackend(folder, device_id=device_id, cuda_graph=cuda_graph is not False, share=shared)
    if name == "ort-cuda":
        return OrtBackend("cuda", threads=threads, cuda_graph=bool(cuda_graph), device_id=device_id)
    return OrtBackend("cpu", threads=threads)


class Pipeline:
    """Stable Diffusion 1.x / 2.x / XL over an sdrt ONNX export (or engine folder)."""

    def __init__(self, folder: Path, manifest: ExportManifest, backend: Backend,
                 engines: dict[str, Engine], tokenizers: list[ClipTokenizer],
                 scheduler_config: dict[str, Any]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.backend = backend
        self.engines = engines
        self.tokenizers = tokenizers
        self.scheduler_config = scheduler_config
        self._step_graphs: dict[tuple[Any, ...], Engine] = {}
        # the small graphs that keep a call's set-up on the device, by name; None: the backend has none
        self._device_graphs: dict[str, Engine | None] = {}
        self._loops: dict[tuple[Any, ...], StepLoop] = {}
        self._lock = threading.RLock()
        self._closed = False

    # -- loading and lifecycle ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, backend: str | Backend = "auto", *, threads: int | None = None,
             cuda_graph: bool | None = None, device_id: int = 0, precision: str | None = None,
             share_with: Pipeline | None = None) -> Pipeline:
        """Load an export or engine folder. ``cuda_graph``: replay captured CUDA graphs. ``tensorrt``
        captures the denoising step (UNet + sampler step) by default, falling back to running the engines
        directly when capture fails (``Result.loop`` says which ran); ``ort-cuda`` captures only when asked
        (``True``), for fixed shapes: the UNet and sampler step composed into one session, captured as one
        graph per step (other engines each on their own, their outputs then valid only until the next call
        at the same shape). ``False`` turns capture off for both. ``device_id``: the GPU (ort-cuda,
        tensorrt). ``precision``: the openvino backend's inference precision, ``auto`` (bf16 where the CPU
        has it, else fp32), ``bf16`` or ``fp32``; refused by the other backends. ``share_with``: a loaded
        pipeline on the same backend whose device memory plan this one joins (an SDXL refiner beside its
        base): on tensorrt both use one stream and ONE scratch block, sized to the larger need, so the two
        models cost their weights plus one activation block. ``backend`` may also be a ``Backend`` made and
        configured by the caller (``OvBackend(cache_dir=..., static_shapes=True)``, ``OrtBackend("cuda",
        gpu_mem_limit=...)``): once loaded, the pipeline owns it and closes it (a load that fails leaves it to
        the caller); its settings come from its constructor, so ``threads``, ``cuda_graph``, ``device_id``,
        ``precision`` and ``share_with`` are refused beside it."""
        import json

        folder = Path(path)
        given = backend if isinstance(backend, Backend) else None
        kind = backend.name if isinstance(backend, Backend) else backend
        if given is not None:
            extra = [k for k, v in (("threads", threads), ("cuda_graph", cuda_graph), ("precision", precision),
                                    ("share_with", share_with)) if v is not None] + (["device_id"] if device_id else [])
            if extra:
                raise InputError(f"{', '.join(extra)} configure the backend load() makes; the {given.name} backend "
                                 "given is configured already: pass them to its constructor, or give the backend's "
                                 "name instead")
            if (folder / "sdrt-engines.json").is_file() != (given.name == "tensorrt"):
                raise _engine_folder_error(folder, given.name) if given.name != "tensorrt" else CompatibilityError(
                    f"{folder} is an ONNX export; the tensorrt backend runs engine folders: build one with "
                    f"`sdrt build {folder} --out ENGINES`")
        if kind in ("ort-cpu", "ort-cuda") and (folder / "sdrt-engines.json").is_file():
            raise _engine_folder_error(folder, kind)  # before reading anything made for TensorRT
        from .optimum import is_optimum_folder, read_optimum

        graphs: dict[str, bytes] = {}
        if is_optimum_folder(folder):  # Optimum's export, adapted to sdrt's contracts in memory
            if kind == "tensorrt":
                raise CompatibilityError(
                    f"{folder} is an Optimum ONNX export; TensorRT runs engines: build them with `sdrt build "
                    f"{folder} --out ENGINES` and load that folder, or use backend=\"ort-cpu\" / \"ort-cuda\"",
                    cli=f"{folder} is an Optimum ONNX export; TensorRT runs engines: build them with `sdrt build "
                        f"{folder} --out ENGINES` and pass that folder, or use --backend ort-cpu / ort-cuda")
            optimum = read_optimum(folder)
            manifest, graphs = optimum.manifest, dict(optimum.graphs)
        else:
            manifest = ExportManifest.read(folder)
        _check_components(manifest, folder)
        if share_with is not None:
            share_with._ready()
            if kind not in ("auto", share_with.backend.name):
                raise InputError(f"share_with runs on {share_with.backend.name}; load this model on the same "
                                 f"backend (backend={share_with.backend.name!r}), not {kind!r}")
            kind = share_with.backend.name
        be = given if given is not None else make_backend(kind, folder, threads, cuda_graph, device_id, precision,
                                                          share=None if share_with is None else share_with.backend)
        try:
            engines: dict[str, Engine] = {}
            for name, comp in manifest.components.items():
                engines[name] = be.load(graphs[name] if name in graphs else str(folder / be.graph_for(comp)), name)
            toks = []
            for enc_name in manifest.encoder_names:
                toks.append(ClipTokenizer.from_folder(folder / tokenizer_of(enc_name),
                                                      vocab_merges=manifest.source.get("kind") == "optimum"))
            _check_widths(engines, folder)
            sched_path = folder / "scheduler" / "scheduler_config.json"
            if not sched_path.is_file():
                raise ArtifactError(f"{sched_path} is missing; re-export the model with `sdrt export`")
            pipe = cls(folder, manifest, be, engines, toks, json.loads(sched_path.read_text()))
            if share_with is not None and be.shares_memory_with(share_with.backend):
                # one device stream: a call of either would otherwise interleave with (or be captured into) the
                # other's, so the pair takes one lock
                pipe._lock = share_with._lock
            return pipe
        except BaseException:
            if given is None:  # a given backend stays the caller's, with what was loaded onto it
                be.close()
            raise

    def close(self) -> None:
        """Release every engine, device buffer, stream and captured graph (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(Exception):  # free on the pipeline's device, whichever thread closes it
                self.backend.make_current()
            for loop in self._loops.values():
                loop.close()
            self._loops.clear()
            self._step_graphs.clear()
            self._device_graphs.clear()
            self.engines = {}
            self.backend.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ready(self) -> None:
        """Every public call starts here: refuse a closed pipeline; bind the device to this thread."""
        if self._closed:
            raise InputError(f"this pipeline ({self.folder}) was closed; load it again with Pipeline.load")
        self.backend.make_current()

    @property
    def dtype(self) -> np.dtype[Any]:
        """The UNet's (so the latents') dtype."""
        self._ready()
        return self.engines["unet"].inputs["sample"].dtype

    # -- stage 1: text ----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                      batch_size: int = 1, guided: bool = True) -> PromptEmbeddings:
        """Prompts -> embeddings for ``len(prompts) * batch_size`` images (negatives first when guided).

        Prompts over 77 tokens are encoded in 77-token chunks and concatenated along the sequence.
        Conditional and unconditional prompts are encoded in one call, so they get the same number of
        chunks (the tokenizer pads the batch to its longest prompt).
        """
        with self._lock:
            self._ready()
            prompts = _prompts(prompt, batch_size)
            b = len(prompts)
            if not guided:
                return self._encode(prompts, b, False)
            # diffusers' force_zeros_for_empty_prompt: True for SDXL base, False for the refiner
            zero = self.manifest.family == "sdxl" and not self.manifest.refiner and negative_prompt is None
            emb = self._encode(self._negatives(negative_prompt, b) + prompts, b, True, zero_negatives=zero)
            return emb

    def embeddings_from(self, prompt_embeds: np.ndarray, negative_prompt_embeds: np.ndarray | None = None, *,
                        pooled_prompt_embeds: np.ndarray | None = None,
                        negative_pooled_prompt_embeds: np.ndarray | None = None,
                        guided: bool = True, batch_size: int = 1) -> PromptEmbeddings:
        """Precomputed embeddings (diffusers' ``prompt_embeds`` and friends: [B, tokens, C], pooled [B, P])
        -> PromptEmbeddings for ``B * batch_size`` images, each row repeated ``batch_size`` times in place
        (diffusers' ``num_images_per_prompt``). Guided without negatives: zeros for SDXL (as diffusers'
        default), else the caller must give them."""
        with self._lock:
            self._ready()
            width = self.engines["unet"].inputs["encoder_hidden_states"].shape[-1]
            pos = _array(prompt_embeds, "prompt_embeds", 3)
            if not _is_int(batch_size) or batch_size < 1:
                raise InputError(f"batch_size {batch_size!r} must be an integer >= 1 (images per embedding row)")
            if isinstance(width, int) and pos.shape[-1] != width:
                raise InputError(f"prompt_embeds are {pos.shape[-1]} wide; this model's UNet takes {width}")
            xl = self.manifest.family == "sdxl"
            pooled = None
            if xl:
                if pooled_prompt_embeds is None:
                    raise InputError("an SDXL model needs pooled_prompt_embeds [B, P] beside prompt_embeds")
                pooled = _array(pooled_prompt_embeds, "pooled_prompt_embeds", 2)
                if pooled.shape[0] != pos.shape[0]:
                    raise InputError(f"pooled_prompt_embeds have {pooled.shape[0]} rows, prompt_embeds "
                                     f"{pos.shape[0]}: give one pooled row per prompt row")
            elif pooled_prompt_embeds is not None:
                raise InputError(f"pooled_prompt_embeds are for SDXL; this is a {self.manifest.family} model")
            if guided:
                if negative_prompt_embeds is None and (not xl or self.manifest.refiner):
                    raise InputError("guided generation from prompt_embeds needs negative_prompt_embeds "
                                     "(or guidance_scale <= 1)")
                neg = np.zeros_like(pos) if negative_prompt_embeds is None else _array(
                    negative_prompt_embeds, "negative_prompt_embeds", 3)
                if neg.shape != pos.shape:
                    raise InputError(f"negative_prompt_embeds {list(neg.shape)} must match prompt_embeds "
                                     f"{list(pos.shape)}")
                pos = np.concatenate([np.repeat(neg, batch_size, axis=0), np.repeat(pos, batch_size, axis=0)])
                if pooled is not None:
                    npool = (np.zeros_like(pooled) if negative_pooled_prompt_embeds is None
                             else _array(negative_pooled_prompt_embeds, "negative_pooled_prompt_embeds", 2))
                    if npool.shape != pooled.shape:
                        raise InputError(f"negative_pooled_prompt_embeds {list(npool.shape)} must match "
                                         f"pooled_prompt_embeds {list(pooled.shape)}")
                    pooled = np.concatenate([np.repeat(npool, batch_size, axis=0),
                                             np.repeat(pooled, batch_size, axis=0)])
            else:
                pos = np.repeat(pos, batch_size, axis=0)
                pooled = None if pooled is None else np.repeat(pooled, batch_size, axis=0)
            b = pos.shape[0] // (2 if guided else 1)
            dt, to_dev = self.dtype, self.backend.to_device
            return PromptEmbeddings(to_dev(pos.astype(dt)), None if pooled is None else to_dev(pooled.astype(dt)),
                                    b, guided)

    def _encode(self, prompts: list[str], b: int, guided: bool, zero_negatives: bool = False) -> PromptEmbeddings:
        """Text encoders -> embeddings on the device. With one encoder and one chunk the encoder's output
        is the UNet's input as it is; otherwise the chunks and encoders are joined on the device by the
        join graph (runtime/text_join.py), or on the host where the backend has none."""
        be, dt = self.backend, self.dtype
        outs: list[dict[str, Array]] = []
        rows = 0
        for name, tok in zip(self.manifest.encoder_names, self.tokenizers, strict=True):
            ids = tok.encode_chunks(prompts)  # [rows, k, 77]
            rows, k, n = ids.shape
            out = self.engines[name]({"input_ids": be.to_device(ids.reshape(rows * k, n))})
            if (len(self.tokenizers) == 1 and k == 1 and not zero_negatives and "text_embeds" not in out
                    and be.meta(out["hidden_states"])[0] == dt):
                # already [rows, 77, C] in the UNet's dtype: no host round trip
                return PromptEmbeddings(out["hidden_states"], None, b, guided)
            outs.append(out)
        pooled = next((o["text_embeds"] for o in reversed(outs) if "text_embeds" in o), None)
        join = self._text_join([o["hidden_states"] for o in outs], pooled)
        if join is None:
            return self._host_join(outs, pooled, rows, b, guided, zero_negatives)
        keep = np.ones(rows, np.float32)
        if zero_negatives:  # diffusers' force_zeros_for_empty_prompt (SDXL)
            keep[:b] = 0
        feeds = {f"hidden_{j}": o["hidden_states"] for j, o in enumerate(outs)}
        if pooled is not None:
            feeds["text_embeds"] = pooled
        joined = join({**feeds, "keep": be.to_device(keep)})
        return PromptEmbeddings(joined["hidden"], joined.get("pooled"), b, guided)

    def _text_join(self, hidden: list[Array], pooled: Array | None) -> Engine | None:
        """The join graph for these encoder outputs, loaded once; None where the backend cannot load it (a
        TensorRT engine folder built by an older sdrt), or the outputs are not the manifest's variant."""
        from .text_join import join_variant

        be = self.backend
        try:
            variant = join_variant(self.manifest)
        except InputError:  # a manifest without the dtypes the variant is read from: the host join
            return None
        have = (tuple(be.meta(h)[0].name for h in hidden), None if pooled is None else be.meta(pooled)[0].name,
                self.dtype.name)
        rows = {be.meta(h)[1][0] for h in hidden}
        if have != (variant.hidden_dtypes, variant.pooled_dtype, variant.out_dtype) or len(rows) != 1:
            return None  # the host join, which says what does not fit
        return self._device_graph(variant.name, variant.graph_bytes, "the prompt embeddings are joined")

    def _host_join(self, outs: list[dict[str, Array]], pooled_out: Array | None, rows: int, b: int, guided: bool,
                   zero_negatives: bool) -> PromptEmbeddings:
        """The join on the host: every encoder output down, concatenated, zeroed, cast, and up again."""
        be, dt = self.backend, self.dtype
        hidden_parts = [be.to_host(o["hidden_states"]) for o in outs]
        hidden_parts = [h.reshape(rows, -1, h.shape[-1]) for h in hidden_parts]
        pooled = None
        if pooled_out is not None:
            # the pooled embedding of the first chunk, as the UIs do
            pooled = be.to_host(pooled_out).reshape(rows, -1, be.meta(pooled_out)[1][-1])[:, 0]
        hidden = np.concatenate(hidden_parts, axis=-1) if len(hidden_parts) > 1 else hidden_parts[0]
        if zero_negatives:  # diffusers' force_zeros_for_empty_prompt (SDXL)
            hidden[:b] = 0
            if pooled is not None:
                pooled[:b] = 0
        return PromptEmbeddings(be.to_device(hidden.astype(dt)),
                                None if pooled is None else be.to_device(pooled.astype(dt)), b, guided)

    # -- stage 2: the sampler plan and the starting latents ----------------------------------------------
    def plan(self, sampler: str = "dpmpp-2m", steps: int = 30, *, strength: float = 1.0,
             timestep_spacing: str | None = None, fresh_from: int = 0) -> samplers.SamplerPlan:
        """The sampler's per-step coefficients for this model's scheduler (img2img when strength < 1).
        ``timestep_spacing`` (leading, trailing, linspace) overrides the scheduler configuration's.
        ``fresh_from``: the row where a second model takes over with a sampler of its own (no multistep
        history), as diffusers' refiner at ``denoising_start`` (see ``samplers.make_plan``)."""
        self._ready()
        return samplers.make_plan(sampler, steps, self.scheduler_config,
                                  prediction_type=self.manifest.prediction_type, strength=strength,
                                  timestep_spacing=timestep_spacing, fresh_from=fresh_from)

    def prepare_latents(self, plan: samplers.SamplerPlan, height: int, width: int, *, batch_size: int = 1,
                        seed: int | Sequence[int] | None = None, latents: np.ndarray | None = None,
                        image: Any = None, mask_image: Any = None, strength: float = 1.0) -> Latents:
        """The starting latents: ``init_noise_sigma * noise`` (txt2img), or ``image`` encoded and noised to
        the plan's first step (img2img). ``seed`` a list: one generator per image, so image k of a batch
        equals the same seed generated alone. ``latents``: the initial noise itself (diffusers' ``latents``).
        ``mask_image`` (white = repaint): inpaint ``image``; the plan's ``strength`` (1: start from noise)."""
        with self._lock:
            self._ready()
            self._check_size(height, width, batch_size, guided=None)
            if image is not None:
                self._check_img2img()
            mask = None if mask_image is None else self._check_inpaint(image, mask_image)
            init = None if image is None else _to_uint8(image, height, width, self.manifest.vae_scale_factor)
            return self._prepare(plan, height, width, batch_size, _resolve_seed(seed, batch_size), latents, init,
                                 mask, strength == 1.0)

    def _prepare(self, plan: samplers.SamplerPlan, height: int, width: int, b: int,
                 seed: int | Sequence[int] | None, latents: np.ndarray | None, init: np.ndarray | None,
                 mask: Any = None, pure_noise: bool = False) -> Latents:
        m = self.manifest
        f = m.vae_scale_factor
        lat_shape = (b, m.latent_channels, height // f, width // f)
        gens = _generators(seed, b)
        if latents is None:
            noise = _draw(gens, lat_shape)
        else:
            noise = np.asarray(latents, dtype=np.float32)
            if noise.shape != lat_shape:
                raise InputError(f"latents have shape {noise.shape}, expected {lat_shape} for this size and batch")
        if init is not None and mask is not None:
            return self._prepare_inpaint(plan, height, width, b, gens, seed, noise, init, mask, pure_noise)
        if init is not None:
            be = self.backend
            enc_lat = self.engines["vae_encoder"]({"image": be.to_device(init)})["latent"]
            graph = self._noise_graph(enc_lat)
            if graph is not None:  # the encoded image never leaves the device
                x_dev = self._noised(graph, enc_lat, be.to_device(np.ascontiguousarray(noise, np.float32)),
                                     plan.noise_coeffs)
                step_noise = _draw(gens, (plan.steps, *lat_shape), axis=1) if plan.needs_noise else None
                return Latents(x_dev, height, width, 0, None, step_noise, _seeds(seed), None, None)
            img_lat = be.to_host(enc_lat)
            img_lat = np.repeat(img_lat.astype(np.float64), b // img_lat.shape[0], axis=0)
            x = plan.add_noise(img_lat, noise.astype(np.float64)).astype(np.float32)
        else:
            x = (noise.astype(np.float64) * plan.init_noise_sigma).astype(np.float32)
        # fresh noise of every ancestral step, drawn up front so the loop never waits on the host
        step_noise = _draw(gens, (plan.steps, *lat_shape), axis=1) if plan.needs_noise else None
        return Latents(self.backend.to_device(x.astype(self.dtype)), height, width, 0, None, step_noise, _seeds(seed),
                       x)

    def _noised(self, graph: Engine, enc_lat: Array, noise: Array, coeffs: Sequence[float]) -> Array:
        """``ka image + kn noise`` in the UNet's dtype by the noising graph, the encoded image broadcast over
        the noise's rows; ``coeffs`` = (ka, kn)."""
        feeds = {"image_latents": enc_lat, "noise": noise,
                 "coeffs": self.backend.to_device(np.asarray(coeffs, np.float32))}
        return graph(feeds)["latents"]

    def _noise_graph(self, enc_lat: Array) -> Engine | None:
        """The noising graph for the encoder's latents (None: the backend has none, or they have several rows)."""
        from .step_graph import noise_engine_name, noise_graph_bytes

        src, shape = self.backend.meta(enc_lat)
        if shape[0] != 1:
            return None
        return self._device_graph(noise_engine_name(src, self.dtype), lambda: noise_graph_bytes(src, self.dtype),
                                  "the encoded image is noised")

    def latents_from(self, latents: Latents, source: Pipeline) -> Latents:
        """``source``'s denoising state on this pipeline's device, for this pipeline to continue (an SDXL
        refiner after its base): the latents themselves, the step, the ancestral noise; not the multistep
        history (``x0``), as a second model's sampler starts fresh (diffusers' refiner at ``denoising_start``)."""
        with self._lock:
            self._ready()
            on_device = not isinstance(latents.x, np.ndarray)
            dtype, shape = source.backend.meta(latents.x) if on_device else (latents.x.dtype, latents.x.shape)
            want = (self.manifest.latent_channels, latents.height // self.manifest.vae_scale_factor,
                    latents.width // self.manifest.vae_scale_factor)
            if tuple(shape[1:]) != want:
                raise InputError(f"the latents are {list(shape)}, this model's latents for "
                                 f"{latents.width}x{latents.height} are [B, {', '.join(map(str, want))}]: they come "
                                 "from a model of another latent format")
            if on_device and dtype == self.dtype and self.backend.shares_memory_with(source.backend):
                x = self.backend.clone(latents.x)  # one device (a base and its refiner): no host trip
            else:
                host = source.backend.to_host(latents.x) if on_device else latents.x
                x = self.backend.to_device(np.asarray(host).astype(self.dtype))
            return Latents(x, latents.height, latents.width, latents.step, None, latents.noise, latents.seed)

    # -- inpainting (runtime/inpaint.py) -------------------------------------------------------------------
    @property
    def is_inpainting(self) -> bool:
        """An inpainting model (a 9-channel UNet): every call needs ``image=`` and ``mask_image=``."""
        self._ready()
        return self._inpaint_mode() == "concat"

    def _inpaint_mode(self) -> str:
        return inpaint.inpaint_mode(int(self.engines["unet"].inputs["sample"].shape[1] or 0),
                                    self.manifest.latent_channels)

    def _check_inpaint(self, image: Any, mask_image: Any) -> Any:
        """The mask as a grayscale PIL image, checked against the image and the export, before any work."""
        if image is None:
            raise InputError("mask_image needs the image to inpaint: pass image=... (white in the mask = repaint)",
                             cli="--mask needs the image to inpaint: pass --init-image")
        if self._inpaint_mode() == "concat" and inpaint.MASKED_ENCODER not in self.engines:
            raise ArtifactError(f"{self.folder} has a 9-channel inpainting UNet but no {inpaint.MASKED_ENCODER}; "
                                "re-export the model with this sdrt version (`sdrt export`)")
        return inpaint.check_mask(mask_image, image)

    def _prepare_inpaint(self, plan: samplers.SamplerPlan, height: int, width: int, b: int,
                         gens: list[np.random.Generator], seed: int | Sequence[int] | None, noise: np.ndarray,
                         init: np.ndarray, mask_l: Any, pure_noise: bool) -> Latents:
        """Inpainting's starting latents and mask state. The encoders' latents stay on the device (the noising
        graph puts the image at the first step's level and, at level 0, gives the blend's image latents);
        where the backend has no noising graph (a folder built by an older sdrt) they go through the host,
        as before. A 9-channel UNet at strength 1 starts from noise alone: its image latents are not encoded
        (diffusers' ``prepare_latents`` neither)."""
        be, mode, dt = self.backend, self._inpaint_mode(), self.dtype
        mask_px = inpaint.binarize(inpaint.resize_mask(mask_l, height, width))
        lmask = inpaint.latent_mask(mask_px, self.manifest.vae_scale_factor, b)
        step_noise = _draw(gens, (plan.steps, *noise.shape), axis=1) if plan.needs_noise else None
        image = be.to_device(init)
        enc_lat = None if mode == "concat" and pure_noise else self.engines["vae_encoder"]({"image": image})["latent"]
        masked = None
        if mode == "concat":
            feeds = {"image": image, "mask": be.to_device(mask_px.astype(np.uint8)[None, :, :, None])}
            masked = self.engines[inpaint.MASKED_ENCODER](feeds)["latent"]
        start = (noise.astype(np.float64) * plan.init_noise_sigma).astype(np.float32) if pure_noise else None
        noised = None if enc_lat is None else self._noise_graph(enc_lat)
        if enc_lat is None or noised is not None:  # on the device: nothing read back
            x = be.to_device(start.astype(dt)) if start is not None else None
            state = inpaint.InpaintState(mode, lmask, masked_latents=masked, resident=True)
            if noised is not None:
                noise_dev = be.to_device(np.ascontiguousarray(noise, np.float32))
                if x is None:
                    x = self._noised(noised, enc_lat, noise_dev, plan.noise_coeffs)
                if mode == "blend":  # the image latents themselves: noise level 0 (ka 1, kn 0) is exact
                    state = replace(state, image_latents=self._noised(noised, enc_lat, noise_dev, (1.0, 0.0)),
                                    noise=noise_dev if dt == np.float32 else be.to_device(noise.astype(dt)))
            return Latents(x, height, width, 0, None, step_noise, _seeds(seed), start, state)
        img_lat = be.to_host(enc_lat)
        img_lat = np.repeat(img_lat.astype(np.float64), b // img_lat.shape[0], axis=0)
        if mode == "blend":
            state = inpaint.InpaintState(mode, lmask, image_latents=img_lat.astype(np.float32), noise=noise)
        else:
            assert masked is not None
            host = be.to_host(masked).astype(np.float32)
            state = inpaint.InpaintState(mode, lmask, masked_latents=np.repeat(host, b // host.shape[0], axis=0))
        x = start if start is not None else plan.add_noise(img_lat, noise.astype(np.float64)).astype(np.float32)
        return Latents(be.to_device(x.astype(dt)), height, width, 0, None, step_noise, _seeds(seed), x, state)

    def _inpaint_inputs(self, state: inpaint.InpaintState, plan: samplers.SamplerPlan, b: int, guided: bool,
                        dt: np.dtype[Any]) -> tuple[dict[str, Array], np.ndarray, np.ndarray | None]:
        """(the inpainting step graph's extra inputs on the device, its coeffs table, the host block appended to
        the first UNet input where that is made on the host). A resident state uploads only the mask; its
        9-channel block is assembled by the extra-channels graph (or, without it, on the host)."""
        be = self.backend
        if state.resident and state.mode == "blend":
            feeds = {"mask": be.to_device(state.mask.astype(dt)), "image_latents": state.image_latents,
                     "init_noise": state.noise}
            return feeds, np.hstack([plan.table, inpaint.blend_table(plan)]), None
        if state.resident:
            src, _ = be.meta(state.masked_latents)
            graph = self._extra_graph(guided, src, dt)
            if graph is not None:
                extra = graph({"mask": be.to_device(state.mask.astype(dt)), "masked_latents": state.masked_latents})
                return {"unet_extra": extra["unet_extra"]}, plan.table, None
            host = be.to_host(state.masked_latents).astype(np.float32)
            state = replace(state, masked_latents=np.repeat(host, b // host.shape[0], axis=0), resident=False)
        feeds, table, head = inpaint.loop_inputs(state, plan, guided, dt)
        return {k: be.to_device(v) for k, v in feeds.items()}, table, head

    # -- stage 3: the denoising loop -------------------------------------------------------------------
    def denoise(self, embeddings: PromptEmbeddings, latents: Latents, plan: samplers.SamplerPlan, *,
                guidance_scale: float = 7.5, start: float | None = None, end: float | None = None,
                callback: Callable[[int, int], None] | None = None, guidance_rescale: float = 0.0,
                control_images: Sequence[Any] | None = None, control_scales: Any = None, control_start: Any = None,
                control_end: Any = None, guess_mode: bool = False, control_preprocess: Any = None,
                aesthetic_score: float | None = None, negative_aesthetic_score: float | None = None,
                timings: dict[str, Any] | None = None) -> Latents:
        """Run the plan's steps from ``latents.step`` (or the ``start`` fraction of the schedule) up to the
        ``end`` fraction (default: the end), device-resident: UNet -> step graph -> UNet. The fractions
        follow diffusers' ``denoising_start`` / ``denoising_end``: a step of timestep t belongs to the part
        before fraction f when t >= round(T * (1 - f)). Running [0, f) then [f, 1] gives the full run.
        ``guidance_rescale``: diffusers' option of that name (0..1; guided only). ``control_images`` and the
        other control keywords: as the call's (ControlNet exports); ``control_start``/``control_end`` are
        fractions of the plan's steps, whichever window of them this call runs. ``aesthetic_score`` /
        ``negative_aesthetic_score``: an SDXL refiner's conditioning (default 6.0 / 2.5, as diffusers).
        ``timings``: receives the per-step milliseconds (``unet_steps_ms``)."""
        with self._lock:
            self._ready()
            self._check_size(latents.height, latents.width, embeddings.batch, guided=self._cfg(guidance_scale))
            creq = self._check_control(control_images, control_scales, control_start, control_end, guess_mode,
                                       control_preprocess, latents.inpaint is not None)
            out = self._denoise(embeddings, latents, plan, guidance_scale, start, end, callback,
                                {} if timings is None else timings, rescale=guidance_rescale, control=creq,
                                aesthetic=(aesthetic_score, negative_aesthetic_score))[0]
            # the loop's buffers are reused by its next run: hand the caller arrays of its own
            be = self.backend
            return replace(out, x=be.clone(out.x), x0=None if out.x0 is None else be.clone(out.x0))

    def _window(self, plan: samplers.SamplerPlan, latents: Latents, start: float | None,
                end: float | None) -> tuple[int, int]:
        train = int(self.scheduler_config.get("num_train_timesteps", 1000))

        def row(frac: float, label: str) -> int:
            if not 0.0 < frac < 1.0:
                raise InputError(f"{label} {frac} is outside (0, 1): give the fraction of the schedule")
            cutoff = round(train - frac * train)
            return int(np.sum(np.asarray(plan.timesteps) >= cutoff))

        lo = latents.step if start is None else row(start, "start")
        hi = plan.steps if end is None else row(end, "end")
        if not 0 <= lo < hi <= plan.steps:
            raise InputError(f"the window [{lo}, {hi}) of the {plan.steps} steps is empty; start before end")
        return lo, hi

    def _denoise(self, emb: PromptEmbeddings, lat: Latents, plan: samplers.SamplerPlan, guidance_scale: float,
                 start: float | None, end: float | None, callback: Callable[[int, int], None] | None,
                 timings: dict[str, Any], clock: Clock | None = None, rescale: float = 0.0,
                 control: controlnet.ControlRequest | None = None,
                 aesthetic: tuple[float | None, float | None] | None = None) -> tuple[Latents, str]:
        """The loop. With the caller's ``clock``, marks once the loop is set up and after every step (the
        caller reads the times); without one, the step times go into ``timings``."""
        _check_guidance(guidance_scale)
        guided = self._cfg(guidance_scale)
        _check_rescale(rescale)
        _aesthetic(self.manifest.refiner, aesthetic)
        rescale = float(rescale) if guided else 0.0  # as diffusers: the rescale applies to guided steps only
        if guided != emb.guided:
            raise InputError(
                f"the embeddings were encoded {'with' if emb.guided else 'without'} guidance but guidance_scale "
                f"is {guidance_scale}; encode with guided={guided}")
        m, be, dt = self.manifest, self.backend, self.dtype
        lo, hi = self._window(plan, lat, start, end)
        b = emb.batch
        if plan.needs_noise and (lat.noise is None or lat.noise.shape[0] != plan.steps):
            raise InputError(f"the latents were not prepared for this plan ({plan.sampler}, {plan.steps} steps); "
                             "prepare them with prepare_latents(plan, ...)")
        to_dev = be.to_device
        cond = {"encoder_hidden_states": emb.hidden}
        if m.family == "sdxl":
            assert emb.pooled is not None
            cond["text_embeds"] = emb.pooled
            cond["time_ids"] = to_dev(self._time_ids(lat.height, lat.width, b, guided, aesthetic))
        if "timestep_cond" in self.engines["unet"].inputs:  # an LCM-distilled UNet: guidance as an embedding
            dim = int(self.engines["unet"].inputs["timestep_cond"].shape[-1])  # type: ignore[arg-type]
            cond["timestep_cond"] = to_dev(np.tile(_guidance_embedding(guidance_scale - 1.0, dim).astype(dt), (b, 1)))
        mode, table, head = None, plan.table, None
        step_inputs: dict[str, Array] = {}
        if lat.inpaint is not None:  # the mask work runs in the step graph's inpainting variant
            mode = lat.inpaint.mode
            step_inputs, table, head = self._inpaint_inputs(lat.inpaint, plan, b, guided, dt)
        elif self._inpaint_mode() == "concat":
            raise InputError("this is an inpainting model (a 9-channel UNet): prepare the latents with image= and "
                             "mask_image=")
        if rescale and mode is not None:
            raise InputError("guidance_rescale with inpainting is not supported: leave guidance_rescale at 0")
        unet_in = self._first_input(plan, lo, lat, guided, dt, step_inputs.get("unet_extra"), head)
        active = control.active if control is not None else ()
        loop = self._loop(guided, dt, mode, rescale > 0.0, active)
        noise = lat.noise[lo:hi] if plan.needs_noise and lat.noise is not None else None
        g = np.array([guidance_scale, rescale] if rescale else guidance_scale, np.float32)
        control_in = None
        if control is not None:
            control_in = self._control_feeds(control, plan, lo, hi, lat.height, lat.width, 2 * b if guided else b,
                                             guided)
        loop.start(latents=lat.x, unet_in=unet_in, x0_prev=lat.x0, cond=cond, guidance=to_dev(g) if guided else None,
                   timesteps=plan.timesteps[lo:hi], coeffs=table[lo:hi],
                   noise=None if noise is None else noise.astype(np.float32), step_inputs=step_inputs or None,
                   control=control_in)
        own = clock is None
        clk = be.clock() if clock is None else clock
        clk.mark()
        for i in range(hi - lo):
            loop.step(i)
            clk.mark()
            if callback is not None:
                callback(lo + i + 1, plan.steps)
        if own:
            steps_ms = clk.intervals_ms()
            timings.update(unet_steps_ms=steps_ms, unet_step_ms=float(np.median(steps_ms)), clock=clk.kind)
            clk.close()
        # the final latents: the loop's own buffers (valid until its next start(); the public denoise() copies them)
        return replace(lat, x=loop.latents, step=hi, x0=loop.x0 if hi < plan.steps else None,
                       start=None), loop.describe()

    def _first_input(self, plan: samplers.SamplerPlan, lo: int, lat: Latents, guided: bool, dt: np.dtype[Any],
                     extra: Array | None, head: np.ndarray | None) -> Array:
        """The first UNet input, s_lo x, on the device by the first-input graph (one 4-byte upload); on the host
        only where the backend has no such graph (an engine folder built by an older sdrt)."""
        be = self.backend
        graph = self._input_graph(guided, dt, extra is not None)
        if graph is not None:
            feeds = {"latents": lat.x, "scale": be.to_device(np.array([plan.table[lo, samplers.S]], np.float32))}
            if extra is not None:
                feeds["unet_extra"] = extra
            return graph(feeds)["unet_in"]
        if extra is not None and head is None:  # the extra channels were assembled on the device
            head = be.to_host(extra)
        x = lat.start if lo == 0 and lat.start is not None else be.to_host(lat.x)
        first_in = samplers.model_input(plan, lo, x.astype(np.float64)).astype(dt)
        first_in = np.concatenate([first_in] * 2) if guided else first_in
        return be.to_device(first_in if head is None else np.concatenate([first_in, head], axis=1))

    def _input_graph(self, guided: bool, dtype: np.dtype[Any], concat: bool) -> Engine | None:
        from .step_graph import input_engine_name, input_graph_bytes

        return self._device_graph(f"{input_engine_name(guided, concat)}_{dtype.name}",
                                  lambda: input_graph_bytes(guided, dtype, concat),
                                  "the first UNet input is computed", input_engine_name(guided, concat))

    def _extra_graph(self, guided: bool, src: np.dtype[Any], dst: np.dtype[Any]) -> Engine | None:
        from .step_graph import extra_engine_name, extra_graph_bytes

        return self._device_graph(extra_engine_name(guided, src, dst), lambda: extra_graph_bytes(guided, src, dst),
                                  "the inpainting UNet's extra channels are assembled")

    def _cast_graph(self, src: np.dtype[Any], dst: np.dtype[Any]) -> Engine | None:
        from .step_graph import cast_engine_name, cast_graph_bytes

        return self._device_graph(cast_engine_name(src, dst), lambda: cast_graph_bytes(src, dst),
                                  "the latents are cast")

    def _device_graph(self, key: str, graph_bytes: Callable[[], bytes], what: str,
                      name: str | None = None) -> Engine | None:
        """One of the small in-memory graphs (first UNet input, img2img noising, VAE cast, embeddings join),
        loaded once per pipeline; None where the backend cannot load it (a TensorRT engine folder built by an
        older sdrt lacks it), said once in the log: the caller then does that work on the host, as before."""
        if key not in self._device_graphs:
            try:
                self._device_graphs[key] = self.backend.load(graph_bytes(), name or key)
            except ArtifactError as e:
                log.info("%s on the host: %s", what, e)
                self._device_graphs[key] = None
        return self._device_graphs[key]

    def _time_ids(self, height: int, width: int, b: int, guided: bool,
                  aesthetic: tuple[float | None, float | None] | None) -> np.ndarray:
        """SDXL's added time ids per UNet row, as diffusers' ``_get_add_time_ids`` with the original and target
        size both the image's and no crop: [h, w, 0, 0, h, w]; an SDXL refiner (requires_aesthetics_score)
        takes [h, w, 0, 0, aesthetic_score], its negative rows negative_aesthetic_score."""
        pos_score, neg_score = _aesthetic(self.manifest.refiner, aesthetic)
        if self.manifest.refiner:
            pos, neg = [height, width, 0, 0, pos_score], [height, width, 0, 0, neg_score]
        else:
            pos = neg = [height, width, 0, 0, height, width]
        rows = [neg] * b + [pos] * b if guided else [pos] * b
        return np.array(rows, np.float64).astype(self.dtype)

    def _loop(self, guided: bool, dt: np.dtype[Any], inpaint_mode: str | None = None,
              rescale: bool = False, active: tuple[int, ...] = ()) -> StepLoop:
        """The loop per step-graph variant and set of active ControlNets (none: the plain ``unet``)."""
        key = (guided, dt.name, inpaint_mode, rescale, active)
        if key not in self._loops:
            step = self._step_graph(guided, dt, inpaint_mode, rescale)
            if active:
                nets = [self.engines[n] if j in active else None for j, n in enumerate(self._controlnets())]
                self._loops[key] = self.backend.step_loop(self.engines[CONTROL_UNET], step, nets)
            else:
                self._loops[key] = self.backend.step_loop(self.engines["unet"], step)
        return self._loops[key]

    # -- ControlNet (runtime/controlnet.py) ---------------------------------------------------------------
    def _controlnets(self) -> tuple[str, ...]:
        return self.manifest.controlnets

    def _check_control(self, control_images: Any, control_scales: Any, control_start: Any, control_end: Any,
                       guess_mode: Any, control_preprocess: Any, masked: bool) -> controlnet.ControlRequest | None:
        """The control keywords checked against the export, before any engine runs."""
        if not isinstance(guess_mode, (bool, np.bool_)):
            raise InputError(f"guess_mode must be True or False, got {guess_mode!r}")
        nets = self._controlnets()
        req = controlnet.check_request(nets, self.folder, control_images, control_scales, control_start, control_end,
                                       bool(guess_mode), control_preprocess)
        if req is None:
            return None
        missing = [n for n in (*nets, CONTROL_UNET) if n not in self.engines]
        if missing:
            raise ArtifactError(f"{self.folder} lists ControlNets but lacks {', '.join(missing)}; re-export the model "
                                "with `sdrt export ... --controlnet CONTROLNET` (and rebuild its engines)")
        if masked or self._inpaint_mode() == "concat":
            raise InputError("ControlNet with inpainting is not supported yet: generate with control_images and no "
                             "mask_image, on a model with an ordinary (4-channel) UNet",
                             cli="ControlNet with inpainting is not supported yet: use --control-image without --mask, "
                                 "on a model with an ordinary (4-channel) UNet")
        return req

    def _control_feeds(self, req: controlnet.ControlRequest, plan: samplers.SamplerPlan, lo: int, hi: int,
                       height: int, width: int, rows: int, guided: bool) -> ControlFeeds:
        """The images at the latents' size (uint8, one per UNet row) and the scale table of rows [lo, hi)."""
        be = self.backend
        nets = self._controlnets()
        residuals = len(self.engines[nets[req.active[0]]].outputs)
        table = controlnet.scale_table(req, plan.steps, rows, residuals, guided)[lo:hi]
        images: list[Any] = []
        for im in req.images:
            if im is None:
                images.append(None)
                continue
            px = controlnet.pixels(im, height, width)
            images.append(be.to_device(np.ascontiguousarray(np.broadcast_to(px, (rows, *px.shape)))))
        return ControlFeeds(images, table)

    # -- stage 4: decode --------------------------------------------------------------------------------
    def decode(self, latents: Latents | Array) -> tuple[list[Any], list[bool]]:
        """Latents -> (PIL images, per image: NaN/inf in the decoded pixels)."""
        with self._lock:
            self._ready()
            return self._decode(latents.x if isinstance(latents, Latents) else latents)

    def _decode(self, x_dev: Array) -> tuple[list[Any], list[bool]]:
        be = self.backend
        if isinstance(x_dev, np.ndarray):
            x_dev = be.to_device(x_dev)
        dec = self.engines["vae_decoder"]
        dec_dt = dec.inputs["latent_sample"].dtype
        src_dt = be.meta(x_dev)[0]
        if src_dt != dec_dt:  # an fp32 VAE after an fp16 UNet (SDXL): cast on the device where the backend can
            cast = self._cast_graph(src_dt, dec_dt)
            x_dev = (be.to_device(be.to_host(x_dev).astype(dec_dt)) if cast is None
                     else cast({"latents": x_dev})["latents_cast"])
        out = dec({"latent_sample": x_dev})
        pixels = be.to_host(out["images"])
        nonfinite = [not bool(v) for v in be.to_host(out["finite"])]
        if any(nonfinite):
            what = f"{sum(nonfinite)} of {len(nonfinite)} images decoded to NaN/inf; their pixels are not meaningful."
            if dec_dt == np.float16:
                why = " An fp16 VAE overflows on some models: re-export with the VAE in fp32 (`sdrt export ... --vae-fp32`)."
            else:  # an fp32 VAE does not overflow: what reached it was not finite
                why = (" The VAE runs in fp32, so the latents reaching it were not finite: NaN/inf in the given "
                       "`latents`, or an overflow in an fp16 UNet (re-export with `--fp32` to check).")
            warnings.warn(what + why, RuntimeWarning, stacklevel=4)
        from PIL import Image

        return [Image.fromarray(p) for p in pixels], nonfinite

    # -- the call -----------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 30,
        guidance_scale: float = 7.5,
        sampler: str = "dpmpp-2m",
        seed: int | Sequence[int] | None = None,
        batch_size: int = 1,
        latents: np.ndarray | None = None,
        image: Any = None,
        strength: float | None = None,
        callback: Callable[[int, int], None] | None = None,
        *,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        pooled_prompt_embeds: np.ndarray | None = None,
        negative_pooled_prompt_embeds: np.ndarray | None = None,
        output: str = "images",
        mask_image: Any = None,
        paste_back: float | None = None,
        guidance_rescale: float = 0.0,
        timestep_spacing: str | None = None,
        control_images: Sequence[Any] | None = None,
        control_scales: Any = None,
        control_start: Any = None,
        control_end: Any = None,
        guess_mode: bool = False,
        control_preprocess: Any = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        refiner: Pipeline | None = None,
        refiner_start: float | None = None,
    ) -> Result:
        """The whole call: encode_prompt -> prepare_latents -> denoise -> decode.

        ``height``/``width``: None is the model's default size (img2img: the image's own size, rounded
        down to a multiple of 8). ``guidance_scale``: 0..100, where <= 1 turns guidance off. ``seed``:
        0..2**32-1, or a list of them, one per image; None for a random one (returned in ``Result.seed``).
        ``strength``: img2img only, in (0, 1], default 0.8. ``output="latents"``: return the final latents
        (``Result.latents``), not images. ``mask_image`` (with ``image``): inpaint, white = repaint, as
        diffusers' inpainting pipelines (strength default 1: the masked region starts from noise).
        ``paste_back``: a mask blur radius in pixels (0: a hard edge); the original pixels outside the mask are
        pasted back over the output. ``guidance_rescale``: 0..1, diffusers' option (guided only).
        ``timestep_spacing``: overrides the scheduler configuration's. ``control_images``: one per ControlNet
        of the export, in order (PIL images or uint8 [H, W, 3] arrays; None leaves a net out), resized to the
        output size as diffusers' ControlNet pipelines do; ``control_scales`` (default 1 each),
        ``control_start`` / ``control_end`` (fractions of the steps, diffusers' ``control_guidance_start`` /
        ``_end``), ``guess_mode`` and ``control_preprocess`` ("canny" per image, or None). Every argument is
        checked before any engine runs. ``aesthetic_score`` / ``negative_aesthetic_score``: an SDXL refiner's
        conditioning (default 6.0 / 2.5, as diffusers' StableDiffusionXLImg2ImgPipeline). ``refiner``: an SDXL
        refiner Pipeline that takes over the latents at ``refiner_start`` (default 0.8) of the schedule:
        ``runtime.refiner.refine``."""
        if refiner is not None or refiner_start is not None:
            if refiner is None:
                raise InputError("refiner_start needs a refiner: pass refiner=Pipeline.load(REFINER_DIR)",
                                 cli="--refiner-start needs a refiner: pass --refiner REFINER_DIR")
            from .refiner import refine

            if any(v is not None for v in (image, strength, mask_image, paste_back, prompt_embeds, control_images)):
                raise InputError("a base + refiner call generates from a prompt: image, strength, mask_image, "
                                 "paste_back, prompt_embeds and control_images are for a single model; leave "
                                 "them out")
            if guidance_rescale or timestep_spacing is not None:
                raise InputError("guidance_rescale and timestep_spacing are not supported with a refiner: leave them "
                                 "out")
            return refine(self, refiner, prompt, negative_prompt, refiner_start=refiner_start, height=height,
                          width=width, steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed,
                          batch_size=batch_size, latents=latents, callback=callback, output=output,
                          aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score)
        with self._lock:
            self._ready()
            t_start = time.perf_counter()
            m, lim = self.manifest, self.manifest.limits
            if output not in OUTPUTS:
                raise InputError(f"output {output!r} is not one of {', '.join(OUTPUTS)}")
            if (prompt is None) == (prompt_embeds is None):
                raise InputError("give either prompt or prompt_embeds (one of them)")
            if not _is_int(batch_size) or not 1 <= batch_size <= lim.max_batch:
                raise InputError(f"batch_size {batch_size!r} is outside the supported range 1..{lim.max_batch}",
                                 cli=f"--batch-size {batch_size!r} is outside the supported range 1..{lim.max_batch}")
            b = (np.shape(prompt_embeds)[0] * batch_size if prompt_embeds is not None
                 else len(_prompts(cast("str | Sequence[str]", prompt), batch_size)))
            for label, v in (("height", height), ("width", width)):
                if v is not None:  # only None means the default: 0 is an error, not a request for the default
                    self._check_side(label, v)
            _check_guidance(guidance_scale)
            _check_rescale(guidance_rescale)
            aesthetic = (aesthetic_score, negative_aesthetic_score)
            _aesthetic(m.refiner, aesthetic)
            if m.refiner and image is None:
                api, cli = _refiner_as_base(self.folder)
                raise InputError(api, cli=cli)
            seed = _resolve_seed(seed, b)
            mask = None if mask_image is None else self._check_inpaint(image, mask_image)
            if guidance_rescale and (mask is not None or self._inpaint_mode() == "concat"):
                raise InputError("guidance_rescale with inpainting is not supported: leave guidance_rescale at 0",
                                 cli="--guidance-rescale with inpainting is not supported: leave it out")
            blur = inpaint.check_paste_back(paste_back)
            if blur is not None and (mask is None or output != "images"):
                raise InputError("paste_back applies to inpainting images: pass mask_image=, or leave paste_back out",
                                 cli="--paste-back applies to inpainting: pass --mask, or leave --paste-back out")
            if mask is None and self._inpaint_mode() == "concat":
                raise InputError(f"{self.folder} is an inpainting model (a 9-channel UNet): pass image= and "
                                 "mask_image= (white = repaint)",
                                 cli=f"{self.folder} is an inpainting model: pass --init-image and --mask")
            creq = self._check_control(control_images, control_scales, control_start, control_end, guess_mode,
                                       control_preprocess, mask is not None)
            if image is None and strength is not None:
                raise InputError("strength applies to img2img only: pass image=..., or leave strength out",
                                 cli="--strength applies to img2img only: pass --init-image, or leave --strength out")
            init = None
            if image is not None:
                self._check_img2img()
                init = _to_uint8(image, height, width, m.vae_scale_factor)
                height, width = init.shape[1], init.shape[2]
            elif creq is not None and (height is None or width is None):  # diffusers: the control image's size
                ch, cw = controlnet.default_size(creq, m.vae_scale_factor)
                height, width = ch if height is None else height, cw if width is None else width
            height = m.default_size if height is None else int(height)
            width = m.default_size if width is None else int(width)
            guided = self._cfg(guidance_scale)
            self._check_size(height, width, b, guided=guided)
            default_strength = 1.0 if mask is not None else DEFAULT_STRENGTH
            strength = 1.0 if image is None else default_strength if strength is None else strength
            plan = self.plan(sampler, steps, strength=strength, timestep_spacing=timestep_spacing)
            # one clock for every stage: device events on a GPU backend, the synchronized host clock on CPU
            clock = self.backend.clock()
            try:
                clock.mark()
                if prompt_embeds is not None:
                    emb = self.embeddings_from(prompt_embeds, negative_prompt_embeds, guided=guided,
                                               pooled_prompt_embeds=pooled_prompt_embeds,
                                               negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                                               batch_size=batch_size)
                else:
                    assert prompt is not None
                    emb = self.encode_prompt(prompt, negative_prompt, batch_size=batch_size, guided=guided)
                clock.mark()
                lat = self._prepare(plan, height, width, b, seed, latents, init, mask, strength == 1.0)
                clock.mark()
                lat, how = self._denoise(emb, lat, plan, guidance_scale, None, None, callback, {}, clock,
                                         rescale=guidance_rescale, control=creq, aesthetic=aesthetic)
                images, nonfinite, final = self._output(lat.x, output)
                if output == "images" and blur is not None:
                    from PIL import Image

                    assert init is not None  # paste_back is refused without an image
                    original, m_out = Image.fromarray(init[0]), inpaint.resize_mask(mask, height, width)
                    images = [inpaint.paste_back(im, original, m_out, blur) for im in images]
                clock.mark()
                ms = clock.intervals_ms()  # text, latents, loop set-up, each step, decode
                steps_ms = ms[3:-1]
                timings: dict[str, Any] = {"text_encoder_ms": ms[0], "unet_steps_ms": steps_ms,
                                           "unet_step_ms": float(np.median(steps_ms)), "clock": clock.kind}
                if init is not None:
                    timings["vae_encoder_ms"] = ms[1]
                if output == "images":
                    timings["vae_decoder_ms"] = ms[-1]
                timings["total_ms"] = (time.perf_counter() - t_start) * 1e3
                return Result(images, timings, nonfinite, how, final, lat.seed)
            except DeviceMemoryError as e:
                raise _memory_error(e, self, b, guided, height, width) from e
            finally:
                clock.close()

    def _output(self, x: Array, output: str) -> tuple[list[Any], list[bool], np.ndarray | None]:
        """A call's last stage: (images, their non-finite flags, None), or ([], [], the latents on the host)
        for ``output="latents"``."""
        if output == "latents":
            return [], [], self.backend.to_host(x)
        images, nonfinite = self._decode(x)
        return images, nonfinite, None

    # -- checks -------------------------------------------------------------------------------------
    def _check_side(self, label: str, v: Any) -> None:
        lim = self.manifest.limits
        if not _is_int(v) or v % lim.multiple_of or not lim.min_size <= v <= lim.max_size:
            raise InputError(
                f"{label} {v!r} is not supported: use a multiple of {lim.multiple_of} between "
                f"{lim.min_size} and {lim.max_size}, or None for the default ({self.manifest.default_size})",
                cli=f"--{label} {v!r} is not supported: use a multiple of {lim.multiple_of} between "
                    f"{lim.min_size} and {lim.max_size}, or leave it out for the default "
                    f"({self.manifest.default_size})",
            )

    def _check_size(self, height: int, width: int, batch: int, guided: bool | None) -> None:
        lim = self.manifest.limits
        for label, v in (("height", height), ("width", width)):
            self._check_side(label, v)
        if not 1 <= batch <= lim.max_batch:
            raise InputError(f"batch_size {batch} is outside the supported range 1..{lim.max_batch}")
        if guided is not None:
            self.backend.check_request(batch, height, width, guided)

    def _check_img2img(self) -> None:
        if "vae_encoder" not in self.engines:
            raise ArtifactError(f"{self.folder} has no VAE encoder, which img2img needs (the image is encoded to "
                                "latents); re-export the model with `sdrt export`, or generate without an image")

    def _negatives(self, negative_prompt: str | Sequence[str] | None, b: int) -> list[str]:
        if negative_prompt is None:
            return [""] * b
        negs = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negs) == 1:
            return negs * b
        if len(negs) != b:
            raise InputError(f"{len(negs)} negative prompts for {b} images; give one, or one per image")
        return negs

    def _cfg(self, guidance_scale: float) -> bool:
        """Classifier-free guidance runs (2B UNet rows) above scale 1, except on a UNet that embeds the
        scale itself (``timestep_cond``: LCM-distilled models, as diffusers' LCM pipelines)."""
        return guidance_scale > 1.0 and "timestep_cond" not in self.engines["unet"].inputs

    def _step_graph(self, guided: bool, dtype: np.dtype[Any], inpaint_mode: str | None = None,
                    rescale: bool = False) -> Engine:
        key = (guided, dtype.name, inpaint_mode, rescale)
        if key not in self._step_graphs:
            from .step_graph import step_engine_name, step_graph_bytes

            self._step_graphs[key] = self.backend.load(step_graph_bytes(guided, dtype, inpaint_mode, rescale),
                                                       step_engine_name(guided, inpaint_mode, rescale))
        return self._step_graphs[key]


def _prompts(prompt: str | Sequence[str], batch_size: int) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise InputError("prompt is empty: give a string or a non-empty list of strings")
    return [p for p in prompts for _ in range(batch_size)]


def _array(a: Any, label: str, ndim: int) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim != ndim or not np.all(np.isfinite(arr)):
        raise InputError(f"{label} must be a finite float array of {ndim} dimensions, got shape {list(arr.shape)}")
    return arr


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _guidance_embedding(w: float, dim: int) -> np.ndarray:
    """LCM's guidance-scale embedding of w = guidance - 1 (VDM's sinusoidal embedding of 1000 w), [1, dim],
    in float32 step for step as diffusers' ``get_guidance_scale_embedding``."""
    half = dim // 2
    scale = np.float32(np.log(np.float32(10000.0))) / np.float32(half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * -scale)
    args = np.float32(w * 1000.0) * freqs
    emb = np.concatenate([np.sin(args), np.cos(args)])
    return np.pad(emb, (0, dim % 2))[None].astype(np.float32)


def _check_rescale(r: Any) -> None:
    if not _is_number(r) or not 0.0 <= r <= 1.0:
        raise InputError(f"guidance_rescale must be a number from 0 to 1 (0.7 is typical for v-prediction models), "
                         f"got {r!r}", cli=f"--guidance-rescale must be a number from 0 to 1, got {r!r}")


AESTHETIC_DEFAULTS = (6.0, 2.5)  # diffusers' aesthetic_score, negative_aesthetic_score


def _aesthetic(refiner: bool, scores: tuple[float | None, float | None] | None) -> tuple[float, float]:
    """The refiner's (aesthetic_score, negative_aesthetic_score), defaults filled; InputError for a bad value, or
    for scores given to a model that takes none."""
    given = (None, None) if scores is None else scores
    if not refiner and any(v is not None for v in given):
        raise InputError("aesthetic_score and negative_aesthetic_score condition an SDXL refiner; this model takes "
                         "none: leave them out",
                         cli="--aesthetic-score and --negative-aesthetic-score condition an SDXL refiner: pass it "
                             "with --refiner, or leave them out")
    out = []
    for label, v, default in zip(("aesthetic_score", "negative_aesthetic_score"), given, AESTHETIC_DEFAULTS,
                                 strict=True):
        if v is None:
            v = default
        if not _is_number(v) or not math.isfinite(v) or not 0.0 <= v <= 10.0:
            raise InputError(f"{label} must be a number from 0 to 10 (the refiner's defaults: 6 and 2.5), got {v!r}",
                             cli=f"--{label.replace('_', '-')} must be a number from 0 to 10 (defaults 6 and 2.5), "
                                 f"got {v!r}")
        out.append(float(v))
    return out[0], out[1]


def _refiner_as_base(folder: Path) -> tuple[str, str]:
    """(message, CLI wording) for an SDXL refiner asked to generate from noise."""
    head = (f"{folder} is an SDXL refiner: it refines, it does not generate from noise (it has only the second "
            "text encoder and was trained on the end of the schedule)")
    api = (f"{head}. Pass it as the refiner of a base model (base(prompt, refiner=refiner_pipeline)), or give it "
           "an image to refine (image=..., strength=0.3)")
    cli = (f"{head}. Pass an SDXL base export as the model and this folder as --refiner, or give it an image "
           "with --init-image (and --strength 0.3)")
    return api, cli


def _check_guidance(g: Any) -> None:
    if not _is_number(g) or not math.isfinite(g) or not 0.0 <= g <= GUIDANCE_MAX:
        what = f"a finite number from 0 to {GUIDANCE_MAX:g} (1 or less turns guidance off; 5-9 is typical)"
        raise InputError(f"guidance_scale must be {what}, got {g!r}", cli=f"--guidance must be {what}, got {g!r}")


def _resolve_seed(seed: Any, b: int) -> int | list[int]:
    """The seed(s) a call uses: checked, and drawn at random when none was given."""
    if seed is None:
        return secrets.randbits(32)
    for s in [seed] if _is_int(seed) else seed if isinstance(seed, (list, tuple)) else [seed]:
        if not _is_int(s) or not 0 <= s <= SEED_MAX:
            raise InputError(f"seed must be an integer from 0 to {SEED_MAX}, a list of them (one per image), or "
                             f"None (a random seed, returned in Result.seed), got {seed!r}",
                             cli=f"--seed must be an integer from 0 to {SEED_MAX}, got {seed!r}; leave --seed out "
                                 "for a random seed (the seed used is printed)")
    if _is_int(seed):
        return int(seed)
    if len(seed) != b:
        raise InputError(f"{len(seed)} seeds for {b} images; give one seed, or one per image")
    return [int(s) for s in seed]


def _engine_folder_error(folder: Path, backend: str) -> CompatibilityError:
    """An engine folder opened with an ONNX Runtime backend: name the backend, or the export it came from."""
    from .engine_manifest import EngineManifest

    try:
        onnx_dir: str | None = EngineManifest.read(folder).onnx_dir
    except SdrtError:
        onnx_dir = None
    source = f"the ONNX export it was built from, {onnx_dir}" if onnx_dir else "the ONNX export it was built from"
    head = f"{folder} is a TensorRT engine folder (made by `sdrt build`), which {backend} cannot run"
    return CompatibilityError(
        f"{head}: load it with backend=\"tensorrt\", or load {source} with backend={backend!r}",
        cli=f"{head}: use --backend tensorrt, or pass {source} with --backend {backend}",
    )


_REQUESTED = re.compile(r"buffer of size (\d+)")


def _memory_error(e: DeviceMemoryError, pipe: Pipeline, b: int, guided: bool, height: int,
                  width: int) -> DeviceMemoryError:
    """The backend's allocation failure, with what was asked, a rough need, and what to lower."""
    m = pipe.manifest
    rows = 2 * b if guided else b
    weights = sum(c.size_bytes for c in m.components.values())
    tokens = (height // m.vae_scale_factor) * (width // m.vae_scale_factor)
    # the UNet's full-resolution self-attention scores (about 8 heads) dominate without fused attention
    attention = rows * 8 * tokens**2 * pipe.dtype.itemsize
    found = _REQUESTED.search(f"{e} {e.__cause__}")
    failed = f"; one buffer of {int(found.group(1)) / 2**30:.1f} GiB could not be allocated" if found else ""
    asked = (f"{width}x{height}, {b} image{'s' if b > 1 else ''}"
             f"{', guided (the UNet runs 2 x batch rows)' if guided else ''}")
    head = (f"{asked} does not fit in {pipe.backend.name}'s memory ({e}){failed}. It needs roughly "
            f"{(weights + attention) / 2**30:.1f} GiB: {weights / 2**30:.1f} GiB of weights and "
            f"{attention / 2**30:.1f} GiB of UNet attention scores where attention is not fused, which grow with "
            "the square of the pixel count")
    return DeviceMemoryError(
        f"{head}. Lower height and width (halving both cuts attention memory 16x), batch_size, or turn "
        "guidance off (guidance_scale=1)",
        cli=f"{head}. Lower --height and --width (halving both cuts attention memory 16x), --batch-size, or "
            "turn guidance off (--guidance 1)",
    )


def _seeds(seed: int | Sequence[int] | None) -> int | list[int] | None:
    """The seed(s) as recorded in Latents and Result: an int, a list of ints, or None."""
    if seed is None:
        return None
    return int(cast(int, seed)) if _is_int(seed) else [int(s) for s in cast(Sequence[int], seed)]


def _generators(seed: int | Sequence[int] | None, b: int) -> list[np.random.Generator]:
    """One generator for the batch (an int or no seed), or one per image (a list of seeds)."""
    if seed is None or _is_int(seed):
        return [np.random.default_rng(None if seed is None else int(seed))]  # type: ignore[arg-type]
    seeds = list(seed)  # type: ignore[arg-type]
    if len(seeds) != b:
        raise InputError(f"{len(seeds)} seeds for {b} images; give one seed, or one per image")
    return [np.random.default_rng(int(s)) for s in seeds]


def _draw(gens: list[np.random.Generator], shape: tuple[int, ...], axis: int = 0) -> np.ndarray:
    """Standard normal noise of ``shape``; with one generator per image, image k's slice along ``axis``
    is what its generator alone would draw for a batch of one."""
    if len(gens) == 1:
        return gens[0].standard_normal(shape, dtype=np.float32)
    one = (*shape[:axis], 1, *shape[axis + 1:])
    return np.concatenate([g.standard_normal(one, dtype=np.float32) for g in gens], axis=axis)


def _check_components(manifest: ExportManifest, folder: Path) -> None:
    need = [*manifest.encoder_names, "unet", "vae_decoder"]
    missing = [c for c in need if c not in manifest.components]
    if missing:
        raise ArtifactError(
            f"{folder} lacks {', '.join(missing)}, which a {manifest.family} model needs; it may hold another "
            "family's artifacts. Re-export the model with `sdrt export`."
        )


def _check_widths(engines: dict[str, Engine], folder: Path) -> None:
    """The UNet must consume what the text encoders produce: catches components of different families."""
    encs = [e for n, e in sorted(engines.items()) if n.startswith("text_encoder")]
    produced = sum(int(e.outputs["hidden_states"].shape[-1] or 0) for e in encs)
    wanted = engines["unet"].inputs["encoder_hidden_states"].shape[-1]
    if isinstance(wanted, int) and produced != wanted:
        raise ArtifactError(
            f"{folder}: the text encoders produce {produced}-wide embeddings but the UNet takes {wanted}: the "
            "components come from different models or families. Re-export the model with `sdrt export`."
        )


def _to_uint8(image: Any, height: int | None, width: int | None, multiple: int) -> np.ndarray:
    """A PIL image or uint8 array [H, W, 3] -> uint8 [1, H, W, 3], resized as diffusers does."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"image array must be uint8 [H, W, 3], got {image.dtype}{list(image.shape)}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"image must be a PIL image or a uint8 [H, W, 3] array, not {type(image).__name__}")
    image = image.convert("RGB")
    w = width or image.width
    h = height or image.height
    w, h = w - w % multiple, h - h % multiple
    if w <= 0 or h <= 0:
        raise InputError(f"image is {image.width}x{image.height}: img2img needs at least {multiple}x{multiple} pixels")
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)[None]
