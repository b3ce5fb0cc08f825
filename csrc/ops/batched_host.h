// Host side of the batched (multi-adapter) forward ops, batched_linear_ and batched_embedding_: argument checks
// and kernel selection (an entry of LORA_BATCHED_VARIANTS in kernels/variants.cuh). The CUDA launcher
// (ops/batched.cu) and the simulator module (sim/sim_module.cpp) both run this code and differ only in the
// device their tensors must be on and in the Launch policy. Nothing here reads device memory: the slots in
// `index` and the `scales` are read by the kernels, so a call can be captured in a CUDA graph and replayed with
// new values in them.
#pragma once

#include "check_msg.h"
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "dispatch.h"
#include "kernels/batched.cuh"
#include "kernels/variants.cuh"
#include "ops/checks.h"

namespace lora_ext {
namespace batched_host {

namespace kb = kernels::batched;

using checks::aligned16;
using checks::ceil_div;
using checks::kIntMax;
using checks::kMaxGridYZ;

// The variant a call with this many tokens per index takes: segment (tiles of rows sharing a slot) from
// kb::kSegmentMinTokens on, decode (a row per CTA) below.
inline bool segment(int64_t tokens_per_index) { return tokens_per_index >= kb::kSegmentMinTokens; }

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  LORA_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous, got shape ", t.sizes(), " and strides ",
                   t.strides());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* what) {
  LORA_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", what, ", got shape ", t.sizes());
}

// What a call was asked to do, after checking.
struct Plan {
  int64_t M, k, d, R, S, groups, tpi, num;
};

// The checks both ops share: out (M, d); a_slots (S, rows, R) with `rows_name` naming its second dimension;
// b_slots (S, R, d); scales (S,) float32; index (M / tokens_per_index,) int32; all contiguous, on out's device
// (of type `device`), the matrices of out's dtype. `input`/`input_name`: x or ids, checked by the caller except
// for its device.
inline Plan check_common(const char* op, const at::Tensor& out, const char* input_name, const at::Tensor& input,
                         const at::Tensor& a_slots, const char* rows_name, const at::Tensor& b_slots,
                         const at::Tensor& scales, const at::Tensor& index, int64_t tokens_per_index,
                         c10::DeviceType device) {
  LORA_CHECK_VALUE(out.device().type() == device, op, ": out must be a ", c10::DeviceTypeName(device),
                   " tensor, got one on ", out.device());
  checks::on_device(op, input_name, input, "out", out);
  checks::on_device(op, "a_slots", a_slots, "out", out);
  checks::on_device(op, "b_slots", b_slots, "out", out);
  checks::on_device(op, "scales", scales, "out", out);
  checks::on_device(op, "index", index, "out", out);

  const auto dt = out.scalar_type();
  LORA_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                   ": out must be float32, float16 or bfloat16, got ", dt);
  LORA_CHECK_VALUE(a_slots.scalar_type() == dt, op, ": a_slots must have out's dtype (", dt, "), got ",
                   a_slots.scalar_type());
  LORA_CHECK_VALUE(b_slots.scalar_type() == dt, op, ": b_slots must have out's dtype (", dt, "), got ",
                   b_slots.scalar_type());
  LORA_CHECK_VALUE(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ", scales.scalar_type());
  LORA_CHECK_VALUE(index.scalar_type() == at::kInt, op, ": index must be int32, got ", index.scalar_type());

  check_dim(op, "out", out, 2, "(M, d)");
  check_dim(op, "a_slots", a_slots, 3, rows_name);
  check_dim(op, "b_slots", b_slots, 3, "(S, R, d)");
  check_dim(op, "scales", scales, 1, "(S,)");
  check_dim(op, "index", index, 1, "(M / tokens_per_index,)");
  check_contiguous(op, "out", out);
  check_contiguous(op, input_name, input);
  check_contiguous(op, "a_slots", a_slots);
  check_contiguous(op, "b_slots", b_slots);
  check_contiguous(op, "scales", scales);
  check_contiguous(op, "index", index);

  Plan p{};
  p.M = out.size(0);
  p.d = out.size(1);
  p.S = a_slots.size(0);
  p.R = a_slots.size(2);
  LORA_CHECK_VALUE(p.S >= 1, op, ": a_slots must hold at least one slot, got shape ", a_slots.sizes());
  LORA_CHECK_VALUE(p.R >= 1 && p.R <= kb::kMaxRank, op, ": a_slots' rank (its last dimension) must be in [1, ",
                   kb::kMaxRank, "], got shape ", a_slots.sizes());
  LORA_CHECK_VALUE(b_slots.size(0) == p.S && b_slots.size(1) == p.R && b_slots.size(2) == p.d, op,
                   ": b_slots must have shape (S, R, d) = (", p.S, ", ", p.R, ", ", p.d,
                   ") for a_slots of shape ", a_slots.sizes(), " and out of shape ", out.sizes(), ", got ",
                   b_slots.sizes());
  LORA_CHECK_VALUE(scales.size(0) == p.S, op, ": scales must have one value per slot (", p.S, "), got shape ",
                   scales.sizes());
  LORA_CHECK_VALUE(tokens_per_index >= 1, op, ": tokens_per_index must be >= 1, got ", tokens_per_index);
  LORA_CHECK_VALUE(p.M % tokens_per_index == 0, op, ": tokens_per_index (", tokens_per_index,
                   ") must divide out's rows (", p.M, ")");
  p.tpi = tokens_per_index;
  p.groups = p.M / tokens_per_index;
  LORA_CHECK_VALUE(index.size(0) == p.groups, op, ": index must have M / tokens_per_index = ", p.groups,
                   " entries (one slot per group of ", tokens_per_index, " rows), got shape ", index.sizes());
  LORA_CHECK_VALUE(p.M <= kIntMax && p.d <= kIntMax && p.S <= kIntMax, op, ": sizes must fit in 32 bits, got out ",
                   out.sizes(), " and a_slots ", a_slots.sizes());
  return p;
}

