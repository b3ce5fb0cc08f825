#!/usr/bin/env bash
# The one prepared command for the GPU machine (Python 3.12, torch 2.11+cu130, no network):
# build lora_ext with its CUDA kernels, run the CUDA tests, run the benchmarks, print a short table last.
# Budget: <= 8 minutes. Outputs (logs, JUnit XML, JSON) go to $LORA_EXT_GPU_OUT, else $OUT (the device
# tool's output folder), else ./gpu_out.
#
# From this machine:  bash bench/fetch_wheels.sh   (once; the test wheels travel in .wheels/)
# then with the device tool:  run(command="bash bench/gpu_check.sh", carry=[".wheels"], timeout_s=510)
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
BUDGET=${LORA_EXT_GPU_BUDGET:-480}  # 8 minutes for the whole script (issue 10), run with timeout_s=510; a rerun fits
# The build's own cap. Measured on this project's 2-core machine, one file at a time: merge.cu 60 s, forward.cu
# 34 s, batched.cu 30 s (sm_90), batched_cpu.cpp 52 s, the simulator 73 s; the first device run compiled about
# 1.8x slower per file (the simulator took most of its 150 s). With 16 jobs and without the simulator the
# critical path is about _cpu then merge.cu: about 200 s there.
BUILD_CAP=${LORA_EXT_GPU_BUILD_CAP:-300}
# a step's time limit: its own cap, cut to what is left of the budget (at least 5 s: `timeout 0` never stops)
capped() { local cap=$1 left=$((BUDGET - SECONDS)); left=$((left > 5 ? left : 5)); echo $((cap < left ? cap : left)); }
failed() { echo "$*"; status=1; }  # dry run: a step that fails makes the run fail
skipped=()  # steps not started for lack of time: the run is then incomplete (exit 3), not clean
time_for() {  # step name, seconds it needs at least: false (and noted) when less is left of the budget
  if [ $((BUDGET - SECONDS)) -lt "$2" ]; then
    echo "SKIPPED for time: $1 needs >= $2 s, $((BUDGET - SECONDS)) s left of ${BUDGET} s"; skipped+=("$1"); return 1
  fi
}
# pytest that survives a crash: the crashing test named, the tests after it run (bench/crash_safe.sh)
source bench/crash_safe.sh
# cuda-gdb (the GPU machine has it) gives a crash's C++ backtrace
GDB=""
[ $DRY = 1 ] || GDB=$(command -v cuda-gdb || ls "${CUDA_HOME:-/usr/local/cuda}/bin/cuda-gdb" 2> /dev/null || true)
# The device tool brings back at most 8 files from $OUT: a GPU run writes gpu.txt, build.log (the wheels' pip
# output too), tests.log, tests-hardware.log, bench.md, bench.json, bench.err and sanitize.log, no more.

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
  # each on its own: one that fails to install leaves the others (loralib missing alone skips its comparisons)
  for w in loralib pytest hypothesis; do
    "$PY" -m pip install -q --no-index --find-links .wheels "$w" >> "$OUT/build.log" 2>&1 \
      || { echo "wheel install failed: $w"; tail -20 "$OUT/build.log"; }
  done
  # pyproject.toml's SPDX license string needs setuptools >= 77 for the --no-build-isolation build
  "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2> /dev/null \
    || "$PY" -m pip install -q --no-index --find-links .wheels "setuptools>=77" >> "$OUT/build.log" 2>&1 \
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
  step "build (sm_90; without the simulator, LORA_EXT_SIM=0: nothing here needs it)"
  if ! timeout "$(capped "$BUILD_CAP")" env MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST=9.0 LORA_EXT_CUDA=1 LORA_EXT_SIM=0 \
      "$PY" -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1; then
    echo "BUILD FAILED (or timed out) after ${SECONDS}s of the ${BUDGET} s budget"; tail -40 "$OUT/build.log"; exit 1
  fi
  "$PY" -c "import lora_ext.ops as o; assert o.cuda_kernels_available(), 'lora_ext._C missing'; print('lora_ext._C loaded')" || exit 1
  echo "built in ${SECONDS}s from the start; $((BUDGET - SECONDS)) s left of ${BUDGET} s"
fi

# (pyproject.toml's addopts already has -q; a second -q would drop pytest's closing count line)
if [ $DRY = 1 ]; then
  step "CUDA tests, rehearsed on the CPU (--sim-as-cuda)"
  crash_safe_pytest "$OUT/tests.log" 600 -x -rs --junitxml="$OUT/tests.xml" -m gpu --sim-as-cuda tests
  rc=$?
  grep "^SKIPPED" "$OUT/tests.log"
  tail -1 "$OUT/tests.log"
