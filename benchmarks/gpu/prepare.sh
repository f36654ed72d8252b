#!/usr/bin/env bash
# Here, on the CPU machine (PyPI reachable): download every wheel the GPU machine lacks for
# `sdrt export` + `sdrt bench` on ort-cuda, pack them into .whl/p1, p2, ... (each at most 60 MiB, one
# folder per device call) and print the device calls to make.
#
#   bash benchmarks/gpu/prepare.sh            # the real kit: cp312 / manylinux x86_64, into .whl/
#   SDRT_KIT_RTX=0 bash benchmarks/gpu/prepare.sh    # without TensorRT for RTX (one call less)
#   SDRT_KIT_REHEARSAL=1 bash benchmarks/gpu/prepare.sh   # a kit for THIS machine's Python, with the
#       CPU onnxruntime in place of onnxruntime-gpu, into .whl/rehearsal/ (to rehearse device.sh here;
#       without TensorRT for RTX unless SDRT_KIT_RTX=1)
#
# What the GPU machine has (KINDS.md, 2026-11): Python 3.12, torch 2.11 (cu130, with the nvidia-* CUDA 13
# and cuDNN wheels), transformers 5.17, huggingface_hub 1.33, safetensors 0.8.0, tokenizers 0.23.2,
# onnx 1.23.1, onnxscript 0.7.2, onnxruntime 1.30 (CPU), accelerate, numpy, pillow, regex, requests,
# filelock, protobuf, flatbuffers, packaging, sympy, psutil, matplotlib, tqdm, nvidia-ml-py, cuda-bindings.
# What sdrt needs beyond that (pyproject: the runtime, [export], [bench], [cuda]):
#   diffusers          [export]; its requirements are all there (importlib_metadata is only imported on
#                      Python < 3.8, so it is not shipped)
#   onnxruntime-gpu    [cuda]; shadows the CPU onnxruntime through PYTHONPATH
#   onnxruntime (CPU)  the same version, for the export that runs before onnxruntime-gpu has arrived
#   tensorrt-rtx-cu13-libs + -bindings   optional: the one TensorRT for RTX try of issue 7
# Not needed: polygraphy (only `sdrt build` with the full TensorRT), onnx-graphsurgeon (unused), sdrt
# itself (the working tree travels; device.sh links it into the install folder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

DIFFUSERS=${SDRT_KIT_DIFFUSERS:-diffusers==0.42.1}
ORT_GPU=${SDRT_KIT_ORT:-onnxruntime-gpu==1.31.1}
# the background export (before onnxruntime-gpu has arrived) checks parity and fuses the UNet with the
# same onnxruntime version, CPU build, instead of the image's 1.30
ORT_CPU=${SDRT_KIT_ORT_CPU:-onnxruntime==1.31.1}
RTX_VERSION=${SDRT_KIT_RTX_VERSION:-1.7.1.116}
RTX=${SDRT_KIT_RTX:-1}
CAP_MIB=${SDRT_KIT_CAP_MIB:-60}
REH=${SDRT_KIT_REHEARSAL:-0}

if [ "$REH" = 1 ]; then
  OUTDIR=.whl/rehearsal
  PYVER=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  ORT_GPU=${SDRT_KIT_ORT:-onnxruntime==1.31.1}  # CPU build: this machine has no GPU
  RTX=${SDRT_KIT_RTX:-0}
else
  OUTDIR=.whl
  PYVER=3.12
fi
ABI=cp${PYVER/./}
DL=$OUTDIR/download
rm -rf "$DL"
mkdir -p "$DL/pre" "$DL/core" "$DL/rtx"

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  PLATFORMS+=(--platform "$p")
done
download() {  # download STREAM REQUIREMENT...
  local dest=$DL/$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --abi "$ABI" --abi abi3 --abi none "${PLATFORMS[@]}" -d "$dest" "$@"
}

echo "== downloading for Python $PYVER ($ABI, manylinux x86_64) into $DL"
download pre "$DIFFUSERS" "$ORT_CPU"
download core "$ORT_GPU"
if [ "$RTX" = 1 ]; then
  download rtx "tensorrt-rtx-cu13-libs==$RTX_VERSION" "tensorrt-rtx-cu13-bindings==$RTX_VERSION"
