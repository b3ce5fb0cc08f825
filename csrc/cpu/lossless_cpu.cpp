// The lossless merge / unmerge / swap pass (docs/LOSSLESS.md) on CPU tensors, bit-identical to the pure-torch
// reference lora_ext/lossless.py (_pass): the same row chunks (lossless._chunk), the same fp32 update
// D = at::mm(left[i:i+h], right) (the same torch matmul on the same views), d = fl32(D * s), W' = T(W + d),
// c = (double)W' - (double)d, delta = ((double)ln * (double)rn) * delta_scale + |c| * 2^-50, the same codes and
// the same exception list (ascending). Everything after the matmul is one fused loop per row, parallel over the
// chunk's rows.
//
// Build flags: -O3 -ffp-contract=off -fno-trapping-math. The contraction flag is required: the reference rounds every product and
// sum separately, and the hot loops are compiled (target_clones) for AVX-512/AVX2 too, where GCC would otherwise
// fuse a*b+c into an FMA and change delta's last bit. -fno-trapping-math (as torch is built) lets GCC
// if-convert, hence vectorize, the float16 conversions (it changes no rounding).
//
// Decisions are made as the reference makes them, reformulated: with code = o(W) mod M the reference's
// restore(c', code) == o(W) holds iff |o(T(float(c'))) - o(W)| <= M/2, and o(T(float(.))) is monotone, so for
// finite W, c and delta "restore(c - delta) and restore(c + delta) give o(W)" is
// o(T(float(c - delta))) >= o(W) - M/2 and o(T(float(c + delta))) <= o(W) + M/2. A non-finite delta makes the
// reference fail (NaN ordinals lie far from every finite one; +inf cannot be near both ends), so it fails here.
//
// NaN bit patterns written into a 16-bit weight follow torch's float -> bf16/fp16 conversion on this machine
// (the wrapper probes it): bf16 NaNs become one constant pattern, fp16 NaNs keep their payload (F16C) or become
// sign | 0x7E00 (torch's scalar path).
#ifndef LORA_KERNELS_ONLY  // (a standalone build of the row kernels, for benchmarks)
#include "../check_msg.h"
#include <torch/extension.h>
#include <sys/mman.h>

#include "team.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "clones.h"

