// Instantiates every forward kernel variant the launcher can select, without torch, so that
// CMakeLists.txt can compile them for each GPU architecture and read ptxas's resource report.
#include "kernels/forward.cuh"

namespace kf = lora_ext::kernels::forward;

#define LORA_INSTANTIATE(T, TC, VEC)                                                   \
  template __global__ void kf::fused_linear_kernel<T, VEC>(kf::Args<T>);              \
  template __global__ void kf::shrink_kernel<T, TC, VEC>(kf::Args<T>);                \
  template __global__ void kf::expand_kernel<T, VEC>(kf::Args<T>);                    \
  template __global__ void kf::embedding_kernel<T, VEC>(kf::Args<T>);

LORA_INSTANTIATE(float, false, true)
LORA_INSTANTIATE(float, false, false)
LORA_INSTANTIATE(__half, true, true)
LORA_INSTANTIATE(__half, true, false)
LORA_INSTANTIATE(__nv_bfloat16, true, true)
LORA_INSTANTIATE(__nv_bfloat16, true, false)
