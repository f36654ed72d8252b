"""The small in-memory graphs that keep a call's set-up on the device (first UNet input, img2img noising, the
inpainting UNet's extra channels, the VAE's cast, the prompt embeddings' join) and the sampler step graphs,
each loaded once per pipeline."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from . import step_graph
from .engine import Backend, Engine
from .errors import ArtifactError

log = logging.getLogger(__name__)


class DeviceGraphs:
    """A pipeline's cache of small graphs on its backend. A getter returns None where the backend cannot load
    that graph (a TensorRT engine folder built by an older sdrt lacks it), said once in the log: the caller then
    does that work on the host."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._graphs: dict[str, Engine | None] = {}
        self._steps: dict[tuple[Any, ...], Engine] = {}

    def clear(self) -> None:
        self._graphs.clear()
        self._steps.clear()

    def get(self, key: str, graph_bytes: Callable[[], bytes], what: str, name: str | None = None) -> Engine | None:
        if key not in self._graphs:
            try:
                self._graphs[key] = self.backend.load(graph_bytes(), name or key)
            except ArtifactError as e:
                log.info("%s on the host: %s", what, e)
                self._graphs[key] = None
        return self._graphs[key]

    def step(self, guided: bool, dtype: np.dtype[Any], inpaint_mode: str | None = None,
             rescale: bool = False) -> Engine:
        """The sampler step graph of this variant (always loadable: the step loop needs it)."""
        key = (guided, dtype.name, inpaint_mode, rescale)
        if key not in self._steps:
            self._steps[key] = self.backend.load(step_graph.step_graph_bytes(guided, dtype, inpaint_mode, rescale),
                                                 step_graph.step_engine_name(guided, inpaint_mode, rescale))
        return self._steps[key]

    def first_input(self, guided: bool, dtype: np.dtype[Any], concat: bool) -> Engine | None:
        name = step_graph.input_engine_name(guided, concat)
        return self.get(f"{name}_{dtype.name}", lambda: step_graph.input_graph_bytes(guided, dtype, concat),
                        "the first UNet input is computed", name)

    def extra(self, guided: bool, src: np.dtype[Any], dst: np.dtype[Any]) -> Engine | None:
        return self.get(step_graph.extra_engine_name(guided, src, dst),
                        lambda: step_graph.extra_graph_bytes(guided, src, dst),
                        "the inpainting UNet's extra channels are assembled")

    def cast(self, src: np.dtype[Any], dst: np.dtype[Any]) -> Engine | None:
        return self.get(step_graph.cast_engine_name(src, dst), lambda: step_graph.cast_graph_bytes(src, dst),
                        "the latents are cast")

    def noise(self, src: np.dtype[Any], dst: np.dtype[Any]) -> Engine | None:
        return self.get(step_graph.noise_engine_name(src, dst), lambda: step_graph.noise_graph_bytes(src, dst),
                        "the encoded image is noised")

    def loaded(self) -> dict[str, Engine | None]:
        """The small graphs loaded so far, by key (None: the backend had none; the work runs on the host)."""
        return dict(self._graphs)
