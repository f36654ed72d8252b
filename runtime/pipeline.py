"""``Pipeline``: text (and optionally an image) -> images, over engines on one backend.

The only module that knows both engines and samplers. Load once, call many times; calls from several
threads at once are safe: they are serialized by a lock, since one pipeline drives one device.
"""

from __future__ import annotations

import math
import re
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import samplers
from .engine import Backend, Engine
from .errors import ArtifactError, CompatibilityError, DeviceMemoryError, InputError, SdrtError
from .manifest import ExportManifest
from .tokenizer import ClipTokenizer

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "tensorrt")
SEED_MAX = 2**32 - 1  # seeds are 32-bit, as in the popular UIs, so any seed printed can be typed back
GUIDANCE_MAX = 100.0  # far above any useful scale (5-9 is typical); larger values only saturate the image
DEFAULT_STRENGTH = 0.8


@dataclass
class Result:
    images: list[Any]  # PIL images
    timings: dict[str, Any]  # milliseconds per stage
    nonfinite: list[bool] = field(default_factory=list)  # per image: NaN/inf in the decoded pixels
    loop: str = ""  # how the denoising loop ran (step by step; TensorRT: captured CUDA graphs or not, and why)
    seed: int = 0  # the seed used (drawn at random when the call gave none): pass it back to reproduce the images


@dataclass
class _Request:
    """A call's arguments after every check, with what the checks derived (sizes, the plan, the noise)."""

    prompts: list[str]  # one per image
    negs: list[str] | None  # None: unguided
    negative_given: bool  # SDXL zeroes the unconditional embeddings when no negative prompt was given
    height: int
    width: int
    guidance_scale: float
    init_image: np.ndarray | None
    plan: samplers.SamplerPlan
    seed: int
    rng: np.random.Generator
    noise: np.ndarray

    @property
    def guided(self) -> bool:
        return self.negs is not None


