#!/usr/bin/env bash
# The CUDA tests' rehearsal (pytest -m gpu --sim-as-cuda) and the C++ CPU passes under AddressSanitizer: the
# simulator module and lora_ext._cpu (the lossless and mixed-batch CPU passes) built with -fsanitize=address, so
# the host code every launcher shares with lora_ext._C (ops/*_host.h: checks, plans, kernel selection, the
# bindings), the simulated kernels' loads and stores into the tensors' host memory and the CPU passes' are checked
# for out-of-bounds and use-after-free accesses. Written after a segfault in _C on the GPU machine whose
# cause the CPU could not show (bench/results/gpu-2026-11-30-H200-run2/README.md); its first run found nothing.
# By hand, not in CI: about 3 minutes of build and 5 of tests on 2 cores. Nothing in the repository is changed:
# the package is copied to build/asan/pkg with the sanitized modules in it.
#   bash scripts/asan_sim.sh [pytest arguments]
# Default: the gpu tests' rehearsal (-m gpu --sim-as-cuda tests), every test that calls the simulator itself, then
# every test of the lossless and mixed-batch paths (the CPU passes).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$root/build/asan"
PY=${PYTHON:-$root/.venv/bin/python}
mkdir -p "$work/build"
rm -f "$work/build/_sim/_sim.so" "$work/build/_cpu/_cpu.so"
cd "$root"
# One process per module: its load after the build fails (ASan is not preloaded there, and ASan then ends the
# process), so whether each was built is checked after. _cpu keeps setup.py's -ffp-contract=off
# -fno-trapping-math (its AVX2/AVX-512 clones' rounding).
build_one() {  # module name, its extra flags (one word, comma-separated), its sources
  MAX_JOBS=${MAX_JOBS:-2} "$PY" - "$work/build/$1" "$@" >> "$work/build.log" 2>&1 <<'EOF' || true
import os, sys
from torch.utils import cpp_extension
out, name, flags, sources = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
os.makedirs(out, exist_ok=True)
cpp_extension.load(name=name, sources=sources, build_directory=out,
                   extra_cflags=["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer",
                                 *filter(None, flags.split(","))],
                   extra_ldflags=["-fsanitize=address"],
                   extra_include_paths=[os.path.abspath("csrc"), "/usr/local/cuda/include"],
                   is_python_module=False)
EOF
  [ -f "$work/build/$1/$1.so" ] || { tail -30 "$work/build.log"; echo "asan_sim: BUILD FAILED ($1)"; exit 1; }
}
: > "$work/build.log"
build_one _sim "" csrc/sim/sim_module.cpp
build_one _cpu "-ffp-contract=off,-fno-trapping-math" csrc/cpu/*.cpp
rm -rf "$work/pkg" && mkdir -p "$work/pkg"
cp -r lora_ext "$work/pkg/"
for m in _sim _cpu; do
  built=$(ls lora_ext/$m.*.so | head -1)
  cp "$work/build/$m/$m.so" "$work/pkg/$built"
done
# libstdc++ preloaded too: ASan's __cxa_throw interceptor needs it loaded before the first C++ throw
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1
run() { PYTHONPATH="$work/pkg" "$PY" -m pytest -p no:cacheprovider -p no:warnings "$@"; }  # (-q: pyproject's)
if [ $# -gt 0 ]; then
  run "$@"
else
  run --sim-as-cuda -m gpu tests
  run $(grep -l "load_sim\|requires_sim\|lora_ext._sim\|import _sim" tests/test_*.py)
  # the C++ CPU passes (lora_ext._cpu): the lossless merge / unmerge / swap and the mixed-batch CPU kernels
  # (not the crash-safe runner's tests: ASan turns their deliberate segfaults into exit status 1)
  run $(grep -l "lossless\|batch_adapters\|batched\|_cpu\b" tests/test_*.py | xargs grep -L "crash_project")
fi
