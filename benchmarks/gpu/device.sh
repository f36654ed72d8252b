#!/usr/bin/env bash
# Issue 7's measurement on the lent GPU machine, in steps that each fit one device call.
# Run from the repository root there; results go to $OUT (at most 8 files, flat).
#
#   bash benchmarks/gpu/device.sh stash             verify the carried .whl/pN, keep its chunks in $SDRT_KIT/parts
#   bash benchmarks/gpu/device.sh export-bg PRESET  install the "pre" stream (diffusers, CPU onnxruntime 1.31.1),
#                                                   start `sdrt export` of PRESET in the background (setsid),
#                                                   then save the bench's baseline weights
#   bash benchmarks/gpu/device.sh rtx tiny|PRESET   one try of TensorRT for RTX (the "rtx" stream): tiny exports
#                                                   sd15-tiny here; a PRESET uses the full export
#   bash benchmarks/gpu/device.sh install           install "pre" + "core" (onnxruntime-gpu); check the CUDA EP
#   bash benchmarks/gpu/device.sh measure PRESET    sdrt bench (ort-cuda vs PyTorch eager and torch.compile),
#                                                   bench report, then the fp32 check if time is left -> $OUT
#   bash benchmarks/gpu/device.sh check PRESET      the fp32 check alone (ort-cuda image vs PyTorch fp32)
#   bash benchmarks/gpu/device.sh export PRESET     export in the foreground (reuses a finished export)
#   bash benchmarks/gpu/device.sh status            what is stashed, installed, exported
#
# PRESET: sd15 or sdxl. A step that cannot finish inside this call (600 s, SDRT_KIT_CALL_S) stops before it
# starts and exits 75 with the line 'NEXT CALL: ...'. SDRT_GPU_KIT_REHEARSAL=1: the same flow on a CPU
# machine (the -tiny preset, ort-cpu against PyTorch CPU, fp32, 4 steps). Other settings: SDRT_KIT (state,
# default /tmp/sdrt-kit), SDRT_KIT_WHL (carried parts, default .whl), SDRT_KIT_STEPS, SDRT_KIT_WARMUP,
# SDRT_KIT_REPEATS, SDRT_KIT_COMPILE=0 (no torch.compile baseline), SDRT_KIT_RTX_BUILD_S (default 240).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GPU_DIR="$REPO/benchmarks/gpu"
REH=${SDRT_GPU_KIT_REHEARSAL:-0}
KIT=${SDRT_KIT:-/tmp/sdrt-kit}
WHL=${SDRT_KIT_WHL:-$REPO/.whl}
PARTS=$KIT/parts
PRE=$KIT/pre    # diffusers + CPU onnxruntime + sdrt: what the background export runs with
SITE=$KIT/site  # every wheel + sdrt: what the measurement runs with
RSITE=$KIT/rtx-site
WORK=$KIT/work  # exports, bench work folders (local disk, never under $OUT)
PY=${PYTHON:-python3}
CALL_S=${SDRT_KIT_CALL_S:-600}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then sed -n '2,24p' "${BASH_SOURCE[0]}"; exit 2; fi
mkdir -p "$KIT" "$WORK"

# -- logging: everything also goes to $OUT/log (kept even when the call is stopped at its limit) ----------
if [ -z "${SDRT_KIT_NO_OUT:-}" ]; then
  OUT=${OUT:?OUT is not set: the device tool sets it; for a rehearsal, export OUT=/some/empty/dir}
  mkdir -p "$OUT"
  # $OUT is emptied before every call: no log yet means this is the call's first step
  [ -f "$OUT/log" ] || date +%s >"$KIT/call-t0"
  exec > >(tee -a "$OUT/log") 2>&1
  TEE_PID=$!
  # let tee write the last lines before the call returns
  trap 'exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null || true' EXIT
fi

call_elapsed() {  # seconds since this call's first device.sh step started (0 in the background job)
  [ -n "${SDRT_KIT_NO_OUT:-}" ] && { echo 0; return; }
  echo $(($(date +%s) - $(cat "$KIT/call-t0" 2>/dev/null || date +%s)))
}
say() { printf '[device.sh %s call +%ss, step +%ss] %s\n' "$(date +%T)" "$(call_elapsed)" "$SECONDS" "$*"; }
die() { say "FAILED: $*" >&2; exit 1; }
defer() { say "NEXT CALL: $*"; exit 75; }
fits() { [ $(($(call_elapsed) + $1)) -le "$CALL_S" ]; }  # fits SECONDS: that much is left in this call
smi() { if command -v nvidia-smi >/dev/null; then nvidia-smi "$@" || true; else echo "(no nvidia-smi)"; fi; }