fi
ls -l "$DL"/*

echo "== requirements of the downloaded wheels (extras left out) against what the GPU machine has"
python3 - "$DL" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

THERE = {"filelock", "huggingface-hub", "numpy", "regex", "requests", "safetensors", "pillow", "flatbuffers",
         "packaging", "protobuf", "sympy", "transformers", "torch", "tokenizers", "onnx"}
NOT_NEEDED = {"importlib-metadata": "diffusers imports it only on Python < 3.8"}
shipped = set()
reqs = []
for whl in sorted(Path(sys.argv[1]).rglob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    name = re.search(r"^Name: (.+)$", meta, re.M).group(1).strip().lower().replace("_", "-")
    shipped.add(name)
    for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        if "extra ==" in line:
            continue
        dep = re.split(r"[ ;<>=!~\[(]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
        reqs.append((name, dep, line.strip()))
bad = []
for name, dep, line in reqs:
    where = ("shipped" if dep in shipped else "on the GPU machine" if dep in THERE else
             f"not needed: {NOT_NEEDED[dep]}" if dep in NOT_NEEDED else None)
    print(f"  {name}: {line} -> {where or 'MISSING'}")
    if where is None:
        bad.append(f"{name} needs {dep}")
if bad:
    sys.exit("missing on the GPU machine and not shipped: " + "; ".join(bad))
EOF

echo "== packing (xz -9e with an x86 filter; a few minutes on 2 cores)"
# order: pre (needed first, by the background export), rtx (tried while the export runs), core
list() { ls "$DL/$1"/*.whl | paste -sd, -; }
streams=(--stream "pre=$(list pre)")
[ "$RTX" = 1 ] && streams+=(--stream "rtx=$(list rtx)")
streams+=(--stream "core=$(list core)")
python3 benchmarks/gpu/parts.py pack --out "$OUTDIR" --cap $((CAP_MIB * 1024 * 1024)) "${streams[@]}"

echo "== sizes"
TREE=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
SHARED=0
[ -d shared ] && SHARED=$(du -sb shared | cut -f1)
python3 - "$OUTDIR" "$TREE" "$SHARED" <<'EOF'
import json
import sys
from pathlib import Path

out, tree, shared = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
m = json.loads((out / "MANIFEST.json").read_text())
MIB = 1 << 20
for name, s in m["streams"].items():
    for f in s["files"]:
        print(f"  {f['name']}: {f['original_bytes'] / MIB:.1f} MiB (sha256 {f['original_sha256']})")
    print(f"  stream {name}: {s['bytes'] / MIB:.1f} MiB xz in {len(s['chunks'])} chunk(s)")
print(f"  working tree that travels with every call: {(tree + shared) / MIB:.2f} MiB")
worst = 0
for folder, info in m["folders"].items():
    total = info["bytes"] + tree + shared
    worst = max(worst, total)
    print(f"  call carrying {out}/{folder}: {info['bytes'] / MIB:.2f} MiB + tree = {total / MIB:.2f} MiB (limit 64)")
if worst > 64 * MIB - 256 * 1024:
    sys.exit("a call would exceed 64 MiB: lower SDRT_KIT_CAP_MIB or shrink the working tree")
EOF

echo "== the device calls (see benchmarks/README.md, 'Running the GPU measurement (issue 7)')"
python3 - "$OUTDIR" "$REH" <<'EOF'
import json
import sys
from pathlib import Path

out, reh = Path(sys.argv[1]), sys.argv[2] == "1"
m = json.loads((out / "MANIFEST.json").read_text())
last = {name: s["chunks"][-1]["folder"] for name, s in m["streams"].items()}
dev = "bash benchmarks/gpu/device.sh"
for i, folder in enumerate(m["folders"], start=1):
    cmd = [f"{dev} stash"]
    timeout = 180
    if folder == last["pre"]:  # p1 unless the cap is tiny: the export starts as soon as diffusers is there
        cmd.append(f"{dev} export-bg sd15")
    if "rtx" in last and folder == last["rtx"]:
        cmd.append(f"{dev} rtx tiny")
        timeout = 420
    if folder == last["core"]:
        cmd += [f"{dev} install", f"{dev} measure sd15"]
        timeout = 600
    env = "export SDRT_GPU_KIT_REHEARSAL=1 SDRT_KIT_WHL=.whl/rehearsal OUT=/tmp/kit-out-$RANDOM; " if reh else ""
    print(f"call {i}: carry [\"{out}/{folder}\"], timeout_s {timeout}")
    print(f"  command: {env}" + " && ".join(cmd))
print("whenever a call ends with 'NEXT CALL: <command>' (exit 75), make that call next (no carry, timeout_s 600)")
print("if time is left: bash benchmarks/gpu/device.sh rtx sd15 (the full-size TensorRT for RTX build)")
print("a later session: the same parts, then 'measure sdxl' in place of 'measure sd15' (see the README)")
EOF
