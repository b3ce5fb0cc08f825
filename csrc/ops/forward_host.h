// Host side of the forward ops, linear and embedding: argument checks, kernel selection (an entry of
// LORA_FORWARD_VARIANTS in kernels/variants.cuh) and the base GEMM / gather. The CUDA launcher
// (ops/forward.cu) and the simulator module (sim/sim_module.cpp) both run this code and differ only in the
// device their tensors must be on and in the Launch policy, which puts a kernel on the GPU or in the
// simulator and says how many multiprocessors there are to fill.
#pragma once

#include "check_msg.h"
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dispatch.h"
#include "kernels/forward.cuh"
#include "kernels/variants.cuh"
#include "ops/checks.h"

namespace lora_ext {
namespace forward_host {

namespace kf = kernels::forward;

using checks::aligned16;
using checks::ceil_div;
using checks::kIntMax;
using checks::kMaxGridYZ;

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  LORA_CHECK_VALUE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", st);
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  LORA_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ", t.dim(), " dimensions");
}

// The factors' dtypes (A float, B as A) and every matrix 2-D: what linear and embedding both require.
inline void check_operands(const char* op, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b) {
  check_float(op, "A", a);
  LORA_CHECK_VALUE(b.scalar_type() == a.scalar_type(), op, ": B must have A's dtype (", a.scalar_type(), "), got ",
                   b.scalar_type());
  check_dim(op, "weight", weight, 2);
  check_dim(op, "A", a, 2);
  check_dim(op, "B", b, 2);
}

// What the linear op was asked to do, after checking.
struct LinearPlan {
  int64_t M, K, N, nb, r, n, num_blocks;
  short slot[kf::kMaxBlocks];
};

inline LinearPlan check_linear(const char* op, const at::Tensor& x, const at::Tensor& x_lora, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b,
                               int64_t num_blocks, const std::vector<int64_t>& block_ids, bool fan_in_fan_out,
                               c10::DeviceType device) {
  LORA_CHECK_VALUE(x.device().type() == device, op, ": x must be a ", c10::DeviceTypeName(device),
                   " tensor, got one on ", x.device());
  checks::on_device(op, "x_lora", x_lora, "x", x);
  checks::on_device(op, "weight", weight, "x", x);
  checks::on_device(op, "A", a, "x", x);
  checks::on_device(op, "B", b, "x", x);
  if (bias) checks::on_device(op, "bias", *bias, "x", x);

  check_float(op, "x", x);
  const auto dt = x.scalar_type();
  LORA_CHECK_VALUE(x_lora.scalar_type() == dt && weight.scalar_type() == dt && (!bias || bias->scalar_type() == dt),
                   op, ": x_lora, weight and bias must have x's dtype (", dt, "), got ", x_lora.scalar_type(), ", ",
                   weight.scalar_type(), (bias ? ", " : ""), (bias ? c10::toString(bias->scalar_type()) : ""));
  check_operands(op, weight, a, b);
  const int64_t N = fan_in_fan_out ? weight.size(1) : weight.size(0);
  const int64_t K = fan_in_fan_out ? weight.size(0) : weight.size(1);
  LORA_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, op, ": x must have ", K, " features in its last dimension, got ",
                   x.sizes());
  LORA_CHECK_VALUE(x_lora.sizes() == x.sizes(), op, ": x_lora must have the shape of x ", x.sizes(), ", got ",
                   x_lora.sizes());
  LORA_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == N), op, ": bias must have shape (", N, "), got ",
                   bias ? bias->sizes() : c10::IntArrayRef());

  checks::block_ids(op, num_blocks, block_ids, kf::kMaxBlocks);
  LORA_CHECK_VALUE(N % num_blocks == 0, op, ": num_blocks (", num_blocks, ") must divide the output features (", N,
                   ")");
  LinearPlan p{};
  p.M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) p.M *= x.size(d);
  p.K = K;
  p.N = N;
  p.num_blocks = num_blocks;
  p.nb = N / num_blocks;
  p.n = (int64_t)block_ids.size();
  if (p.n) {
    LORA_CHECK_VALUE(a.size(1) == K, op, ": A must have ", K, " columns (the in-features), got shape ", a.sizes());
    p.r = checks::rank(op, a, b, p.n, p.nb);
  }
  LORA_CHECK_VALUE(p.M <= kIntMax && K <= kIntMax && N <= kIntMax && p.n * p.r <= kIntMax, op,
                   ": sizes must fit in 32 bits, got x ", x.sizes(), " and A ", a.sizes());
  for (int64_t e = 0; e < num_blocks; ++e) p.slot[e] = -1;
  for (int64_t j = 0; j < p.n; ++j) p.slot[block_ids[j]] = (short)j;
  return p;
}

