"""The small in-memory graphs that keep a call's set-up on the device (first UNet input, img2img noising, the
inpainting UNet's extra channels, the VAE's cast, the prompt embeddings' join) and the sampler step graphs,
each loaded once per pipeline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import step_graph
from .engine import Backend, Engine
from .errors import ArtifactError


class DeviceGraphs:
    """A pipeline's cache of small graphs on its backend. Every backend loads them all (ONNX Runtime and
    OpenVINO from the bytes, TensorRT from the engines ``sdrt build`` prebuilt; a folder built by an older
    sdrt, without them, is refused when its engine manifest is read): there is no host path. A graph that
    cannot be loaded is an ArtifactError naming it and the work it does."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._graphs: dict[str, Engine] = {}
        self._steps: dict[tuple[Any, ...], Engine] = {}

    def clear(self) -> None:
        self._graphs.clear()
        self._steps.clear()

    def get(self, key: str, graph_bytes: Callable[[], bytes], what: str, name: str | None = None) -> Engine:
        if key not in self._graphs:
            try:
                self._graphs[key] = self.backend.load(graph_bytes(), name or key)
            except ArtifactError as e:
                raise ArtifactError(f"{what} on the device by the graph {name or key}, which the {self.backend.name} "
                                    f"backend could not load: {e}") from e
        return self._graphs[key]

    def step(self, guided: bool, dtype: np.dtype[Any], inpaint_mode: str | None = None,
             rescale: bool = False) -> Engine:
        """The sampler step graph of this variant (always loadable: the step loop needs it)."""
        key = (guided, dtype.name, inpaint_mode, rescale)
        if key not in self._steps:
            self._steps[key] = self.backend.load(step_graph.step_graph_bytes(guided, dtype, inpaint_mode, rescale),
                                                 step_graph.step_engine_name(guided, inpaint_mode, rescale))
        return self._steps[key]

    def first_input(self, guided: bool, dtype: np.dtype[Any], concat: bool) -> Engine:
        name = step_graph.input_engine_name(guided, concat)
        return self.get(f"{name}_{dtype.name}", lambda: step_graph.input_graph_bytes(guided, dtype, concat),
                        "the first UNet input is computed", name)

    def extra(self, guided: bool, src: np.dtype[Any], dst: np.dtype[Any], mask_channels: int = 1) -> Engine:
        return self.get(step_graph.extra_engine_name(guided, src, dst, mask_channels),
                        lambda: step_graph.extra_graph_bytes(guided, src, dst, mask_channels),
                        "the inpainting UNet's extra channels are assembled")

    def cast(self, src: np.dtype[Any], dst: np.dtype[Any]) -> Engine:
        return self.get(step_graph.cast_engine_name(src, dst), lambda: step_graph.cast_graph_bytes(src, dst),
                        "the latents are cast")

    def noise(self, src: np.dtype[Any], dst: np.dtype[Any]) -> Engine:
        return self.get(step_graph.noise_engine_name(src, dst), lambda: step_graph.noise_graph_bytes(src, dst),
                        "the encoded image is noised")

    def loaded(self) -> dict[str, Engine]:
        """The small graphs loaded so far, by key."""
        return dict(self._graphs)
