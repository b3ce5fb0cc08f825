#!/usr/bin/env bash
# The one prepared command for the GPU machine (Python 3.12, torch 2.11+cu130, no network):
# build lora_ext with its CUDA kernels, run the CUDA tests, run the benchmarks, print a short table last.
# Budget: <= 8 minutes. Outputs (logs, JUnit XML, JSON) go to $LORA_EXT_GPU_OUT, else $OUT (the device
# tool's output folder), else ./gpu_out.
#
# From this machine:  bash bench/fetch_wheels.sh   (once; the test wheels travel in .wheels/)
# then with the device tool:  run(command="bash bench/gpu_check.sh", carry=[".wheels"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${LORA_EXT_GPU_OUT:-${OUT:-./gpu_out}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0
step() { echo "== $(date +%T) $*"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

step "test dependencies from .wheels"
if [ -d .wheels ]; then
  "$PY" -m pip install -q --no-index --find-links .wheels loralib pytest hypothesis > "$OUT/pip.log" 2>&1 \
    || { echo "wheel install failed"; tail -20 "$OUT/pip.log"; }
fi

step "build (sm_90)"
if ! timeout 300 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 LORA_EXT_CUDA=1 \
    "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1
fi
"$PY" -c "import lora_ext.ops as o; assert o.cuda_kernels_available(), 'lora_ext._C missing'; print('lora_ext._C loaded')" || exit 1

step "CUDA tests"
timeout 150 "$PY" -m pytest -q -x --junitxml="$OUT/tests.xml" -m gpu tests > "$OUT/tests.log" 2>&1
rc=$?
tail -5 "$OUT/tests.log"
[ $rc -eq 0 ] || { status=1; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20; }

step "benchmarks"
timeout 270 "$PY" -m lora_ext.cli bench --device cuda --quick --json "$OUT/bench.json" > "$OUT/bench.md" 2>"$OUT/bench.err" \
  || { status=1; tail -20 "$OUT/bench.err"; }

step "results (full table in $OUT/bench.md)"
cat "$OUT/bench.md"
exit $status
