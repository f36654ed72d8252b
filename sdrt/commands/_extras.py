"""Which optional extra of sdrt provides a module, and how to install it: ``pip install .`` installs only
the runtime, so a command that needs PyTorch says what to install instead of a ModuleNotFoundError."""

from __future__ import annotations

TORCH_INSTALL = "pip install torch==2.13.0 (the CPU build; for an NVIDIA GPU, the CUDA build from https://pytorch.org)"
# top-level module -> (what it is, the extra of pyproject.toml that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "torch": ("PyTorch", "export"),
    "diffusers": ("diffusers", "export"),
    "transformers": ("transformers", "export"),
    "accelerate": ("accelerate", "export"),
    "onnxscript": ("onnxscript", "export"),
    "safetensors": ("safetensors", "export"),
    "psutil": ("psutil", "bench"),
    "matplotlib": ("matplotlib", "bench"),
    "cv2": ("OpenCV", "control"),
}


def missing_extra(command: str, error: ModuleNotFoundError) -> str | None:
    """The message for ``error`` when an extra of sdrt provides the missing module; None otherwise (a bug)."""
    top = (error.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    what, extra = EXTRAS[top]
    # torch first, and pinned: the extra alone would pull PyTorch's default build (GBs of CUDA libraries)
    torch_first = f"{TORCH_INSTALL}, then " if extra == "export" else ""
    return (f"{what} is not installed (No module named {top!r}): `sdrt {command}` needs sdrt's {extra!r} extra. "
            f"Install it: {torch_first}pip install \"sdrt[{extra}]\" (from a checkout of sdrt: "
            f"pip install \".[{extra}]\")")
