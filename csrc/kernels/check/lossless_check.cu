// Instantiates every lossless merge/unmerge/swap kernel variant (LORA_LOSSLESS_VARIANTS in kernels/variants.cuh,
// the list the host code selects from), without torch, so that CMakeLists.txt can compile them for each GPU
// architecture and read ptxas's resource report.
#include "kernels/lossless.cuh"
#include "kernels/variants.cuh"

namespace kl = lora_ext::kernels::lossless;

#define LORA_INSTANTIATE(T, TAB, VEC)                                                       \
  template __global__ void kl::merge_lossless_kernel<T, TAB, VEC>(kl::Args<T, TAB>);       \
  template __global__ void kl::unmerge_lossless_kernel<T, TAB, VEC>(kl::Args<T, TAB>);     \
  template __global__ void kl::swap_lossless_kernel<T, TAB, VEC>(kl::Args<T, TAB>);

LORA_LOSSLESS_VARIANTS(LORA_INSTANTIATE)
