#!/usr/bin/env bash
# The one GPU call (DESIGN section 7): every check, in priority order, under one deadline,
# each result written into $OUT as soon as it exists.
#
#   bash benchmarks/gpu_prepare.sh                      # here, first: .gpu/ and the command
#   GPU_CHECK_DEADLINE_S=480 bash benchmarks/gpu_check.sh    # there (carry [".gpu"])
#   OUT=/tmp/rehearsal GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # CPU rehearsal
#
# Steps (name, cap in s; each runs for min(cap, time left before the deadline less the 120 s
# kept for the headline benchmark while it has not run)):
#   1 env        25  environment, copy GB/s and bf16 GEMM TFLOP/s          -> env.json
#   2 ext       120  the carried .gpu/_C*.so (build only if it does not import), peer wheels
#   3 parity    100  every public op x {triton, cuda} vs fp64 reference    -> parity.csv
#   4 tests     110  pytest -m gpu, -n workers, --timeout 60, no -x        -> tests.log
#   5 sanitizers 90  compute-sanitizer memcheck, racecheck and synccheck at once, each on
#                    benchmarks/gpu_sanitize.py (PYTORCH_NO_CUDA_MEMORY_CACHING=1, rlkernels'
#                    kernels only), lines prefixed with the tool      -> sanitizer.log
#   6 headline  150  one realistic shape per op, all providers, fwd and fwd+bwd -> bench.csv
#   7 trainer   150  one GRPO step of a Qwen2.5-0.5B-shaped model           -> trainer.json
#     grid     rest  the wider benchmark grid, largest shapes first         -> bench.csv
# A step that fails does not stop the next. summary.md (one line per step, status, seconds)
# is rewritten after every step, and says which step was running if the call is cut. The
# other step output goes to check.log. At most 8 files land in $OUT, none in a subfolder.
#
# Knobs: OUT (required), GPU_CHECK_DRY=1, GPU_CHECK_DEADLINE_S (default 480; 290 dry),
# GPU_CHECK_STEPS (comma list, default all), GPU_CHECK_WORKERS (pytest -n, default 4),
# PYTHON (default python3). Exit status 1 if a step failed or timed out, else 0.
set -u
if [ "${1:-}" = --step ]; then :; else
  cd "$(dirname "$0")/.."
fi
ROOT=$PWD
: "${OUT:?set OUT to the folder whose files come back (the device tool sets it)}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT ROOT
export DRY=${GPU_CHECK_DRY:-0}
export PY=${PYTHON:-python3}
export WORK=${GPU_CHECK_WORK:-/tmp/rlk-gpu-check}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# the working tree is the package (the device image has no rlkernels); peers from step 2
export PYTHONPATH=$ROOT:$WORK/site${PYTHONPATH:+:$PYTHONPATH}
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DRYFLAG=--dry
else
  DRYFLAG=
fi
export DRYFLAG

# ---- steps (each runs as `bash gpu_check.sh --step NAME` under timeout) ----------------------

step_env() { $PY benchmarks/gpu_env.py --out "$OUT/env.json" $DRYFLAG; }

step_ext() {
  local so rc=0
  if [ "$DRY" = 1 ]; then  # leave this machine's tree and Python alone
    echo "dry run: carried files not installed: $(ls .gpu 2>/dev/null | tr '\n' ' ')"
  elif ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" .gpu/wheels/*.whl && echo "peer wheels: $(ls .gpu/wheels | tr '\n' ' ')" \
      || echo "NOTE: peer wheels failed to install"
  else
    echo "no .gpu/wheels: peers that the image lacks will be skipped"
  fi
  for so in .gpu/_C*.so; do
    [ -e "$so" ] && [ "$DRY" != 1 ] && cp -f "$so" rlkernels/ && echo "using carried $so ($(cat .gpu/BUILD.txt 2>/dev/null | tr '\n' ' '))"
  done
  status() { $PY -m rlkernels info 2>&1 | tee "$WORK/info.txt" | sed -n 's/^  cuda *//p'; }
  local s; s=$(status)
  cat "$WORK/info.txt"
  if [ "$s" != ok ] && [ "$DRY" != 1 ]; then
    echo "carried _C does not serve ($s): building for sm_90a"
    cmake -S . -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v $PY)" \
      -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" -DCMAKE_CUDA_ARCHITECTURES=90a \
      -DRLKERNELS_OUTPUT_DIR="$ROOT/rlkernels" >/dev/null && cmake --build "$WORK/build" --parallel 16 || rc=1
    s=$(status)
    echo "cuda backend after the build: $s"
  fi
  [ "$DRY" = 1 ] || $PY -c "import importlib.util as u; print('peers importable:', {m: u.find_spec(m) is not None for m in ('liger_kernel', 'cut_cross_entropy', 'trl', 'verl', 'flash_attn')})"
  if [ "$s" = ok ]; then echo "NOTE: _C ok"; elif [ "$DRY" = 1 ]; then echo "NOTE: dry run: $s"; return 0; else echo "NOTE: $s"; return 1; fi
  return $rc
}

