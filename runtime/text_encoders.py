"""A model's text encoders run on a backend, whatever the prompt dialect: their feeds (the token ids, and the
attention mask where an encoder takes one) and their runs over many rows in batches of a call's shape."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .compel_prompts import MASK_INPUT
from .engine import Array, Backend, Engine


class EncoderRunner:
    """The text encoders (``engines`` by name) on ``backend``."""

    def __init__(self, backend: Backend, engines: Mapping[str, Engine]) -> None:
        self.backend = backend
        self.engines = engines
        # the all-ones attention mask of each (shape, dtype) a text encoder was fed, kept on the device: every call
        # but a MASK-downweighted compel prompt's feeds it, so it goes up once rather than once per call
        self._ones_masks: dict[tuple[tuple[int, ...], str], Array] = {}

    def feeds(self, name: str, ids: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Array]:
        """A text encoder's inputs for ``ids`` [B, T] on the device: with its attention mask where it takes one
        (``mask``, or all ones: the graph's own reading of the ids)."""
        be = self.backend
        feeds = {"input_ids": be.to_device(np.ascontiguousarray(ids))}
        spec = self.engines[name].inputs.get(MASK_INPUT)
        if spec is None:
            return feeds
        if mask is None or mask.all():  # the graph's own reading of the ids: the cached device copy
            key = (tuple(ids.shape), np.dtype(spec.dtype).str)
            if key not in self._ones_masks:
                self._ones_masks[key] = be.to_device(np.ones(ids.shape, spec.dtype))
            feeds[MASK_INPUT] = self._ones_masks[key]
        else:
            feeds[MASK_INPUT] = be.to_device(np.ascontiguousarray(mask.astype(spec.dtype)))
        return feeds

    def rows(self, name: str, ids: np.ndarray, masks: np.ndarray, batch: int, lora: Mapping[str, Array]
             ) -> tuple[np.ndarray, np.ndarray | None]:
        """One encoder's outputs (hidden_states, text_embeds or None) for ``ids`` [N, 77] read with the attention
        masks ``masks`` [N, 77] (fed where the encoder takes them: then every one is all ones but MASK's), on the
        host, run in batches of ``batch`` rows (the last one filled with its first row)."""
        be = self.backend
        hidden, embeds = [], []
        for start in range(0, len(ids), batch):
            part, mask = ids[start:start + batch], masks[start:start + batch]
            n = len(part)
            if n < batch:
                part = np.concatenate([part, np.repeat(part[:1], batch - n, axis=0)])
                mask = np.concatenate([mask, np.repeat(mask[:1], batch - n, axis=0)])
            out = self.engines[name]({**self.feeds(name, part, mask), **lora})
            hidden.append(be.to_host(out["hidden_states"])[:n])
            if "text_embeds" in out:
                embeds.append(be.to_host(out["text_embeds"])[:n])
        return np.concatenate(hidden), (np.concatenate(embeds) if embeds else None)
