#!/usr/bin/env bash
# Builds and runs the kernels' own checks (CMakeLists.txt): the nvcc compile check for every kernel
# variant on sm_80 and sm_90 (warnings, spills and local memory are errors), then the simulator's tests,
# plain and under ASan/UBSan. Prints ptxas's resource usage as a table. Exits non-zero on any failure.
#
#   scripts/check_kernels.sh [build-dir]      (default build/kernels; env: CUDA_ROOT, JOBS)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$root/build/kernels}"
cuda="${CUDA_ROOT:-/usr/local/cuda}"
jobs="${JOBS:-2}"

mkdir -p "$build"
cmake -S "$root" -B "$build" -DCUDA_ROOT="$cuda" -DCMAKE_BUILD_TYPE=Release > "$build.configure.log" 2>&1 \
  || { cat "$build.configure.log"; exit 1; }
rm -f "$build.configure.log"
# Rebuild the compile check every time so its report is always printed.
rm -rf "$build/kernel_check"
cmake --build "$build" -j "$jobs"

echo "== ptxas resource usage =="
cat "$build"/kernel_check/*.ptxas.txt | python3 "$root/scripts/ptxas_table.py"

echo "== device-side asserts under NDEBUG =="
# Torch's builds define NDEBUG; the kernels' LORA_KERNEL_ASSERT (kernels/common.cuh) must still call
# __assertfail in every variant of the kernels that check their arguments on the device: the embedding kernels
# (ids), the batched shrink (slots) and the batched embedding expand (slots and ids; kEmbedding, the last
# template argument, true).
# asserting CHECK_SOURCE ENTRY_REGEX: every .entry whose mangled name matches calls __assertfail.
asserting() {
  local ptx="$build/$(basename "$1" .cu)_ndebug.ptx"
  "$cuda/bin/nvcc" -std=c++17 -O3 -DNDEBUG -I"$root/csrc" -arch=compute_80 -ptx "$root/csrc/kernels/check/$1" -o "$ptx"
  local entries calling
  entries=$(grep -E '^.visible .entry' "$ptx" | grep -cE "$2" || true)
  calling=$(awk '/^.visible .entry/ { name = $3 } /call.uni/ { getline; if ($0 ~ /__assertfail/) print name }' "$ptx" \
    | { grep -E "$2" || true; } | sort -u | wc -l)
  if [ "$entries" -eq 0 ] || [ "$calling" -ne "$entries" ]; then
    echo "check_kernels: $calling of $entries kernels matching $2 ($1) call __assertfail under NDEBUG" >&2
    exit 1
  fi
  echo "$calling of $entries kernels matching $2 keep their device-side assert"
}
asserting forward_check.cu 'embedding_kernel'
asserting batched_check.cu 'batched13shrink_kernel'
asserting batched_check.cu 'batched13expand_kernelI.*Lb[01]ELb[01]ELb1EE'

echo "== simulator tests =="
"$build/simt_test"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 "$build/simt_test_asan"
echo "check_kernels: all passed"
