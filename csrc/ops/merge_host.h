// Host side of merge_, delta_weight_ and swap_, and of their lossless forms merge_lossless_, unmerge_lossless_
// and swap_lossless_ (the same checks plus the record's tensors): argument checks and kernel selection (an entry
// of LORA_MERGE_VARIANTS or LORA_LOSSLESS_VARIANTS in kernels/variants.cuh). The CUDA launcher (ops/merge.cu)
// and the simulator module (sim/sim_module.cpp) both run this code and differ only in the device their tensors
// must be on and in the Launch policy, which puts a kernel on the GPU or in the simulator: what CI checks on the
// CPU is the same selection the GPU runs.
#pragma once

#include "check_msg.h"
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "ops/checks.h"
#include "kernels/lossless.cuh"
#include "kernels/merge.cuh"
#include "kernels/variants.cuh"

namespace lora_ext {
namespace merge_host {

namespace km = kernels::merge;

// What an op was asked to do, after checking.
struct Plan {
  km::BlockMap map;
  long long ldw;
  int nb, k, r, n;
  bool transposed;
  bool tensor_core;  // a 16-bit W at r >= 32: WMMA keeps the merge memory-bound (float32 factors as bf16 hi/lo)
  bool vector;       // 16-byte accesses: W's pointer, row stride and block offsets allow them
};

// Tensor cores for a 16-bit W from rank 32 on, whatever the factors' dtype (kernels/merge.cuh): below that the
// fp32 FMAs stay under the memory floor; a float32 W has no 16-bit operands to give them.
inline bool tensor_core(at::ScalarType w_type, int64_t rank) { return w_type != at::kFloat && rank >= 32; }

// Checks every argument before anything runs; `w_name` is "W" for merge_ and "out" for delta_weight_,
// a_name/b_name name the factors in messages (swap_ has two pairs).
inline Plan check(const char* op, const char* w_name, const at::Tensor& w, const at::Tensor& a, const at::Tensor& b,
                  int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed,
                  c10::DeviceType device, const char* a_name = "A", const char* b_name = "B") {
  LORA_CHECK_VALUE(w.device().type() == device, op, ": ", w_name, " must be a ", c10::DeviceTypeName(device),
                   " tensor, got one on ", w.device());
  checks::on_device(op, a_name, a, w_name, w);
  checks::on_device(op, b_name, b, w_name, w);

  const auto wt = w.scalar_type();
  LORA_CHECK_VALUE(wt == at::kFloat || wt == at::kHalf || wt == at::kBFloat16, op, ": ", w_name,
                   " must be float32, float16 or bfloat16, got ", wt);
  LORA_CHECK_VALUE(a.scalar_type() == wt || a.scalar_type() == at::kFloat, op, ": ", a_name,
                   " must be float32 or ", w_name, "'s dtype (", wt, "), got ", a.scalar_type());
  LORA_CHECK_VALUE(b.scalar_type() == a.scalar_type(), op, ": ", b_name, " must have ", a_name, "'s dtype (",
                   a.scalar_type(), "), got ", b.scalar_type());

  LORA_CHECK_VALUE(w.dim() == 2, op, ": ", w_name, " must be 2-D, got ", w.dim(), " dimensions");
  LORA_CHECK_VALUE(a.dim() == 2, op, ": ", a_name, " must be 2-D, got ", a.dim(), " dimensions");
  LORA_CHECK_VALUE(b.dim() == 2, op, ": ", b_name, " must be 2-D, got ", b.dim(), " dimensions");
  LORA_CHECK_VALUE((w.size(1) <= 1 || w.stride(1) == 1) && (w.size(0) <= 1 || w.stride(0) >= w.size(1)), op,
                   ": ", w_name, " must have column stride 1 and a row stride of at least its ", w.size(1),
                   " columns (contiguous, or a row-slice of a wider tensor), got strides ", w.strides());

  checks::block_ids(op, num_blocks, block_ids, km::kMaxBlocks);

  const int64_t n = (int64_t)block_ids.size();
  const int64_t blocked = transposed ? w.size(1) : w.size(0);  // the dimension split into num_blocks blocks
  const int64_t k = transposed ? w.size(0) : w.size(1);
  LORA_CHECK_VALUE(blocked % num_blocks == 0, op, ": ", w_name, " has ", blocked,
                   transposed ? " columns" : " rows", ", not divisible by num_blocks=", num_blocks,
                   " (transposed=", transposed, ")");
  const int64_t nb = blocked / num_blocks;
  LORA_CHECK_VALUE(a.size(1) == k, op, ": ", a_name, " must have ", k, " columns (", w_name,
                   transposed ? "'s rows, transposed" : "'s columns", "), got shape ", a.sizes());
  int64_t r = b.size(1);
  if (n == 0) {
    LORA_CHECK_VALUE(a.size(0) == 0 && b.size(0) == 0, op, ": with no enabled blocks ", a_name, " and ", b_name,
                     " must have 0 rows, got ", a_name, " ", a.sizes(), " and ", b_name, " ", b.sizes());
  } else {
    r = checks::rank(op, a, b, n, nb, a_name, b_name);
  }
  LORA_CHECK_VALUE(nb <= checks::kIntMax && k <= checks::kIntMax && r <= checks::kIntMax, op, ": ", w_name, ", ",
                   a_name, " and ", b_name, " sizes must fit in 32 bits");
  const int64_t m_total = transposed ? k : nb;
  LORA_CHECK_VALUE(checks::ceil_div(m_total, km::kTileM) <= checks::kMaxGridYZ, op, ": ", w_name, " has too many ",
                   transposed ? "rows" : "rows per block", " (", m_total, "; at most ",
                   checks::kMaxGridYZ * km::kTileM, ")");

  Plan p{};
  p.ldw = w.size(0) <= 1 ? w.size(1) : w.stride(0);
  p.nb = (int)nb;
  p.k = (int)k;
  p.r = (int)r;
  p.n = (int)n;
  p.transposed = transposed;
  p.map.count = (int)n;
  for (int64_t e = 0; e < num_blocks; ++e) p.map.slot[e] = -1;
  for (int64_t j = 0; j < n; ++j) {
    p.map.id[j] = (short)block_ids[j];
    p.map.slot[block_ids[j]] = (short)j;
  }
  p.map.count = (int)n;
  const int64_t vec = 16 / w.element_size();
  p.vector = reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 && p.ldw % vec == 0 &&
             (!transposed || num_blocks == 1 || nb % vec == 0);
  p.tensor_core = tensor_core(wt, r);
  return p;
}

// Which kernel: merge_ (W += ...), delta_weight_ (out = ...) or swap_ (W += two factor pairs' updates).
enum class Kind { kMerge, kDelta, kSwap };

template <typename T, typename Tab, bool kTensorCore, bool kVector, Kind kKind>
constexpr auto kernel_for() {
  if constexpr (kKind == Kind::kDelta)
    return &km::delta_weight_kernel<T, Tab, kTensorCore, kVector>;
  else if constexpr (kKind == Kind::kSwap)
    return &km::swap_kernel<T, Tab, kTensorCore, kVector>;
  else
    return &km::merge_kernel<T, Tab, kTensorCore, kVector>;
}

// One entry of LORA_MERGE_VARIANTS (kernels/variants.cuh), as a type.
template <typename T_, typename Tab_, bool kTensorCore_, bool kVector_>
struct Variant {
  using T = T_;
  using Tab = Tab_;
  static constexpr bool kTensorCore = kTensorCore_;
  static constexpr bool kVector = kVector_;

