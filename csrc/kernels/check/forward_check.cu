// Instantiates every forward kernel variant (LORA_FORWARD_VARIANTS in kernels/variants.cuh, the list the
// host code selects from), without torch, so that CMakeLists.txt can compile them for each GPU
// architecture and read ptxas's resource report.
#include "kernels/forward.cuh"
#include "kernels/variants.cuh"

namespace kf = lora_ext::kernels::forward;

#define LORA_INSTANTIATE(T, TC, VEC)                                      \
  template __global__ void kf::fused_linear_kernel<T, VEC>(kf::Args<T>); \
  template __global__ void kf::shrink_kernel<T, TC, VEC>(kf::Args<T>);   \
  template __global__ void kf::expand_kernel<T, VEC>(kf::Args<T>);       \
  template __global__ void kf::embedding_kernel<T, VEC>(kf::Args<T>);

LORA_FORWARD_VARIANTS(LORA_INSTANTIATE)
