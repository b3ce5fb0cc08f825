// Instantiates every merge/delta/swap kernel variant the launcher can select, without torch, so that
// CMakeLists.txt can compile them for each GPU architecture and read ptxas's resource report.
#include "kernels/merge.cuh"

namespace km = lora_ext::kernels::merge;

#define LORA_INSTANTIATE(T, TAB, TC)                                                       \
  template __global__ void km::merge_kernel<T, TAB, TC, true>(km::Args<T, TAB>);          \
  template __global__ void km::merge_kernel<T, TAB, TC, false>(km::Args<T, TAB>);         \
  template __global__ void km::delta_weight_kernel<T, TAB, TC, true>(km::Args<T, TAB>);   \
  template __global__ void km::delta_weight_kernel<T, TAB, TC, false>(km::Args<T, TAB>);

#define LORA_INSTANTIATE_SWAP(T, TAB, TC)                                        \
  template __global__ void km::swap_kernel<T, TAB, TC, true>(km::Args<T, TAB>); \
  template __global__ void km::swap_kernel<T, TAB, TC, false>(km::Args<T, TAB>);

LORA_INSTANTIATE_SWAP(float, float, false)
LORA_INSTANTIATE_SWAP(__half, float, false)
LORA_INSTANTIATE_SWAP(__half, __half, false)
LORA_INSTANTIATE_SWAP(__half, __half, true)
LORA_INSTANTIATE_SWAP(__nv_bfloat16, float, false)
LORA_INSTANTIATE_SWAP(__nv_bfloat16, __nv_bfloat16, false)
LORA_INSTANTIATE_SWAP(__nv_bfloat16, __nv_bfloat16, true)

LORA_INSTANTIATE(float, float, false)
LORA_INSTANTIATE(__half, float, false)
LORA_INSTANTIATE(__half, __half, false)
LORA_INSTANTIATE(__half, __half, true)
LORA_INSTANTIATE(__nv_bfloat16, float, false)
LORA_INSTANTIATE(__nv_bfloat16, __nv_bfloat16, false)
LORA_INSTANTIATE(__nv_bfloat16, __nv_bfloat16, true)
