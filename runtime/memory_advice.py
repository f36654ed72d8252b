"""An allocation failure explained: what was asked, a rough need, and what to lower."""

from __future__ import annotations

import re

from .errors import DeviceMemoryError
from .manifest import ExportManifest

_REQUESTED = re.compile(r"buffer of size (\d+)")


def explain(e: DeviceMemoryError, m: ExportManifest, backend: str, itemsize: int, b: int, guided: bool, height: int,
                  width: int) -> DeviceMemoryError:
    """The backend's allocation failure, with what was asked, a rough need, and what to lower."""
    rows = 2 * b if guided else b
    weights = sum(c.size_bytes for c in m.components.values())
    denoiser = m.model_family.denoiser_label
    # the finest self-attention's tokens: a UNet's latent pixels, a transformer's patches (an image side is a
    # multiple of one: 16 pixels for SD 3 / FLUX.1's 2x2 patches); its scores (about 8 heads) dominate unfused
    side = max(m.limits.multiple_of, m.vae_scale_factor)
    tokens = (height // side) * (width // side)
    attention = rows * 8 * tokens**2 * itemsize
    found = _REQUESTED.search(f"{e} {e.__cause__}")
    failed = f"; one buffer of {int(found.group(1)) / 2**30:.1f} GiB could not be allocated" if found else ""
    asked = (f"{width}x{height}, {b} image{'s' if b > 1 else ''}"
             f"{f', guided (the {denoiser} runs 2 x batch rows)' if guided else ''}")
    head = (f"{asked} does not fit in {backend}'s memory ({e}){failed}. It needs roughly "
            f"{(weights + attention) / 2**30:.1f} GiB: {weights / 2**30:.1f} GiB of weights and "
            f"{attention / 2**30:.1f} GiB of {denoiser} attention scores where attention is not fused, which grow "
            "with the square of the pixel count")
    return DeviceMemoryError(
        f"{head}. Lower height and width (halving both cuts attention memory 16x), batch_size, or turn "
        "guidance off (guidance_scale=1)",
        cli=f"{head}. Lower --height and --width (halving both cuts attention memory 16x), --batch-size, or "
            "turn guidance off (--guidance 1)",
    )
