// The CUDA ops behind lora_ext._C.merge_, delta_weight_ and swap_ (implemented in ops/merge.cu).
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

// W[blocks] += new_scale * B2_j @ A2_j - old_scale * B1_j @ A1_j in one pass (one adapter replaced by another).
void swap_cuda(const at::Tensor& w, const at::Tensor& old_a, const at::Tensor& old_b, double old_scale,
               const at::Tensor& new_a, const at::Tensor& new_b, double new_scale, int64_t num_blocks,
               const std::vector<int64_t>& block_ids, bool transposed);

}  // namespace lora_ext
