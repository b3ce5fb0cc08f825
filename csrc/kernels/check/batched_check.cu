// Instantiates every batched (multi-adapter) forward kernel variant (LORA_BATCHED_VARIANTS in
// kernels/variants.cuh, the list the host code selects from), without torch, so that CMakeLists.txt can compile
// them for each GPU architecture and read ptxas's resource report.
#include "kernels/batched.cuh"
#include "kernels/variants.cuh"

namespace kb = lora_ext::kernels::batched;

#define LORA_INSTANTIATE(T, SEG, VEC)                                               \
  template __global__ void kb::shrink_kernel<T, SEG, VEC>(kb::Args<T>);            \
  template __global__ void kb::expand_kernel<T, SEG, VEC, false>(kb::Args<T>);     \
  template __global__ void kb::expand_kernel<T, SEG, VEC, true>(kb::Args<T>);

LORA_BATCHED_VARIANTS(LORA_INSTANTIATE)
