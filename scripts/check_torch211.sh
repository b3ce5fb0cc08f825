#!/usr/bin/env bash
# The GPU machine builds lora_ext against torch 2.11, whose extensions compile as C++17 (torch >= 2.13
# requires C++20, which is what this machine builds with). This compiles every host and CUDA source
# against torch 2.11's headers in C++17 so that a C++20-only construct fails here, not on the GPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
work=build/torch211
PY=${PY:-.venv/bin/python}
if [ ! -d "$work/torch/include" ]; then
  mkdir -p "$work"
  "$PY" -m pip download -q --no-deps --only-binary=:all: torch==2.11.0 -d "$work" 2>&1 | grep -v WARNING || true
  (cd "$work" && unzip -q -o torch-2.11.0-*.whl 'torch/include/*' && rm -f torch-2.11.0-*.whl)
fi
T="$work/torch/include"
PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
PB=$("$PY" -c "import pybind11; print(pybind11.get_include())")
INC=(-I csrc -I "$T" -I "$T/torch/csrc/api/include" -I "$PYINC" -I "$PB" -I /usr/local/cuda/include)
DEFS=(-DTORCH_EXTENSION_NAME=check -DTORCH_API_INCLUDE_EXTENSION_H)
for f in csrc/bindings.cpp csrc/sim/*.cpp csrc/cpu/*.cpp; do
  echo "c++17 + torch 2.11 headers: $f"
  g++ -std=c++17 -fsyntax-only "${DEFS[@]}" "${INC[@]}" "$f"
done
for f in csrc/ops/*.cu; do
  echo "c++17 + torch 2.11 headers (nvcc, sm_90): $f"
  /usr/local/cuda/bin/nvcc -std=c++17 -c -o /dev/null -gencode arch=compute_90,code=sm_90 \
    --expt-relaxed-constexpr "${DEFS[@]}" -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ "${INC[@]}" "$f"
done
echo "check_torch211: all sources compile as C++17 against torch 2.11"