namespace {

enum Kind { F32 = 0, BF16 = 1, F16 = 2 };


// (memcpy, not C++20's std::bit_cast: torch 2.11's extensions build as C++17)
LORA_INLINE uint32_t fbits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
LORA_INLINE float bitsf(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct Conv {
  uint32_t nan_bf16;     // the bf16 pattern torch writes for every NaN
  uint32_t f16_payload;  // 1: fp16 NaNs keep their payload (F16C), 0: sign | 0x7E00
};

// float -> the weight's bits (round to nearest even), as torch converts
template <int K>
LORA_INLINE uint32_t from_float(float f, const Conv& cv) {
  uint32_t u = fbits(f);
  if constexpr (K == F32) {
    return u;
  } else if constexpr (K == BF16) {
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? cv.nan_bf16 : (r & 0xFFFFu);
  } else {
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    uint32_t nanv = 0x7E00u | (cv.f16_payload ? ((a >> 13) & 0x3FFu) : 0u);
    uint32_t normal = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    uint32_t subn = fbits(bitsf(a) + 0.5f) - 0x3F000000u;
    uint32_t h = a > 0x7F800000u ? nanv : (a >= 0x477FF000u ? 0x7C00u : (a >= 0x38800000u ? normal : subn));
    return h | sign;
  }
}

// the weight's bits -> float (exact)
template <int K>
LORA_INLINE float to_float(uint32_t b) {
  if constexpr (K == F32) {
    return bitsf(b);
  } else if constexpr (K == BF16) {
    return bitsf(b << 16);
  } else {
    uint32_t sign = (b & 0x8000u) << 16;
    uint32_t e = (b >> 10) & 0x1Fu;
    uint32_t m = b & 0x3FFu;
    uint32_t big = e == 31u ? (0x7F800000u | (m << 13)) : (((e + 112u) << 23) | (m << 13));
    uint32_t small = fbits(static_cast<float>(static_cast<int32_t>(m)) * 5.9604644775390625e-8f);
    return bitsf(sign | (e == 0u ? small : big));
  }
}

// ordinal of a bit pattern (int16 / int32 semantics); its own inverse
template <int K>
LORA_INLINE int32_t ord(uint32_t b) {
  if constexpr (K == F32) {
    int32_t v = static_cast<int32_t>(b);
    return v ^ ((v >> 31) & 0x7FFFFFFF);
  } else {
    int32_t v = static_cast<int32_t>(static_cast<int16_t>(static_cast<uint16_t>(b)));
    return v ^ ((v >> 31) & 0x7FFF);
  }
}

template <int K>
LORA_INLINE bool finite(uint32_t b) {
  if constexpr (K == F32) return (b & 0x7F800000u) != 0x7F800000u;
  if constexpr (K == BF16) return (b & 0x7F80u) != 0x7F80u;
  return (b & 0x7C00u) != 0x7C00u;
}

template <int K>
LORA_INLINE bool is_nan(uint32_t b) {
  if constexpr (K == F32) return (b & 0x7FFFFFFFu) > 0x7F800000u;
  if constexpr (K == BF16) return (b & 0x7FFFu) > 0x7F80u;
  return (b & 0x7FFFu) > 0x7C00u;
}

// non-negative remainders
LORA_INLINE uint32_t mod3(uint32_t u) {  // u < 2^17
  uint32_t q = (u * 43691u) >> 17;
  return u - 3u * q;
}
LORA_INLINE uint32_t mod65535(int32_t y) {  // any int32
  int32_t hi = y >> 16;                     // y = hi * 65536 + lo == hi + lo (mod 65535)
  uint32_t u = static_cast<uint32_t>(hi + static_cast<int32_t>(static_cast<uint32_t>(y) & 0xFFFFu) + 65535);
  uint32_t s = (u >> 16) + (u & 0xFFFFu);  // u < 2^18: s <= 65538
  return s >= 65535u ? s - 65535u : s;
}

template <int K>
LORA_INLINE uint32_t code_of(int32_t o) {
  if constexpr (K == F32) return mod65535(o);
  return mod3(static_cast<uint32_t>(o + 32769));
}

// restore: the bits of the ordinal x == code (mod M) nearest o(T(float(c)))
template <int K>
LORA_INLINE uint32_t restore_bits(double c, uint32_t code, const Conv& cv) {
  int32_t y = ord<K>(from_float<K>(static_cast<float>(c), cv));
  if constexpr (K == F32) {
    uint32_t ym = mod65535(y);
    int32_t t = static_cast<int32_t>(code) - static_cast<int32_t>(ym);
    t = t < 0 ? t + 65535 : t;
    int32_t adj = t > 32767 ? t - 65535 : t;
    uint32_t x = static_cast<uint32_t>(y) + static_cast<uint32_t>(adj);  // int64 -> int32 wraps
    return static_cast<uint32_t>(ord<F32>(x));
  } else {
    int32_t t = static_cast<int32_t>(mod3(static_cast<uint32_t>(static_cast<int32_t>(code) - y + 32769)));
    int32_t x = y + (t > 1 ? t - 3 : t);
    return static_cast<uint32_t>(ord<K>(static_cast<uint32_t>(x))) & 0xFFFFu;  // int64 -> int16 wraps
  }
}

template <int K>
struct Tr {
  using S = std::conditional_t<K == F32, uint32_t, uint16_t>;
  static constexpr uint32_t M = K == F32 ? 65535u : 3u;
  static constexpr int32_t H = K == F32 ? 32767 : 1;
};

// One row of a merge. base: the base row (the weight row itself, or the restored row of a swap); out: the weight
// row. The vector pass decides with a float-only sufficient condition (below); an element it cannot prove gets
// code M and keeps its base in `out`, and merge_exact then decides it as the reference does.
template <int K>
struct MergeArgs {
  const typename Tr<K>::S* base;
  typename Tr<K>::S* out;
  const float* D;
  const float* rn;
  typename std::conditional_t<K == F32, uint16_t, uint8_t>* code;
  float s;
  float lnds;  // >= ln * delta_scale, at least 2^-100 (an upper bound, safe from underflow)
  double ln;
  double ds;
  int64_t N;
  Conv cv;
};

// The reference's decision for one element: (kept, W' bits).
template <int K>
LORA_INLINE bool merge_exact(uint32_t wb, float D, float s, float rn, double ln, double ds, const Conv& cv,
                             uint32_t* wp_out) {
  float df = D * s;
  float wpf = to_float<K>(wb) + df;
  uint32_t wpb = from_float<K>(wpf, cv);
  double c = static_cast<double>(to_float<K>(wpb)) - static_cast<double>(df);
  double delta = (ln * static_cast<double>(rn)) * ds + std::fabs(c) * 0x1p-50;
  double lo = c - delta, hi = c + delta;
  int32_t ylo = ord<K>(from_float<K>(static_cast<float>(lo), cv));
  int32_t yhi = ord<K>(from_float<K>(static_cast<float>(hi), cv));
  int32_t ow = ord<K>(wb);
  int32_t lo_b = static_cast<int32_t>(static_cast<uint32_t>(ow) - static_cast<uint32_t>(Tr<K>::H));
  int32_t hi_b = static_cast<int32_t>(static_cast<uint32_t>(ow) + static_cast<uint32_t>(Tr<K>::H));
  *wp_out = wpb;
  return finite<K>(wb) & (std::fabs(c) < HUGE_VAL) & (delta < HUGE_VAL) & (ylo >= lo_b) & (yhi <= hi_b);
}

// The vector pass. Sufficient condition for the reference's "kept" (proof in docs terms):
// E = c_exact - W = (W' - W) - d; with t1 = fl32(W' - W), t2 = fl32(t1 - d): |E| <= |t2|(1 + 2^-23) + |t1| 2^-23.
// The reference's hi = fl64(c + delta), lo = fl64(c - delta) satisfy |hi - W|, |W - lo| <= Q with
// Q = |E| + ln rn ds (1 + 2^-49) + (|W'| + |d|) 2^-49. L below is computed in float and bounds Q from above
// (every float rounding (<= 2^-24 relative each, a handful of them) is covered by the factor 1 + 2^-18; underflow
// (<= 2^-150 absolute per operation) by + 2^-140; overflow or NaN fail the test). If L < G, with G at most the
// distance from W to the values whose ordinals are o(W) -+ M/2 (16-bit: the exact gaps to the neighbours; fp32:
// |W| 2^-11, for 2^-100 <= |W| < 2^120), then lo > value(o(W) - M/2) and hi < value(o(W) + M/2) strictly, so
// (monotone rounding; strictness settles +-0) both restores give o(W): kept, with the same W' and code. For 16-bit
// weights away from zero G extends to 1.25 gaps: it suffices that lo, hi round (double -> float -> T) to the
// neighbours or nearer, i.e. lie strictly inside the rounding midpoints beyond them.
template <int K>
LORA_INLINE int64_t merge_row(const MergeArgs<K>& a) {
  using S = typename Tr<K>::S;
  const S* __restrict base = a.base;
  S* __restrict out = a.out;
  const float* __restrict D = a.D;
  const float* __restrict rn = a.rn;
  auto* __restrict code = a.code;
  const float s = a.s, lnds = a.lnds;
  const Conv cv = a.cv;
  const int64_t N = a.N;
  int64_t fails = 0;
  for (int64_t n = 0; n < N; ++n) {
    uint32_t wb = base[n];
    float wf = to_float<K>(wb);
    float df = D[n] * s;
    float wpf = wf + df;
    uint32_t wpb = from_float<K>(wpf, cv);
    float wpff = to_float<K>(wpb);
    float t1 = wpff - wf;
    float t2 = t1 - df;
    float L = (std::fabs(t2) + std::fabs(t1) * 0x1p-22f) + rn[n] * lnds +
              (std::fabs(wf) + std::fabs(wpff) + std::fabs(df)) * 0x1p-46f;
    L = L * (1.0f + 0x1p-18f) + 0x1p-140f;
    int32_t ow = ord<K>(wb);
    float G;
    if constexpr (K == F32) {
      float aw = std::fabs(wf);
      G = (aw >= 0x1p-100f) & (aw < 0x1p120f) ? aw * 0x1p-11f : 0.0f;
    } else {
      float pf = to_float<K>(static_cast<uint32_t>(ord<K>(static_cast<uint32_t>(ow - 1))));
      float nf = to_float<K>(static_cast<uint32_t>(ord<K>(static_cast<uint32_t>(ow + 1))));
      float gl = wf - pf, gh = nf - wf;
      G = gl < gh ? gl : gh;
      // away from zero the window reaches past the neighbours to the rounding midpoints beyond them: at least
      // 1.25 G from W (the spacing at most halves once on the way), less a float ulp of slack so that float(lo)
      // lies strictly past the midpoint (a tie there could round to the far side)
      const float near_zero = K == BF16 ? 0x1p-130f : 0x1p-21f;
      G = std::fabs(wf) < near_zero ? G : G * 1.25f - std::fabs(wf) * 0x1p-20f;
    }
    bool ok = finite<K>(wb) & (L < G);
    uint32_t cd = ok ? code_of<K>(ow) : Tr<K>::M;
    out[n] = static_cast<S>(ok ? wpb : wb);
    code[n] = static_cast<std::remove_reference_t<decltype(code[n])>>(cd);
    fails += ok ? 0 : 1;
  }
  return fails;
}

// One row of an unmerge: out = the base restored from wp (merged), the old update and the codes; escapes keep
// wp (the caller looks them up), and so do coded elements whose merged value is not finite (written while merged).
// Returns the number of escapes.
template <int K>
struct RestoreArgs {
  const typename Tr<K>::S* wp;
  typename Tr<K>::S* out;
  const float* D;
  const typename std::conditional_t<K == F32, uint16_t, uint8_t>* code;
  float s;
  int64_t N;
  Conv cv;
};

template <int K>
LORA_INLINE int64_t restore_row(const RestoreArgs<K>& a) {
  using S = typename Tr<K>::S;
  const S* wp = a.wp;  // may alias out (unmerge in place): same element read then written
  S* out = a.out;
  const float* __restrict D = a.D;
  const auto* __restrict code = a.code;
  const float s = a.s;
  const Conv cv = a.cv;
  const int64_t N = a.N;
  int64_t esc = 0;
#pragma GCC ivdep
  for (int64_t n = 0; n < N; ++n) {
    uint32_t wpb = wp[n];
    uint32_t cd = code[n];
    float df = D[n] * s;
    float wpf = to_float<K>(wpb);
    double c = static_cast<double>(wpf) - static_cast<double>(df);
    uint32_t bits = restore_bits<K>(c, cd, cv);
    // a coded element's base is finite: a restore past the largest value is of a value written into the merged
    // weight, which takes its lossy unmerge T(c) (one code step past the top is inf or NaN)
    bits = finite<K>(bits) ? bits : from_float<K>(static_cast<float>(c), cv);
    bool e = cd == Tr<K>::M;
    // a merged value that is not finite keeps its bits: no merge codes one, so it was written while merged
    bool keep = e | !(std::fabs(wpf) < HUGE_VALF);
    out[n] = static_cast<S>(keep ? wpb : bits);
    esc += e ? 1 : 0;
  }
  return esc;
}

LORA_CLONES int64_t merge_row_f32(const MergeArgs<F32>& a) { return merge_row<F32>(a); }
LORA_CLONES int64_t merge_row_bf16(const MergeArgs<BF16>& a) { return merge_row<BF16>(a); }
LORA_CLONES int64_t merge_row_f16(const MergeArgs<F16>& a) { return merge_row<F16>(a); }
LORA_CLONES int64_t restore_row_f32(const RestoreArgs<F32>& a) { return restore_row<F32>(a); }
LORA_CLONES int64_t restore_row_bf16(const RestoreArgs<BF16>& a) { return restore_row<BF16>(a); }
LORA_CLONES int64_t restore_row_f16(const RestoreArgs<F16>& a) { return restore_row<F16>(a); }

template <int K>
int64_t merge_row_any(const MergeArgs<K>& a) {
  if constexpr (K == F32) return merge_row_f32(a);
  else if constexpr (K == BF16) return merge_row_bf16(a);
  else return merge_row_f16(a);
}
template <int K>
int64_t restore_row_any(const RestoreArgs<K>& a) {
  if constexpr (K == F32) return restore_row_f32(a);
  else if constexpr (K == BF16) return restore_row_bf16(a);
  else return restore_row_f16(a);
}

// calls fn(c) for every c < N with code[c] == M, in order: 8 (uint8 codes 0..3, M = 3) or 4 (uint16, M = 0xFFFF)
// codes per 64-bit word, set lanes found with exact lane tests and ctz
template <typename T, typename F>
LORA_INLINE void for_each_escape(const T* code, int64_t N, F&& fn) {
  constexpr int64_t L = 8 / sizeof(T);
  int64_t i = 0;
  for (; i + L <= N; i += L) {
    uint64_t w;
    std::memcpy(&w, code + i, 8);
    uint64_t hit;
    if constexpr (sizeof(T) == 1) {
      hit = w & (w >> 1) & 0x0101010101010101ull;  // both bits set: code 3
    } else {
      const uint64_t t = ~w;  // lanes of 0xFFFF become 0: exact zero-lane test
      const uint64_t lo = 0x7FFF7FFF7FFF7FFFull;
      hit = ~(((t & lo) + lo) | t | lo);
    }
    while (hit) {
      const int b = __builtin_ctzll(hit);
      fn(i + b / (8 * static_cast<int>(sizeof(T))));
      hit &= hit - 1;
    }
  }
  for (; i < N; ++i)
    if (code[i] == (sizeof(T) == 1 ? 3u : 0xFFFFu)) fn(i);
}

// the four 2-bit codes of each byte value, one per byte (a table: the shifts and masks per code do not vectorize
// and cost 4x more)
struct Unpacked {
  uint8_t codes[256][4];
  Unpacked() {
    for (int b = 0; b < 256; ++b)
      for (int q = 0; q < 4; ++q) codes[b][q] = static_cast<uint8_t>((b >> (2 * q)) & 3);
  }
};
inline const Unpacked& unpacked() {
  static const Unpacked table;
  return table;
}

LORA_INLINE void unpack2(const uint8_t* __restrict p, uint8_t* __restrict c, int64_t width) {
  const Unpacked& t = unpacked();
  for (int64_t i = 0; i < width; ++i) std::memcpy(c + 4 * i, t.codes[p[i]], 4);
}
LORA_CLONES void pack2(const uint8_t* __restrict c, uint8_t* __restrict p, int64_t width) {
  for (int64_t i = 0; i < width; ++i)
    p[i] = static_cast<uint8_t>(c[4 * i] | (c[4 * i + 1] << 2) | (c[4 * i + 2] << 4) | (c[4 * i + 3] << 6));
}

#ifndef LORA_KERNELS_ONLY
// one adapter on one block: left (M_rows, r), right (r, N) fp32, as lossless._Pair builds them
struct Pair {
  at::Tensor left, right;
  float s;
  // the reference's left[i:i+h] @ right (at::mm, i.e. mm_out into a fresh tensor), into a reused buffer
  at::Tensor update(int64_t i, int64_t h, at::Tensor& buf) const {
    if (!buf.defined() || buf.size(0) < h || buf.size(1) != right.size(1))
      buf = at::empty({h, right.size(1)}, right.options());
    at::Tensor out = buf.narrow(0, 0, h);
    at::mm_out(out, left.slice(0, i, i + h), right);
    return out;
  }
};

Pair make_pair(const at::Tensor& A, const at::Tensor& B, double scale, int64_t n, int64_t j, bool transposed) {
  int64_t r = A.size(0) / n, nb = B.size(0) / n;
  at::Tensor a = A.slice(0, j * r, (j + 1) * r).to(at::kFloat);
  at::Tensor b = B.slice(0, j * nb, (j + 1) * nb).to(at::kFloat);
  Pair p;
  if (transposed) {
    p.left = a.t();
    p.right = b.t();
  } else {
    p.left = b;
    p.right = a;
  }
  p.s = static_cast<float>(scale);
  return p;
}

// The codes, every byte of which the pass writes. Large ones on transparent huge pages where the kernel allows
// them (madvise mode): a fresh 32 MB tensor costs ~4x less in page faults than at::zeros/at::empty.
at::Tensor alloc_codes(std::vector<int64_t> shape, at::ScalarType dt) {
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  const size_t bytes = static_cast<size_t>(count) * (dt == at::kShort ? 2 : 1);
  constexpr size_t kHuge = size_t(1) << 21;
  if (bytes >= kHuge) {
    const size_t size = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, size) == 0) {
      madvise(p, size, MADV_HUGEPAGE);  // advice only: its failure changes nothing
      return at::from_blob(p, shape, [](void* q) { free(q); }, at::TensorOptions().dtype(dt));
    }
  }
  return at::empty(shape, at::TensorOptions().dtype(dt));
}

