// The CUDA ops behind lora_ext._C.merge_, delta_weight_ and swap_, and their lossless forms merge_lossless_,
// unmerge_lossless_ and swap_lossless_ (implemented in ops/merge.cu; docs/LOSSLESS.md).
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

// Lossless merge: as merge_cuda, plus the record (codes, exception list of capacity exc_index.numel(), the
// exception count in counter, zeroed by the caller) from the norms lnorm (n, M_rows), rnorm (n, N) and gamma.
void merge_lossless_cuda(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
                         int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed,
                         const at::Tensor& lnorm, const at::Tensor& rnorm, double gamma, const at::Tensor& codes,
                         const at::Tensor& exc_index, const at::Tensor& exc_bits, const at::Tensor& counter);

// The base back, bit for bit, from the merged W, the pair and its record (exc_index: the exact sorted list).
void unmerge_lossless_cuda(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
                           int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed,
                           const at::Tensor& codes, const at::Tensor& exc_index, const at::Tensor& exc_bits);

// Restores the base with the old pair and its record and merges the new pair from it, writing the new record.
void swap_lossless_cuda(const at::Tensor& w, const at::Tensor& old_a, const at::Tensor& old_b, double old_scale,
                        const at::Tensor& old_codes, const at::Tensor& old_exc_index, const at::Tensor& old_exc_bits,
                        const at::Tensor& new_a, const at::Tensor& new_b, double new_scale, int64_t num_blocks,
                        const std::vector<int64_t>& block_ids, bool transposed, const at::Tensor& lnorm,
                        const at::Tensor& rnorm, double gamma, const at::Tensor& codes, const at::Tensor& exc_index,
                        const at::Tensor& exc_bits, const at::Tensor& counter);

}  // namespace lora_ext
