"""After ``pip install .`` alone (no export extra), the commands that need PyTorch say which extra to
install, with the commands, instead of a ModuleNotFoundError traceback. The extra's packages are made
unimportable in a subprocess, as if they were not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what pip install "sdrt[export]" adds to the runtime's dependencies (pyproject.toml)
EXPORT_EXTRA = ("torch", "diffusers", "transformers", "accelerate", "onnxscript", "safetensors")
HIDE = f"""
import sys
for name in {EXPORT_EXTRA!r}:
    sys.modules[name] = None  # import raises ModuleNotFoundError, find_spec answers None: not installed
from sdrt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [
    ["export", "--random", "sd15-tiny", "--out", "{tmp}/onnx"],
    ["demo", "--out", "{tmp}/demo"],
    ["bench", "--preset", "sd15-tiny", "--backends", "ort-cpu", "--resolutions", "64", "--steps", "1",
     "-o", "{tmp}/bench.json"],
])
def test_a_command_without_the_export_extra_says_what_to_install(tmp_path: Path, command: list[str]) -> None:
    argv = [a.format(tmp=tmp_path) for a in command]
    r = subprocess.run([sys.executable, "-c", HIDE, *argv], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "ModuleNotFoundError" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sdrt {argv[0]}: error: PyTorch is not installed (No module named 'torch')")
    assert "'export' extra" in last
    assert "pip install torch==2.13.0" in last and 'pip install "sdrt[export]"' in last
    assert 'pip install ".[export]"' in last
    assert last.index("pip install torch==2.13.0") < last.index('pip install "sdrt[export]"')  # torch first
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_missing_module_no_extra_provides_is_not_disguised() -> None:
    from sdrt.commands._extras import missing_extra

    assert missing_extra("export", ModuleNotFoundError("No module named 'nosuch'", name="nosuch")) is None
    msg = missing_extra("bench", ModuleNotFoundError("No module named 'matplotlib.pyplot'", name="matplotlib.pyplot"))
    assert msg is not None and 'pip install "sdrt[bench]"' in msg and "torch" not in msg
