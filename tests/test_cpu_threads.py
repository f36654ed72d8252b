"""``SDRT_THREADS``: the CPU threads of a backend built without ``threads=`` (ort-cpu's intra-op threads, OpenVINO's
``INFERENCE_NUM_THREADS``); an explicit ``threads=`` wins; a bad value is refused by name."""

from __future__ import annotations

import pytest

from sdrt.runtime.cpu_threads import ENV, default_threads
from sdrt.runtime.errors import InputError
from sdrt.runtime.ort_backend import OrtBackend


def test_unset_or_empty_leaves_the_backend_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert default_threads() is None and OrtBackend("cpu").threads is None
    monkeypatch.setenv(ENV, " ")
    assert default_threads() is None


def test_a_count_applies_where_threads_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "3")
    assert default_threads() == 3
    assert OrtBackend("cpu").threads == 3
    assert OrtBackend("cpu", threads=2).threads == 2


@pytest.mark.parametrize("raw", ["0", "-2", "two", "1.5"])
def test_a_bad_value_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(ENV, raw)
    with pytest.raises(InputError, match=rf"SDRT_THREADS='{raw}' is not a thread count: .* 1 or more"):
        OrtBackend("cpu")


def test_ort_sessions_and_openvino_take_it(monkeypatch: pytest.MonkeyPatch, tiny_export) -> None:
    """The count reaches the session options ONNX Runtime builds and OpenVINO's compiled models."""
    from sdrt.runtime.pipeline import Pipeline

    monkeypatch.setenv(ENV, "1")
    folder = tiny_export("sd15-tiny")
    with Pipeline.load(folder, backend="ort-cpu") as pipe:
        opts = pipe.engines["vae_decoder"].session.get_session_options()
        assert opts.intra_op_num_threads == 1
    pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino extra")
    from sdrt.runtime.ov_backend import OvBackend

    be = OvBackend("CPU", cache_dir=False)
    assert be.config["INFERENCE_NUM_THREADS"] == 1
    be.close()
