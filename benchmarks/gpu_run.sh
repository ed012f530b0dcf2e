#!/usr/bin/env bash
# One GPU session in one go (DESIGN section 7): build _C for sm_90a, check, benchmark.
#
#   bash benchmarks/gpu_run.sh OUTDIR [STEPS] [BENCH_ARGS...]
#
# STEPS (comma list, default all): setup,info,verify,gputests,cudatests,memcheck,bench,trainer
# (cudatests: the parity tests of tests/ops and tests/cuda on backend=cuda; memcheck:
# compute-sanitizer --tool memcheck over a small cuda parity subset)
# BENCH_ARGS go to `rlkernels bench` (default: --peers --budget-s 330).
# Each step is logged to OUTDIR/<step>.log; a failing step is recorded, the next one runs.
# One device call may run 10 minutes: the default steps fit; for the whole grid run two calls
# (see benchmarks/NOTES.md), e.g. STEPS=setup,info,verify,gputests,bench with --op vocab ops,
# then STEPS=setup,bench with the other ops. At the end everything is packed into
# OUTDIR/gpu_run.tar.gz and, if $OUT is set, copied there with the CSV, tables and logs
# (the device tool brings back at most 8 files).
set -u
OUTDIR=${1:?usage: gpu_run.sh OUTDIR [STEPS] [BENCH_ARGS...]}
STEPS=${2:-setup,info,verify,gputests,cudatests,memcheck,bench,trainer}
shift; shift 2>/dev/null || true
BENCH_ARGS=("$@")
[ ${#BENCH_ARGS[@]} -eq 0 ] && BENCH_ARGS=(--peers --budget-s 330)
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 RLKERNELS_CUDA_ARCHS=${RLKERNELS_CUDA_ARCHS:-90a}
SUMMARY="$OUTDIR/summary.log"
: >"$SUMMARY"
T0=$(date +%s)

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  case ",$STEPS," in *",$name,"*) ;; *) return 0;; esac
  local t=$(date +%s)
  echo "=== $name: $*" | tee -a "$SUMMARY"
  timeout "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUTDIR/$name.log"
  echo "=== $name: rc=$rc in $(( $(date +%s) - t )) s" | tee -a "$SUMMARY"
}

setup() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/rk_peers .whl/*.whl || echo "peer wheels: install failed"
  fi
  $PY -m pip install --no-build-isolation --no-deps -e . && \
    $PY -c "import rlkernels; print(rlkernels.available_backends())"
}
[ -d /tmp/rk_peers ] && export PYTHONPATH=/tmp/rk_peers${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv \
  >"$OUTDIR/nvidia-smi.txt" 2>&1 || true
step setup 300 setup
[ -d /tmp/rk_peers ] && export PYTHONPATH=/tmp/rk_peers${PYTHONPATH:+:$PYTHONPATH}
step info 60 $PY -m rlkernels info
step verify 240 $PY -m rlkernels verify
step gputests 300 $PY -m pytest -q -m gpu tests -x -p no:cacheprovider
step cudatests 300 $PY -m pytest -q tests/ops tests/cuda -k cuda -p no:cacheprovider
if command -v compute-sanitizer >/dev/null 2>&1; then
  step memcheck 300 compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -q \
    -p no:cacheprovider tests/cuda/test_cuda_vocab.py tests/cuda/test_cuda_advantage_policy.py \
    -k "token_logprobs_matches_reference and 1031 or sliced or inplace_backward or kl_divergence_matches_reference and 1031 and jsd or group_advantages_index or grpo_loss_matches"
else
  echo "=== memcheck: compute-sanitizer not found, skipped" | tee -a "$SUMMARY"
fi
step bench 540 $PY -m rlkernels bench --out "$OUTDIR/results" "${BENCH_ARGS[@]}"
# issue 6: one GRPO step of a Qwen2.5-0.5B-shaped model (V=151936, 16k tokens, bf16),
# peak memory and step time with --ops torch vs kernels (trainer.md / trainer.json)
step trainer 420 $PY benchmarks/bench_trainer.py --out "$OUTDIR/results"

echo "total $(( $(date +%s) - T0 )) s" | tee -a "$SUMMARY"
tar -czf /tmp/gpu_run.tar.gz -C "$OUTDIR" . && mv /tmp/gpu_run.tar.gz "$OUTDIR/"
if [ -n "${OUT:-}" ] && [ "$OUT" != "$OUTDIR" ]; then
  cp "$OUTDIR/gpu_run.tar.gz" "$SUMMARY" "$OUT/" 2>/dev/null
  for f in "$OUTDIR"/results/*.csv "$OUTDIR"/results/*.md "$OUTDIR"/results/trainer.json; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
fi
grep "rc=" "$SUMMARY"
