"""What every route shares (config, model, batcher, metrics) and the FastAPI dependencies that hand it out:
``State`` reaches the app's ``ServeState``, ``require_api_key`` checks the bearer key."""

from __future__ import annotations

import functools
import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from .batcher import Batcher
from .config import ServeConfig
from .errors import ApiError
from .metrics import Metrics


@dataclass
class ServeState:
    """One app's shared state, kept on ``app.state.serve``. ``batcher`` exists from the app's startup on."""

    config: ServeConfig
    folder: Path
    loaders: list[Callable[[], Any]]
    owns_pipelines: bool
    model_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    batcher: Batcher | None = None
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.batcher.depth if self.batcher is not None else 0,
                               lambda: self.batcher.in_flight if self.batcher is not None else 0)

    @classmethod
    def create(cls, pipeline_or_dir: Any, config: ServeConfig, *, backend: str, devices: tuple[int, ...],
               precision: str | None) -> ServeState:
        """A loaded ``Pipeline`` (its caller keeps and closes it), or a folder loaded on each of ``devices``."""
        if isinstance(pipeline_or_dir, (str, os.PathLike)):
            from sdrt.runtime.pipeline import Pipeline

            folder = Path(pipeline_or_dir)
            loaders: list[Callable[[], Any]] = [functools.partial(Pipeline.load, folder, backend, device_id=d,
                                                                  precision=precision, lora_dir=config.lora_dir,
                                                                  static_shapes=config.static_shapes)
                                                for d in devices]
            owns = True
        else:
            folder = Path(pipeline_or_dir.folder)
            loaders = [lambda: pipeline_or_dir]
            owns = False
        if config.image_dir is not None:
            config.image_dir.mkdir(parents=True, exist_ok=True)
        return cls(config, folder, loaders, owns, config.model_id or folder.name)

    def start_batcher(self) -> Batcher:
        cfg = self.config
        self.batcher = Batcher(self.loaders, max_batch=cfg.max_batch, window_s=cfg.batch_window_ms / 1e3,
                               max_queue=cfg.max_queue, batching=cfg.batching, warmup=cfg.warmup,
                               on_batch=self.metrics.observe_batch, owns_pipelines=self.owns_pipelines)
        self.batcher.start()
        return self.batcher

    def pipeline(self) -> Any:
        """The first worker's pipeline (its manifest says the model's sizes); 503 until it is loaded."""
        b = self.batcher
        if b is None or not b.ready:
            if b is not None and b.failed is not None:
                raise ApiError(503, f"the model failed to load: {b.failed}", None, "not_ready")
            raise still_loading()
        return b.pipes[0]


def still_loading() -> ApiError:
    return ApiError(503, "the model is still loading; retry shortly (GET /readyz says when)", None, "not_ready",
                    {"Retry-After": "2"})


def serve_state(request: Request) -> ServeState:
    st: ServeState = request.app.state.serve
    return st


State = Annotated[ServeState, Depends(serve_state)]


async def require_api_key(request: Request, st: State) -> None:
    """401 unless the server has no key or the request carries ``Authorization: Bearer <key>``."""
    key = st.config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # constant-time: the comparison's duration says nothing about how much of the key was right
    if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())):
        raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>", "authorization",
                       "invalid_api_key", {"WWW-Authenticate": "Bearer"})


Auth = [Depends(require_api_key)]
