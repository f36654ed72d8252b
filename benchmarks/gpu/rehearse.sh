#!/usr/bin/env bash
# The device calls of the kit in .whl/rehearsal (SDRT_KIT_REHEARSAL=1 bash benchmarks/gpu/prepare.sh),
# made here on the CPU, as the device tool would make them: only that call's folder carried, an empty
# $OUT per call, state kept in $SDRT_KIT between calls. Then a standalone `check`, a `measure` that must
# defer (exit 75) for want of time, and `status`. Prints one line per call; the logs stay in $REH/outN.
#
#   SDRT_KIT_REHEARSAL=1 SDRT_KIT_RTX=1 SDRT_KIT_CAP_MIB=20 bash benchmarks/gpu/prepare.sh
#   bash benchmarks/gpu/rehearse.sh          # about 3-5 minutes on 2 cores
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
REH=${REH:-/tmp/sdrt-rehearsal}
export SDRT_GPU_KIT_REHEARSAL=1 SDRT_KIT=$REH/kit SDRT_KIT_WHL=$REH/carried
[ -f .whl/rehearsal/MANIFEST.json ] || { echo "no .whl/rehearsal: run SDRT_KIT_REHEARSAL=1 bash benchmarks/gpu/prepare.sh"; exit 1; }
rm -rf "$REH"; mkdir -p "$REH"
fails=0
call() {  # call N FOLDER COMMAND [WANT_RC]
  local n=$1 folder=$2 cmd=$3 want=${4:-0}
  rm -rf "$REH/carried"; mkdir -p "$REH/carried"
  [ -n "$folder" ] && cp -r ".whl/rehearsal/$folder" "$REH/carried/"
  export OUT=$REH/out$n; mkdir -p "$OUT"
  local t=$SECONDS rc=0
  bash -c "$cmd" >/dev/null 2>&1 || rc=$?
  [ "$rc" = "$want" ] || fails=$((fails + 1))
  echo "call $n [${folder:-no carry}] $cmd: exit $rc (want $want), $((SECONDS - t)) s; OUT: $(ls "$OUT" | tr '\n' ' ')"
}
plan=$(python3 - <<'PY'
import json
m = json.load(open(".whl/rehearsal/MANIFEST.json"))
last = {k: s["chunks"][-1]["folder"] for k, s in m["streams"].items()}
for f in m["folders"]:
    steps = ["stash"] + (["export-bg sd15"] if f == last["pre"] else []) + (["rtx tiny"] if f == last.get("rtx") else []) \
        + (["install", "measure sd15"] if f == last["core"] else [])
    print(f + "|" + " && ".join("bash benchmarks/gpu/device.sh " + s for s in steps))
PY
)
n=0
while IFS='|' read -r folder cmd; do n=$((n + 1)); call "$n" "$folder" "$cmd"; done <<<"$plan"
call $((n + 1)) "" "bash benchmarks/gpu/device.sh check sd15"
SDRT_KIT_CALL_S=30 call $((n + 2)) "" "bash benchmarks/gpu/device.sh measure sd15" 75
call $((n + 3)) "" "bash benchmarks/gpu/device.sh status"
echo "$fails call(s) ended otherwise than expected; logs in $REH/out*/log"
[ "$fails" = 0 ]