def make_backend(name: str, folder: Path, threads: int | None = None, cuda_graph: bool | None = None) -> Backend:
    """``cuda_graph`` None: the backend's default (tensorrt: on; ort-cuda: off)."""
    from .ort_backend import OrtBackend, cuda_available

    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    engine_folder = (folder / "sdrt-engines.json").is_file()
    if engine_folder and name in ("ort-cpu", "ort-cuda"):
        raise _engine_folder_error(folder, name)
    if name == "auto":
        if engine_folder:
            name = "tensorrt"
        else:
            name = "ort-cuda" if cuda_available() else "ort-cpu"
    if cuda_graph and name == "ort-cpu":
        raise InputError("cuda_graph needs a GPU backend (ort-cuda or tensorrt); the backend here is ort-cpu")
    if name == "tensorrt":
        from .trt_backend import TrtBackend

        return TrtBackend(folder, cuda_graph=cuda_graph is not False)
    if name == "ort-cuda":
        return OrtBackend("cuda", threads=threads, cuda_graph=bool(cuda_graph))
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
        self._step_graphs: dict[tuple[bool, str], Engine] = {}
        self._lock = threading.Lock()

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", *, threads: int | None = None,
             cuda_graph: bool | None = None) -> Pipeline:
        """Load an export or engine folder. ``cuda_graph``: replay captured CUDA graphs. ``tensorrt``
        captures the denoising step (UNet + sampler step) by default, falling back to running the engines
        directly when capture fails (``Result.loop`` says which ran); ``ort-cuda`` captures each engine
        only when asked (``True``), for fixed shapes, and its outputs are then valid only until the next
        call at the same shape. ``False`` turns capture off for both."""
        import json

        folder = Path(path)
        if backend in ("ort-cpu", "ort-cuda") and (folder / "sdrt-engines.json").is_file():
            raise _engine_folder_error(folder, backend)  # before reading anything made for TensorRT
        manifest = ExportManifest.read(folder)
        _check_components(manifest, folder)
        be = make_backend(backend, folder, threads, cuda_graph)
        engines: dict[str, Engine] = {}
        for name, comp in manifest.components.items():
            engines[name] = be.load(str(folder / be.graph_for(comp)), name)
        toks = []
        for i in range(2 if manifest.family == "sdxl" else 1):
            toks.append(ClipTokenizer.from_folder(folder / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}")))
        _check_widths(engines, folder)
        sched_path = folder / "scheduler" / "scheduler_config.json"
        if not sched_path.is_file():
            raise ArtifactError(f"{sched_path} is missing; re-export the model with `sdrt export`")
        return cls(folder, manifest, be, engines, toks, json.loads(sched_path.read_text()))

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.engines["unet"].inputs["sample"].dtype

    # -- text ---------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Prompts -> (hidden states [B, 77k, C], pooled [B, P] for SDXL), on the host.

        Prompts over 77 tokens are encoded in 77-token chunks and concatenated along the sequence.
        Conditional and unconditional prompts are encoded in one call, so they get the same number of
        chunks (the tokenizer pads the batch to its longest prompt).
        """
        hidden_parts, pooled = [], None
        for i, tok in enumerate(self.tokenizers):
            name = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
            ids = tok.encode_chunks(prompts)  # [B, k, 77]
            b, k, n = ids.shape
            out = self.engines[name]({"input_ids": self.backend.to_device(ids.reshape(b * k, n))})
            h = self.backend.to_host(out["hidden_states"]).reshape(b, k * n, -1)
            hidden_parts.append(h)
            if "text_embeds" in out:
                # the pooled embedding of the first chunk, as the UIs do
                pooled = self.backend.to_host(out["text_embeds"]).reshape(b, k, -1)[:, 0]
        hidden = np.concatenate(hidden_parts, axis=-1) if len(hidden_parts) > 1 else hidden_parts[0]
        return hidden, pooled

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

    def _check_size(self, height: int, width: int, batch: int, guided: bool | None = None) -> None:
        lim = self.manifest.limits
        for label, v in (("height", height), ("width", width)):
            self._check_side(label, v)
        if not 1 <= batch <= lim.max_batch:
            raise InputError(f"batch_size {batch} is outside the supported range 1..{lim.max_batch}")
        engine_manifest = getattr(self.backend, "manifest", None)  # TensorRT: the engines' build profile
        if engine_manifest is not None:
            engine_manifest.profile.check_request(batch, height, width, guided=guided)

    # -- the call -----------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 30,
        guidance_scale: float = 7.5,
        sampler: str = "dpmpp-2m",
        seed: int | None = None,
        batch_size: int = 1,
        latents: np.ndarray | None = None,
        image: Any = None,
        strength: float | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> Result:
        """``height``/``width``: None is the model's default size (img2img: the image's own size, rounded
        down to a multiple of 8). ``guidance_scale``: 0..100, where <= 1 turns guidance off. ``seed``:
        0..2**32-1, None for a random one (returned in ``Result.seed``). ``strength``: img2img only, in
        (0, 1], default 0.8. Every argument is checked before any engine runs."""
        with self._lock:
            t_start = time.perf_counter()
            req = self._check_request(prompt, negative_prompt, height, width, steps, guidance_scale, sampler,
                                      seed, batch_size, latents, image, strength)
            try:
                return self._generate(req, callback, t_start)
            except DeviceMemoryError as e:
                raise _memory_error(e, req, self) from e

    def _check_request(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None,
                       height: int | None, width: int | None, steps: int, guidance_scale: float, sampler: str,
                       seed: int | None, batch_size: int, latents: np.ndarray | None, image: Any,
                       strength: float | None) -> _Request:
        m, lim = self.manifest, self.manifest.limits
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("prompt is empty: give a string or a non-empty list of strings")
        if not _is_int(batch_size) or not 1 <= batch_size <= lim.max_batch:
            raise InputError(f"batch_size {batch_size!r} is outside the supported range 1..{lim.max_batch}",
                             cli=f"--batch-size {batch_size!r} is outside the supported range 1..{lim.max_batch}")
        prompts = [p for p in prompts for _ in range(batch_size)]
        for label, v in (("height", height), ("width", width)):
            if v is not None:  # only None means the default: 0 is an error, not a request for the default
                self._check_side(label, v)
        if not _is_number(guidance_scale) or not math.isfinite(guidance_scale) or not (
                0.0 <= guidance_scale <= GUIDANCE_MAX):
            what = f"a finite number from 0 to {GUIDANCE_MAX:g} (1 or less turns guidance off; 5-9 is typical)"
            raise InputError(f"guidance_scale must be {what}, got {guidance_scale!r}",
                             cli=f"--guidance must be {what}, got {guidance_scale!r}")
        if seed is None:
            seed = secrets.randbits(32)
        elif not _is_int(seed) or not 0 <= seed <= SEED_MAX:
            raise InputError(f"seed must be an integer from 0 to {SEED_MAX} or None (a random seed, returned in "
                             f"Result.seed), got {seed!r}",
                             cli=f"--seed must be an integer from 0 to {SEED_MAX}, got {seed!r}; leave --seed out "
                                 "for a random seed (the seed used is printed)")
        if image is None and strength is not None:
            raise InputError("strength applies to img2img only: pass image=..., or leave strength out",
                             cli="--strength applies to img2img only: pass --init-image, or leave --strength out")
        init_image = None
        if image is not None:
            init_image = _to_uint8(image, height, width, m.vae_scale_factor)
            height, width = init_image.shape[1], init_image.shape[2]
        height = m.default_size if height is None else int(height)
        width = m.default_size if width is None else int(width)
        b, guided = len(prompts), guidance_scale > 1.0
        self._check_size(height, width, b, guided=guided)
        plan = samplers.make_plan(sampler, steps, self.scheduler_config, prediction_type=m.prediction_type,
                                  strength=1.0 if image is None else DEFAULT_STRENGTH if strength is None else strength)
        f = m.vae_scale_factor
        lat_shape = (b, m.latent_channels, height // f, width // f)
        rng = np.random.default_rng(int(seed))
        if latents is None:
            noise = rng.standard_normal(lat_shape, dtype=np.float32)
        else:
            noise = np.asarray(latents, dtype=np.float32)
            if noise.shape != lat_shape:
                raise InputError(f"latents have shape {noise.shape}, expected {lat_shape} for this size and batch")
        negs = self._negatives(negative_prompt, b) if guided else None
        return _Request(prompts, negs, negative_prompt is not None, height, width, float(guidance_scale), init_image, plan, int(seed), rng, noise)

    def _generate(self, req: _Request, callback: Callable[[int, int], None] | None, t_start: float) -> Result:
        m, plan, prompts, negs, rng = self.manifest, req.plan, req.prompts, req.negs, req.rng
        height, width, b, guided = req.height, req.width, len(req.prompts), req.guided
        guidance_scale, init_image, noise = req.guidance_scale, req.init_image, req.noise
        lat_shape = noise.shape
        timings: dict[str, Any] = {}

        # 1. text
        t0 = time.perf_counter()
        if negs is not None:
            hidden, pooled = self._encode(negs + prompts)
            if m.family == "sdxl" and not req.negative_given:
                hidden[:b] = 0  # diffusers' force_zeros_for_empty_prompt
                assert pooled is not None
                pooled[:b] = 0
        else:
            hidden, pooled = self._encode(prompts)
        timings["text_encoder_ms"] = (time.perf_counter() - t0) * 1e3

        # 2. the starting latents (img2img: the encoded image, noised to the starting step)
        t0 = time.perf_counter()
        if init_image is not None:
            enc = self.engines["vae_encoder"]
            img_lat = self.backend.to_host(enc({"image": self.backend.to_device(init_image)})["latent"])
            img_lat = np.repeat(img_lat.astype(np.float64), b // img_lat.shape[0], axis=0)
            x = plan.add_noise(img_lat, noise.astype(np.float64)).astype(np.float32)
            timings["vae_encoder_ms"] = (time.perf_counter() - t0) * 1e3
        else:
            x = (noise.astype(np.float64) * plan.init_noise_sigma).astype(np.float32)

        # 3. the denoising loop, device-resident: UNet -> step graph -> UNet
        unet, dt = self.engines["unet"], self.dtype
        step = self._step_graph(guided, dt)
        n = len(plan.timesteps)
        # fresh noise of every ancestral step, drawn up front so the loop never waits on the host
        step_noise = rng.standard_normal((n, *lat_shape), dtype=np.float32) if plan.needs_noise else None
        to_dev = self.backend.to_device
        cond = {"encoder_hidden_states": to_dev(hidden.astype(dt))}
        if m.family == "sdxl":
            assert pooled is not None
            cond["text_embeds"] = to_dev(pooled.astype(dt))
            cond["time_ids"] = to_dev(np.tile(np.array([height, width, 0, 0, height, width], dt),
                                              (hidden.shape[0], 1)))
        x_dev = to_dev(x.astype(dt))
        zeros = to_dev(np.zeros(lat_shape, dt))
        guide = {"guidance": to_dev(np.array(guidance_scale, np.float32))} if guided else {}
        first_in = samplers.model_input(plan, 0, x.astype(np.float64)).astype(dt)
        unet_in = to_dev(np.concatenate([first_in] * 2) if guided else first_in)
        capture = getattr(self.backend, "capture_step", None)
        if capture is not None:  # TensorRT: UNet + step graph over fixed buffers, replayed as CUDA graphs
            loop = capture(unet, step)
            loop.start(latents=x_dev, unet_in=unet_in, x0_prev=zeros, cond=cond, guidance=guide.get("guidance"),
                       timesteps=plan.timesteps, coeffs=plan.table, noise=step_noise)
            advance: Callable[[int], None] = loop.step
            how = "captured CUDA graphs" if loop.captured else f"engines run directly ({loop.reason})"
        else:
            # every per-step input goes to the device before the loop: the loop itself does no host work
            rows = 2 * b if guided else b
            t_dev = [to_dev(np.full((rows,), t, np.float32)) for t in plan.timesteps]
            c_dev = [to_dev(plan.coeffs(i)) for i in range(n)]
            n_dev = [to_dev(z.astype(dt)) for z in step_noise] if step_noise is not None else [zeros] * n
            state = {"latents": x_dev, "x0": zeros, "unet_in": unet_in}

            def plain_step(i: int) -> None:
                out = unet({"sample": state["unet_in"], "timestep": t_dev[i], **cond})["out_sample"]
                res = step({"latents": state["latents"], "unet_out": out, **guide, "coeffs": c_dev[i],
                            "x0_prev": state["x0"], "noise": n_dev[i]})
                state.update(latents=res["latents_next"], x0=res["x0"], unet_in=res["unet_in_next"])

            advance = plain_step
            how = "engines run step by step"
        unet_ms: list[float] = []
        for i in range(n):
            t0 = time.perf_counter()
            advance(i)
            self.backend.synchronize()
            unet_ms.append((time.perf_counter() - t0) * 1e3)
            if callback is not None:
                callback(i + 1, n)
        # the final latents (TensorRT: a view of the loop's buffer, valid until its next start(): decoded below)
        x_dev = loop.latents if capture is not None else state["latents"]
        timings["unet_steps_ms"] = unet_ms
        timings["unet_step_ms"] = float(np.median(unet_ms)) if unet_ms else 0.0

        # 4. decode
        t0 = time.perf_counter()
        dec = self.engines["vae_decoder"]
        dec_dt = dec.inputs["latent_sample"].dtype
        if dec_dt == dt:
            lat_dev = x_dev
        else:  # an fp32 VAE after an fp16 UNet (SDXL): cast on the host, once
            lat_dev = self.backend.to_device(self.backend.to_host(x_dev).astype(dec_dt))
        out = dec({"latent_sample": lat_dev})
        pixels = self.backend.to_host(out["images"])
        finite = self.backend.to_host(out["finite"])
        timings["vae_decoder_ms"] = (time.perf_counter() - t0) * 1e3
        timings["total_ms"] = (time.perf_counter() - t_start) * 1e3
        nonfinite = [not bool(v) for v in finite]
        if any(nonfinite):
            warnings.warn(
                f"{sum(nonfinite)} of {len(nonfinite)} images decoded to NaN/inf (an fp16 overflow in the "
                "VAE); their pixels are not meaningful. Re-export with the VAE in fp32 "
                "(`sdrt export ... --vae-fp32`).",
                RuntimeWarning, stacklevel=3,
            )
        from PIL import Image

        return Result([Image.fromarray(p) for p in pixels], timings, nonfinite, how, req.seed)

    def _negatives(self, negative_prompt: str | Sequence[str] | None, b: int) -> list[str]:
        if negative_prompt is None:
            return [""] * b
        negs = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negs) == 1:
            return negs * b
        if len(negs) != b:
            raise InputError(f"{len(negs)} negative prompts for {b} images; give one, or one per image")
        return negs

    def _step_graph(self, guided: bool, dtype: np.dtype[Any]) -> Engine:
        key = (guided, dtype.name)
        if key not in self._step_graphs:
            from .step_graph import STEP_ENGINES, step_graph_bytes

            self._step_graphs[key] = self.backend.load(step_graph_bytes(guided, dtype), STEP_ENGINES[guided])
        return self._step_graphs[key]


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


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


def _memory_error(e: DeviceMemoryError, req: _Request, pipe: Pipeline) -> DeviceMemoryError:
    """The backend's allocation failure, with what was asked, a rough need, and what to lower."""
    m, b = pipe.manifest, len(req.prompts)
    rows = 2 * b if req.guided else b
    weights = sum(c.size_bytes for c in m.components.values())
    tokens = (req.height // m.vae_scale_factor) * (req.width // m.vae_scale_factor)
    # the UNet's full-resolution self-attention scores (about 8 heads) dominate without fused attention
    attention = rows * 8 * tokens**2 * pipe.dtype.itemsize
    found = _REQUESTED.search(f"{e} {e.__cause__}")
    failed = f"; one buffer of {int(found.group(1)) / 2**30:.1f} GiB could not be allocated" if found else ""
    asked = (f"{req.width}x{req.height}, {b} image{'s' if b > 1 else ''}"
             f"{', guided (the UNet runs 2 x batch rows)' if req.guided else ''}")
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


def _check_components(manifest: ExportManifest, folder: Path) -> None:
    need = ["text_encoder", "unet", "vae_decoder"] + (["text_encoder_2"] if manifest.family == "sdxl" else [])
    missing = [c for c in need if c not in manifest.components]
    if missing:
        raise ArtifactError(
            f"{folder} lacks {', '.join(missing)}, which a {manifest.family} model needs; it may hold another "
            "family's artifacts. Re-export the model with `sdrt export`."
        )


def _check_widths(engines: dict[str, Engine], folder: Path) -> None:
    """The UNet must consume what the text encoders produce: catches components of different families."""
    encs = [e for n, e in sorted(engines.items()) if n.startswith("text_encoder")]
    produced = sum(int(e.outputs["hidden_states"].shape[-1] or 0) for e in encs)  # type: ignore[arg-type]
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
        image = image.resize((w, h), resample=Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)[None]
