// The Python bindings of the ops, in one table shared by lora_ext._C (bindings.cpp: the CUDA launchers of
// ops/*.cu) and lora_ext._sim (sim/sim_module.cpp: the same host code run through the simulator), so that
// both modules have the same names, signatures, argument names and docstrings. Adding an op is one m.def
// here (and its function in both Ops types; the signature types below make a mismatch a compile error).
// Host compiler only (pybind11): the .cu files never include it.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace lora_ext {
namespace bindings {

// Each op's signature: a backend's function must have exactly this type.
using MergeFn = void(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
                     int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed);
using SwapFn = void(const at::Tensor& w, const at::Tensor& old_a, const at::Tensor& old_b, double old_scale,
                    const at::Tensor& new_a, const at::Tensor& new_b, double new_scale, int64_t num_blocks,
                    const std::vector<int64_t>& block_ids, bool transposed);
using MergeLosslessFn = void(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
                             int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed,
                             const at::Tensor& lnorm, const at::Tensor& rnorm, double gamma, const at::Tensor& codes,
                             const at::Tensor& exc_index, const at::Tensor& exc_bits, const at::Tensor& counter);
using UnmergeLosslessFn = void(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
                               int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed,
                               const at::Tensor& codes, const at::Tensor& exc_index, const at::Tensor& exc_bits);
using SwapLosslessFn = void(const at::Tensor& w, const at::Tensor& old_a, const at::Tensor& old_b, double old_scale,
                            const at::Tensor& old_codes, const at::Tensor& old_exc_index,
                            const at::Tensor& old_exc_bits, const at::Tensor& new_a, const at::Tensor& new_b,
                            double new_scale, int64_t num_blocks, const std::vector<int64_t>& block_ids,
                            bool transposed, const at::Tensor& lnorm, const at::Tensor& rnorm, double gamma,
                            const at::Tensor& codes, const at::Tensor& exc_index, const at::Tensor& exc_bits,
                            const at::Tensor& counter);
using LinearFn = at::Tensor(const at::Tensor& x, const at::Tensor& x_lora, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b,
                            double scale, int64_t num_blocks, const std::vector<int64_t>& block_ids,
                            bool fan_in_fan_out, const std::optional<at::Tensor>& scale_tensor);
using EmbeddingFn = at::Tensor(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& a,
                               const at::Tensor& b, double scale, std::optional<int64_t> padding_idx,
                               const std::optional<at::Tensor>& scale_tensor);
using BatchedFn = void(const at::Tensor& out, const at::Tensor& input, const at::Tensor& a_slots,
                       const at::Tensor& b_slots, const at::Tensor& scales, const at::Tensor& index,
                       int64_t tokens_per_index);

// Defines the ops on m. Ops names the backend's functions: merge_, delta_weight_, swap_, merge_lossless_,
// unmerge_lossless_, swap_lossless_, linear, embedding, batched_linear_ and batched_embedding_
// (static member functions, or static constexpr pointers to functions), of the types above.
template <typename Ops>
void define_ops(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("merge_", static_cast<MergeFn*>(Ops::merge_),
        "W[blocks] += scale * B_j @ A_j in place (transposed: W[:, blocks] += scale * (B_j @ A_j)^T)",
        py::arg("W"), py::arg("A"), py::arg("B"), py::arg("scale"), py::arg("num_blocks"), py::arg("block_ids"),
        py::arg("transposed"));
  m.def("delta_weight_", static_cast<MergeFn*>(Ops::delta_weight_),
        "out = the dense scale * delta that merge_ adds (zeros in disabled blocks)", py::arg("out"), py::arg("A"),
        py::arg("B"), py::arg("scale"), py::arg("num_blocks"), py::arg("block_ids"), py::arg("transposed"));
  m.def("swap_", static_cast<SwapFn*>(Ops::swap_),
        "W[blocks] += new_scale * B2_j @ A2_j - old_scale * B1_j @ A1_j in place, in one pass",
        py::arg("W"), py::arg("old_A"), py::arg("old_B"), py::arg("old_scale"), py::arg("new_A"), py::arg("new_B"),
        py::arg("new_scale"), py::arg("num_blocks"), py::arg("block_ids"), py::arg("transposed"));
  m.def("merge_lossless_", static_cast<MergeLosslessFn*>(Ops::merge_lossless_),
        "merge_ that also writes the lossless record (docs/LOSSLESS.md): codes (n, M_rows, ceil(N/4)) uint8 for a "
        "16-bit W or (n, M_rows, 4*ceil(N/4)) int16 for float32, the exceptions (exc_index int64, exc_bits int32, "
        "capacity exc_index.numel(); past it the element keeps its base) counted in counter (int64 (1,), zeroed); "
        "lnorm (n, M_rows) and rnorm (n, N) float32 the factors' rounded-up norms, gamma the rank's bound",
        py::arg("W"), py::arg("A"), py::arg("B"), py::arg("scale"), py::arg("num_blocks"), py::arg("block_ids"),
        py::arg("transposed"), py::arg("lnorm"), py::arg("rnorm"), py::arg("gamma"), py::arg("codes"),
        py::arg("exc_index"), py::arg("exc_bits"), py::arg("counter"));
  m.def("unmerge_lossless_", static_cast<UnmergeLosslessFn*>(Ops::unmerge_lossless_),
        "the base back, bit for bit, from W merged by merge_lossless_ with these factors, scale and layout, and its "
        "record (exc_index: the exact list, sorted; an escape not in it is left as it is)",
        py::arg("W"), py::arg("A"), py::arg("B"), py::arg("scale"), py::arg("num_blocks"), py::arg("block_ids"),
        py::arg("transposed"), py::arg("codes"), py::arg("exc_index"), py::arg("exc_bits"));
  m.def("swap_lossless_", static_cast<SwapLosslessFn*>(Ops::swap_lossless_),
        "unmerge_lossless_ of the old adapter and merge_lossless_ of the new one in one pass (bit-identical to a "
        "fresh merge_lossless_ of the new adapter into the base)",
        py::arg("W"), py::arg("old_A"), py::arg("old_B"), py::arg("old_scale"), py::arg("old_codes"),
        py::arg("old_exc_index"), py::arg("old_exc_bits"), py::arg("new_A"), py::arg("new_B"), py::arg("new_scale"),
        py::arg("num_blocks"), py::arg("block_ids"), py::arg("transposed"), py::arg("lnorm"), py::arg("rnorm"),
        py::arg("gamma"), py::arg("codes"), py::arg("exc_index"), py::arg("exc_bits"), py::arg("counter"));
  m.def("linear", static_cast<LinearFn*>(Ops::linear),
        "F.linear(x, W, bias) + scale * (x_lora A^T) B^T in the enabled column blocks "
        "(fan_in_fan_out: W is (in, out)). "
        "scale_tensor: None, or a float32 tensor of one element on x's device whose value the kernels read when "
        "they run (a captured CUDA graph follows it); scale is then unused",
        py::arg("x"), py::arg("x_lora"), py::arg("weight"), py::arg("bias"), py::arg("A"), py::arg("B"),
        py::arg("scale"), py::arg("num_blocks"), py::arg("block_ids"), py::arg("fan_in_fan_out"),
        py::arg("scale_tensor") = py::none());
  m.def("embedding", static_cast<EmbeddingFn*>(Ops::embedding),
        "weight[ids] + scale * A[:, ids]^T B^T (an id out of range fails the kernel: a device-side assert). "
        "scale_tensor: as for linear, on weight's device",
        py::arg("ids"), py::arg("weight"), py::arg("A"), py::arg("B"), py::arg("scale"), py::arg("padding_idx"),
        py::arg("scale_tensor") = py::none());
  m.def("batched_linear_", static_cast<BatchedFn*>(Ops::batched_linear_),
        "Multi-adapter LoRA forward in place: out[m] = out[m] + scales[i] * (x[m] a_slots[i]) b_slots[i] (fp32 "
        "accumulation, one rounding) with i = index[m // tokens_per_index]; rows of slot -1 are left as they are. "
        "out (M, d), x (M, k), a_slots (S, k, R) (A^T per slot), b_slots (S, R, d) (B^T per slot), all of one dtype "
        "and contiguous; scales (S,) float32 and index (M // tokens_per_index,) int32 are read on the device (a "
        "slot outside [-1, S) fails the kernel: a device-side assert)",
        py::arg("out"), py::arg("x"), py::arg("a_slots"), py::arg("b_slots"), py::arg("scales"), py::arg("index"),
        py::arg("tokens_per_index"));
  m.def("batched_embedding_", static_cast<BatchedFn*>(Ops::batched_embedding_),
        "batched_linear_ for Embedding adapters: out[m] += scales[i] * a_slots[i, ids[m]] b_slots[i], ids (M,) "
        "int64 or int32, a_slots (S, num_embeddings, R); an id out of range in an updated row fails the kernel (a "
        "device-side assert)",
        py::arg("out"), py::arg("ids"), py::arg("a_slots"), py::arg("b_slots"), py::arg("scales"), py::arg("index"),
        py::arg("tokens_per_index"));
}

}  // namespace bindings
}  // namespace lora_ext
