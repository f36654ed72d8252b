#!/usr/bin/env bash
# Type-check sdrt's runtime, server and TensorRT code against a patched copy of tensorrt-stubs (TensorRT itself is not
# installable here). Reproducible on a fresh machine: installs the pinned stubs with --no-deps into
# .stubs/ (git-ignored) and patches that copy; the installed packages are never modified.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
STUBS=$("$PY" tests/typecheck/patch_trt_stubs.py)
MYPYPATH="$STUBS" "$PY" -m mypy --config-file tests/typecheck/mypy.ini export/trt_build.py export/refit.py runtime/ serve/ "$@"
