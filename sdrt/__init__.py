"""sdrt: Stable Diffusion on ONNX Runtime and TensorRT.

``sdrt.Pipeline`` is the runtime entry point; it is imported lazily so that ``import sdrt`` stays cheap
and never pulls in torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from sdrt.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'sdrt' has no attribute {name!r}")
