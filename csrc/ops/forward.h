// The CUDA ops behind lora_ext._C.linear and embedding (implemented in ops/forward.cu).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace lora_ext {

// F.linear(x, W, bias) + scale * (x_lora A^T) B^T, the low-rank term only in the enabled column blocks.
// fan_in_fan_out: W is stored (in_features, out_features). scale_tensor: None, or a float32 CUDA tensor of one
// element whose value the kernels read when they run (then `scale` is unused).
at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& x_lora, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b, double scale,
                       int64_t num_blocks, const std::vector<int64_t>& block_ids, bool fan_in_fan_out,
                       const c10::optional<at::Tensor>& scale_tensor);

// weight[ids] + scale * A[:, ids]^T B^T; scale_tensor as for linear_cuda.
at::Tensor embedding_cuda(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b,
                          double scale, c10::optional<int64_t> padding_idx,
                          const c10::optional<at::Tensor>& scale_tensor);

}  // namespace lora_ext
