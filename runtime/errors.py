"""Exceptions sdrt raises. Every message names the problem and the fix.

Library code raises these; only the CLI turns them into an exit code.
"""

from __future__ import annotations


class SdrtError(Exception):
    """Base class: anything sdrt reports to a user."""


class InputError(SdrtError, ValueError):
    """A call's arguments are out of range or of the wrong kind."""


class ArtifactError(SdrtError):
    """An artifact folder (ONNX export or engine folder) is missing, incomplete or corrupt."""


class CompatibilityError(SdrtError):
    """An artifact was made for another family, GPU, TensorRT version or schema."""


class ParityError(SdrtError):
    """An exported graph disagrees with its PyTorch module beyond the documented bound."""


class BackendUnavailable(SdrtError):
    """A requested backend (onnxruntime-gpu, TensorRT, CUDA) is not installed or has no device."""


class UnsafeCheckpointError(SdrtError):
    """A pickled checkpoint was given without the explicit opt-in to unpickle it."""
