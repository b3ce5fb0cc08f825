// lora_ext._C: the CUDA kernels for CUDA tensors. lora_ext.ops wraps these as torch.library custom ops;
// lora_ext._sim exposes the same functions, with the same signatures, through the CPU simulator. The
// bindings themselves are the shared table in ops/bindings_table.h.
#include <torch/extension.h>

#include "ops/batched.h"
#include "ops/bindings_table.h"
#include "ops/forward.h"
#include "ops/merge.h"

namespace {

// The CUDA launchers (ops/merge.cu, ops/forward.cu, ops/batched.cu) as bindings_table.h's Ops.
struct CudaOps {
  static constexpr auto merge_ = &lora_ext::merge_cuda;
  static constexpr auto delta_weight_ = &lora_ext::delta_weight_cuda;
  static constexpr auto swap_ = &lora_ext::swap_cuda;
  static constexpr auto merge_lossless_ = &lora_ext::merge_lossless_cuda;
  static constexpr auto unmerge_lossless_ = &lora_ext::unmerge_lossless_cuda;
  static constexpr auto swap_lossless_ = &lora_ext::swap_lossless_cuda;
  static constexpr auto linear = &lora_ext::linear_cuda;
  static constexpr auto embedding = &lora_ext::embedding_cuda;
  static constexpr auto batched_linear_ = &lora_ext::batched_linear_cuda;
  static constexpr auto batched_embedding_ = &lora_ext::batched_embedding_cuda;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_ext's CUDA kernels";
  lora_ext::bindings::define_ops<CudaOps>(m);
}
