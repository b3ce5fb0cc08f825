#!/usr/bin/env bash
# The GPU machine's software here, without its GPU: Python 3.12 and torch 2.11.0+cu130 (the registry's build,
# the one that machine has), lora_ext built the way bench/gpu_check.sh builds it there (LORA_EXT_CUDA=1,
# TORCH_CUDA_ARCH_LIST=9.0), then `bench/gpu_check.sh --dry` and the whole test suite against that torch.
# check_torch211.sh (in CI) only compiles against torch 2.11's headers; this also runs the Python side, where
# an API that torch 2.14 has and 2.11 lacks shows (the first run found dynamo's ContextVar and DTensor's
# _StridedShard gather). Last, gpu_check.sh's own GPU flow with stand-ins for nvidia-smi and compute-sanitizer.
# By hand, not in CI: about 3 GB of downloads the first time, then a clone of HEAD, a 4-minute build, a
# 6-minute test run and a 3-minute GPU-flow build on 2 cores.
#   bash scripts/rehearse_torch211.sh [--dry-only]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$root/build/r211"
is312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' > /dev/null 2>&1; }
if [ -z "${PY312:-}" ]; then  # (pyenv's python3.12 shim exists but fails unless 3.12 is selected: try each)
  for c in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    if is312 "$c"; then PY312=$c; break; fi
  done
fi
is312 "${PY312:-none}" || { echo "rehearse_torch211: no Python 3.12 found (set PY312)"; exit 2; }
mkdir -p "$work"
if [ ! -x "$work/venv/bin/python" ]; then
  "$PY312" -m venv "$work/venv"
  "$work/venv/bin/pip" install -q --upgrade pip
  # transformers and accelerate at the GPU machine's versions (the device tool's KINDS.md); torch caps setuptools
  "$work/venv/bin/pip" install -q torch==2.11.0 ninja pybind11 "setuptools>=77,<82" wheel numpy pytest hypothesis \
    loralib==0.1.2 safetensors tqdm peft transformers==5.17.0 accelerate==1.15.0 ruff 2>&1 | grep -v "^WARNING: Location" || true
fi
V="$work/venv/bin/python"
"$V" -c "import torch, sys; assert torch.__version__.startswith('2.11.0'), torch.__version__; print('python', sys.version.split()[0], 'torch', torch.__version__)"
rm -rf "$work/repo"
git clone -q "$root" "$work/repo"
cd "$work/repo"
echo "== build (sm_90, LORA_EXT_CUDA=1), log: $work/build.log"
MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST=9.0 LORA_EXT_CUDA=1 "$V" -m pip install --no-build-isolation --no-deps -e . \
  > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; echo "rehearse_torch211: BUILD FAILED"; exit 1; }
status=0
echo "== bench/gpu_check.sh --dry"
PYTHON="$V" LORA_EXT_GPU_OUT="$work/dry" bash bench/gpu_check.sh --dry > "$work/dry.log" 2>&1 || status=1
grep -E "^== dry run|passed|failed" "$work/dry.log" | tail -4
if [ "${1:-}" != "--dry-only" ]; then
  echo "== the test suite (log: $work/tests.log)"
  "$V" -m pytest -p no:warnings -rf tests > "$work/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$work/tests.log" | head -30 || true
  tail -1 "$work/tests.log"
fi
if [ "${1:-}" != "--dry-only" ]; then
  # gpu_check.sh's GPU-machine flow (never run by its dry mode), with stand-ins for nvidia-smi and
  # compute-sanitizer: the LORA_EXT_SIM=0 sm_90 build must load lora_ext._C, the test steps run (their tests
  # skip: no GPU), and the benchmark and sanitizer steps must fail for want of a GPU, not of a script error
  echo "== bench/gpu_check.sh's GPU flow with stand-ins (log: $work/flow.log)"
  fake="$work/fakebin"; mkdir -p "$fake"
  printf '#!/bin/sh\necho "name, driver_version"\necho "stand-in (no GPU), 0"\n' > "$fake/nvidia-smi"
  printf '#!/bin/sh\nshift 4\n"$@"\nrc=$?\necho "ERROR SUMMARY: 0 errors"\nexit $rc\n' > "$fake/compute-sanitizer"
  chmod +x "$fake/nvidia-smi" "$fake/compute-sanitizer"
  rm -rf "$work/flow"
  PATH="$fake:$PATH" MAX_JOBS=${MAX_JOBS:-2} PYTHON="$V" OUT="$work/flow" LORA_EXT_GPU_BUDGET=1500 \
    LORA_EXT_GPU_BUILD_CAP=1200 \
    bash bench/gpu_check.sh > "$work/flow.log" 2>&1 && { echo "the GPU flow passed without a GPU?"; status=1; }
  for want in "lora_ext._C loaded" "no CUDA device is visible to torch" "memcheck: FAILED" "racecheck: FAILED" \
      "== FAILED in"; do
    grep -q "$want" "$work/flow.log" || { echo "the GPU flow's log lacks: $want"; status=1; }
  done
  n=$(find "$work/flow" -type f | wc -l)
  [ "$n" -le 8 ] || { echo "the GPU flow left $n files in \$OUT: the device tool brings back 8"; status=1; }
  grep -E "^(== |built in|SKIPPED for)" "$work/flow.log"
fi
echo "rehearse_torch211: $([ $status = 0 ] && echo passed || echo FAILED) (HEAD $(git rev-parse --short HEAD))"
exit $status
