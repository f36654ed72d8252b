"""The quality suite: fixed prompts and seeds, the images a pipeline makes for them, and their score.

``score_pipeline`` runs an sdrt ``Pipeline`` (any backend, precision or sampler) over the suite and reads
every image back with ``score.read``; ``score_diffusers`` does the same with diffusers' own pipeline (what
the training records in ``training.json``, and what sdrt's images are held to). Both start each image from
the same noise (``latents_for``), so their scores differ only by what the runtimes compute differently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import score, shapes

SUITE_SEED = 4242  # the suite's scenes (the training pictures use other seeds)
N_PROMPTS = 30
STEPS = 20
SAMPLER = "dpmpp-2m"
GUIDANCE = 5.0
LATENT_CHANNELS = 4
LATENT_SIDE = shapes.SIZE // 4  # the shapes model's VAE reduces 4 x per side


def suite(n: int = N_PROMPTS) -> list[shapes.Scene]:
    """The suite's scenes; their captions are the prompts."""
    return shapes.scenes(SUITE_SEED, n)


def latents_for(index: int) -> np.ndarray:
    """The starting noise of prompt ``index``: float32 [1, 4, 16, 16], the same for every runtime."""
    rng = np.random.default_rng(10_000 + index)
    return rng.standard_normal((1, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE), dtype=np.float32)


@dataclass(frozen=True)
class Report:
    """Share of images that show each asked attribute, and all four at once (``overall``)."""

    n: int
    accuracy: dict[str, float]
    overall: float

    def summary(self) -> str:
        parts = ", ".join(f"{a} {self.accuracy[a]:.2f}" for a in score.ATTRIBUTES)
        return f"overall {self.overall:.2f} ({parts}) on {self.n} prompts"

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "overall": round(self.overall, 4),
                "accuracy": {a: round(v, 4) for a, v in self.accuracy.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        return cls(int(d["n"]), {a: float(v) for a, v in d["accuracy"].items()}, float(d["overall"]))


def grade(scene: shapes.Scene, reading: score.Reading) -> dict[str, bool]:
    """Which of the scene's attributes the picture shows."""
    got = reading.attributes()
    return {a: got[a] == want for a, want in scene.attributes().items()}


def report(scenes: Sequence[shapes.Scene], images: Sequence[Any]) -> Report:
    """Score ``images`` (uint8 arrays or PIL images), one per scene, against what each scene asked."""
    if len(scenes) != len(images) or not scenes:
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes; give one image per scene")
    grades = [grade(s, score.read(img)) for s, img in zip(scenes, images)]
    acc = {a: float(np.mean([g[a] for g in grades])) for a in score.ATTRIBUTES}
    return Report(len(grades), acc, float(np.mean([all(g.values()) for g in grades])))


def ceiling(n: int = 300, seed: int = 777) -> Report:
    """The score of pictures drawn by the data set's own renderer (held out from training): the most any
    model can reach."""
    scenes = shapes.scenes(seed, n)
    return report(scenes, [shapes.render(s) for s in scenes])


def images_pipeline(pipe: Any, scenes: Sequence[shapes.Scene], *, steps: int = STEPS, sampler: str = SAMPLER,
                    guidance: float = GUIDANCE, batch: int = 10,
                    callback: Callable[[int, int], None] | None = None, **call: Any) -> list[Any]:
    """sdrt's images for ``scenes`` (prompt i starts from ``latents_for(i)``), ``batch`` prompts per call;
    ``call``: further keywords of every call (``cache="deepcache"``, ``cache_interval=3``, ...)."""
    images: list[Any] = []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i: i + batch]
        lat = np.concatenate([latents_for(i + k) for k in range(len(chunk))])
        result = pipe([s.caption for s in chunk], latents=lat, steps=steps, sampler=sampler,
                      guidance_scale=guidance, height=shapes.SIZE, width=shapes.SIZE, **call)
        images += result.images
        if callback is not None:
            callback(len(images), len(scenes))
    return images


def score_pipeline(pipe: Any, *, n: int = N_PROMPTS, **options: Any) -> Report:
    """An sdrt ``Pipeline`` over the suite's first ``n`` prompts (options: those of ``images_pipeline``)."""
    scenes = suite(n)
    return report(scenes, images_pipeline(pipe, scenes, **options))


def images_diffusers(pipe: Any, scenes: Sequence[shapes.Scene], *, steps: int = STEPS,
                     guidance: float = GUIDANCE, batch: int = 10) -> list[np.ndarray]:
    """diffusers' ``StableDiffusionPipeline`` (dpmpp-2m: its DPMSolverMultistepScheduler) on the same noise,
    ``batch`` prompts per call as ``images_pipeline`` calls sdrt."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    out: list[np.ndarray] = []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i: i + batch]
        lat = np.concatenate([latents_for(i + k) for k in range(len(chunk))])
        with torch.no_grad():
            images = pipe([s.caption for s in chunk], latents=torch.from_numpy(lat), num_inference_steps=steps,
                          guidance_scale=guidance, height=shapes.SIZE, width=shapes.SIZE, output_type="np").images
        out += [(img * 255).round().astype(np.uint8) for img in images]
    return out


def score_diffusers(pipe: Any, *, n: int = N_PROMPTS, steps: int = STEPS, guidance: float = GUIDANCE) -> Report:
    scenes = suite(n)
    return report(scenes, images_diffusers(pipe, scenes, steps=steps, guidance=guidance))


def large_share(images: Sequence[Any]) -> float:
    """The share of ``images`` whose shape is larger than any the base model was trained on (the LoRA's variant)."""
    return float(np.mean([score.read(img).large for img in images]))


def lora_effect(model: Any, lora: Any, scale: float = 1.0) -> dict[str, Any]:
    """diffusers' pipeline on the suite without and with the LoRA file (at ``scale``): the share of large shapes
    and the score of the four asked attributes, each way."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, local_files_only=True)
    scenes = suite()
    plain = images_diffusers(pipe, scenes)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=scale)
    styled = images_diffusers(pipe, scenes)
    return {"scale": scale, "large_share_without": large_share(plain), "large_share_with": large_share(styled),
            "score_without": report(scenes, plain).to_dict(), "score_with": report(scenes, styled).to_dict()}
