"""Deliberately wrong TensorRT calls: mypy must reject every line marked ``# E``, proving the stubs are
in effect (an unresolved ``tensorrt`` would be typed Any and let everything through)."""

from __future__ import annotations

import tensorrt as trt


def misuse(logger: trt.ILogger) -> None:
    builder = trt.Builder(logger)
    builder.create_netwrk(0)  # E: misspelt method
    config = builder.create_builder_config()
    config.set_flag("FP16")  # E: a string is not a BuilderFlag
    config.builder_optimization_level = "high"  # E: an int attribute