  // e.g. "merge<W=Half, factors=Float, tensor_core=0, vector=1>" (lora_ext._sim.last_variant())
  static std::string describe() {
    return std::string("merge<W=") + c10::toString(scalar_type_of<T>) + ", factors=" +
           c10::toString(scalar_type_of<Tab>) + ", tensor_core=" + (kTensorCore ? "1" : "0") +
           ", vector=" + (kVector ? "1" : "0") + ">";
  }
};

// The variants check() can lead to: W float32, fp16 or bf16; factors float32 or W's dtype; tensor cores only
// for a 16-bit W; 16-byte accesses or not.
template <typename T, typename Tab, bool kTensorCore, bool kVector>
constexpr bool selectable() {
  constexpr bool weight = std::is_same<T, float>::value || std::is_same<T, __half>::value ||
                          std::is_same<T, __nv_bfloat16>::value;
  constexpr bool factors = std::is_same<Tab, float>::value || std::is_same<Tab, T>::value;
  return weight && factors && (!kTensorCore || !std::is_same<T, float>::value);
}

template <typename T, typename Tab, bool kTensorCore, bool kVector>
constexpr bool listed() {
#define LORA_MERGE_LISTED(T_, TAB_, TC_, VEC_) \
  || (std::is_same<T, T_>::value && std::is_same<Tab, TAB_>::value && kTensorCore == TC_ && kVector == VEC_)
  return false LORA_MERGE_VARIANTS(LORA_MERGE_LISTED);
#undef LORA_MERGE_LISTED
}

// LORA_MERGE_VARIANTS lists exactly the selectable variants (over the three dtypes), so select_variant
// below finds one for every checked call, and no kernel is compiled that nothing selects.
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
              "LORA_MERGE_VARIANTS (kernels/variants.cuh) must list exactly the variants the host can select");

// Calls f(Variant<...>{}) for the entry of LORA_MERGE_VARIANTS that matches W's dtype, the factors' dtype and
// the plan's tensor-core and vector choices: the list is all the host instantiates. The Launch policy hears
// which one.
template <class Launch, typename F>
void select_variant(const char* op, const Plan& plan, at::ScalarType w_type, at::ScalarType ab_type, F&& f) {
#define LORA_MERGE_SELECT(T, TAB, TC, VEC)                                                    \
  if (w_type == scalar_type_of<T> && ab_type == scalar_type_of<TAB> && plan.tensor_core == TC && \
      plan.vector == VEC) {                                                                     \
    Launch::selected(&Variant<T, TAB, TC, VEC>::describe);                                      \
    return f(Variant<T, TAB, TC, VEC>{});                                                       \
  }
  LORA_MERGE_VARIANTS(LORA_MERGE_SELECT)
#undef LORA_MERGE_SELECT
  LORA_CHECK(false, op, ": no kernel variant for W ", w_type, " with factors ", ab_type,
             " (tensor_core=", plan.tensor_core, ", vector=", plan.vector, ") in LORA_MERGE_VARIANTS");
}

// The second factor pair of a swap, (a2, b2) of rank r2, and the first pair's multiplier.
struct Second {
  const at::Tensor* a2 = nullptr;
  const at::Tensor* b2 = nullptr;
  int r2 = 0;
  double mult = 1.0;
};

template <class Launch, Kind kKind>
void run(const char* op, const Plan& plan, const at::Tensor& w, const at::Tensor& a, const at::Tensor& b,
         double scale, int num_blocks, const Second& second = {}) {
  select_variant<Launch>(op, plan, w.scalar_type(), a.scalar_type(), [&](auto variant) {
    using V = decltype(variant);
    using T = typename V::T;
    using Tab = typename V::Tab;
    km::Args<T, Tab> args;
    args.w = reinterpret_cast<T*>(w.data_ptr());
    args.ldw = plan.ldw;
    args.a = reinterpret_cast<const Tab*>(a.data_ptr());
    args.b = reinterpret_cast<const Tab*>(b.data_ptr());
    args.nb = plan.nb;
    args.k = plan.k;
    args.r = plan.r;
    args.scale = (float)scale;
    args.a2 = second.a2 ? reinterpret_cast<const Tab*>(second.a2->data_ptr()) : nullptr;
    args.b2 = second.b2 ? reinterpret_cast<const Tab*>(second.b2->data_ptr()) : nullptr;
    args.r2 = second.r2;
    args.mult = (float)second.mult;
    args.transposed = plan.transposed;
    args.map = plan.map;
    args.map.count = kKind == Kind::kDelta ? num_blocks : plan.n;
    // Prefetching kernels (kernels/merge.cuh) walk the tiles with as many blocks as are resident at once (or one
    // per tile when fewer); the others take one block per tile.
    const auto kernel = kernel_for<T, Tab, V::kTensorCore, V::kVector, kKind>();
    constexpr bool kDelta = kKind == Kind::kDelta;
    constexpr size_t smem = km::launch_smem_bytes<T, Tab, V::kTensorCore, V::kVector, kDelta>();
    const long long tiles = km::tile_count(args);
    LORA_CHECK_VALUE(tiles <= checks::kIntMax, op, ": ", kDelta ? "out" : "W", " has too many 64 x 128 tiles (",
                     tiles, "; at most ", checks::kIntMax, ")");
    const long long blocks =
        km::kPrefetch<V::kVector, kDelta> ? std::min<long long>(tiles, Launch::resident(kernel, km::kThreads, smem))
                                          : tiles;
    Launch::run(kernel, dim3((unsigned)blocks), dim3(km::kThreads), smem, args);
  });
}

// W[blocks] += scale * B_j @ A_j (kDelta false), or out = the dense scale * delta (kDelta true).
template <class Launch, bool kDelta>
void apply(const char* op, const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
           int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed, c10::DeviceType device) {
  const Plan plan = check(op, kDelta ? "out" : "W", w, a, b, num_blocks, block_ids, transposed, device);
  // An empty W (no rows, columns or features per block) would be a zero-size grid, an invalid launch
  // configuration on CUDA; with no enabled block a merge adds nothing. A merge at scale 0 adds nothing either
  // and writes nothing, as the CPU's addmm_(alpha=0) (and swap_ with both scales 0): W + 0 * delta would turn
  // -0 into +0 and non-finite factor values into NaN.
  if (w.numel() == 0 || (!kDelta && (plan.n == 0 || scale == 0))) return;
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  run<Launch, kDelta ? Kind::kDelta : Kind::kMerge>(op, plan, w, ac, bc, scale, (int)num_blocks);
}

// W[blocks] += new_scale * B2_j @ A2_j - old_scale * B1_j @ A1_j in one pass (one rounding per element).
// Both pairs are checked against W like merge_'s operands (named new_A/new_B, old_A/old_B) before anything
// runs; they must share one dtype (float32 or W's). The kernel computes W + scale * (mult * x + y) for the
// pairs' products x and y: y is the pair with the larger multiplier, so mult = m_x / m_y is at most 1 in size.
template <class Launch>
void apply_swap(const char* op, const at::Tensor& w, const at::Tensor& old_a, const at::Tensor& old_b,
                double old_scale, const at::Tensor& new_a, const at::Tensor& new_b, double new_scale,
                int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed, c10::DeviceType device) {
  const Plan new_plan = check(op, "W", w, new_a, new_b, num_blocks, block_ids, transposed, device, "new_A", "new_B");
  const Plan old_plan = check(op, "W", w, old_a, old_b, num_blocks, block_ids, transposed, device, "old_A", "old_B");
  LORA_CHECK_VALUE(old_a.scalar_type() == new_a.scalar_type(), op, ": old_A and new_A must share one dtype, got ",
                   old_a.scalar_type(), " and ", new_a.scalar_type());
  LORA_CHECK_VALUE(std::isfinite(old_scale) && std::isfinite(new_scale), op,
                   ": old_scale and new_scale must be finite, got ", old_scale, " and ", new_scale);
  if (w.numel() == 0 || new_plan.n == 0 || (old_scale == 0 && new_scale == 0)) return;  // as in apply
  const bool new_is_y = std::abs(new_scale) >= std::abs(old_scale);
  const at::Tensor ax = (new_is_y ? old_a : new_a).contiguous(), bx = (new_is_y ? old_b : new_b).contiguous();
  const at::Tensor ay = (new_is_y ? new_a : old_a).contiguous(), by = (new_is_y ? new_b : old_b).contiguous();
  const double m_x = new_is_y ? -old_scale : new_scale, m_y = new_is_y ? new_scale : -old_scale;
  Plan plan = new_is_y ? old_plan : new_plan;
  plan.tensor_core = tensor_core(w.scalar_type(), new_plan.r + old_plan.r);
  Second second;
  second.a2 = &ay;
  second.b2 = &by;
  second.r2 = (new_is_y ? new_plan : old_plan).r;
  second.mult = m_x / m_y;
  run<Launch, Kind::kSwap>(op, plan, w, ax, bx, m_y, 0, second);
}

// ---- lossless merge, unmerge and swap (docs/LOSSLESS.md; kernels/lossless.cuh) -----------------------------

namespace kl = kernels::lossless;

// One entry of LORA_LOSSLESS_VARIANTS (kernels/variants.cuh), as a type. The lossless kernels always take the
// fp32 FMA sum, so the plan's tensor-core choice does not enter.
template <typename T_, typename Tab_, bool kVector_>
struct LosslessVariant {
  using T = T_;
  using Tab = Tab_;
  static constexpr bool kVector = kVector_;

