#!/usr/bin/env bash
# The CUDA tests' rehearsal (pytest -m gpu --sim-as-cuda) under AddressSanitizer: the simulator module built with
# -fsanitize=address, so the host code every launcher shares with lora_ext._C (ops/*_host.h: checks, plans,
# kernel selection, the bindings) and the simulated kernels' loads and stores into the tensors' host memory are
# checked for out-of-bounds and use-after-free accesses. Written after a segfault in _C on the GPU machine whose
# cause the CPU could not show (bench/results/gpu-2026-11-30-H200-run2/README.md); its first run found nothing.
# By hand, not in CI: about 3 minutes of build and 5 of tests on 2 cores. Nothing in the repository is changed:
# the package is copied to build/asan/pkg with the sanitized module in it.
#   bash scripts/asan_sim.sh [pytest arguments]
# Default: the gpu tests' rehearsal (-m gpu --sim-as-cuda tests), then every test that calls the simulator itself.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$root/build/asan"
PY=${PYTHON:-$root/.venv/bin/python}
mkdir -p "$work/build"
rm -f "$work/build/_sim.so"
cd "$root"
# The build's own load of the module fails (ASan is not preloaded there): whether it was built is checked after.
MAX_JOBS=${MAX_JOBS:-2} "$PY" - "$work/build" > "$work/build.log" 2>&1 <<'EOF' || true
import os, sys
from torch.utils import cpp_extension
cpp_extension.load(name="_sim", sources=["csrc/sim/sim_module.cpp"], build_directory=sys.argv[1],
                   extra_cflags=["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
                   extra_ldflags=["-fsanitize=address"],
                   extra_include_paths=[os.path.abspath("csrc"), "/usr/local/cuda/include"],
                   is_python_module=False)
EOF
[ -f "$work/build/_sim.so" ] || { tail -30 "$work/build.log"; echo "asan_sim: BUILD FAILED"; exit 1; }
rm -rf "$work/pkg" && mkdir -p "$work/pkg"
cp -r lora_ext "$work/pkg/"
sim=$(ls lora_ext/_sim.*.so | head -1)
cp "$work/build/_sim.so" "$work/pkg/$sim"
# libstdc++ preloaded too: ASan's __cxa_throw interceptor needs it loaded before the first C++ throw
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1
run() { PYTHONPATH="$work/pkg" "$PY" -m pytest -q -p no:cacheprovider -p no:warnings "$@"; }
if [ $# -gt 0 ]; then
  run "$@"
else
  run --sim-as-cuda -m gpu tests
  run $(grep -l "load_sim\|requires_sim\|lora_ext._sim\|import _sim" tests/test_*.py)
fi
