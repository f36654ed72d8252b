"""An export made with ControlNets holds two UNets (the plain ``unet`` and ``unet_control``, which takes the nets'
residuals): each loads on the first call that runs it, so a process that runs one kind of call holds one UNet's
weights. Checked on ort-cpu, openvino and ort-cuda's code path: which UNets are loaded after each kind of call, the
images equal to those of the same export loaded with every engine up front (the way every backend loaded before;
their agreement with diffusers' ControlNet pipelines is test_controlnet_parity.py's), the manifest's description of
each UNet equal to its loaded graph's, one load under threads calling at once, and the errors of a missing or
corrupt graph. TensorRT loads both with the model (test_controlnet_parity.py's LoRA case, on the fakes)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdrt.runtime.engine import Backend
from sdrt.runtime.errors import ArtifactError
from sdrt.runtime.loading import Deferred
from sdrt.runtime.manifest import ExportManifest
from sdrt.runtime.pipeline import CONTROL_UNET, Pipeline

from .helpers.inputs import control_image
from .helpers.pipelines import loaded_on

PROMPT = "a house by a lake, evening light"
KW: dict[str, Any] = {"height": 64, "width": 64, "steps": 3, "guidance_scale": 6.0, "sampler": "dpmpp-2m", "seed": 5}
UNETS = {"unet", CONTROL_UNET}


def _control() -> dict[str, Any]:
    return {"control_images": [control_image(10), None], "control_scales": [0.9, 1.0]}


def _image(pipe: Pipeline, **kw: Any) -> np.ndarray:
    return np.asarray(pipe(PROMPT, **KW, **kw).images[0])


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino", "ort-cuda-path"])
def test_each_unet_loads_on_the_first_call_that_runs_it(tiny_controlnet_export, monkeypatch: pytest.MonkeyPatch,
                                                        backend: str) -> None:
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    with monkeypatch.context() as m:  # the same export with every engine loaded up front, as before
        m.setattr(Backend, "loads_on_demand", False)
        with loaded_on(folder, backend, monkeypatch) as eager:
            assert UNETS <= set(eager.engines)
            want_control, want_plain = _image(eager, **_control()), _image(eager)
    with loaded_on(folder, backend, monkeypatch) as pipe:  # control calls first
        assert not UNETS & set(pipe.engines) and "controlnet_0" in pipe.engines
        np.testing.assert_array_equal(_image(pipe, **_control()), want_control)
        assert UNETS & set(pipe.engines) == {CONTROL_UNET}
        np.testing.assert_array_equal(_image(pipe, **_control()), want_control)
        np.testing.assert_array_equal(_image(pipe), want_plain)  # a server mixing both: each loaded once
        assert UNETS <= set(pipe.engines)
        np.testing.assert_array_equal(_image(pipe, **_control()), want_control)
    with loaded_on(folder, backend, monkeypatch) as pipe:  # plain calls first (every net left out: plain too)
        np.testing.assert_array_equal(_image(pipe), want_plain)
        np.testing.assert_array_equal(_image(pipe, control_images=[None, None]), want_plain)
        assert UNETS & set(pipe.engines) == {"unet"}
        np.testing.assert_array_equal(_image(pipe, **_control()), want_control)
        assert UNETS <= set(pipe.engines)


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino"])
def test_the_manifest_describes_each_unet_as_its_graph(tiny_controlnet_export, monkeypatch: pytest.MonkeyPatch,
                                                       backend: str) -> None:
    """What is read of a UNet not loaded yet (the latents' dtype, which inputs it takes, their widths and channels)
    comes from the manifest: the same names, dtypes and fixed sizes as the loaded graph's, for both UNets."""
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    with loaded_on(folder, backend, monkeypatch) as pipe:
        dtype, guided = pipe.dtype, pipe.uses_guidance(6.0)
        _image(pipe, **_control())
        _image(pipe)
        assert pipe.dtype == dtype == np.float32 and pipe.uses_guidance(6.0) == guided is True
        for name in sorted(UNETS):
            described = Deferred(pipe.backend, name, pipe.manifest.components[name])
            engine = pipe.engines[name]
            for want, got in ((engine.inputs, described.inputs), (engine.outputs, described.outputs)):
                assert list(got) == list(want), name
                for k, spec in want.items():
                    assert got[k].dtype == spec.dtype, (name, k)
                    fixed = [d if isinstance(d, int) else None for d in spec.shape]
                    assert [d if isinstance(d, int) else None for d in got[k].shape] == fixed, (name, k)
            with pytest.raises(RuntimeError, match="not loaded"):
                described.run({})


def test_threads_calling_at_once_load_the_unet_once(tiny_controlnet_export) -> None:
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    with Pipeline.load(folder, backend="ort-cpu") as pipe:
        loads: list[str] = []
        real = pipe.backend.load
        pipe.backend.load = lambda path, name, **kw: loads.append(name) or real(path, name, **kw)  # type: ignore[method-assign]
        out: list[np.ndarray] = []
        threads = [threading.Thread(target=lambda: out.append(_image(pipe, **_control()))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(out) == 2 and loads.count(CONTROL_UNET) == 1 and "unet" not in loads
        np.testing.assert_array_equal(out[0], out[1])


def test_a_missing_unet_is_refused_at_load_and_a_corrupt_one_on_its_first_call(tiny_controlnet_export,
                                                                                tmp_path: Path) -> None:
    """A graph that is not there is the load's error, as when every engine loaded with the model; one that cannot be
    read is the error of the call that first runs it (the backend's own, the load's message), and the pipeline still
    runs the other kind of call."""
    folder = tmp_path / "export"
    shutil.copytree(tiny_controlnet_export("sd15-tiny", "fp32", 2), folder)
    graph = folder / ExportManifest.read(folder).components[CONTROL_UNET].path
    saved = graph.read_bytes()
    graph.unlink()
    with pytest.raises(ArtifactError, match=f"{graph} is missing; re-export the model"):
        Pipeline.load(folder, backend="ort-cpu")
    graph.write_bytes(saved[: len(saved) // 3])
    with Pipeline.load(folder, backend="ort-cpu") as pipe:
        with pytest.raises(ArtifactError, match=f"cannot load {graph}: .*corrupt or incomplete"):
            pipe(PROMPT, **KW, **_control())
        assert CONTROL_UNET not in pipe.engines
        assert np.asarray(pipe(PROMPT, **KW).images[0]).std() > 5


def test_the_text_stage_sees_engines_loaded_or_replaced_after_it_was_built(tiny_controlnet_export,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The text stage outlives the call that builds it: it reads the pipeline's engines through a live view, so a UNet
    loaded later replaces its description there, and an engine swapped for a while (as a test's monkeypatch does)
    is swapped back for it too (a copy taken when the stage was built kept the swapped one)."""
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    with loaded_on(folder, "ort-cpu") as pipe:
        encoder = pipe.engines["text_encoder"]
        with monkeypatch.context() as m:
            m.setitem(pipe.engines, "text_encoder", None)
            text = pipe._conditioning()  # built while the encoder was swapped out
            assert text.engines["text_encoder"] is None
        assert text.engines["text_encoder"] is encoder
        assert isinstance(text.engines["unet"], Deferred)
        _image(pipe)  # a plain call loads the plain UNet
        assert text.engines["unet"] is pipe.engines["unet"] and not isinstance(text.engines["unet"], Deferred)
