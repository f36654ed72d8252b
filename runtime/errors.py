"""Exceptions sdrt raises. Every message names the problem and the fix.

Library code raises these; only the CLI turns them into an exit code.
"""

from __future__ import annotations


class SdrtError(Exception):
    """Base class: anything sdrt reports to a user.

    ``cli``: the same message for a command-line user, where the fix is a flag (``--backend ort-cpu``)
    rather than a keyword (``backend="ort-cpu"``). The CLI prints ``for_cli()``; ``str()`` is the API's.
    """

    def __init__(self, message: str = "", *, cli: str | None = None) -> None:
        super().__init__(message)
        self.cli = cli

    def for_cli(self) -> str:
        return self.cli if self.cli is not None else str(self)


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


class DeviceMemoryError(SdrtError):
    """A request does not fit in the device's (or host's) memory; the message says what to lower."""
