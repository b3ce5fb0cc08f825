#!/usr/bin/env bash
# Creates .venv (if missing), installs the build and test dependencies, and builds lora_ext into it
# (the CUDA kernels too when nvcc is found; see setup.py for the switches).
#
# The simulator lora_ext._sim is one large translation unit, the longest compile of the build, which ninja cannot
# split: it builds beside the other modules (setup.py's LORA_EXT_SIM=only, in place, its own build folders) rather
# than before them with a core idle. LORA_EXT_SIM=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements-dev.txt
sim=${LORA_EXT_SIM:-1}
sim_pid=
if [ "$sim" = 1 ]; then
  mkdir -p build
  LORA_EXT_SIM=only MAX_JOBS=1 .venv/bin/python setup.py -q build_ext --inplace --build-temp build/sim-temp \
    --build-lib build/sim-lib > build/sim_build.log 2>&1 &
  sim_pid=$!
  trap 'kill "$sim_pid" 2> /dev/null || true' EXIT
  sim=0
fi
LORA_EXT_SIM=$sim MAX_JOBS=${MAX_JOBS:-2} .venv/bin/pip install -q --no-build-isolation --no-deps -e .
if [ -n "$sim_pid" ]; then
  if ! wait "$sim_pid"; then
    cat build/sim_build.log
    echo "setup: building lora_ext._sim failed (its log is above)" >&2
    exit 1
  fi
  trap - EXIT
  .venv/bin/python -c "import lora_ext._sim" || { cat build/sim_build.log; exit 1; }
fi
.venv/bin/python -c "import lora_ext, lora_ext.ops as o; print('lora_ext', lora_ext.__version__, 'CUDA kernels built:', o.cuda_kernels_available())"
