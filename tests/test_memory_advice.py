"""An allocation failure explained (runtime/memory_advice.py): the request, a rough need counted by hand for a UNet
model and a transformer model, and what to lower."""

from __future__ import annotations

from sdrt.runtime.errors import DeviceMemoryError
from sdrt.runtime.manifest import ExportManifest
from sdrt.runtime.memory_advice import explain


def test_a_unet_models_need_counts_latent_pixels(tiny_export) -> None:
    m = ExportManifest.read(tiny_export("sd15-tiny"))
    weights = sum(c.size_bytes for c in m.components.values())
    err = explain(DeviceMemoryError("unet: out of memory"), m, "ort-cuda", 4, 1, True, 512, 512)
    # 512 px / 8 = 64 latent pixels a side: 4096 tokens; 2 rows x 8 heads x 4096^2 scores x 4 bytes = 1 GiB
    assert str(err).startswith("512x512, 1 image, guided (the UNet runs 2 x batch rows) does not fit in ort-cuda's "
                               "memory (unet: out of memory). It needs roughly "
                               f"{(weights + 2**30) / 2**30:.1f} GiB: {weights / 2**30:.1f} GiB of weights and 1.0 GiB "
                               "of UNet attention scores")
    assert "--height and --width" in err.for_cli() and "guidance_scale=1" in str(err)


def test_a_transformer_models_need_counts_its_patches(sd3_export) -> None:
    m = ExportManifest.read(sd3_export("sd3-tiny"))
    weights = sum(c.size_bytes for c in m.components.values())
    err = explain(DeviceMemoryError("unet: out of memory"), m, "tensorrt", 4, 2, False, 1024, 1024)
    # 1024 px / 16 (2x2 patches of 8-pixel latents) = 64 patches a side: 4096 tokens, as SD 1.5's UNet at 512;
    # 2 images unguided: 2 rows x 8 heads x 4096^2 x 4 bytes = 1 GiB (counting latent pixels would say 16)
    assert str(err).startswith("1024x1024, 2 images does not fit in tensorrt's memory (unet: out of memory). It "
                               f"needs roughly {(weights + 2**30) / 2**30:.1f} GiB: {weights / 2**30:.1f} GiB of "
                               "weights and 1.0 GiB of transformer attention scores")
    guided = explain(DeviceMemoryError("x"), m, "tensorrt", 4, 1, True, 1024, 1024)
    assert "guided (the transformer runs 2 x batch rows)" in str(guided)