# -- helpers -------------------------------------------------------------------------------------------
preset_of() {  # sd15 -> sd15 (sd15-tiny in a rehearsal)
  case "$1" in
    sd15|sdxl) if [ "$REH" = 1 ]; then echo "$1-tiny"; else echo "$1"; fi ;;
    *) die "unknown preset '$1' (sd15 or sdxl)" ;;
  esac
}

estimate() {  # estimate bench|check NAME: seconds the step needs on the H200 (see benchmarks/README.md)
  if [ "$REH" = 1 ]; then echo 60; return; fi
  case "$1-$2" in
    bench-sd15) echo "${SDRT_KIT_BENCH_S:-330}" ;;
    check-sd15) echo "${SDRT_KIT_CHECK_S:-100}" ;;
    bench-sdxl) echo "${SDRT_KIT_BENCH_S:-480}" ;;
    check-sdxl) echo "${SDRT_KIT_CHECK_S:-200}" ;;
  esac
}

nvidia_libs() {  # the CUDA 13 / cuDNN libraries of the image's Python (torch's nvidia-* wheels)
  "$PY" - <<'EOF'
import glob, os, site, sys
dirs = []
roots = site.getsitepackages() + [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
for sp in roots:
    for d in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib")) + glob.glob(os.path.join(sp, "nvidia", "lib"))):
        if d not in dirs and glob.glob(os.path.join(d, "*.so*")):
            dirs.append(d)
print(":".join(dirs))
EOF
}

use_site() {  # use_site DIR...: PYTHONPATH (and the CUDA libraries) for installed folders
  local IFS=:
  export PYTHONPATH="$*"
  if [ "$REH" != 1 ] && [ -z "${SDRT_KIT_LIBS_SET:-}" ]; then
    local libs
    libs=$(nvidia_libs)
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" SDRT_KIT_LIBS_SET=1
  fi
}

link_sdrt() {  # sdrt from this working tree, laid out as its wheel would be (pyproject's package-dir)
  "$PY" - "$REPO" "$1" <<'EOF'
import sys, tomllib
from pathlib import Path
repo, site = Path(sys.argv[1]), Path(sys.argv[2])
dirs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
root = site / "sdrt"
root.mkdir(parents=True, exist_ok=True)
for entry in (repo / dirs["sdrt"]).iterdir():
    if entry.name != "__pycache__" and not (root / entry.name).exists():
        (root / entry.name).symlink_to(entry)
for pkg, d in dirs.items():
    if pkg != "sdrt" and not (root / pkg.split(".", 1)[1]).exists():
        (root / pkg.split(".", 1)[1]).symlink_to(repo / d)
EOF
}

pip_target() {  # pip_target DIR WHEEL...
  local dir=$1; shift
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
    --target "$dir" "$@"
}

assemble() {  # assemble STREAM: print the verified wheels' paths
  "$PY" "$GPU_DIR/parts.py" assemble --dest "$PARTS" --stream "$1" --out "$KIT/wheels/$1"
}

install_pre() {
  [ -f "$PRE/.installed" ] && return 0
  say "installing the pre stream (diffusers, CPU onnxruntime) into $PRE"
  local wheels
  wheels=$(assemble pre) || die "the pre stream is not complete (see above)"
  rm -rf "$PRE"
  # shellcheck disable=SC2086
  pip_target "$PRE" $wheels
  link_sdrt "$PRE"
  touch "$PRE/.installed"
}

require_installed() {
  [ -f "$SITE/.installed" ] || die "nothing installed in $SITE: run 'install' first (a machine given back loses it all: start again from the first part)"
  use_site "$SITE"
}

bg_running() { [ -f "$WORK/export-$1.pid" ] && kill -0 "$(cat "$WORK/export-$1.pid")" 2>/dev/null; }

# -- steps ---------------------------------------------------------------------------------------------
step_stash() {
  say "stash: the carried parts in $WHL"
  "$PY" "$GPU_DIR/parts.py" stash --src "$WHL" --dest "$PARTS"
  if [ "$REH" != 1 ] && [ ! -f "$KIT/.gpu-seen" ]; then
    smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
    df -h /tmp | tail -n 1 || true
    nproc || true
    touch "$KIT/.gpu-seen"
  fi
  local f
  for f in "$WORK"/export-*.log; do
    [ -f "$f" ] && say "background $(basename "$f" .log): $(tail -n 1 "$f")"
  done
  return 0
}

step_export_bg() {
  local p; p=$(preset_of "$1")
  install_pre
  if [ -f "$WORK/export-$p.done" ]; then say "export of $p already finished"; return 0; fi
  bg_running "$p" && { say "the export of $p is already running"; return 0; }
  rm -f "$WORK/export-$p.failed"
  say "starting the export of $p in the background (log: $WORK/export-$p.log)"
  SDRT_KIT_NO_OUT=1 SDRT_KIT_PREWARM=1 setsid nohup bash "$GPU_DIR/device.sh" export "$1" \
    >"$WORK/export-$p.log" 2>&1 </dev/null &
  echo $! >"$WORK/export-$p.pid"
  sleep "${SDRT_KIT_BG_LOOK_S:-8}"
  tail -n 3 "$WORK/export-$p.log" || true
  bg_running "$p" || [ -f "$WORK/export-$p.done" ] || die "the background export stopped at once (log above)"
}

step_install() {
  [ -f "$SITE/.installed" ] && { say "already installed in $SITE"; use_site "$SITE"; return 0; }
  say "install: joining and checking the pre and core streams"
  local wheels core
  wheels=$(assemble pre) || die "the pre stream is not complete (see above)"
  core=$(assemble core) || die "the core stream is not complete (see above)"
  # pre's CPU onnxruntime served the background export; here onnxruntime-gpu takes its place
  wheels="$(echo "$wheels" | grep -v '/onnxruntime-[0-9]' || true) $core"
  say "pip install --no-deps --target $SITE: $(for w in $wheels; do basename "$w"; done | tr '\n' ' ')"
  rm -rf "$SITE"
  # shellcheck disable=SC2086
  pip_target "$SITE" $wheels
  link_sdrt "$SITE"
  rm -rf "$KIT/wheels/pre" "$KIT/wheels/core"
  use_site "$SITE"
  say "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  "$PY" -c "import onnxruntime as o; print(o.__version__, o.__file__); print(o.get_available_providers())"
  local ep=CUDAExecutionProvider
  [ "$REH" = 1 ] && ep=CPUExecutionProvider
  # a real session with a convolution (cuDNN) and a matmul (cuBLAS): available providers alone prove nothing
  "$PY" - "$ep" <<'EOF' || die "onnxruntime cannot run on $ep (see above)"
import sys
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
ep = sys.argv[1]
w = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")
m = numpy_helper.from_array(np.eye(6, dtype=np.float32), "m")
g = helper.make_graph(
    [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("MatMul", ["c", "m"], ["y"])],
    "smoke", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 6])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 6, 6])], [w, m])
