#!/usr/bin/env bash
# Prepare the one GPU call (DESIGN section 7), here, on CPU, before asking for a machine.
#
#   bash benchmarks/gpu_prepare.sh            # build, download, check, print the call
#   bash benchmarks/gpu_prepare.sh --check    # only check the carry and print the call
#
# 1. builds rlkernels/_C for the device (Python 3.12, x86-64, sm_90a) with this machine's
#    nvcc into .gpu/ (git-ignored), so the check imports it instead of building (70-100 s);
# 2. downloads the peer wheels the benchmarks compare against into .gpu/wheels/, only those
#    whose dependencies the device image already has (never torch): Liger-Kernel,
#    Cut Cross-Entropy, TRL (+ datasets, dill, multiprocess, which TRL's helpers import).
#    Not carried: verl (imports ray), flash-attn (no wheel on PyPI; its Triton cross entropy
#    imports the package's CUDA extension first);
# 3. checks that what travels (tracked + untracked-not-ignored files + .gpu/) is under the
#    64 MiB a call may carry, and prints the device command, its length and the carry list.
#
# Knobs: PY312 (a Python 3.12 with headers; default python3.12 on PATH or pyenv's),
# GPU_PREPARE_VENV (build venv with pybind11, default ~/.cache/rlkernels-gpu-prepare/py312),
# RLKERNELS_CUDA_ARCHS (default 90a), GPU_PREPARE_SKIP_BUILD=1 / GPU_PREPARE_SKIP_WHEELS=1
# (reuse what .gpu/ holds), GPU_CHECK_DEADLINE_S (written into the printed command).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=.gpu
LIMIT_BYTES=$((64 * 1024 * 1024))
ARCHS=${RLKERNELS_CUDA_ARCHS:-90a}
VENV=${GPU_PREPARE_VENV:-$HOME/.cache/rlkernels-gpu-prepare/py312}
PEERS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0
       dill==0.4.1 multiprocess==0.70.19)
CHECK_ONLY=0
[ "${1:-}" = --check ] && CHECK_ONLY=1 && GPU_PREPARE_SKIP_BUILD=1 && GPU_PREPARE_SKIP_WHEELS=1
mkdir -p "$CARRY/wheels"

die() { echo "gpu_prepare: $*" >&2; exit 1; }

if [ "${GPU_PREPARE_SKIP_BUILD:-0}" != 1 ]; then
  if [ -z "${PY312:-}" ]; then  # the first Python 3.12 that runs (a pyenv shim may not)
    for c in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
      if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        PY312=$c; break
      fi
    done
  fi
  "${PY312:-false}" -c '' 2>/dev/null || die "no Python 3.12 found (set PY312): _C must match the device's cp312"
  command -v nvcc >/dev/null || die "nvcc is not on PATH: it builds _C for sm_$ARCHS"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY312" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q pybind11
  fi
  BUILD=build/gpu-cp312
  rm -f "$CARRY"/_C.*.so
  echo "gpu_prepare: building rlkernels._C for sm_$ARCHS, cp312 ($BUILD -> $CARRY/)"
  cmake -S . -B "$BUILD" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
    -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$VENV/bin/python" \
    -Dpybind11_DIR="$("$VENV/bin/python" -m pybind11 --cmakedir)" \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DRLKERNELS_OUTPUT_DIR="$ROOT/$CARRY" >/dev/null
  cmake --build "$BUILD" --parallel "${MAX_JOBS:-2}"
fi
SO=$(ls "$CARRY"/_C.cpython-312-x86_64-linux-gnu.so 2>/dev/null || true)
if [ -z "$SO" ]; then
  [ "$CHECK_ONLY" = 1 ] || die "$CARRY/ holds no _C.cpython-312-x86_64-linux-gnu.so (run without GPU_PREPARE_SKIP_BUILD)"
  echo "gpu_prepare: warning: no $CARRY/_C.cpython-312-x86_64-linux-gnu.so: the check would build _C on the device (70-100 s)"
fi
[ "$CHECK_ONLY" = 1 ] || {
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
  echo "archs $ARCHS"
  echo "nvcc $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo unknown)"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$CARRY/BUILD.txt"

if [ "${GPU_PREPARE_SKIP_WHEELS:-0}" != 1 ]; then
  rm -f "$CARRY"/wheels/*.whl
  # manylinux tags as the device README gives them; every peer here is a pure-Python wheel
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$CARRY/wheels" "${PEERS[@]}" 2>&1 \
    | grep -v "^WARNING: Location" || true
fi
ls "$CARRY"/wheels/*.whl >/dev/null 2>&1 || echo "gpu_prepare: warning: no peer wheels in $CARRY/wheels"

# What travels: tracked and untracked-not-ignored files (the device README), plus the carry.
tree_bytes=$(git ls-files -co --exclude-standard -z | xargs -0 -r du -cb 2>/dev/null \
             | awk '$2 == "total" {s += $1} END {print s + 0}')
carry_bytes=$(du -sb "$CARRY" | cut -f1)
total=$((tree_bytes + carry_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "gpu_prepare: working tree $(mib "$tree_bytes") MiB + $CARRY $(mib "$carry_bytes") MiB" \
     "= $(mib "$total") MiB of 64 MiB"
for f in "$CARRY"/_C*.so "$CARRY"/wheels/*.whl; do
  [ -e "$f" ] && printf '  %8s KiB  %s\n' "$(( $(stat -c %s "$f") / 1024 ))" "$f"
done
[ "$total" -lt "$LIMIT_BYTES" ] || die "over the 64 MiB a call may carry"

CMD="GPU_CHECK_DEADLINE_S=${GPU_CHECK_DEADLINE_S:-480} bash benchmarks/gpu_check.sh"
[ "${#CMD}" -lt 2000 ] || die "the command is ${#CMD} characters (limit 2000)"
echo "gpu_prepare: device call (one command, ${#CMD} characters):"
echo "  command:   $CMD"
echo "  carry:     [\"$CARRY\"]"
echo "  timeout_s: 570"
echo "then: python benchmarks/gpu_ingest.py <files_at of the reply>"
