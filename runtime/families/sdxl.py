"""SDXL base: CLIP ViT-L and OpenCLIP bigG (penultimate hidden states joined on channels, bigG's projected
pooled output), size-and-crop time ids, zeros as the negatives of an empty negative prompt."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Family


@dataclass(frozen=True)
class SdxlFamily(Family):
    @property
    def time_ids(self) -> int:
        return 6

    def extra_conditioning(self, height: int, width: int, batch: int, guided: bool,
                           scores: tuple[float | None, float | None] | None = None) -> dict[str, np.ndarray]:
        """diffusers' ``_get_add_time_ids`` with the original and target size both the image's and no crop:
        [h, w, 0, 0, h, w] per row."""
        self.check_scores(scores)
        rows = (2 if guided else 1) * batch
        return {"time_ids": np.array([[height, width, 0, 0, height, width]] * rows, np.float64)}

    def export_time_ids(self, size: int) -> list[float]:
        return [float(size), size, 0, 0, size, size]


SDXL = SdxlFamily(key="sdxl", label="SDXL base", encoders=("text_encoder", "text_encoder_2"), penultimate=True,
                  pooled=True, zero_negatives=True, diffusers_pipeline="StableDiffusionXL")