model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
s = ort.InferenceSession(model.SerializeToString(), providers=[ep])
x = np.random.default_rng(0).standard_normal((1, 1, 6, 6), dtype=np.float32)
y = s.run(None, {"x": x})[0]
ref = np.zeros_like(x)
xp = np.pad(x[0, 0], 1)
for i in range(6):
    for j in range(6):
        ref[0, 0, i, j] = xp[i:i + 3, j:j + 3].sum()
print("session providers:", s.get_providers())
assert s.get_providers()[0] == ep, f"{ep} did not load: the session runs on {s.get_providers()}"
assert np.allclose(y, ref, atol=1e-4), "wrong result"
print(f"{ep}: a Conv + MatMul session ran and computed the right values")
EOF
  "$PY" -m sdrt info
  touch "$SITE/.installed"
  say "installed"
}

prewarm() {  # the bench's baseline weights (a diffusers folder), saved where `sdrt bench --work-dir` looks
  local p=$1 precision=fp16
  [ "$REH" = 1 ] && precision=fp32
  say "saving the baseline's diffusers weights into $WORK/bench-$p ($precision)"
  "$PY" - "$WORK/export-$p" "$WORK/bench-$p" "$precision" <<'EOF' || say "(not saved: the bench will do it)"
import sys
from pathlib import Path
from sdrt.benchmarks.bench import BenchConfig, _Run
from sdrt.runtime.manifest import ExportManifest
folder, work, precision = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
work.mkdir(parents=True, exist_ok=True)
run = _Run(BenchConfig(artifact=str(folder)), lambda event: None)
path, why = run.baseline_weights(work, folder, ExportManifest.read(folder), precision)
print(f"baseline weights: {path or why}")
EOF
}

