// Instantiates every merge/delta/swap kernel variant (LORA_MERGE_VARIANTS in kernels/variants.cuh, the list
// the host code selects from), without torch, so that CMakeLists.txt can compile them for each GPU
// architecture and read ptxas's resource report.
#include "kernels/merge.cuh"
#include "kernels/variants.cuh"

namespace km = lora_ext::kernels::merge;

#define LORA_INSTANTIATE(T, TAB, TC, VEC)                                                 \
  template __global__ void km::merge_kernel<T, TAB, TC, VEC>(km::Args<T, TAB>);          \
  template __global__ void km::delta_weight_kernel<T, TAB, TC, VEC>(km::Args<T, TAB>);   \
  template __global__ void km::swap_kernel<T, TAB, TC, VEC>(km::Args<T, TAB>);

LORA_MERGE_VARIANTS(LORA_INSTANTIATE)