// One entry of LORA_FORWARD_VARIANTS (kernels/variants.cuh), as a type.
template <typename T_, typename Tab_, bool kTensorCore_, bool kVector_>
struct Variant {
  using T = T_;
  using Tab = Tab_;                                  // the factors' type: float32, or T
  static constexpr bool kTensorCore = kTensorCore_;  // the shrink's path for T
  static constexpr bool kVector = kVector_;

  // e.g. "forward<BFloat16, factors=Float, tensor_core=1, vector=1>" (lora_ext._sim.last_variant())
  static std::string describe() {
    return std::string("forward<") + c10::toString(scalar_type_of<T>) + ", factors=" +
           c10::toString(scalar_type_of<Tab>) + ", tensor_core=" + (kTensorCore ? "1" : "0") +
           ", vector=" + (kVector ? "1" : "0") + ">";
  }
};

// The variants the host can select: activations float32, fp16 or bf16; factors float32 or the activations'
// dtype (factor_type below); the shrink on tensor cores for fp16/bf16 activations, whichever the factors
// (float32 A is rounded to T as the shrink stages it); 16-byte accesses or not.
template <typename T, typename Tab, bool kTensorCore, bool kVector>
constexpr bool selectable() {
  constexpr bool fp32 = std::is_same<T, float>::value;
  constexpr bool factors = std::is_same<Tab, float>::value || std::is_same<Tab, T>::value;
  return (fp32 || std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value) && factors &&
         kTensorCore == !fp32;
}

template <typename T, typename Tab, bool kTensorCore, bool kVector>
constexpr bool listed() {
#define LORA_FORWARD_LISTED(T_, TAB_, TC_, VEC_) \
  || (std::is_same<T, T_>::value && std::is_same<Tab, TAB_>::value && kTensorCore == TC_ && kVector == VEC_)
  return false LORA_FORWARD_VARIANTS(LORA_FORWARD_LISTED);
#undef LORA_FORWARD_LISTED
}

// LORA_FORWARD_VARIANTS lists exactly the selectable variants (over the three dtypes for each of T and Tab), so
// select_variant below finds one for every checked call, and no kernel is compiled that nothing selects.
template <typename T, typename Tab>
constexpr bool list_matches() {
  return listed<T, Tab, false, false>() == selectable<T, Tab, false, false>() &&
         listed<T, Tab, false, true>() == selectable<T, Tab, false, true>() &&
         listed<T, Tab, true, false>() == selectable<T, Tab, true, false>() &&
         listed<T, Tab, true, true>() == selectable<T, Tab, true, true>();
}
template <typename T>
constexpr bool list_matches() {
  return list_matches<T, float>() && list_matches<T, __half>() && list_matches<T, __nv_bfloat16>();
}
static_assert(list_matches<float>() && list_matches<__half>() && list_matches<__nv_bfloat16>(),
              "LORA_FORWARD_VARIANTS (kernels/variants.cuh) must list exactly the variants the host can select");

// The dtype the kernels read the factors in: theirs when it is float32 or the activations' dtype (no copy);
// otherwise (16-bit factors of the other 16-bit dtype, or 16-bit factors of a float32 model) float32, which
// holds either exactly (one cast, as before; the layers never make such factors).
inline at::ScalarType factor_type(at::ScalarType factors, at::ScalarType activations) {
  return factors == at::kFloat || factors == activations ? factors : at::kFloat;
}

// Calls f(Variant<...>{}) for the entry of LORA_FORWARD_VARIANTS that matches the activations' dtype, the
// factors' dtype and the vector choice: the list is all the host instantiates. The Launch policy hears which one.
template <class Launch, typename F>
void select_variant(const char* op, at::ScalarType dtype, at::ScalarType ab_type, bool vector, F&& f) {
#define LORA_FORWARD_SELECT(T, TAB, TC, VEC)                                            \
  if (dtype == scalar_type_of<T> && ab_type == scalar_type_of<TAB> && vector == VEC) { \
    Launch::selected(&Variant<T, TAB, TC, VEC>::describe);                              \
    return f(Variant<T, TAB, TC, VEC>{});                                               \
  }
  LORA_FORWARD_VARIANTS(LORA_FORWARD_SELECT)
#undef LORA_FORWARD_SELECT
  LORA_CHECK(false, op, ": no kernel variant for ", dtype, " with factors ", ab_type, " (vector=", vector,
             ") in LORA_FORWARD_VARIANTS");
}

