// The CUDA ops behind lora_ext._C.merge_ and delta_weight_ (implemented in ops/merge.cu).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace lora_ext {

// W[blocks] += scale * B_j @ A_j in place; transposed storage: W[:, blocks] += scale * (B_j @ A_j)^T.
void merge_cuda(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale, int64_t num_blocks,
                const std::vector<int64_t>& block_ids, bool transposed);

// out = the dense scale * delta merge_cuda adds, zeros in disabled blocks (loralib's conv1d + zero_pad).
void delta_weight_cuda(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scale,
                       int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed);

}  // namespace lora_ext
