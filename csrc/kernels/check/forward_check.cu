// Instantiates every forward kernel variant (LORA_FORWARD_VARIANTS in kernels/variants.cuh, the list the
// host code selects from), without torch, so that CMakeLists.txt can compile them for each GPU
// architecture and read ptxas's resource report.
#include "kernels/forward.cuh"
#include "kernels/variants.cuh"

namespace kf = lora_ext::kernels::forward;

#define LORA_INSTANTIATE(T, TAB, TC, VEC)                                                \
  template __global__ void kf::fused_linear_kernel<T, TAB, VEC>(kf::Args<T, TAB>);     \
  template __global__ void kf::shrink_kernel<T, TAB, TC, VEC>(kf::Args<T, TAB>);       \
  template __global__ void kf::expand_kernel<T, TAB, VEC>(kf::Args<T, TAB>);           \
  template __global__ void kf::embedding_kernel<T, TAB, VEC>(kf::Args<T, TAB>);

LORA_FORWARD_VARIANTS(LORA_INSTANTIATE)
