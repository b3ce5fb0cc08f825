#!/usr/bin/env bash
# Creates .venv (if missing), installs the build and test dependencies, and builds lora_ext into it
# (the CUDA kernels too when nvcc is found; see setup.py for the switches).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements-dev.txt
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import lora_ext, lora_ext.ops as o; print('lora_ext', lora_ext.__version__, 'CUDA kernels built:', o.cuda_kernels_available())"