struct Exc {
  int64_t n;
  uint32_t base, wp;
};

template <int K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> run(
    at::Tensor weight, const c10::optional<at::Tensor>& old_A, const c10::optional<at::Tensor>& old_B,
    double old_scale, const c10::optional<at::Tensor>& rec_codes, const c10::optional<at::Tensor>& rec_index,
    const c10::optional<at::Tensor>& rec_bits, const c10::optional<at::Tensor>& new_A,
    const c10::optional<at::Tensor>& new_B, double new_scale, const c10::optional<at::Tensor>& lnorm,
    const c10::optional<at::Tensor>& rnorm, double delta_scale, int64_t num_blocks,
    const std::vector<int64_t>& block_ids, bool transposed, int64_t step, int64_t cap, Conv cv) {
  using S = typename Tr<K>::S;
  using CodeT = std::conditional_t<K == F32, uint16_t, uint8_t>;
  constexpr uint32_t M = Tr<K>::M;
  const bool has_old = old_A.has_value(), has_new = new_A.has_value();
  const int64_t n = static_cast<int64_t>(block_ids.size());
  const int64_t blocked = transposed ? weight.size(1) : weight.size(0);
  const int64_t nb = blocked / num_blocks;
  const int64_t k = transposed ? weight.size(0) : weight.size(1);
  const int64_t rows = transposed ? k : nb, cols = transposed ? nb : k;
  const int64_t ld = weight.stride(0);
  const int64_t width = (cols + 3) / 4;
  S* W = reinterpret_cast<S*>(weight.data_ptr());

  at::Tensor codes, exc_index_t, exc_bits_t;
  std::vector<int64_t> exc_i;
  std::vector<int32_t> exc_b;
  int64_t total = 0;
  if (has_new) {
    codes = K == F32 ? alloc_codes({n, rows, width * 4}, at::kShort) : alloc_codes({n, rows, width}, at::kByte);
  }
  const int64_t* old_idx = nullptr;
  const int32_t* old_bits = nullptr;
  int64_t old_count = 0;
  const uint8_t* old_codes = nullptr;
  int64_t old_row_bytes = 0;
  if (has_old) {
    old_idx = rec_index->data_ptr<int64_t>();
    old_bits = rec_bits->data_ptr<int32_t>();
    old_count = rec_index->numel();
    old_codes = reinterpret_cast<const uint8_t*>(rec_codes->data_ptr());
    old_row_bytes = rec_codes->size(2) * rec_codes->element_size();
  }
  const float* ln_p = has_new ? lnorm->data_ptr<float>() : nullptr;
  const float* rn_p = has_new ? rnorm->data_ptr<float>() : nullptr;
  uint8_t* new_codes = has_new ? reinterpret_cast<uint8_t*>(codes.data_ptr()) : nullptr;
  const int64_t new_row_bytes = has_new ? codes.size(2) * codes.element_size() : 0;

  std::vector<std::vector<Exc>> row_exc;
  at::Tensor buf_old, buf_new;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t e = block_ids[j];
    Pair p_old, p_new;
    if (has_old) p_old = make_pair(*old_A, *old_B, old_scale, n, j, transposed);
    if (has_new) p_new = make_pair(*new_A, *new_B, new_scale, n, j, transposed);
    for (int64_t i = 0; i < rows; i += step) {
      const int64_t h = std::min(step, rows - i);
      at::Tensor d_old, d_new;
      if (has_old) d_old = p_old.update(i, h, buf_old);
      if (has_new) d_new = p_new.update(i, h, buf_new);
      const float* Do = has_old ? d_old.data_ptr<float>() : nullptr;
      const float* Dn = has_new ? d_new.data_ptr<float>() : nullptr;
      row_exc.assign(has_new ? h : 0, {});
      // rows on torch's threads, every dtype (2 cores, 4096^2, r=16, side by side in one process, best of 5:
      // float32 merge 26 -> 18 ms, switch 40 -> 27 ms with the team; an earlier serial choice for float32 had
      // timed the first passes of a fresh process, which a fresh record's page faults dominate)
      lora_cpu::parallel_range(0, h, 1, [&](int64_t b0, int64_t b1) {
        std::vector<S> base_buf(has_old && has_new ? cols : 0);
        std::vector<uint8_t> cbuf(K == F32 ? 0 : width * 4 + 64, 0);
        for (int64_t mm = b0; mm < b1; ++mm) {
          const int64_t m = i + mm;
          S* wrow = W + (transposed ? m * ld + e * nb : (e * nb + m) * ld);
          const int64_t row_index = (j * rows + m) * cols;
          const S* base = wrow;
          if (has_old) {
            const uint8_t* crow = old_codes + (j * rows + m) * old_row_bytes;
            const CodeT* cp;
            if constexpr (K == F32) {
              cp = reinterpret_cast<const uint16_t*>(crow);
            } else {
              unpack2(crow, cbuf.data(), width);
              cp = cbuf.data();
            }
            S* dst = has_new ? base_buf.data() : wrow;
            RestoreArgs<K> ra{wrow, dst, Do + mm * cols, cp, p_old.s, cols, cv};
            if (restore_row_any<K>(ra) > 0) {
              // escapes: the original bits from the list (searchsorted, as the reference), else left as they are
              // (the escapes come in increasing order: one walk through the row's part of the list, from its first
              // entry, finds each one's first entry at or past it, as searchsorted does)
              const int64_t* const end = old_idx + old_count;
              const int64_t* q = std::lower_bound(old_idx, end, row_index);
              for_each_escape(cp, cols, [&](int64_t c) {
                const int64_t idx = row_index + c;
                while (q < end && *q < idx) ++q;
                if (q < end && *q == idx) dst[c] = static_cast<S>(static_cast<uint32_t>(old_bits[q - old_idx]));
              });
            }
            base = dst;
          }
          if (!has_new) continue;
          uint8_t* crow = new_codes + (j * rows + m) * new_row_bytes;
          CodeT* cdst = K == F32 ? reinterpret_cast<CodeT*>(crow) : reinterpret_cast<CodeT*>(cbuf.data());
          const double ln = static_cast<double>(ln_p[j * rows + m]);
          float lnds = static_cast<float>(ln * delta_scale * (1.0 + 0x1p-40));
          lnds = lnds < 0x1p-100f ? 0x1p-100f : lnds;  // (a NaN stays NaN and fails every test)
          MergeArgs<K> ma{base, wrow, Dn + mm * cols, rn_p + j * cols, cdst, p_new.s, lnds, ln, delta_scale,
                          cols, cv};
          const int64_t fails = merge_row_any<K>(ma);
          if constexpr (K == F32) std::fill(cdst + cols, cdst + width * 4, CodeT(0));  // padding codes 0
          if (fails > 0) {
            // the elements the vector pass could not prove: the reference's decision
            auto& list = row_exc[mm];
            const float* Drow = Dn + mm * cols;
            const float* rrow = rn_p + j * cols;
            for_each_escape(cdst, cols, [&](int64_t c) {
              const uint32_t wb = base[c];
              uint32_t wpb;
              if (merge_exact<K>(wb, Drow[c], p_new.s, rrow[c], ln, delta_scale, cv, &wpb)) {
                cdst[c] = static_cast<CodeT>(code_of<K>(ord<K>(wb)));
                wrow[c] = static_cast<S>(wpb);
              } else {
                list.push_back({c, wb, wpb});
              }
            });
          }
          if constexpr (K != F32) {
            std::fill(cbuf.begin() + cols, cbuf.begin() + width * 4, 0);
            pack2(cbuf.data(), crow, width);
          }
        }
      });
      if (!has_new) continue;
      // in order: list the exceptions (up to cap entries) and write their W'; past the cap an exception keeps
      // its base and is not listed (the refused pass's unmerge leaves it alone)
      // a NaN W' takes its bits from torch's own ops on the reference's tensors (torch writes NaN payloads
      // differently in its vector loops and their scalar tails, e.g. fp16 -> fp32 in a tail gives 0x7FFFFFFF)
      bool nan_wp = false;
      for (int64_t mm = 0; mm < h && !nan_wp; ++mm)
        for (const Exc& x : row_exc[mm]) nan_wp = nan_wp || is_nan<K>(x.wp);
      at::Tensor wp_ref;
      const S* wp_ref_p = nullptr;
      if (nan_wp) {
        at::Tensor view = transposed ? weight.slice(1, e * nb, (e + 1) * nb).slice(0, i, i + h)
                                     : weight.slice(0, e * nb, (e + 1) * nb).slice(0, i, i + h);
        // what the view holds now at an exception is its base; elsewhere W' (same shape, strides and NaNs)
        at::Tensor basev = has_old ? view.contiguous() : view;
        wp_ref = (basev.to(at::kFloat) + d_new.mul(static_cast<double>(p_new.s))).to(weight.scalar_type())
                     .contiguous();
        wp_ref_p = reinterpret_cast<const S*>(wp_ref.data_ptr());
      }
      for (int64_t mm = 0; mm < h; ++mm) {
        const auto& list = row_exc[mm];
        if (list.empty()) continue;
        const int64_t m = i + mm;
        S* wrow = W + (transposed ? m * ld + e * nb : (e * nb + m) * ld);
        const int64_t row_index = (j * rows + m) * cols;
        for (const Exc& x : list) {
          ++total;
          if (static_cast<int64_t>(exc_i.size()) >= cap) continue;
          exc_i.push_back(row_index + x.n);
          exc_b.push_back(static_cast<int32_t>(x.base));
          wrow[x.n] = wp_ref_p != nullptr && is_nan<K>(x.wp) ? wp_ref_p[mm * cols + x.n] : static_cast<S>(x.wp);
        }
      }
    }
  }
  if (has_new) {
    exc_index_t = at::empty({static_cast<int64_t>(exc_i.size())}, at::kLong);
    exc_bits_t = at::empty({static_cast<int64_t>(exc_b.size())}, at::kInt);
    if (!exc_i.empty()) {
      std::memcpy(exc_index_t.data_ptr<int64_t>(), exc_i.data(), exc_i.size() * sizeof(int64_t));
      std::memcpy(exc_bits_t.data_ptr<int32_t>(), exc_b.data(), exc_b.size() * sizeof(int32_t));
    }
  }
  return {codes, exc_index_t, exc_bits_t, total};
}

