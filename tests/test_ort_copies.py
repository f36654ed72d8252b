"""Host <-> device copies of ort-cuda's code path, counted on the real onnxruntime (CPU EP, CPU memory).

On ort-cuda every tensor is an OrtValue, so every copy between the host and the device goes through one of
three calls of ONNX Runtime's Python API: ``OrtValue.ortvalue_from_numpy`` (an upload), ``OrtValue.numpy``
(a download) and ``OrtValue.update_inplace`` with a numpy array (an upload into a fixed buffer; with an
OrtValue it is a copy on the device). :func:`ort_copies` counts those calls, as tests/test_trt_pipeline.py
counts the fake CUDA runtime's copies, over the same backend the other ort-cuda tests use: ort-cuda in all
but the device (OrtValues and IO binding in CPU memory on the CPU EP).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from sdrt.runtime import ort_backend
from sdrt.runtime.ort_backend import OrtBackend
from sdrt.runtime.ort_loop import FusedStepLoop
from sdrt.runtime.pipeline import Pipeline

from .helpers.pipelines import ort_cuda_on_cpu


@dataclass
class Copies:
    up: int = 0  # host -> device: OrtValues made from numpy, update_inplace from numpy
    down: int = 0  # device -> host: OrtValue.numpy
    on_device: int = 0  # update_inplace from an OrtValue
    down_shapes: Counter[tuple[int, ...]] = field(default_factory=Counter)
    up_shapes: Counter[tuple[int, ...]] = field(default_factory=Counter)

    def snapshot(self) -> Copies:
        return Copies(self.up, self.down, self.on_device, Counter(self.down_shapes), Counter(self.up_shapes))

    def since(self, s: Copies) -> Copies:
        return Copies(self.up - s.up, self.down - s.down, self.on_device - s.on_device,
                      self.down_shapes - s.down_shapes, self.up_shapes - s.up_shapes)


@pytest.fixture
def ort_copies(monkeypatch: pytest.MonkeyPatch) -> Copies:
    """Counts every host <-> device copy made through onnxruntime's OrtValue API while the test runs."""
    ort = ort_backend.ort_module()
    counts = Copies()
    from_numpy = ort.OrtValue.ortvalue_from_numpy
    to_numpy = ort.OrtValue.numpy
    update = ort.OrtValue.update_inplace

    def counted_from_numpy(cls: Any, a: np.ndarray, *args: Any, **kw: Any) -> Any:
        counts.up += 1
        counts.up_shapes[np.shape(a)] += 1
        return from_numpy(a, *args, **kw)

    def counted_numpy(self: Any) -> np.ndarray:
        counts.down += 1
        counts.down_shapes[tuple(self.shape())] += 1
        return to_numpy(self)

    def counted_update(self: Any, data: Any) -> None:
        if isinstance(data, np.ndarray):
            counts.up += 1
            counts.up_shapes[data.shape] += 1
        else:
            counts.on_device += 1
        update(self, data)

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", classmethod(counted_from_numpy))
    monkeypatch.setattr(ort.OrtValue, "numpy", counted_numpy)
    monkeypatch.setattr(ort.OrtValue, "update_inplace", counted_update)
    return counts


def _ort_cuda_on_cpu(monkeypatch: pytest.MonkeyPatch, cuda_graph: bool, fused: bool | None) -> None:
    """Pipeline.load(backend="ort-cuda") gets ort-cuda in all but the device."""

    def backend(*a: Any, **k: Any) -> OrtBackend:
        return ort_cuda_on_cpu(monkeypatch, cuda_graph=cuda_graph, fused_step=fused)

    monkeypatch.setattr("sdrt.runtime.backends.make_backend", backend)


def test_the_counter_sees_each_kind_of_copy(ort_copies: Copies) -> None:
    """The counting wrapper itself, on hand-made OrtValues: 2 uploads, 1 device copy, 1 download."""
    ort = ort_backend.ort_module()
    a = np.arange(6, dtype=np.float32)
    src = ort.OrtValue.ortvalue_from_numpy(a, "cpu", 0)  # up
    dst = ort.OrtValue.ortvalue_from_shape_and_type([6], np.float32, "cpu", 0)  # an allocation: no copy
    dst.update_inplace(a * 2)  # up
    dst.update_inplace(src)  # on the device
    np.testing.assert_array_equal(dst.numpy(), a)  # down
    assert (ort_copies.up, ort_copies.on_device, ort_copies.down) == (2, 1, 1)
    assert ort_copies.down_shapes == Counter({(6,): 1})


@pytest.mark.parametrize("cuda_graph,fused", [(True, None), (False, None)])
def test_host_device_copies_per_call(tiny_export, monkeypatch: pytest.MonkeyPatch, ort_copies: Copies,
                                     cuda_graph: bool, fused: bool | None) -> None:
    """A warm SD1.5 txt2img call on ort-cuda copies to the host only the decoded pixels and their finite flags
    (the prompt's embeddings go from the text encoder to the UNet on the device; the latents from the loop to
    the VAE), for 3 steps as for 6, with the composed UNet + step loop and with the engines step by step. The
    uploads per call are the prompt's token ids and the per-step inputs: they grow by a fixed number per step
    (ort-cuda has no row view of a device table, so each step's timestep and coefficient row go up apart)."""
    folder = tiny_export("sd15-tiny")
    _ort_cuda_on_cpu(monkeypatch, cuda_graph, fused)
    kw: dict[str, Any] = {"seed": 1, "sampler": "euler-a", "height": 64, "width": 64}
    counts: dict[int, Copies] = {}
    with Pipeline.load(folder, backend="ort-cuda") as pipe:
        for steps in (3, 6):
            pipe("a red fox", steps=steps, **kw)  # warm: the composed session's buffers exist
            snap = ort_copies.snapshot()
            res = pipe("a red fox", steps=steps, **kw)
            counts[steps] = ort_copies.since(snap)
            assert len(res.images) == 1 and res.timings["clock"] == "host"
        loop = next(iter(pipe._loops.values()))
        assert isinstance(loop, FusedStepLoop) == cuda_graph
    # down: the images [1, 64, 64, 3] uint8 and the finite flags [1] bool, nothing else
    for steps in (3, 6):
        assert counts[steps].down == 2, counts
        assert counts[steps].down_shapes == Counter({(1, 64, 64, 3): 1, (1,): 1}), counts
    # up, by shape: the token ids of prompt and negative prompt [2, 77] (the text encoder's all-ones attention mask
    # of that shape went up once, on the warm-up call, and stays on the device; only compel's MASK downweighting
    # uploads one per call); the first latents [1, 4, 8, 8]; the
    # first-input graph's scale [1]; the guidance scale []; per step the timestep of both UNet rows [2], the
    # sampler's coefficient row [columns] and euler-a's noise [1, 4, 8, 8]. The plain loop also uploads a
    # zero latent per call (the first x0); the composed loop keeps one on the device.
    columns = ref_columns(folder)
    for steps in (3, 6):
        latent_sized = 1 + steps + (0 if cuda_graph else 1)
        want = Counter({(2, 77): 1, (1, 4, 8, 8): latent_sized, (1,): 1, (): 1, (2,): steps, (columns,): steps})
        assert counts[steps].up_shapes == want, counts
        assert counts[steps].up == sum(want.values())
    assert counts[6].up - counts[3].up == 3 * 3  # 3 uploads a step


def ref_columns(folder: Any) -> int:
    with Pipeline.load(folder, backend="ort-cpu") as ref:
        return int(ref.plan("euler-a", 3).table.shape[1])