// A Launch policy may poison the outputs the op allocates (poison(at::Tensor&)): the simulator fills them with
// NaN, so that an element no kernel writes fails every test that reads it. The CUDA launcher has none.
template <class Launch, class = void>
struct HasPoison : std::false_type {};
template <class Launch>
struct HasPoison<Launch, decltype(Launch::poison(std::declval<at::Tensor&>()))> : std::true_type {};

template <class Launch>
void poison_fresh(at::Tensor& out) {
  if constexpr (HasPoison<Launch>::value) Launch::poison(out);
}

// Split-K for the shrink: enough CTAs for two per multiprocessor, each with at least 256 of K.
inline void choose_splits(int64_t tiles, int64_t K, int sm_count, int& splits, int& k_per_split) {
  const int64_t want = ceil_div(2 * (int64_t)sm_count, tiles);
  const int64_t s = std::max<int64_t>(1, std::min<int64_t>(want, ceil_div(K, 256)));
  k_per_split = (int)(ceil_div(ceil_div(std::max<int64_t>(K, 1), s), kf::kShrinkK) * kf::kShrinkK);
  splits = (int)std::max<int64_t>(1, ceil_div(K, k_per_split));
}

// The decode shapes take the fused kernel; the others the shrink and the expand.
inline bool fused(const LinearPlan& p) { return p.M <= kf::kFusedMaxM && p.r <= kf::kFusedMaxR; }

// Column tiles of one output block (of nb features of `element_size` bytes): the expand and embedding kernels
// put them on gridDim.y, so there may be at most 65535 (8.4M float32 or 16.8M fp16/bf16 features).
inline void check_col_tiles(const char* op, const char* what, int64_t nb, int64_t element_size) {
  const int64_t cols = (int64_t)kf::kColVecs * (16 / element_size);
  LORA_CHECK_VALUE(ceil_div(nb, cols) <= kMaxGridYZ, op, ": too many ", what, " (", nb, "; at most ",
                   kMaxGridYZ * cols, " for this dtype)");
}

template <class Launch, typename T, typename Tab, bool kTensorCore, bool kVector>
void launch_linear(const LinearPlan& p, kf::Args<T, Tab>& args, const at::Tensor& x, int sm_count) {
  const unsigned col_tiles = (unsigned)ceil_div(p.nb, kf::tile_cols<T>());
  const dim3 block(kf::kThreads);
  if (fused(p)) {
    Launch::run(&kf::fused_linear_kernel<T, Tab, kVector>, dim3(col_tiles, (unsigned)p.num_blocks), block,
                kf::fused_smem_bytes<T>(), args);
    return;
  }
  const int64_t m_tiles = ceil_div(p.M, kf::kShrinkM), j_tiles = ceil_div(args.R, kf::kShrinkJ);
  LORA_CHECK_VALUE(j_tiles <= kMaxGridYZ, "lora_ext linear: too many LoRA ranks (", args.R, ")");
  choose_splits(m_tiles * j_tiles, p.K, sm_count, args.splits, args.k_per_split);
  const at::Tensor part = at::empty({args.splits, p.M, args.R}, x.options().dtype(at::kFloat));
  args.part = part.data_ptr<float>();
  Launch::run(&kf::shrink_kernel<T, Tab, kTensorCore, kVector>,
              dim3((unsigned)m_tiles, (unsigned)j_tiles, (unsigned)args.splits), block,
              kf::shrink_smem_bytes<T, kTensorCore>(), args);
  Launch::run(&kf::expand_kernel<T, Tab, kVector>,
              dim3((unsigned)ceil_div(p.M, kf::kExpandRows), col_tiles, (unsigned)p.num_blocks), block,
              kf::expand_smem_bytes<T>(), args);
}

// t, or where it is a view, a tensor of its own over the same memory: the kernels' outputs are never views. A
// custom op's output that is a view refuses in-place writes under autograd (`layer(x).relu_()`), which
// nn.Linear's take (lora_ext.ops._own does the same for the reference's).
inline at::Tensor own(const at::Tensor& t) { return t.is_view() ? at::_unsafe_view(t, t.sizes()) : t; }