#endif  // LORA_KERNELS_ONLY
}  // namespace
#ifndef LORA_KERNELS_ONLY

// One pass over the enabled blocks of `weight` (CPU, row-major rows with unit column stride): restore the base
// with (old_A, old_B, old_scale) and the record (rec_codes, rec_index sorted, rec_bits) when old_A is given, then
// merge (new_A, new_B, new_scale) with the norms lnorm (n, M_rows), rnorm (n, N) and delta_scale =
// gamma(r) * |new_scale| when new_A is given. Scales are the float32 values (as doubles). step: rows per chunk
// (lossless._chunk). cap: at most this many exceptions are listed (and their W' written); the count is returned
// in full. Returns (codes, exc_index, exc_bits, exceptions); undefined tensors for an unmerge.
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> lossless_pass_(
    at::Tensor weight, c10::optional<at::Tensor> old_A, c10::optional<at::Tensor> old_B, double old_scale,
    c10::optional<at::Tensor> rec_codes, c10::optional<at::Tensor> rec_index, c10::optional<at::Tensor> rec_bits,
    c10::optional<at::Tensor> new_A, c10::optional<at::Tensor> new_B, double new_scale,
    c10::optional<at::Tensor> lnorm, c10::optional<at::Tensor> rnorm, double delta_scale, int64_t num_blocks,
    std::vector<int64_t> block_ids, bool transposed, int64_t step, int64_t cap, int64_t nan_bf16,
    bool f16_payload) {
  LORA_CHECK(weight.device().is_cpu() && weight.dim() == 2, "lossless_pass_: a 2-D CPU weight");
  LORA_CHECK(weight.size(1) <= 1 || weight.stride(1) == 1, "lossless_pass_: the weight's columns must be unit-stride");
  LORA_CHECK(num_blocks >= 1 && step >= 1, "lossless_pass_: bad num_blocks / step");
  LORA_CHECK(old_A.has_value() == old_B.has_value() && new_A.has_value() == new_B.has_value(),
             "lossless_pass_: factors come in pairs");
  const int64_t n = static_cast<int64_t>(block_ids.size());
  const int64_t blocked = transposed ? weight.size(1) : weight.size(0);
  const int64_t k = transposed ? weight.size(0) : weight.size(1);
  const int64_t nb = blocked / num_blocks;
  const int64_t rows = transposed ? k : nb, cols = transposed ? nb : k;
  for (int64_t e : block_ids) LORA_CHECK(e >= 0 && e < num_blocks, "lossless_pass_: block id out of range");
  const bool f32 = weight.scalar_type() == at::kFloat;
  if (old_A.has_value()) {
    LORA_CHECK(rec_codes.has_value() && rec_index.has_value() && rec_bits.has_value(), "lossless_pass_: record");
    LORA_CHECK(rec_codes->is_contiguous() && rec_codes->dim() == 3 && rec_codes->size(0) == n &&
                   rec_codes->size(1) == rows && rec_codes->size(2) == (f32 ? 4 : 1) * ((cols + 3) / 4) &&
                   rec_codes->scalar_type() == (f32 ? at::kShort : at::kByte),
               "lossless_pass_: the record's codes do not fit this weight");
    LORA_CHECK(rec_index->is_contiguous() && rec_index->scalar_type() == at::kLong && rec_bits->is_contiguous() &&
                   rec_bits->scalar_type() == at::kInt && rec_bits->numel() == rec_index->numel(),
               "lossless_pass_: the record's exception list");
  }
  if (new_A.has_value()) {
    LORA_CHECK(lnorm.has_value() && rnorm.has_value() && lnorm->is_contiguous() && rnorm->is_contiguous() &&
                   lnorm->scalar_type() == at::kFloat && rnorm->scalar_type() == at::kFloat &&
                   lnorm->numel() == n * rows && rnorm->numel() == n * cols,
               "lossless_pass_: norms");
  }
  Conv cv{static_cast<uint32_t>(nan_bf16) & 0xFFFFu, f16_payload ? 1u : 0u};
  switch (weight.scalar_type()) {
    case at::kFloat:
      return run<F32>(weight, old_A, old_B, old_scale, rec_codes, rec_index, rec_bits, new_A, new_B, new_scale,
                      lnorm, rnorm, delta_scale, num_blocks, block_ids, transposed, step, cap, cv);
    case at::kBFloat16:
      return run<BF16>(weight, old_A, old_B, old_scale, rec_codes, rec_index, rec_bits, new_A, new_B, new_scale,
                       lnorm, rnorm, delta_scale, num_blocks, block_ids, transposed, step, cap, cv);
    case at::kHalf:
      return run<F16>(weight, old_A, old_B, old_scale, rec_codes, rec_index, rec_bits, new_A, new_B, new_scale,
                      lnorm, rnorm, delta_scale, num_blocks, block_ids, transposed, step, cap, cv);
    default:
      LORA_CHECK(false, "lossless_pass_: float16, bfloat16 or float32 weights");
  }
}

namespace lora_ext_cpu {
void register_batched(pybind11::module_& m);  // batched_cpu.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lossless_pass_", &lossless_pass_, "the lossless merge / unmerge / swap pass on CPU (docs/LOSSLESS.md)");
  m.def("last_parallel_parts", [] { return lora_cpu::last_parts().load(); },
        "how many threads the last parallel loop of this module ran on (1: serially; a test hook)");
  lora_ext_cpu::register_batched(m);
}
#endif  // LORA_KERNELS_ONLY
