"""A graph ONNX Runtime cannot load is reported once, by sdrt, with the fix: ORT's own native log line
(``[E:onnxruntime:...]``, in red) is not printed before it. In a subprocess: ORT logs to the process's
stderr, which pytest's capture does not see."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def test_a_truncated_onnx_data_is_reported_by_sdrt_alone(tiny_export, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_export("sd15-tiny", "fp32"), broken)
    data = broken / "unet" / "model.onnx_data"
    with data.open("r+b") as f:
        f.truncate(data.stat().st_size // 2)
    code = ("import sys; from sdrt.cli import main; "
            f"sys.exit(main(['generate', {str(broken)!r}, '--prompt', 'a cat', '--steps', '1', "
            f"'--backend', 'ort-cpu', '-o', {str(tmp_path / 'x.png')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr
    assert err.startswith(f"sdrt generate: error: cannot load {broken / 'unet' / 'model.onnx'}: "), err
    assert "out of bounds or can not be read in full" in err  # ORT's reason, inside sdrt's message
    assert err.rstrip().endswith("The file is corrupt or incomplete; re-export it")
    assert "[E:onnxruntime:" not in err and "[W:onnxruntime:" not in err and "\x1b[" not in err
    assert not (tmp_path / "x.png").exists()