// F.linear(x, W, bias) + scale * (x_lora A^T) B^T in the enabled column blocks. The LoRA kernels write
// out = bias + the low-rank term, then the base GEMM accumulates onto it (beta = 1). scale_tensor (checks.h):
// when given, the kernels read the scale from it at run time and `scale` is unused.
template <class Launch>
at::Tensor linear(const char* op, const at::Tensor& x, const at::Tensor& x_lora, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b, double scale,
                  int64_t num_blocks, const std::vector<int64_t>& block_ids, bool fan_in_fan_out,
                  const c10::optional<at::Tensor>& scale_tensor, c10::DeviceType device, int sm_count) {
  const LinearPlan p = check_linear(op, x, x_lora, weight, bias, a, b, num_blocks, block_ids, fan_in_fan_out, device);
  const float* scale_ptr = checks::scale_pointer(op, scale_tensor, "x", x);
  const at::Tensor w = fan_in_fan_out ? weight.t() : weight;  // (N, K)
  // Nothing for the kernels to write (no enabled block, no rows, no output features): a zero-size grid is
  // an invalid launch configuration on CUDA.
  if (p.n == 0 || p.M == 0 || p.N == 0) return own(at::linear(x, w, bias));
  if (!fused(p)) check_col_tiles(op, "output features per block", p.nb, x.element_size());
  const auto dt = x.scalar_type();
  // The factors as they are stored when float32 or x's dtype (the layers' cases: no copy, no launch); the
  // kernels read float32 factors directly (Tab, kernels/forward.cuh).
  const auto ft = factor_type(a.scalar_type(), dt);
  const at::Tensor xl = x_lora.reshape({p.M, p.K}).contiguous();
  at::Tensor ac = a.to(ft).contiguous();
  const at::Tensor bc = b.to(ft).contiguous();
  at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  // The output is allocated in its own shape and written through a 2-D view of it: a returned view would refuse
  // in-place writes under autograd (see own)
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(p.N);
  const at::Tensor result = at::empty(shape, x.options());
  at::Tensor out = result.view({p.M, p.N});
  poison_fresh<Launch>(out);

  // 16-byte accesses need 16-byte aligned rows of x_lora and A (K a multiple of the vector) and of the output
  // and bias blocks (nb a multiple of it). Each operand's own pointer decides only its own accesses: x_lora,
  // the large operand (the caller's activations), is read element by element when its data pointer is
  // misaligned (Args::x_aligned; copying it would cost another pass over it) while A, bias and out keep their
  // 16-byte accesses. A and bias are small: a misaligned one (a view at an odd offset) is copied into fresh,
  // aligned storage. B is read element by element and needs no alignment; out is fresh.
  const int64_t vec = 16 / x.element_size();
  const bool vector = aligned16(out) && p.K % vec == 0 && p.nb % vec == 0;
  if (vector && !aligned16(ac)) ac = ac.clone(at::MemoryFormat::Contiguous);
  if (vector && !aligned16(bias_c)) bias_c = bias_c.clone(at::MemoryFormat::Contiguous);
  select_variant<Launch>(op, dt, ft, vector, [&](auto variant) {
    using V = decltype(variant);
    using scalar_t = typename V::T;
    using Tab = typename V::Tab;
    kf::Args<scalar_t, Tab> args{};
    args.x = reinterpret_cast<const scalar_t*>(xl.data_ptr());
    args.a = reinterpret_cast<const Tab*>(ac.data_ptr());
    args.b = reinterpret_cast<const Tab*>(bc.data_ptr());
    args.bias = bias_c.defined() ? reinterpret_cast<const scalar_t*>(bias_c.data_ptr()) : nullptr;
    args.out = reinterpret_cast<scalar_t*>(out.data_ptr());
    args.M = (int)p.M;
    args.K = (int)p.K;
    args.R = (int)(p.n * p.r);
    args.r = (int)p.r;
    args.nb = (int)p.nb;
    args.N = (int)p.N;
    args.scale = (float)scale;
    args.scale_ptr = scale_ptr;
    args.x_aligned = aligned16(xl);
    args.base_aligned = true;  // bias: copied above when misaligned
    for (int64_t e = 0; e < p.num_blocks; ++e) args.slot[e] = p.slot[e];
    launch_linear<Launch, scalar_t, Tab, V::kTensorCore, V::kVector>(p, args, x, sm_count);
  });
  out.addmm_(x.reshape({p.M, p.K}), w.t());
  return result;
}

