// The CUDA ops behind lora_ext._C.batched_linear_ and batched_embedding_ (implemented in ops/batched.cu).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace lora_ext {

// out[m] = round(out[m] + scales[i] * (x[m] a_slots[i]) b_slots[i]) in place, i = index[m / tokens_per_index],
// for the rows whose slot is not -1 (the others are left as they are). a_slots (S, k, R), b_slots (S, R, d),
// scales (S,) float32 and index int32 are read by the kernels (no host sync: a CUDA graph can capture the call).
void batched_linear_cuda(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a_slots,
                         const at::Tensor& b_slots, const at::Tensor& scales, const at::Tensor& index,
                         int64_t tokens_per_index);

// The same with t = a_slots[i, ids[m]] (ids (M,) int64 or int32, a_slots (S, num_embeddings, R)); an id out of
// range in an updated row fails the kernel.
void batched_embedding_cuda(const at::Tensor& out, const at::Tensor& ids, const at::Tensor& a_slots,
                            const at::Tensor& b_slots, const at::Tensor& scales, const at::Tensor& index,
                            int64_t tokens_per_index);

}  // namespace lora_ext
