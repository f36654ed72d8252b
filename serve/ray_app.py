"""Ray Serve: the same FastAPI app as ``sdrt serve``, as each replica's ingress (the ``ray`` extra).

One model replica per GPU (``num_gpus: 1``; Ray sets each replica's visible device, so it loads device 0);
replicas and autoscaling come from the Serve config. Each replica batches with sdrt's own batcher, which
keys batches by compatibility; Ray's ``@serve.batch`` has no key, so it would mix requests that cannot
share a UNet batch. ``max_ongoing_requests`` must be at least the batch size for batches to form.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from pathlib import Path
from typing import Any

from ray import serve

from .app import create_app
from .config import ServeConfig

_FIELDS = {f.name for f in dataclasses.fields(ServeConfig)}


@serve.deployment(max_ongoing_requests=72, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class SdrtModel:
    def __init__(self, path: str, config: dict[str, Any], backend: str = "auto", precision: str | None = None) -> None:
        fields: dict[str, Any] = {k: (Path(v) if k == "image_dir" and v else v) for k, v in config.items()}
        cfg = ServeConfig(**fields)
        self._app = create_app(Path(path), cfg, backend=backend, precision=precision)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    def check_health(self) -> None:
        b = self._app.state.serve.batcher
        if b is not None and b.failed is not None:
            raise RuntimeError(f"the pipeline failed to load: {b.failed}")


def build(args: dict[str, Any], deployment_options: dict[str, Any] | None = None) -> Any:
    """The application builder for a Serve config's ``import_path: sdrt.serve.ray_app:build``; ``args``:
    ``path``, ``backend``, ``precision`` (openvino's), any ServeConfig field, and ``num_replicas`` /
    ``num_gpus`` / ``num_cpus``."""
    args = dict(args)
    path = str(args.pop("path"))
    backend = str(args.pop("backend", "auto"))
    precision = args.pop("precision", None)
    options: dict[str, Any] = {}
    if "num_replicas" in args:
        options["num_replicas"] = int(args.pop("num_replicas"))
    actor = {k: args.pop(k) for k in ("num_gpus", "num_cpus") if k in args}
    if not actor:
        actor = {"num_gpus": 1} if backend in ("tensorrt", "ort-cuda") else {"num_cpus": 1}
    options["ray_actor_options"] = actor
    unknown = sorted(set(args) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown sdrt serve options {', '.join(unknown)}; valid: {', '.join(sorted(_FIELDS))}")
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()}
    cfg.setdefault("load_before_serving", True)
    batch = int(cfg.get("max_batch", ServeConfig.max_batch))
    options["max_ongoing_requests"] = max(batch, int(cfg.get("max_queue", ServeConfig.max_queue)) + batch)
    options.update(deployment_options or {})  # a config file's deployment section wins
    return SdrtModel.options(**options).bind(path, cfg, backend, precision)  # type: ignore[attr-defined]


def run_ray(path: Path, cfg: ServeConfig, *, backend: str, host: str, port: int,
            config_file: Path | None = None, precision: str | None = None) -> int:
    """``sdrt serve DIR --ray``: run on the Ray cluster at RAY_ADDRESS (or a local one) until SIGTERM."""
    import ray

    args: dict[str, Any] = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    args.update(path=str(path), backend=backend)
    if precision is not None:
        args["precision"] = precision
    deploy_options: dict[str, Any] = {}
    if config_file is not None:
        import yaml

        doc = yaml.safe_load(config_file.read_text())
        app_doc = (doc.get("applications") or [{}])[0]
        args.update({k: v for k, v in (app_doc.get("args") or {}).items() if k != "path"})
        deploy_options = ((app_doc.get("deployments") or [{}])[0]) or {}
        deploy_options.pop("name", None)
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    app = build(args, deploy_options)
    serve.run(app, name="sdrt", route_prefix="/")
    print(f"sdrt serve on Ray Serve: http://{host}:{port} (SIGTERM or Ctrl-C stops it)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()  # replicas drain their in-flight requests (graceful_shutdown_timeout_s)
    ray.shutdown()
    return 0
