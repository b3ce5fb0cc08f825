// CUDA launchers for batched_linear_ and batched_embedding_: the checks and kernel selection are in
// ops/batched_host.h, shared with the simulator module; this file puts the chosen kernels on the current stream.
#include "ops/batched.h"
#include "ops/batched_host.h"
#include "ops/cuda_launch.cuh"

namespace lora_ext {

void batched_linear_cuda(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a_slots,
                         const at::Tensor& b_slots, const at::Tensor& scales, const at::Tensor& index,
                         int64_t tokens_per_index) {
  const char* op = "lora_ext._C.batched_linear_";
  on_cuda(op, "out", out, [&] {
    batched_host::linear<CudaLaunch>(op, out, x, a_slots, b_slots, scales, index, tokens_per_index,
                                     c10::DeviceType::CUDA);
  });
}

void batched_embedding_cuda(const at::Tensor& out, const at::Tensor& ids, const at::Tensor& a_slots,
                            const at::Tensor& b_slots, const at::Tensor& scales, const at::Tensor& index,
                            int64_t tokens_per_index) {
  const char* op = "lora_ext._C.batched_embedding_";
  on_cuda(op, "out", out, [&] {
    batched_host::embedding<CudaLaunch>(op, out, ids, a_slots, b_slots, scales, index, tokens_per_index,
                                        c10::DeviceType::CUDA);
  });
}

}  // namespace lora_ext