// One entry of LORA_BATCHED_VARIANTS (kernels/variants.cuh), as a type.
template <typename T_, bool kSegment_, bool kVector_>
struct Variant {
  using T = T_;
  static constexpr bool kSegment = kSegment_;
  static constexpr bool kVector = kVector_;

  // e.g. "batched<BFloat16, segment=1, vector=1>" (lora_ext._sim.last_variant())
  static std::string describe() {
    return std::string("batched<") + c10::toString(scalar_type_of<T>) + ", segment=" + (kSegment ? "1" : "0") +
           ", vector=" + (kVector ? "1" : "0") + ">";
  }
};

// The variants the host can select: float32, fp16 or bf16; decode or segment; 16-byte accesses or not.
template <typename T, bool kSegment, bool kVector>
constexpr bool selectable() {
  return std::is_same<T, float>::value || std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
}

template <typename T, bool kSegment, bool kVector>
constexpr bool listed() {
#define LORA_BATCHED_LISTED(T_, SEG_, VEC_) || (std::is_same<T, T_>::value && kSegment == SEG_ && kVector == VEC_)
  return false LORA_BATCHED_VARIANTS(LORA_BATCHED_LISTED);
#undef LORA_BATCHED_LISTED
}

// LORA_BATCHED_VARIANTS lists exactly the selectable variants (over the three dtypes).
template <typename T>
constexpr bool list_matches() {
  return listed<T, false, false>() == selectable<T, false, false>() &&
         listed<T, false, true>() == selectable<T, false, true>() &&
         listed<T, true, false>() == selectable<T, true, false>() &&
         listed<T, true, true>() == selectable<T, true, true>();
}
static_assert(list_matches<float>() && list_matches<__half>() && list_matches<__nv_bfloat16>(),
              "LORA_BATCHED_VARIANTS (kernels/variants.cuh) must list exactly the variants the host can select");

// Both kernels of a variant cut a group into the same row tiles (Args::tiles_per_group serves both).
static_assert(kb::shrink_tile_rows<false>() == kb::expand_tile_rows<false>() &&
                  kb::shrink_tile_rows<true>() == kb::expand_tile_rows<true>(),
              "the shrink and the expand of a variant must tile rows alike");

