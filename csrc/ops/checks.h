// Argument checks shared by the host code of every op (ops/*_host.h), so that each rule and its message
// exist once. They raise ValueError in Python (LORA_CHECK_VALUE: check_msg.h).
#pragma once

#include "check_msg.h"
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace lora_ext {
namespace checks {

constexpr int64_t kIntMax = 0x7fffffff;  // sizes the kernels index with int
constexpr int64_t kMaxGridYZ = 65535;    // CUDA's limit on gridDim.y and gridDim.z

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Data a kernel's 16-byte vector variant can read (an undefined tensor, e.g. no bias, counts as aligned).
inline bool aligned16(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// MergedLinear's output blocks: num_blocks in [1, max_blocks], block_ids strictly increasing in range.
inline void block_ids(const char* op, int64_t num_blocks, const std::vector<int64_t>& ids, int64_t max_blocks) {
  LORA_CHECK_VALUE(num_blocks >= 1 && num_blocks <= max_blocks, op, ": num_blocks must be in [1, ", max_blocks,
                   "], got ", num_blocks);
  for (size_t i = 0; i < ids.size(); ++i) {
    LORA_CHECK_VALUE(ids[i] >= 0 && ids[i] < num_blocks, op, ": block_ids must lie in [0, num_blocks=", num_blocks,
                     "), got ", ids[i]);
    LORA_CHECK_VALUE(i == 0 || ids[i] > ids[i - 1], op, ": block_ids must be strictly increasing, got ",
                     c10::IntArrayRef(ids));
  }
}

// The rank r of factors A (n*r, k) and B (n*nb, r) for n >= 1 enabled blocks of nb features; their
// column counts are checked by the caller, which knows what to name them after.
inline int64_t rank(const char* op, const at::Tensor& a, const at::Tensor& b, int64_t n, int64_t nb,
                    const char* a_name = "A", const char* b_name = "B") {
  LORA_CHECK_VALUE(a.size(0) % n == 0 && a.size(0) > 0, op, ": ", a_name, " must have n*r rows for n=", n,
                   " enabled blocks and rank r >= 1, got shape ", a.sizes());
  const int64_t r = a.size(0) / n;
  LORA_CHECK_VALUE(b.size(0) == n * nb && b.size(1) == r, op, ": ", b_name, " must have shape (n*nb, r) = (", n * nb,
                   ", ", r, ") for n=", n, " enabled blocks of nb=", nb, " and rank r=", r, ", got ", b.sizes());
  return r;
}

inline void on_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref) {
  LORA_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name, "'s device (", ref.device(),
                   "), got ", t.device());
}

// The forward ops' scale_tensor: None, or a float32 tensor of exactly one element on the op's device (that of
// `ref`, called ref_name), whose value the kernels read when they run rather than when they are launched, so
// that a captured CUDA graph follows it. Returns its data pointer, or null for None.
inline const float* scale_pointer(const char* op, const c10::optional<at::Tensor>& scale_tensor,
                                  const char* ref_name, const at::Tensor& ref) {
  if (!scale_tensor || !scale_tensor->defined()) return nullptr;
  const at::Tensor& s = *scale_tensor;
  LORA_CHECK_VALUE(s.scalar_type() == at::kFloat, op, ": scale_tensor must be a float32 tensor, got ",
                   s.scalar_type());
  LORA_CHECK_VALUE(s.numel() == 1, op, ": scale_tensor must have exactly one element, got shape ", s.sizes());
  on_device(op, "scale_tensor", s, ref_name, ref);
  const float* ptr = s.data_ptr<float>();
  LORA_CHECK_VALUE(reinterpret_cast<uintptr_t>(ptr) % alignof(float) == 0, op,
                   ": scale_tensor's element must be 4-byte aligned");
  return ptr;
}

}  // namespace checks
}  // namespace lora_ext