step_export() {
  local p; p=$(preset_of "$1")
  if [ -f "$WORK/export-$p.done" ] && [ -f "$WORK/export-$p/sdrt.json" ]; then say "export of $p: reused"; return 0; fi
  if [ -f "$SITE/.installed" ]; then use_site "$SITE"; else install_pre; use_site "$PRE"; fi
  local args=(--random "$p" --ort-cuda --out "$WORK/export-$p")
  [ "$REH" = 1 ] && args+=(--fp32)
  say "sdrt export ${args[*]} (onnxruntime from PYTHONPATH=$PYTHONPATH, else the image's)"
  local t=$SECONDS
  if "$PY" -m sdrt export "${args[@]}"; then
    say "export of $p done in $((SECONDS - t)) s"
    [ -n "${SDRT_KIT_PREWARM:-}" ] && prewarm "$p"
    echo "$((SECONDS - t))" >"$WORK/export-$p.done"
  else
    touch "$WORK/export-$p.failed"
    die "export of $p failed"
  fi
}

wait_export() {  # wait_export NAME SECONDS_NEEDED_AFTER: the export of NAME, waiting as long as this call allows
  local name=$1 need=$2 p; p=$(preset_of "$1")
  if [ -f "$WORK/export-$p.done" ]; then say "export of $p: finished earlier in $(cat "$WORK/export-$p.done") s"; return 0; fi
  if bg_running "$p"; then
    say "waiting for the background export of $p (this call has room until +$((CALL_S - need)) s)"
    local n=0
    while bg_running "$p" && [ ! -f "$WORK/export-$p.done" ]; do
      fits "$need" || defer "the export is still running; call again: bash benchmarks/gpu/device.sh measure $name"
      [ $((n % 6)) = 0 ] && say "  ... $(tail -n 1 "$WORK/export-$p.log" 2>/dev/null)"
      n=$((n + 1))
      sleep 5
    done
    say "the background export ended; its log:"
    cat "$WORK/export-$p.log"
    [ -f "$WORK/export-$p.done" ] || die "the background export of $p failed (log above)"
    return 0
  fi
  if [ -f "$WORK/export-$p.failed" ]; then
    cat "$WORK/export-$p.log" 2>/dev/null || true
    die "the export of $p failed earlier (log above)"
  fi
  step_export "$name"
}

