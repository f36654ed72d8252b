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


def test_sdrt_generate_takes_it_and_names_a_bad_value(monkeypatch: pytest.MonkeyPatch, tiny_export, tmp_path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The command (which has no --threads) runs its backend on the count; a bad one fails it before any image,
    naming the variable."""
    from sdrt.cli import main
    from sdrt.runtime import ort_backend

    made: list[int | None] = []
    real = ort_backend.OrtBackend.close

    def close(self: ort_backend.OrtBackend) -> None:
        made.append(self.threads)
        real(self)

    monkeypatch.setattr(ort_backend.OrtBackend, "close", close)
    args = ["generate", str(tiny_export("sd15-tiny")), "--backend", "ort-cpu", "--prompt", "a cat", "--steps", "1",
            "--height", "64", "--width", "64"]
    monkeypatch.setenv(ENV, "1")
    assert main([*args, "-o", str(tmp_path / "one.png")]) == 0
    assert made == [1] and (tmp_path / "one.png").is_file()
    monkeypatch.setenv(ENV, "two")
    assert main([*args, "-o", str(tmp_path / "two.png")]) == 1
    assert "SDRT_THREADS='two' is not a thread count" in capsys.readouterr().err
    assert not (tmp_path / "two.png").exists()