// Calls f(Variant<...>{}) for the entry of LORA_BATCHED_VARIANTS that matches; the Launch policy hears which.
template <class Launch, typename F>
void select_variant(const char* op, at::ScalarType dtype, bool segment, bool vector, F&& f) {
#define LORA_BATCHED_SELECT(T, SEG, VEC)                                 \
  if (dtype == scalar_type_of<T> && segment == SEG && vector == VEC) { \
    Launch::selected(&Variant<T, SEG, VEC>::describe);                 \
    return f(Variant<T, SEG, VEC>{});                                  \
  }
  LORA_BATCHED_VARIANTS(LORA_BATCHED_SELECT)
#undef LORA_BATCHED_SELECT
  LORA_CHECK(false, op, ": no kernel variant for ", dtype, " (segment=", segment, ", vector=", vector,
             ") in LORA_BATCHED_VARIANTS");
}

// The expand's column tiles lie on gridDim.y: at most 65535 of them (16-byte column vectors of out's elements).
inline void check_col_tiles(const char* op, int64_t d, bool seg, int64_t element_size) {
  const int64_t cols = (seg ? kb::ExpandShape<true>::kColVecs : kb::ExpandShape<false>::kColVecs) * (16 / element_size);
  LORA_CHECK_VALUE(ceil_div(d, cols) <= kMaxGridYZ, op, ": too many output features (d = ", d, "; at most ",
                   kMaxGridYZ * cols, " for this dtype and tokens_per_index)");
}

template <typename T>
kb::Args<T> make_args(const Plan& p, const at::Tensor& out, const at::Tensor& a_slots, const at::Tensor& b_slots,
                      const at::Tensor& scales, const at::Tensor& index) {
  kb::Args<T> args{};
  args.a = reinterpret_cast<const T*>(a_slots.data_ptr());
  args.b = reinterpret_cast<const T*>(b_slots.data_ptr());
  args.scales = scales.data_ptr<float>();
  args.index = index.data_ptr<int32_t>();
  args.out = reinterpret_cast<T*>(out.data_ptr());
  args.M = (int)p.M;
  args.d = (int)p.d;
  args.R = (int)p.R;
  args.S = (int)p.S;
  args.tpi = (int)p.tpi;
  return args;
}

// The expand of variant V onto out (kEmbedding: t gathered from a_slots at the ids).
template <class Launch, class V, bool kEmbedding>
void launch_expand(const Plan& p, kb::Args<typename V::T>& args) {
  using T = typename V::T;
  args.tiles_per_group = (int)ceil_div(p.tpi, kb::expand_tile_rows<V::kSegment>());
  const dim3 grid((unsigned)(p.groups * args.tiles_per_group),
                  (unsigned)ceil_div(p.d, kb::expand_tile_cols<T, V::kSegment>()));
  Launch::run(&kb::expand_kernel<T, V::kSegment, V::kVector, kEmbedding>, grid, dim3(kb::kThreads),
              kb::expand_smem_bytes<V::kSegment>(), args);
}

