"""``sdrt serve``: an HTTP image service (OpenAI images API, AUTOMATIC1111 API) with request batching."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="an sdrt ONNX export (sdrt export) or engine folder (sdrt build)")
    p.add_argument("--backend", default="auto", help="auto, ort-cpu, ort-cuda, tensorrt, openvino")
    p.add_argument("--precision", default=None, choices=("auto", "bf16", "fp32"),
                   help="openvino only: its inference precision (default auto: bf16 where the CPU has it, else "
                        "fp32); the other backends compute in the export's or engines' precision")
    p.add_argument("--devices", default="0", help="GPUs to serve on, one worker each: 0 or 0,1,2,3")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="images per UNet batch (capped by the engines')")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the oldest request waits for others to share its batch")
    p.add_argument("--no-batching", action="store_true", help="run every request in a batch of its own")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting; beyond it: 429 + Retry-After")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds; past it a queued request gets 504")
    p.add_argument("--api-key", default=None,
                   help="require Authorization: Bearer KEY (or set SDRT_API_KEY; the flag wins)")
    p.add_argument("--max-n", type=int, default=None, help="images per request (default: --max-batch)")
    p.add_argument("--max-pixels", type=int, default=1024 * 1024, help="width * height of a generated image")
    p.add_argument("--max-upload-pixels", type=int, default=2048 * 2048, help="width * height of an upload")
    p.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--max-prompt-chars", type=int, default=2000)
    p.add_argument("--image-dir", type=Path, default=None,
                   help="keep images here and allow response_format=url (served at /images/NAME)")
    p.add_argument("--lora-dir", type=Path, default=None,
                   help="a folder of LoRA .safetensors files that requests name in `loras` (and A1111 prompts as "
                        "<lora:NAME:SCALE>), on an export made with --lora-slots; listed at GET /sdapi/v1/loras")
    p.add_argument("--static-shapes", action="store_true",
                   help="openvino: compile each graph for the exact shapes of the requests (once per new size, about "
                        "10 s for SD 1.5 at 512 on 2 cores) instead of once with dynamic axes; measured 3%% faster per "
                        "image, so it pays for a server that serves one or a few sizes")
    p.add_argument("--grace", type=float, default=30.0, help="SIGTERM: seconds for in-flight work to finish")
    p.add_argument("--ray", action="store_true", help="run on Ray Serve (the ray extra) instead of uvicorn")
    p.add_argument("--ray-config", type=Path, default=None,
                   help="with --ray: a Serve config file (replicas, autoscaling, resources)")


def config_from(args: argparse.Namespace) -> object:
    from sdrt.serve.config import API_KEY_ENV, ServeConfig

    return ServeConfig(
        max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, max_queue=args.max_queue,
        request_timeout_s=args.request_timeout, batching=not args.no_batching,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, max_body_bytes=args.max_body_bytes,
        max_pixels=args.max_pixels, max_upload_pixels=args.max_upload_pixels, max_n=args.max_n,
        max_prompt_chars=args.max_prompt_chars, max_steps=args.max_steps, image_dir=args.image_dir,
        grace_s=args.grace, lora_dir=args.lora_dir, static_shapes=args.static_shapes,
    )


def run(args: argparse.Namespace) -> int:
    from sdrt.runtime.errors import BackendUnavailable, InputError

    try:
        import uvicorn

        from sdrt.serve.app import create_app
    except ImportError as e:
        raise BackendUnavailable(f"sdrt serve needs the serve extra ({e.name} is missing): "
                                 "pip install 'sdrt[serve]'") from e
    if not Path(args.path).is_dir():
        raise InputError(f"{args.path} is not a folder; give an sdrt export or engine folder")
    if args.precision is not None or args.static_shapes:  # openvino's settings: the backend auto picks, named now
        from sdrt.runtime.backends import resolve_backend

        name = resolve_backend(args.backend, Path(args.path))
        which = f"--backend {args.backend}" if name == args.backend else f"--backend {args.backend} (here: {name})"
        if args.precision is not None and name != "openvino":
            raise InputError(f"--precision sets the openvino backend's inference precision; {which} computes in "
                             "the export's or engines' precision: leave --precision out, or use --backend openvino")
        if args.static_shapes and name != "openvino":
            raise InputError(f"--static-shapes compiles the openvino backend's graphs per shape; {which} has no "
                             "such setting: leave --static-shapes out, or use --backend openvino")
    cfg = config_from(args)
    cfg.check()  # type: ignore[attr-defined]
    try:
        devices = tuple(int(d) for d in str(args.devices).split(",") if d.strip())
    except ValueError:
        raise InputError(f"--devices {args.devices!r} must be GPU numbers separated by commas, such as 0 or 0,1") from None
    # what the workers will load, read and checked now: a missing component or a folder of another kind fails
    # here with one line, before the port is bound (the engines themselves load in the workers)
    from sdrt.runtime.loading import read_model

    read_model(Path(args.path), args.backend)
    if args.ray:
        from sdrt.serve.ray_app import run_ray

        return run_ray(Path(args.path), cfg, backend=args.backend, host=args.host, port=args.port,
                       config_file=args.ray_config, precision=args.precision)
    app = create_app(Path(args.path), cfg, backend=args.backend, devices=devices,  # type: ignore[arg-type]
                     precision=args.precision)
    logging.getLogger("sdrt.serve.access").setLevel(logging.INFO)
    where = "all interfaces" if args.host in ("0.0.0.0", "::") else args.host
    print(f"sdrt serve: {args.path} on http://{args.host}:{args.port} ({where}); GET /readyz says when it is ready",
          flush=True)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, let open requests finish within the grace period,
    # then the app's shutdown closes the pipelines. It then re-raises the signal to the handler it found:
    # a no-op for SIGTERM, so that a drained server exits 0 as process managers expect.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning",
                timeout_graceful_shutdown=int(args.grace), lifespan="on")
    return 0
