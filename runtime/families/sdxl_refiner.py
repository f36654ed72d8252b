"""The SDXL refiner: an SDXL-family expert for the end of the schedule. Only the OpenCLIP bigG encoder; its time
ids carry an aesthetic score instead of the target size; it continues a base's latents (or refines an image)
and does not generate from noise. Its manifest says ``family: sdxl`` and ``refiner: true``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .base import Family, check_score

AESTHETIC_DEFAULTS = (6.0, 2.5)  # diffusers' aesthetic_score, negative_aesthetic_score


@dataclass(frozen=True)
class SdxlRefinerFamily(Family):
    @property
    def time_ids(self) -> int:
        return 5

    def check_scores(self, scores: tuple[float | None, float | None] | None) -> tuple[float, float]:
        given = (None, None) if scores is None else scores
        pos, neg = (check_score(label, v, d) for label, v, d in
                    zip(("aesthetic_score", "negative_aesthetic_score"), given, AESTHETIC_DEFAULTS, strict=True))
        return pos, neg

    def extra_conditioning(self, height: int, width: int, batch: int, guided: bool,
                           scores: tuple[float | None, float | None] | None = None) -> dict[str, np.ndarray]:
        """[h, w, 0, 0, aesthetic_score] per row, the negative rows negative_aesthetic_score
        (diffusers' ``StableDiffusionXLImg2ImgPipeline`` with ``requires_aesthetics_score``)."""
        pos_score, neg_score = self.check_scores(scores)
        pos, neg = [height, width, 0, 0, pos_score], [height, width, 0, 0, neg_score]
        rows = [neg] * batch + [pos] * batch if guided else [pos] * batch
        return {"time_ids": np.array(rows, np.float64)}

    def export_time_ids(self, size: int) -> list[float]:
        return [float(size), size, 0, 0, AESTHETIC_DEFAULTS[0]]

    def refuse_generation(self, folder: Path) -> InputError:
        head = (f"{folder} is an SDXL refiner: it refines, it does not generate from noise (it has only the second "
                "text encoder and was trained on the end of the schedule)")
        return InputError(f"{head}. Pass it as the refiner of a base model (base(prompt, refiner=refiner_pipeline)), "
                          "or give it an image to refine (image=..., strength=0.3)",
                          cli=f"{head}. Pass an SDXL base export as the model and this folder as --refiner, or give "
                              "it an image with --init-image (and --strength 0.3)")


SDXL_REFINER = SdxlRefinerFamily(key="sdxl", label="SDXL refiner", encoders=("text_encoder_2",), penultimate=True,
                                 pooled=True, generates=False, diffusers_pipeline="StableDiffusionXL")
