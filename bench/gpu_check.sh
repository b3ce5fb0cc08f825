#!/usr/bin/env bash
# The one prepared command for the GPU machine (Python 3.12, torch 2.11+cu130, no network):
# build lora_ext with its CUDA kernels, run the CUDA tests, run the benchmarks, print a short table last.
# Budget: <= 8 minutes. Outputs (logs, JUnit XML, JSON) go to $LORA_EXT_GPU_OUT, else $OUT (the device
# tool's output folder), else ./gpu_out.
#
# From this machine:  bash bench/fetch_wheels.sh   (once; the test wheels travel in .wheels/)
# then with the device tool:  run(command="bash bench/gpu_check.sh", carry=[".wheels"], timeout_s=540)
#
# Dry run, on a machine without a GPU (CI runs it):  bash bench/gpu_check.sh --dry   (or LORA_EXT_GPU_DRY=1)
# Every step runs with CPU stand-ins for what needs the GPU: no nvidia-smi; the build step checks that lora_ext
# imports (builds it only when it does not); the CUDA tests run with --sim-as-cuda (lora_ext._sim standing in
# for lora_ext._C; tests marked hardware are skipped); the sanitizer's kernel suite runs without the sanitizer
# through the simulator; the benchmarks rehearse the CUDA run's rows (--rehearse).
#
# Order and budget: bench/NOTES-gpu.md. Each step's time limit is cut to what is left of the 8 minutes.
# Python is $PYTHON, else .venv/bin/python when there is one, else python3. Exits non-zero if any step fails.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry]" >&2; exit 2 ;;
esac
case "${LORA_EXT_GPU_DRY:-}" in
  1) DRY=1 ;;
  ""|0) ;;
  *) echo "LORA_EXT_GPU_DRY must be 1 or 0" >&2; exit 2 ;;