step_measure() {
  local name=$1 p; p=$(preset_of "$1")
  require_installed
  local need; need=$(estimate bench "$name")
  wait_export "$name" "$need"
  fits "$need" || defer "about $need s are needed and this call is at +$(call_elapsed) s: bash benchmarks/gpu/device.sh measure $name"
  local exp=$WORK/export-$p bw=$WORK/bench-$p
  local steps=30 warmup repeats timeout backends=ort-cuda compile=(--compile) extra=()
  case "$name" in
    sd15) warmup=2; repeats=10; timeout=300 ;;
    sdxl) warmup=1; repeats=5; timeout=420 ;;
  esac
  if [ "$REH" = 1 ]; then
    steps=4; warmup=1; repeats=3; timeout=300; backends=ort-cpu
    extra=(--precision fp32 --threads "$(nproc)")
  fi
  steps=${SDRT_KIT_STEPS:-$steps}; warmup=${SDRT_KIT_WARMUP:-$warmup}; repeats=${SDRT_KIT_REPEATS:-$repeats}
  [ "${SDRT_KIT_COMPILE:-1}" = 0 ] && compile=()
  # ort-cuda with CUDA graphs (issue 7 asks for them at static shapes): off by default on a first run, so a
  # capture failure cannot cost the whole ort-cuda figure; SDRT_KIT_CUDA_GRAPH=1 in a later call turns it on
  [ "${SDRT_KIT_CUDA_GRAPH:-0}" = 1 ] && extra+=(--cuda-graph)
  local res
  res=$("$PY" -c "from sdrt.runtime.manifest import ExportManifest as M; print(M.read('$exp').default_size)")
  say "bench $p: $backends vs PyTorch eager${compile[*]:+ and torch.compile}, ${res}px, $steps steps, warm-up $warmup, repeats $repeats (estimate $need s)"
  smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv,noheader
  (cd "$OUT" && "$PY" -m sdrt bench --artifact "$exp" --backends "$backends" "${compile[@]}" --resolutions "$res" \
     --steps "$steps" --batch-sizes 1 --guidance 7.5 --samplers dpmpp-2m --warmup "$warmup" --repeats "$repeats" \
     --timeout "$timeout" --work-dir "$bw" "${extra[@]}") || die "sdrt bench failed"
  smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv,noheader
  say "bench done"
  local json
  json=$(ls -t "$OUT"/bench-*.json | head -n 1)
  "$PY" -m sdrt bench report "$json" -o "$OUT" || say "bench report failed (the JSON is still in \$OUT)"
  {  # the worker processes' stderr and the export log, in one file
    echo "== export log ($WORK/export-$p.log)"; cat "$WORK/export-$p.log" 2>/dev/null || echo "(foreground: see log)"
    for f in "$bw"/job-*.stderr.txt; do [ -f "$f" ] && { echo "== $f"; tail -n 60 "$f"; }; done
  } >"$OUT/workers-$name.txt"
  "$PY" - "$json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{'backend':20s} {'status':7s} {'it/s':>7s} {'step p50':>9s} {'p90':>7s} {'total p50':>10s} {'VRAM GB':>8s} {'floor':>6s}")
for m in d["measurements"]:
    st, tot = m["unet_step_ms"] or {}, m["total_ms"] or {}
    vram = m["peak_vram_bytes"] or m["device_mem_delta_bytes"] or 0
    fl = (m["of_floor"] or {}).get("unet_step") or 0
    print(f"{m['backend']:20s} {m['status']:7s} {m['its'] or 0:7.2f} {st.get('p50') or 0:9.2f} {st.get('p90') or 0:7.2f} "
          f"{tot.get('p50') or 0:10.1f} {vram / 1e9:8.2f} {fl:6.3f}" + (f"  {m['reason'][:90]}" if m["reason"] else ""))
    if m.get("image_vs_baseline"):
        print(f"{'':20s} image vs {m['baseline']}: {m['image_vs_baseline']}")
for c in d["ceilings"]:
    print(f"ceiling {c['device']} {c['dtype']} n={c['n']}: {c['tflops']} TFLOP/s ({c['status']})")
EOF
  if fits "$(estimate check "$name")"; then
    step_check "$name"
  else
    say "NEXT CALL: not enough time left for the fp32 check: bash benchmarks/gpu/device.sh check $name"
  fi
  ls -l "$OUT"
}

step_check() {
  local name=$1 p; p=$(preset_of "$1")
  require_installed
  local exp=$WORK/export-$p bw=$WORK/bench-$p
  [ -f "$exp/sdrt.json" ] || die "no export of $p: run 'measure $name' first"
  local steps=30 backend=ort-cuda fargs=()
  [ "$REH" = 1 ] && { steps=4; backend=ort-cpu; fargs=(--device cpu --threads "$(nproc)"); }
  steps=${SDRT_KIT_STEPS:-$steps}
  local lat
  lat=$(ls "$bw"/latents-*-b1.npy 2>/dev/null | head -n 1)
  [ -n "$lat" ] && fargs+=(--latents "$lat")
  say "fp32 check: the $backend image of $p against PyTorch fp32, same latents (${lat:-drawn from seed 0})"
  local rc=0
  "$PY" "$GPU_DIR/fp32_check.py" --artifact "$exp" --backend "$backend" --steps "$steps" \
    --out "$OUT/fp32-check-$name.json" --png "$OUT/fp32-check-$name.png" "${fargs[@]}" || rc=$?
  case "$rc" in
    0) say "fp32 check: within the bound" ;;
    3) say "fp32 check: OUTSIDE the bound (see fp32-check-$name.json)" ;;
    *) say "fp32 check failed to run (exit $rc)" ;;
  esac
}

