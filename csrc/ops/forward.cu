// CUDA launchers for linear and embedding: the checks, kernel selection and base GEMM are in
// ops/forward_host.h, shared with the simulator module; this file puts the chosen kernels on the current
// stream.
#include <c10/cuda/CUDAException.h>

#include "ops/cuda_launch.cuh"
#include "ops/forward.h"
#include "ops/forward_host.h"

namespace lora_ext {

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& x_lora, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b, double scale,
                       int64_t num_blocks, const std::vector<int64_t>& block_ids, bool fan_in_fan_out,
                       const c10::optional<at::Tensor>& scale_tensor) {
  const char* op = "lora_ext._C.linear";
  return on_cuda(op, "x", x, [&] {
    return forward_host::linear<CudaLaunch>(op, x, x_lora, weight, bias, a, b, scale, num_blocks, block_ids,
                                            fan_in_fan_out, scale_tensor, c10::DeviceType::CUDA, sm_count());
  });
}

at::Tensor embedding_cuda(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b,
                          double scale, c10::optional<int64_t> padding_idx,
                          const c10::optional<at::Tensor>& scale_tensor) {
  const char* op = "lora_ext._C.embedding";
  return on_cuda(op, "weight", weight, [&] {
    return forward_host::embedding<CudaLaunch>(op, ids, weight, a, b, scale, padding_idx, scale_tensor,
                                               c10::DeviceType::CUDA);
  });
}

}  // namespace lora_ext