else
  # What every later result depends on first; then what only the hardware can show (graphs, streams, sizes).
  gpu_tests() {  # name, time cap, marker expression
    time_for "$1" 30 || return 0
    crash_safe_pytest "$OUT/$1.log" "$2" --maxfail=25 -rfEs -m "$3" tests
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

step "benchmarks"
if [ $DRY = 1 ]; then
  bench=(--device cuda --quick --rehearse) limit=120  # the CUDA run's every row on the CPU, lora_ext._sim for _C
else
  # the merge and switch rows come first; 90 s stay for the sanitizer after it
  bench=(--device cuda --quick) limit=$(( $(capped 270) - 90 ))
  [ $limit -ge 30 ] || limit=0
fi
if [ $limit -gt 0 ]; then
  timeout $limit "$PY" -m lora_ext.cli bench "${bench[@]}" --json "$OUT/bench.json" > "$OUT/bench.md" 2>"$OUT/bench.err" \
    || { status=1; tail -20 "$OUT/bench.err"; }
else
  echo "SKIPPED for time: benchmarks, $((BUDGET - SECONDS)) s left of ${BUDGET} s"; skipped+=("benchmarks")
fi

step "compute-sanitizer (memcheck, racecheck) over bench/sanitize_cases.py"
if [ $DRY = 1 ]; then
  timeout 60 "$PY" bench/sanitize_cases.py --rehearse > "$OUT/sanitize.log" 2>&1 || { status=1; cat "$OUT/sanitize.log"; }
  tail -1 "$OUT/sanitize.log"
else
  SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [ ! -x "$SAN" ]; then
    echo "compute-sanitizer not found on this machine: skipped" | tee "$OUT/sanitize.log"
  else
    # memcheck without torch's caching allocator: an access past a tensor inside a cached block is then seen
    for tool in memcheck racecheck; do
      time_for "compute-sanitizer $tool" 20 || continue
      log=$(mktemp) nocache=()
      [ $tool = memcheck ] && nocache=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)  # (torch reads it as set or not)
      if timeout "$(capped 60)" env "${nocache[@]}" "$SAN" --tool $tool --error-exitcode 9 "$PY" bench/sanitize_cases.py \
          > "$log" 2>&1 && grep -q "^sanitize_cases: all passed" "$log" && grep -qE "(ERROR|RACECHECK) SUMMARY: 0 (errors|hazards displayed \(0 errors)" "$log"; then
        # (the suite's own verdict too: whether the sanitizer passes the program's exit code on is not relied on)
        echo "$tool: clean ($(tail -1 "$log"))"
      else
        status=1; echo "$tool: FAILED or timed out"; tail -30 "$log"
      fi
      { echo "== $tool"; cat "$log"; } >> "$OUT/sanitize.log"; rm -f "$log"
    done
  fi
fi

step "profile of the largest misses (bench/gpu_profile.py), into $OUT/gpu.txt, where time is left"
# Optional: what the next session reads first (host time, runtime calls, kernels of the misses). Not run, or cut,
# for lack of time, the run stays clean; its failure (an error, not the time limit) fails the run.
if [ $DRY = 1 ]; then
  { echo; echo "== profile (rehearsal)"; } >> "$OUT/gpu.txt"
  timeout 120 "$PY" bench/gpu_profile.py --rehearse >> "$OUT/gpu.txt" 2>&1 || { status=1; tail -20 "$OUT/gpu.txt"; }
  tail -1 "$OUT/gpu.txt"
elif [ $((BUDGET - SECONDS)) -ge 40 ]; then
  { echo; echo "== profile"; } >> "$OUT/gpu.txt"
  timeout "$(capped 90)" env PYTHONUNBUFFERED=1 "$PY" bench/gpu_profile.py >> "$OUT/gpu.txt" 2>&1
  rc=$?
  if [ $rc -eq 124 ]; then  # cut by the budget: what it printed stays; not a failure
    echo "profile cut at the budget's end (its cases so far are in gpu.txt)"
  elif [ $rc -ne 0 ]; then
    status=1; tail -20 "$OUT/gpu.txt"
  fi
  tail -11 "$OUT/gpu.txt"
else
  echo "profile not run: $((BUDGET - SECONDS)) s left of ${BUDGET} s (it needs 40); run it alone: python bench/gpu_profile.py"
fi

step "results (full table in $OUT/bench.md)"
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
if [ $DRY = 1 ]; then
  echo "== dry run: $([ $status = 0 ] && echo every step passed || echo FAILED) in ${SECONDS}s"
fi
if [ $status = 0 ] && [ ${#skipped[@]} -gt 0 ]; then
  echo "== INCOMPLETE in ${SECONDS}s: no step failed, but these did not run for lack of time: ${skipped[*]}"
  exit 3
fi
[ $DRY = 1 ] || echo "== $([ $status = 0 ] && echo "every step passed" || echo FAILED) in ${SECONDS}s (budget ${BUDGET} s)"
exit $status