// weight[ids] + scale * A[:, ids]^T B^T; A is (r, num_embeddings), B is (embedding_dim, r). padding_idx only
// shapes the gradient (nn.Embedding's forward returns the padding row as stored); it is checked here.
// scale_tensor as for linear. The ids are checked by the kernel (a device-side assert).
template <class Launch>
at::Tensor embedding(const char* op, const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& a,
                     const at::Tensor& b, double scale, c10::optional<int64_t> padding_idx,
                     const c10::optional<at::Tensor>& scale_tensor, c10::DeviceType device) {
  LORA_CHECK_VALUE(weight.device().type() == device, op, ": weight must be a ", c10::DeviceTypeName(device),
                   " tensor, got one on ", weight.device());
  checks::on_device(op, "ids", ids, "weight", weight);
  checks::on_device(op, "A", a, "weight", weight);
  checks::on_device(op, "B", b, "weight", weight);
  LORA_CHECK_VALUE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
                   ": ids must be int32 or int64, got ", ids.scalar_type());
  check_float(op, "weight", weight);
  check_operands(op, weight, a, b);
  const int64_t num = weight.size(0), dim = weight.size(1);
  LORA_CHECK_VALUE(a.size(1) == num, op, ": A must have ", num, " columns (the embeddings), got shape ", a.sizes());
  const int64_t r = checks::rank(op, a, b, 1, dim);
  LORA_CHECK_VALUE(!padding_idx || (*padding_idx >= -num && *padding_idx < num), op,
                   ": padding_idx must be within the ", num, " embeddings, got ", *padding_idx);
  const int64_t M = ids.numel();
  LORA_CHECK_VALUE(M <= kIntMax && dim <= kIntMax && r <= kIntMax, op, ": sizes must fit in 32 bits");
  LORA_CHECK_VALUE(num > 0 || M == 0, op, ": embedding id out of range: weight has no rows (num_embeddings=0) and ",
                   M, " ids");
  const float* scale_ptr = checks::scale_pointer(op, scale_tensor, "weight", weight);
  check_col_tiles(op, "embedding features", dim, weight.element_size());

  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(dim);
  const auto dt = weight.scalar_type();
  const at::Tensor result = at::empty(shape, weight.options());  // in its own shape: see linear
  at::Tensor out = result.view({M, dim});
  if (M == 0 || dim == 0) return result;  // nothing to write: a zero-size grid is an invalid launch
  poison_fresh<Launch>(out);
  const at::Tensor ids64 = ids.reshape({M}).to(at::kLong).contiguous();
  const at::Tensor table = weight.contiguous();
  const auto ft = factor_type(a.scalar_type(), dt);  // as for linear: float32 factors are read as stored
  const at::Tensor ac = a.to(ft).contiguous(), bc = b.to(ft).contiguous();
  const int64_t vec = 16 / weight.element_size();
  // The table's own pointer decides only its reads (Args::base_aligned): a misaligned table (a view at an odd
  // offset) is read element by element and out, fresh, keeps its 16-byte stores.
  const bool vector = aligned16(out) && dim % vec == 0;
  select_variant<Launch>(op, dt, ft, vector, [&](auto variant) {
    using V = decltype(variant);
    using scalar_t = typename V::T;
    using Tab = typename V::Tab;
    kf::Args<scalar_t, Tab> args{};
    args.a = reinterpret_cast<const Tab*>(ac.data_ptr());
    args.b = reinterpret_cast<const Tab*>(bc.data_ptr());
    args.table = reinterpret_cast<const scalar_t*>(table.data_ptr());
    args.ids = reinterpret_cast<const long long*>(ids64.data_ptr<int64_t>());
    args.out = reinterpret_cast<scalar_t*>(out.data_ptr());
    args.M = (int)M;
    args.r = (int)r;
    args.nb = (int)dim;
    args.N = (int)dim;
    args.num = num;
    args.scale = (float)scale;
    args.scale_ptr = scale_ptr;
    args.base_aligned = aligned16(table);
    args.slot[0] = 0;
    const dim3 grid((unsigned)ceil_div(M, kf::kExpandRows), (unsigned)ceil_div(dim, kf::tile_cols<scalar_t>()));
    Launch::run(&kf::embedding_kernel<scalar_t, Tab, V::kVector>, grid, dim3(kf::kThreads),
                kf::embedding_smem_bytes<scalar_t>(), args);
  });
  return result;
}

}  // namespace forward_host
}  // namespace lora_ext
