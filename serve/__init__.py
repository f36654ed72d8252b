"""``sdrt serve``: an HTTP image service over a Pipeline (the ``serve`` extra: FastAPI, uvicorn,
prometheus-client, python-multipart).

``create_app(pipeline_or_dir, ...)`` returns the FastAPI app, for teams that mount it in their own
service; ``sdrt serve DIR`` runs it with uvicorn; ``sdrt serve DIR --ray`` on Ray Serve.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str) -> Any:
    # FastAPI is imported only when the server is used: `import sdrt.serve` stays cheap
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServeConfig":
        from .config import ServeConfig

        return ServeConfig
    raise AttributeError(name)