step_parity() { $PY benchmarks/gpu_parity.py --out "$OUT/parity.csv" $DRYFLAG; }

step_tests() {
  local files args=(-q -m gpu -p no:cacheprovider -rfEs --continue-on-collection-errors)
  files=$(grep -rl --include='test_*.py' "mark.gpu\|gpu_cuda" tests | sort)
  $PY -c "import xdist" 2>/dev/null && args+=(-n "${GPU_CHECK_WORKERS:-4}") \
    || echo "pytest-xdist missing: serial"
  $PY -c "import pytest_timeout" 2>/dev/null && args+=(--timeout 60) \
    || echo "pytest-timeout missing: no per-test timeout"
  echo "pytest ${args[*]} $(echo $files)"
  $PY -m pytest "${args[@]}" $files
  local rc=$?
  echo "NOTE: $(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$OUT/tests.log" | tail -1 | tr -d '=')"
  return $rc
}

sanitize() {  # sanitize TOOL: its lines, prefixed "[TOOL] ", then "[TOOL] rc=N"
  local filter=()
  compute-sanitizer --help 2>/dev/null | grep -q -- "--kernel-name " && filter=(--kernel-name kns=rlk)
  echo "compute-sanitizer --tool $1 ${filter[*]} $PY benchmarks/gpu_sanitize.py"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$1" --error-exitcode 9 \
    --print-limit 30 "${filter[@]}" $PY benchmarks/gpu_sanitize.py
  echo "rc=$?"
}
step_sanitizers() {  # the three tools in parallel: independent processes, no timings taken
  local t
  for t in memcheck racecheck synccheck; do
    sanitize "$t" 2>&1 | sed -u "s/^/[$t] /" &
  done
  wait
  local note="" bad=0 rc sum
  for t in memcheck racecheck synccheck; do
    rc=$(grep "^\[$t\] rc=" "$OUT/sanitizer.log" | tail -1 | cut -d= -f2)
    sum=$(grep "^\[$t\]" "$OUT/sanitizer.log" | grep -o 'ERROR SUMMARY: [0-9]*' | tail -1 | grep -o '[0-9]*$')
    note="$note$t rc=${rc:-?} (${sum:-?} errors); "
    [ "${rc:-1}" = 0 ] || bad=1
  done
  echo "NOTE: $note$(grep -h '^\[memcheck\] NOTE: ' "$OUT/sanitizer.log" | tail -1 | cut -c18-)"
  return $bad
}

step_headline() {
  $PY benchmarks/gpu_bench.py --preset headline --csv "$OUT/bench.csv" --env "$OUT/env.json" \
    --budget-s "$(( STEP_LIMIT - 15 ))" $DRYFLAG
}

step_trainer() {
  local args=(--out "$WORK/trainer")
  [ "$DRY" = 1 ] && args+=(--size tiny --dtype float32 --steps 1 --tokens 64 --prompts 2
                           --group-size 2 --configs kernels)
  $PY benchmarks/bench_trainer.py "${args[@]}"
  local rc=$?
  [ -f "$WORK/trainer/trainer.json" ] && cp "$WORK/trainer/trainer.json" "$OUT/trainer.json"
  return $rc
}

step_grid() {
  $PY benchmarks/gpu_bench.py --preset grid --csv "$OUT/bench.csv" --env "$OUT/env.json" \
    --budget-s "$(( STEP_LIMIT - 15 ))" $DRYFLAG
}

if [ "${1:-}" = --step ]; then
  "step_$2"
  exit $?
fi

# ---- the driver ------------------------------------------------------------------------------