// out[m] = round(out[m] + scales[i] * (x[m] a_slots[i]) b_slots[i]) for the rows m of each group whose slot
// i = index[group] is not -1; those of slot -1 are left as they are. t = x a_slots[i] is kept in fp32 in a
// temporary (M, R).
template <class Launch>
void linear(const char* op, const at::Tensor& out, const at::Tensor& x, const at::Tensor& a_slots,
            const at::Tensor& b_slots, const at::Tensor& scales, const at::Tensor& index, int64_t tokens_per_index,
            c10::DeviceType device) {
  Plan p = check_common(op, out, "x", x, a_slots, "(S, k, R)", b_slots, scales, index, tokens_per_index, device);
  LORA_CHECK_VALUE(x.scalar_type() == out.scalar_type(), op, ": x must have out's dtype (", out.scalar_type(),
                   "), got ", x.scalar_type());
  check_dim(op, "x", x, 2, "(M, k)");
  p.k = a_slots.size(1);
  LORA_CHECK_VALUE(x.size(0) == p.M, op, ": x must have out's ", p.M, " rows, got shape ", x.sizes());
  LORA_CHECK_VALUE(x.size(1) == p.k, op, ": x must have a_slots' k = ", p.k, " features (a_slots ", a_slots.sizes(),
                   "), got shape ", x.sizes());
  LORA_CHECK_VALUE(p.k <= kIntMax, op, ": sizes must fit in 32 bits, got x ", x.sizes());
  const bool seg = segment(p.tpi);
  const auto dt = out.scalar_type();
  const int64_t vec = 16 / out.element_size();
  check_col_tiles(op, p.d, seg, out.element_size());
  if (p.M == 0 || p.d == 0) return;  // nothing to write: a zero-size grid is an invalid launch configuration
  // 16-byte accesses of out and b_slots along d, and of x along k: aligned rows of all three.
  const bool vector =
      p.d % vec == 0 && p.k % vec == 0 && aligned16(out) && aligned16(b_slots) && aligned16(x);
  const at::Tensor t = at::empty({p.M, p.R}, out.options().dtype(at::kFloat));
  select_variant<Launch>(op, dt, seg, vector, [&](auto variant) {
    using V = decltype(variant);
    using scalar_t = typename V::T;
    kb::Args<scalar_t> args = make_args<scalar_t>(p, out, a_slots, b_slots, scales, index);
    args.x = reinterpret_cast<const scalar_t*>(x.data_ptr());
    args.t = t.data_ptr<float>();
    args.k = (int)p.k;
    args.tiles_per_group = (int)ceil_div(p.tpi, kb::shrink_tile_rows<V::kSegment>());
    const dim3 grid((unsigned)(p.groups * args.tiles_per_group),
                    V::kSegment ? (unsigned)ceil_div(p.R, kb::kSegJ) : 1u);
    Launch::run(&kb::shrink_kernel<scalar_t, V::kSegment, V::kVector>, grid, dim3(kb::kThreads),
                kb::shrink_smem_bytes<V::kSegment>(), args);
    launch_expand<Launch, V, false>(p, args);
  });
}

// out[m] = round(out[m] + scales[i] * a_slots[i, ids[m]] b_slots[i]) for the rows m of each group whose slot i
// is not -1 (a_slots (S, num_embeddings, R): slot s holds A_s^T of an Embedding adapter; ids int64 or int32).
// One launch: the expand gathers t itself. An id outside [0, num_embeddings) of an updated row fails the kernel
// (a device-side assert).
template <class Launch>
void embedding(const char* op, const at::Tensor& out, const at::Tensor& ids, const at::Tensor& a_slots,
               const at::Tensor& b_slots, const at::Tensor& scales, const at::Tensor& index, int64_t tokens_per_index,
               c10::DeviceType device) {
  Plan p = check_common(op, out, "ids", ids, a_slots, "(S, num_embeddings, R)", b_slots, scales, index,
                        tokens_per_index, device);
  LORA_CHECK_VALUE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
                   ": ids must be int64 or int32, got ", ids.scalar_type());
  check_dim(op, "ids", ids, 1, "(M,)");
  LORA_CHECK_VALUE(ids.size(0) == p.M, op, ": ids must have one id per row of out (", p.M, "), got shape ",
                   ids.sizes());
  p.num = a_slots.size(1);
  LORA_CHECK_VALUE(p.num >= 1, op, ": a_slots must have at least one embedding row, got shape ", a_slots.sizes());
  const bool seg = segment(p.tpi);
  const auto dt = out.scalar_type();
  const int64_t vec = 16 / out.element_size();
  check_col_tiles(op, p.d, seg, out.element_size());
  if (p.M == 0 || p.d == 0) return;
  const bool vector = p.d % vec == 0 && aligned16(out) && aligned16(b_slots);
  const at::Tensor ids64 = ids.to(at::kLong);  // int32 ids: an int64 copy (on the device: no sync)
  select_variant<Launch>(op, dt, seg, vector, [&](auto variant) {
    using V = decltype(variant);
    using scalar_t = typename V::T;
    kb::Args<scalar_t> args = make_args<scalar_t>(p, out, a_slots, b_slots, scales, index);
    args.ids = reinterpret_cast<const long long*>(ids64.data_ptr<int64_t>());
    args.num = p.num;
    launch_expand<Launch, V, true>(p, args);
  });
}

}  // namespace batched_host
}  // namespace lora_ext