  // e.g. "lossless<W=Half, factors=Float, vector=1>" (lora_ext._sim.last_variant())
  static std::string describe() {
    return std::string("lossless<W=") + c10::toString(scalar_type_of<T>) + ", factors=" +
           c10::toString(scalar_type_of<Tab>) + ", vector=" + (kVector ? "1" : "0") + ">";
  }
};

template <typename T, typename Tab, bool kVector>
constexpr bool lossless_listed() {
#define LORA_LOSSLESS_LISTED(T_, TAB_, VEC_) \
  || (std::is_same<T, T_>::value && std::is_same<Tab, TAB_>::value && kVector == VEC_)
  return false LORA_LOSSLESS_VARIANTS(LORA_LOSSLESS_LISTED);
#undef LORA_LOSSLESS_LISTED
}

template <typename T, typename Tab>
constexpr bool lossless_list_matches() {
  return lossless_listed<T, Tab, false>() == selectable<T, Tab, false, false>() &&
         lossless_listed<T, Tab, true>() == selectable<T, Tab, false, true>();
}
template <typename T>
constexpr bool lossless_list_matches() {
  return lossless_list_matches<T, float>() && lossless_list_matches<T, __half>() &&
         lossless_list_matches<T, __nv_bfloat16>();
}
static_assert(lossless_list_matches<float>() && lossless_list_matches<__half>() &&
                  lossless_list_matches<__nv_bfloat16>(),
              "LORA_LOSSLESS_VARIANTS (kernels/variants.cuh) must list exactly the variants the host can select");

template <class Launch, typename F>
void select_lossless_variant(const char* op, bool vector, at::ScalarType w_type, at::ScalarType ab_type, F&& f) {
#define LORA_LOSSLESS_SELECT(T, TAB, VEC)                                                        \
  if (w_type == scalar_type_of<T> && ab_type == scalar_type_of<TAB> && vector == VEC) {         \
    Launch::selected(&LosslessVariant<T, TAB, VEC>::describe);                                  \
    return f(LosslessVariant<T, TAB, VEC>{});                                                   \
  }
  LORA_LOSSLESS_VARIANTS(LORA_LOSSLESS_SELECT)
#undef LORA_LOSSLESS_SELECT
  LORA_CHECK(false, op, ": no kernel variant for W ", w_type, " with factors ", ab_type, " (vector=", vector,
             ") in LORA_LOSSLESS_VARIANTS");
}

// A factor pair and its scale, as given.
struct Pair {
  const at::Tensor* a;
  const at::Tensor* b;
  double scale;
  const char* a_name;
  const char* b_name;
  const char* scale_name;
};

// A record's tensors, as given: codes, and the exception list (index, bits); `prefix` names them ("" or "old_").
struct Record {
  const at::Tensor* codes;
  const at::Tensor* exc_index;
  const at::Tensor* exc_bits;
  const char* prefix;
};

// What a record written by merge/swap also needs: the norms, gamma and the exception counter.
struct Output {
  const at::Tensor* lnorm;
  const at::Tensor* rnorm;
  double gamma;
  const at::Tensor* counter;
};

inline void check_tensor(const char* op, const std::string& name, const at::Tensor& t, at::ScalarType dtype,
                         std::vector<int64_t> shape, const at::Tensor& w, const char* what) {
  LORA_CHECK_VALUE(t.device() == w.device(), op, ": ", name, " must be on W's device (", w.device(), "), got ",
                   t.device());
  LORA_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " (", what, "), got ",
                   t.scalar_type());
  LORA_CHECK_VALUE(t.sizes() == c10::IntArrayRef(shape), op, ": ", name, " must have shape ",
                   c10::IntArrayRef(shape), " (", what, "), got ", t.sizes());
  LORA_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The record's tensors for a region of n blocks of rows x cols elements; list_name: the exception list is the
// sorted list a merge wrote (read) or the capacity of the one to write.
inline void check_record(const char* op, const Record& rec, const at::Tensor& w, int64_t n, int64_t rows,
                         int64_t cols, const char* list_what) {
  const std::string pre = rec.prefix;
  const bool wide = w.scalar_type() == at::kFloat;
  const int64_t groups = (cols + 3) / 4;
  check_tensor(op, pre + "codes", *rec.codes, wide ? at::kShort : at::kByte, {n, rows, wide ? 4 * groups : groups},
               w,
               wide ? "one uint16 code per element of a float32 W, rows padded to a multiple of 4"
                    : "four 2-bit codes a byte for a 16-bit W, rows padded to a multiple of 4 codes");
  const at::Tensor& idx = *rec.exc_index;
  LORA_CHECK_VALUE(idx.dim() == 1, op, ": ", pre, "exc_index must be 1-D, got shape ", idx.sizes());
  check_tensor(op, pre + "exc_index", idx, at::kLong, {idx.size(0)}, w, list_what);
  check_tensor(op, pre + "exc_bits", *rec.exc_bits, at::kInt, {idx.size(0)}, w,
               "the base bits of each exception, as many as exc_index");
}

template <class Launch, kl::Mode kMode>
void lossless(const char* op, const at::Tensor& w, const Pair* old, const Record* old_rec, const Pair* fresh,
              const Record* rec, const Output* out, int64_t num_blocks, const std::vector<int64_t>& block_ids,
              bool transposed, c10::DeviceType device) {
  const Pair& first = fresh ? *fresh : *old;
  const Plan plan =
      check(op, "W", w, *first.a, *first.b, num_blocks, block_ids, transposed, device, first.a_name, first.b_name);
  Plan old_plan = plan;
  if (fresh && old) {
    old_plan = check(op, "W", w, *old->a, *old->b, num_blocks, block_ids, transposed, device, old->a_name,
                     old->b_name);
    LORA_CHECK_VALUE(old->a->scalar_type() == fresh->a->scalar_type(), op, ": ", old->a_name, " and ",
                     fresh->a_name, " must share one dtype, got ", old->a->scalar_type(), " and ",
                     fresh->a->scalar_type());
  }
  for (const Pair* pr : {old, fresh})
    if (pr)
      LORA_CHECK_VALUE(std::isfinite(pr->scale) && std::isfinite((float)pr->scale), op, ": ", pr->scale_name,
                       " must be finite (as a float32), got ", pr->scale);
  const int64_t n = plan.n;
  const int64_t rows = transposed ? plan.k : plan.nb;
  const int64_t cols = transposed ? plan.nb : plan.k;
  if (old_rec) check_record(op, *old_rec, w, n, rows, cols, "the sorted exception list of the merge");
  if (rec) {
    check_record(op, *rec, w, n, rows, cols, "the exception list's capacity");
    check_tensor(op, "lnorm", *out->lnorm, at::kFloat, {n, rows}, w, "the left operand's row norms");
    check_tensor(op, "rnorm", *out->rnorm, at::kFloat, {n, cols}, w, "the right operand's column norms");
    check_tensor(op, "counter", *out->counter, at::kLong, {1}, w, "the exception count, zeroed");
    LORA_CHECK_VALUE(std::isfinite(out->gamma) && out->gamma >= 0, op, ": gamma must be finite and >= 0, got ",
                     out->gamma);
  }
  if (n == 0 || rows == 0 || cols == 0) return;  // nothing recorded (and no zero-size grid)

  const at::Tensor a = first.a->contiguous(), b = first.b->contiguous();
  const at::Tensor oa = (fresh && old) ? old->a->contiguous() : a, ob = (fresh && old) ? old->b->contiguous() : b;
  select_lossless_variant<Launch>(op, plan.vector, w.scalar_type(), a.scalar_type(), [&](auto variant) {
    using V = decltype(variant);
    using T = typename V::T;
    using Tab = typename V::Tab;
    using Code = kl::Code<T>;
    kl::Args<T, Tab> args{};
    args.w = reinterpret_cast<T*>(w.data_ptr());
    args.ldw = plan.ldw;
    args.nb = plan.nb;
    args.k = plan.k;
    args.transposed = plan.transposed;
    args.map = plan.map;
    if (fresh) {
      args.a = reinterpret_cast<const Tab*>(a.data_ptr());
      args.b = reinterpret_cast<const Tab*>(b.data_ptr());
      args.r = plan.r;
      args.scale = (float)fresh->scale;
      args.lnorm = out->lnorm->data_ptr<float>();
      args.rnorm = out->rnorm->data_ptr<float>();
      args.delta_scale = out->gamma * std::fabs((double)args.scale);
      args.codes = reinterpret_cast<Code*>(rec->codes->data_ptr());
      args.exc_index = reinterpret_cast<long long*>(rec->exc_index->data_ptr());
      args.exc_bits = rec->exc_bits->data_ptr<int>();
      args.cap = rec->exc_index->numel();
      args.counter = reinterpret_cast<unsigned long long*>(out->counter->data_ptr());
    }
    if (old) {
      args.old_a = reinterpret_cast<const Tab*>((fresh ? oa : a).data_ptr());
      args.old_b = reinterpret_cast<const Tab*>((fresh ? ob : b).data_ptr());
      args.old_r = old_plan.r;
      args.old_scale = (float)old->scale;
      args.old_codes = reinterpret_cast<const Code*>(old_rec->codes->data_ptr());
      args.old_exc_index = reinterpret_cast<const long long*>(old_rec->exc_index->data_ptr());
      args.old_exc_bits = old_rec->exc_bits->data_ptr<int>();
      args.old_count = old_rec->exc_index->numel();
    }
    const dim3 grid((unsigned)((cols + km::kTileN - 1) / km::kTileN), (unsigned)((rows + km::kTileM - 1) / km::kTileM),
                    (unsigned)n);
    constexpr auto kernel = kMode == kl::Mode::kMerge     ? &kl::merge_lossless_kernel<T, Tab, V::kVector>
                            : kMode == kl::Mode::kUnmerge ? &kl::unmerge_lossless_kernel<T, Tab, V::kVector>
                                                          : &kl::swap_lossless_kernel<T, Tab, V::kVector>;
    Launch::run(kernel, grid, dim3(km::kThreads), kl::smem_bytes<T>(), args);
  });
}

// merge_lossless_: W[blocks] += scale * B_j @ A_j, writing the record (codes, exceptions, counter).
template <class Launch>
void merge_lossless(const char* op, const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
                    int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed, const at::Tensor& lnorm,
                    const at::Tensor& rnorm, double gamma, const at::Tensor& codes, const at::Tensor& exc_index,
                    const at::Tensor& exc_bits, const at::Tensor& counter, c10::DeviceType device) {
  const Pair fresh{&a, &b, scale, "A", "B", "scale"};
  const Record rec{&codes, &exc_index, &exc_bits, ""};
  const Output out{&lnorm, &rnorm, gamma, &counter};
  lossless<Launch, kl::Mode::kMerge>(op, w, nullptr, nullptr, &fresh, &rec, &out, num_blocks, block_ids, transposed,
                                     device);
}

// unmerge_lossless_: the base back from W', the pair and the record merge_lossless_ wrote (its list sorted).
template <class Launch>
void unmerge_lossless(const char* op, const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
                      int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed,
                      const at::Tensor& codes, const at::Tensor& exc_index, const at::Tensor& exc_bits,
                      c10::DeviceType device) {
  const Pair old{&a, &b, scale, "A", "B", "scale"};
  const Record rec{&codes, &exc_index, &exc_bits, ""};
  lossless<Launch, kl::Mode::kUnmerge>(op, w, &old, &rec, nullptr, nullptr, nullptr, num_blocks, block_ids,
                                       transposed, device);
}

// swap_lossless_: the base restored with the old pair and its record, then the new pair merged, in one pass.
template <class Launch>
void swap_lossless(const char* op, const at::Tensor& w, const at::Tensor& old_a, const at::Tensor& old_b,
                   double old_scale, const at::Tensor& old_codes, const at::Tensor& old_exc_index,
                   const at::Tensor& old_exc_bits, const at::Tensor& new_a, const at::Tensor& new_b, double new_scale,
                   int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed, const at::Tensor& lnorm,
                   const at::Tensor& rnorm, double gamma, const at::Tensor& codes, const at::Tensor& exc_index,
                   const at::Tensor& exc_bits, const at::Tensor& counter, c10::DeviceType device) {
  const Pair old{&old_a, &old_b, old_scale, "old_A", "old_B", "old_scale"};
  const Pair fresh{&new_a, &new_b, new_scale, "new_A", "new_B", "new_scale"};
  const Record old_rec{&old_codes, &old_exc_index, &old_exc_bits, "old_"};
  const Record rec{&codes, &exc_index, &exc_bits, ""};
  const Output out{&lnorm, &rnorm, gamma, &counter};
  lossless<Launch, kl::Mode::kSwap>(op, w, &old, &old_rec, &fresh, &rec, &out, num_blocks, block_ids, transposed,
                                    device);
}

}  // namespace merge_host
}  // namespace lora_ext