step_rtx() {
  local what=$1 p exp res=64
  if [ "$what" = tiny ]; then p=sd15-tiny; else p=$(preset_of "$what"); fi
  if [ ! -f "$RSITE/.installed" ]; then
    local wheels
    wheels=$(assemble rtx) || die "the rtx stream is not complete (see above)"
    rm -rf "$RSITE"
    # shellcheck disable=SC2086
    pip_target "$RSITE" $wheels
    # the standalone bindings wheel installs `tensorrt_rtx_bindings`; sdrt imports `tensorrt_rtx` (what the
    # tensorrt-rtx-cu13 metapackage, an sdist, would add): a two-line shim
    mkdir -p "$RSITE/tensorrt_rtx"
    printf 'from tensorrt_rtx_bindings import *  # noqa: F403\nfrom tensorrt_rtx_bindings import __version__  # noqa: F401\n' \
      >"$RSITE/tensorrt_rtx/__init__.py"
    rm -rf "$KIT/wheels/rtx"
    touch "$RSITE/.installed"
  fi
  if [ -f "$SITE/.installed" ]; then use_site "$RSITE" "$SITE"; else install_pre; use_site "$RSITE" "$PRE"; fi
  export SDRT_TENSORRT_MODULE=tensorrt_rtx
  local rc=0
  "$PY" -c "import tensorrt_rtx as t; print('tensorrt_rtx', t.__version__, 'from', t.__file__); print('builder:', t.Builder(t.Logger()))" || rc=$?
  say "import tensorrt_rtx and make a Builder: exit $rc"
  exp=$WORK/export-$p
  if [ "$what" = tiny ]; then
    if [ ! -f "$exp/sdrt.json" ]; then
      say "exporting sd15-tiny (fp16) for the TensorRT for RTX try"
      "$PY" -m sdrt export --random sd15-tiny --out "$exp" >/dev/null || die "the sd15-tiny export failed"
    fi
  else
    [ -f "$exp/sdrt.json" ] || die "no export of $p in $exp: run 'measure $what' first"
    res=$("$PY" -c "from sdrt.runtime.manifest import ExportManifest as M; print(M.read('$exp').default_size)")
  fi
  local build_s=${SDRT_KIT_RTX_BUILD_S:-240}
  say "sdrt build --tensorrt-module tensorrt_rtx: $p, static ${res}px, batch 1 (at most $build_s s)"
  rc=0
  timeout "$build_s" "$PY" -m sdrt build "$exp" --out "$WORK/rtx-$p" --tensorrt-module tensorrt_rtx \
    --height "$res" --width "$res" --batch 1 --force || rc=$?
  say "RESULT: sdrt build with TensorRT for RTX on $(smi --query-gpu=name,compute_cap --format=csv,noheader): exit $rc"
  [ "$rc" = 0 ] || return 0
  rc=0
  "$PY" -m sdrt bench --artifact "$exp" --engines "$WORK/rtx-$p" --backends tensorrt --baseline none \
    --resolutions "$res" --steps 30 --batch-sizes 1 --warmup 1 --repeats 3 --timeout 240 --work-dir "$WORK/rtx-bench-$p" \
    -o "$OUT/rtx-bench-$p.json" || rc=$?
  say "RESULT: sdrt bench on the TensorRT for RTX engines of $p: exit $rc"
}

step_status() {
  if [ -f "$PARTS/MANIFEST.json" ]; then "$PY" "$GPU_DIR/parts.py" status --dest "$PARTS"; else say "no parts stashed"; fi
  local d
  for d in "$PRE" "$SITE" "$RSITE"; do [ -f "$d/.installed" ] && say "installed: $d"; done
  ls -la "$WORK" 2>/dev/null || true
}

# -- main ----------------------------------------------------------------------------------------------
step=$1; shift
case "$step" in
  stash) step_stash ;;
  export-bg) step_export_bg "${1:?preset}" ;;
  install) step_install ;;
  export) step_export "${1:?preset}" ;;
  measure) step_measure "${1:?preset}" ;;
  check) step_check "${1:?preset}" ;;
  rtx) step_rtx "${1:?tiny, sd15 or sdxl}" ;;
  status) step_status ;;
  *) die "unknown step '$step' (stash, export-bg, install, export, measure, check, rtx, status)" ;;
esac
say "step $step: ok"