esac
OUT=${LORA_EXT_GPU_OUT:-${OUT:-./gpu_out}}
mkdir -p "$OUT"
if [ $DRY = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
status=0
step() { echo "== $(date +%T) $*"; }
BUDGET=${LORA_EXT_GPU_BUDGET:-470}  # seconds for the whole script
# a step's time limit: its own cap, cut to what is left of the budget (at least 5 s: `timeout 0` never stops)
capped() { local cap=$1 left=$((BUDGET - SECONDS)); left=$((left > 5 ? left : 5)); echo $((cap < left ? cap : left)); }
failed() { echo "$*"; status=1; }  # dry run: a step that fails makes the run fail

step "machine"
if [ $DRY = 1 ]; then
  echo "DRY RUN: no GPU, no nvidia-smi; CPU stand-ins for the GPU steps ($(uname -m), $(nproc) cores)" | tee "$OUT/gpu.txt"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt" \
    || failed "torch does not import with $PY"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
fi

step "test dependencies from .wheels"
if [ $DRY = 1 ]; then
  # The three wheels install into a throwaway folder, from .wheels alone and for the GPU machine's Python
  # (their own dependencies come from its image there, so not here); the test dependencies must import here.
  if [ -d .wheels ]; then
    target=$(mktemp -d)
    "$PY" -m pip install -q --no-index --find-links .wheels --no-deps --target "$target" --only-binary=:all: \
      --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
      loralib pytest hypothesis > "$OUT/pip.log" 2>&1 || { failed "wheel install failed"; tail -20 "$OUT/pip.log"; }
    rm -rf "$target"
  else
    echo "no .wheels/ here (bash bench/fetch_wheels.sh fills it before a GPU run)"
  fi
  "$PY" -c "import loralib, pytest, hypothesis; print('test dependencies import')" || failed "test dependencies missing"
elif [ -d .wheels ]; then
  "$PY" -m pip install -q --no-index --find-links .wheels loralib pytest hypothesis > "$OUT/pip.log" 2>&1 \
    || { echo "wheel install failed"; tail -20 "$OUT/pip.log"; }
  # pyproject.toml's SPDX license string needs setuptools >= 77 for the --no-build-isolation build
  "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2> /dev/null \
    || "$PY" -m pip install -q --no-index --find-links .wheels "setuptools>=77" >> "$OUT/pip.log" 2>&1 \
    || echo "setuptools >= 77 missing and not in .wheels: the build may refuse pyproject.toml's license field"
fi

if [ $DRY = 1 ]; then
  step "build (dry run: lora_ext must import; built only if it does not)"
  if "$PY" -c "import lora_ext._sim" 2> /dev/null; then
    echo "lora_ext is built; not rebuilt in a dry run"
  elif ! timeout 1200 env MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install --no-build-isolation --no-deps -e . \
      > "$OUT/build.log" 2>&1; then
    echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1
  fi
  "$PY" -c "import lora_ext.ops as o, lora_ext._sim; print('lora_ext._sim loaded; lora_ext._C', 'loaded' if o.cuda_kernels_available() else 'not built')" || exit 1
else
  step "build (sm_90)"
  if ! timeout 300 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 LORA_EXT_CUDA=1 \
      "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1
  fi
  "$PY" -c "import lora_ext.ops as o; assert o.cuda_kernels_available(), 'lora_ext._C missing'; print('lora_ext._C loaded')" || exit 1
fi

# (pyproject.toml's addopts already has -q; a second -q would drop pytest's closing count line)
if [ $DRY = 1 ]; then
  step "CUDA tests, rehearsed on the CPU (--sim-as-cuda)"
  timeout 600 "$PY" -m pytest -x -rs --junitxml="$OUT/tests.xml" -m gpu --sim-as-cuda tests > "$OUT/tests.log" 2>&1
  rc=$?
  grep "^SKIPPED" "$OUT/tests.log"
  tail -1 "$OUT/tests.log"
else
  # What every later result depends on first; then what only the hardware can show (graphs, streams, sizes).
  gpu_tests() {  # name, time cap, marker expression
    timeout "$(capped "$2")" "$PY" -m pytest --maxfail=25 --junitxml="$OUT/$1.xml" -m "$3" tests > "$OUT/$1.log" 2>&1
    local rc=$?
    tail -3 "$OUT/$1.log"
    [ $rc -eq 0 ] || { status=1; grep -E "^(FAILED|ERROR)" "$OUT/$1.log" | head -20; }
  }
  step "CUDA tests (kernels and layers against float64)"
  gpu_tests tests 150 "gpu and not hardware"
  step "CUDA tests that need the hardware (graphs, streams, large sizes, autocast)"
  gpu_tests tests-hardware 120 "gpu and hardware"
  rc=0
fi
[ $rc -eq 0 ] || { status=1; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20; }

step "compute-sanitizer (memcheck, racecheck) over bench/sanitize_cases.py"
if [ $DRY = 1 ]; then
  timeout 60 "$PY" bench/sanitize_cases.py --rehearse > "$OUT/sanitize.log" 2>&1 || { status=1; cat "$OUT/sanitize.log"; }
  tail -1 "$OUT/sanitize.log"
else
  SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [ ! -x "$SAN" ]; then
    echo "compute-sanitizer not found on this machine: skipped" | tee "$OUT/sanitize.log"
  else
    for tool in memcheck racecheck; do
      if timeout "$(capped 60)" "$SAN" --tool $tool --error-exitcode 9 "$PY" bench/sanitize_cases.py \
          > "$OUT/sanitize-$tool.log" 2>&1; then
        echo "$tool: clean ($(tail -1 "$OUT/sanitize-$tool.log"))"
      else
        status=1; echo "$tool: FAILED or timed out"; tail -30 "$OUT/sanitize-$tool.log"
      fi
    done
  fi
fi

step "benchmarks"
if [ $DRY = 1 ]; then
  bench=(--device cuda --quick --rehearse) limit=120  # the CUDA run's every row on the CPU, lora_ext._sim for _C
else
  bench=(--device cuda --quick) limit=$(capped 270)
fi
timeout $limit "$PY" -m lora_ext.cli bench "${bench[@]}" --json "$OUT/bench.json" > "$OUT/bench.md" 2>"$OUT/bench.err" \
  || { status=1; tail -20 "$OUT/bench.err"; }

step "results (full table in $OUT/bench.md)"
cat "$OUT/bench.md"
if [ $DRY = 1 ]; then
  echo "== dry run: $([ $status = 0 ] && echo every step passed || echo FAILED) in ${SECONDS}s"
fi
exit $status
