"""``Pipeline``: text (and optionally an image) -> images, over engines on one backend.

The only module that knows both engines and samplers. Load once, call many times; calls from several
threads at once are safe: they are serialized by a lock, since one pipeline drives one device.
"""

from __future__ import annotations

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
from .errors import ArtifactError, InputError
from .manifest import ExportManifest
from .tokenizer import ClipTokenizer

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "tensorrt")


@dataclass
class Result:
    images: list[Any]  # PIL images
    timings: dict[str, Any]  # milliseconds per stage
    nonfinite: list[bool] = field(default_factory=list)  # per image: NaN/inf in the decoded pixels
    loop: str = ""  # how the denoising loop ran (step by step; TensorRT: captured CUDA graphs or not, and why)


def make_backend(name: str, folder: Path, threads: int | None = None, cuda_graph: bool | None = None) -> Backend:
    """``cuda_graph`` None: the backend's default (tensorrt: on; ort-cuda: off)."""
    from .ort_backend import OrtBackend, cuda_available

    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name == "auto":
        if (folder / "sdrt-engines.json").is_file():
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
    def _check_size(self, height: int, width: int, batch: int, guided: bool | None = None) -> None:
        lim = self.manifest.limits
        for label, v in (("height", height), ("width", width)):
            if v % lim.multiple_of or not lim.min_size <= v <= lim.max_size:
                raise InputError(
                    f"{label} {v} is not supported: use a multiple of {lim.multiple_of} between "
                    f"{lim.min_size} and {lim.max_size}"
                )
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
        strength: float = 0.8,
        callback: Callable[[int, int], None] | None = None,
    ) -> Result:
        with self._lock:
            return self._generate(prompt, negative_prompt, height, width, steps, guidance_scale, sampler,
                                  seed, batch_size, latents, image, strength, callback)

    def _generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None,
                  height: int | None, width: int | None, steps: int, guidance_scale: float, sampler: str,
                  seed: int | None, batch_size: int, latents: np.ndarray | None, image: Any,
                  strength: float, callback: Callable[[int, int], None] | None) -> Result:
        t_start = time.perf_counter()
        m = self.manifest
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("prompt is empty: give a string or a non-empty list of strings")
        prompts = [p for p in prompts for _ in range(batch_size)]
        b = len(prompts)
        init_image = None
        if image is not None:
            init_image = _to_uint8(image, height, width, m.vae_scale_factor)
            height, width = init_image.shape[1], init_image.shape[2]
        height = height or m.default_size
        width = width or m.default_size
        self._check_size(height, width, b, guided=guidance_scale > 1.0)
        if image is None:
            strength = 1.0
        plan = samplers.make_plan(sampler, steps, self.scheduler_config,
                                  prediction_type=m.prediction_type, strength=strength)
        guided = guidance_scale > 1.0
        f = m.vae_scale_factor
        lat_shape = (b, m.latent_channels, height // f, width // f)
        rng = np.random.default_rng(seed)
        if latents is None:
            noise = rng.standard_normal(lat_shape, dtype=np.float32)
        else:
            noise = np.asarray(latents, dtype=np.float32)
            if noise.shape != lat_shape:
                raise InputError(f"latents have shape {noise.shape}, expected {lat_shape} for this size and batch")
        negs = self._negatives(negative_prompt, b) if guided else None
        timings: dict[str, Any] = {}

        # 1. text
        t0 = time.perf_counter()
        if negs is not None:
            hidden, pooled = self._encode(negs + prompts)
            if m.family == "sdxl" and negative_prompt is None:
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

        return Result([Image.fromarray(p) for p in pixels], timings, nonfinite, how)

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
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)[None]