DEADLINE_S=${GPU_CHECK_DEADLINE_S:-$([ "$DRY" = 1 ] && echo 290 || echo 480)}
STEPS=${GPU_CHECK_STEPS:-env,ext,parity,tests,sanitizers,headline,trainer,grid}
# name:cap:cap in a dry run:log file (cap 0: whatever time is left)
ALL=(env:25:30:check.log ext:120:40:check.log parity:100:90:check.log tests:110:60:tests.log
     sanitizers:90:0:sanitizer.log
     headline:150:90:check.log trainer:150:50:check.log grid:0:0:check.log)
RESERVE=$([ "$DRY" = 1 ] && echo 90 || echo 120)  # kept for the headline by every step before it
GPU_STEPS=" sanitizers "
rm -rf "$WORK"; mkdir -p "$WORK"
T0=$(date +%s)
ROWS=()
FAILED=0
: >"$OUT/check.log"

summary() {  # summary [RUNNING_STEP]
  {
    echo "# rlkernels GPU check$([ "$DRY" = 1 ] && echo ' (DRY RUN on CPU: tiny shapes, no GPU)')"
    echo
    echo "Started $(date -u -d @"$T0" +%Y-%m-%dT%H:%M:%SZ), deadline ${DEADLINE_S} s, " \
         "$(( $(date +%s) - T0 )) s elapsed at this write."
    echo
    echo "| step | status | s | note |"
    echo "| --- | --- | --- | --- |"
    local r
    for r in "${ROWS[@]}"; do echo "$r"; done
    [ -n "${1:-}" ] && echo "| $1 | RUNNING (if this line is the last, the call was cut here) | | |"
  } >"$WORK/summary.md"
  cp "$WORK/summary.md" "$OUT/summary.md"
}

for spec in "${ALL[@]}"; do
  IFS=: read -r name cap drycap log <<<"$spec"
  [ "$DRY" = 1 ] && cap=$drycap
  case ",$STEPS," in *",$name,"*) ;; *) continue;; esac
  elapsed=$(( $(date +%s) - T0 ))
  left=$(( DEADLINE_S - elapsed ))
  if [ "$DRY" = 1 ] && [[ "$GPU_STEPS" == *" $name "* ]]; then
    n=$($PY benchmarks/gpu_sanitize.py --list 2>&1 | tee -a "$OUT/check.log" | grep -o '^[0-9]*')
    ROWS+=("| $name | skipped | 0 | dry run: no GPU (the driver covers ${n:-?} _C entry points) |")
    summary; continue
  fi
  if [ "$DRY" != 1 ] && [[ "$GPU_STEPS" == *" $name "* ]] && ! command -v compute-sanitizer >/dev/null; then
    ROWS+=("| $name | skipped | 0 | compute-sanitizer not on PATH |"); summary; continue
  fi
  room=$left
  [ "$name" != headline ] && [ -z "${HEADLINE_DONE:-}" ] && [[ ",$STEPS," == *",headline,"* ]] \
    && room=$(( left - RESERVE ))
  limit=$cap
  { [ "$cap" = 0 ] || [ "$room" -lt "$cap" ]; } && limit=$room
  if [ "$limit" -lt 20 ]; then
    ROWS+=("| $name | not run: deadline | 0 | ${left} s left of ${DEADLINE_S} |"); summary
    [ "$name" = headline ] && HEADLINE_DONE=1
    continue
  fi
  summary "$name"
  echo "===== $name (cap ${limit} s) $(date -u +%H:%M:%S)" | tee -a "$OUT/$log"
  before=$(wc -l <"$OUT/$log")
  t=$(date +%s)
  STEP_LIMIT=$limit timeout -k 5 "$limit" bash benchmarks/gpu_check.sh --step "$name" >>"$OUT/$log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t ))
  note=$(tail -n +"$((before + 1))" "$OUT/$log" | grep '^NOTE: ' | tail -1 | cut -c7-200 | tr '|' '/')
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT (cap ${limit} s)"; FAILED=1 ;;
    *) status="FAILED (rc=$rc)"; FAILED=1 ;;
  esac
  echo "===== $name: $status in ${dt} s" | tee -a "$OUT/$log"
  ROWS+=("| $name | $status | $dt | $note |")
  [ "$name" = headline ] && HEADLINE_DONE=1
  summary
done

echo
echo "total $(( $(date +%s) - T0 )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/summary.md"
exit $FAILED
