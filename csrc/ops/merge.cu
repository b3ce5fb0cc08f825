// CUDA launchers for merge_, delta_weight_ and swap_ and their lossless forms (merge_lossless_,
// unmerge_lossless_, swap_lossless_): the checks and kernel selection are in ops/merge_host.h, shared with the
// simulator module; this file only puts the chosen kernel on the current stream.
#include "ops/cuda_launch.cuh"
#include "ops/merge.h"
#include "ops/merge_host.h"

namespace lora_ext {
namespace {

template <bool kDelta>
void apply(const char* op, const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
           int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed) {
  on_cuda(op, kDelta ? "out" : "W", w, [&] {
    merge_host::apply<CudaLaunch, kDelta>(op, w, a, b, scale, num_blocks, block_ids, transposed, c10::DeviceType::CUDA);
  });
}

}  // namespace

void merge_cuda(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale, int64_t num_blocks,
                const std::vector<int64_t>& block_ids, bool transposed) {
  apply<false>("lora_ext._C.merge_", w, a, b, scale, num_blocks, block_ids, transposed);
}

void delta_weight_cuda(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scale,
                       int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed) {
  apply<true>("lora_ext._C.delta_weight_", out, a, b, scale, num_blocks, block_ids, transposed);
}

void swap_cuda(const at::Tensor& w, const at::Tensor& old_a, const at::Tensor& old_b, double old_scale,
               const at::Tensor& new_a, const at::Tensor& new_b, double new_scale, int64_t num_blocks,
               const std::vector<int64_t>& block_ids, bool transposed) {
  const char* op = "lora_ext._C.swap_";
  on_cuda(op, "W", w, [&] {
    merge_host::apply_swap<CudaLaunch>(op, w, old_a, old_b, old_scale, new_a, new_b, new_scale, num_blocks, block_ids,
                                       transposed, c10::DeviceType::CUDA);
  });
}

void merge_lossless_cuda(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
                         int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed,
                         const at::Tensor& lnorm, const at::Tensor& rnorm, double gamma, const at::Tensor& codes,
                         const at::Tensor& exc_index, const at::Tensor& exc_bits, const at::Tensor& counter) {
  const char* op = "lora_ext._C.merge_lossless_";
  on_cuda(op, "W", w, [&] {
    merge_host::merge_lossless<CudaLaunch>(op, w, a, b, scale, num_blocks, block_ids, transposed, lnorm, rnorm, gamma,
                                           codes, exc_index, exc_bits, counter, c10::DeviceType::CUDA);
  });
}

void unmerge_lossless_cuda(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
                           int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed,
                           const at::Tensor& codes, const at::Tensor& exc_index, const at::Tensor& exc_bits) {
  const char* op = "lora_ext._C.unmerge_lossless_";
  on_cuda(op, "W", w, [&] {
    merge_host::unmerge_lossless<CudaLaunch>(op, w, a, b, scale, num_blocks, block_ids, transposed, codes, exc_index,
                                             exc_bits, c10::DeviceType::CUDA);
  });
}

void swap_lossless_cuda(const at::Tensor& w, const at::Tensor& old_a, const at::Tensor& old_b, double old_scale,
                        const at::Tensor& old_codes, const at::Tensor& old_exc_index, const at::Tensor& old_exc_bits,
                        const at::Tensor& new_a, const at::Tensor& new_b, double new_scale, int64_t num_blocks,
                        const std::vector<int64_t>& block_ids, bool transposed, const at::Tensor& lnorm,
                        const at::Tensor& rnorm, double gamma, const at::Tensor& codes, const at::Tensor& exc_index,
                        const at::Tensor& exc_bits, const at::Tensor& counter) {
  const char* op = "lora_ext._C.swap_lossless_";
  on_cuda(op, "W", w, [&] {
    merge_host::swap_lossless<CudaLaunch>(op, w, old_a, old_b, old_scale, old_codes, old_exc_index, old_exc_bits,
                                          new_a, new_b, new_scale, num_blocks, block_ids, transposed, lnorm, rnorm,
                                          gamma, codes, exc_index, exc_bits, counter, c10::DeviceType::CUDA);
  });
}

}  // namespace lora_ext
