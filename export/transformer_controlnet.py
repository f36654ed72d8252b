"""The ControlNet components of the transformer families (SD 3 / 3.5, FLUX.1): ``controlnet_j`` and the in-memory
``unet_control``, built one way for both (export/sd3_controlnet.py and export/flux_controlnet.py say which inputs a
net reads and which samples it gives).

A net reads some of the transformer's own inputs, then the control image's VAE latents (``controlnet_cond``), a
Union net's control mode, and one scale per sample (``conditioning_scale``); it gives its samples on the
transformer's patch grid. ``unet_control`` takes the transformer's inputs, then every net's samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .onnx_export import ComponentSpec
from .streamed import IoSpec

Example = Callable[[torch.Generator, int, int, int], tuple[torch.Tensor, ...]]


def net_spec(name: str, module: torch.nn.Module, weights: torch.nn.Module, base_inputs: IoSpec, base_example: Example,
             reads: Sequence[str], latent_channels: int, samples: Sequence[str], grid: tuple[int | str, ...],
             mode: tuple[str, int] | None = None) -> ComponentSpec:
    """One net: ``reads`` (names of the transformer's ``base_inputs``, whose example inputs ``base_example`` makes),
    the control latents, ``mode`` (a Union net's mode input: its name and how many modes) and the scales; the
    ``samples`` out, each on ``grid``."""
    reads = list(reads)
    base_names = [n for n, _, _ in base_inputs]
    by_name = {n: (kind, shape) for n, kind, shape in base_inputs}

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        given = dict(zip(base_names, base_example(g, b, h, w)))
        # distinct per row and sample, so a column or row mix-up shows
        return (*(given[n] for n in reads), torch.randn(b, latent_channels, h, w, generator=g),
                *([torch.randint(0, mode[1], (b,), generator=g, dtype=torch.int32)] if mode else []),
                0.25 + 1.5 * torch.rand(b, len(samples), generator=g))

    return ComponentSpec(
        name=name,
        module=module,
        weights=weights,
        inputs=[*((n, *by_name[n]) for n in reads),
                ("controlnet_cond", "float", ("batch", latent_channels, "height", "width")),
                *([(mode[0], "int32", ("batch",))] if mode else []),
                ("conditioning_scale", "float32", ("batch", len(samples)))],
        outputs=[(n, "float", grid) for n in samples],
        example=example,
    )


def control_spec(module: torch.nn.Module, base: ComponentSpec, residuals: IoSpec, patch: int, inner: int,
                 residual_example: Callable[..., Sequence[torch.Tensor]] | None = None) -> ComponentSpec:
    """``unet_control`` of a transformer held in memory: ``module`` with the plain transformer's inputs (``base``),
    then the nets' samples (``residuals``), and its prediction out. ``residual_example(g, b, h, w, args)``: the
    samples fed with the transformer's example ``args`` (default: random ones of unit scale on the patch grid)."""

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        args = base.example(g, b, h, w)
        if residual_example is not None:
            return (*args, *residual_example(g, b, h, w, args))
        return (*args, *(torch.randn(b, h // patch, w // patch, inner, generator=g) for _ in residuals))

    return ComponentSpec(name="unet_control", module=module, weights=base.weights, inputs=[*base.inputs, *residuals],
                         outputs=[base.outputs[0]], example=example)
