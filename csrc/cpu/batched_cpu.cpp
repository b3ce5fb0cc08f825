// Mixed batches on the CPU (lora_ext.ops.batched_linear_ / batched_embedding_; reference.py has their
// definition in pure torch): for each row m whose group has a slot i = index[m / tokens] >= 0,
//   t = scales[i] * (x[m] @ a[i])          (shrink: a[i] is the adapter's A^T, (k, R), fp32 accumulation)
//   out[m] = T(out[m] + t @ b[i])          (expand: b[i] is B^T, (R, d); one rounding per element)
// The live rows are grouped by slot first (a counting sort of the groups), so that each slot's factors are
// read once per tile of up to 8 of its rows rather than once per row: the shrink and the expand are small
// register-tiled GEMMs (a tile of rows x a chunk of R, resp. x a chunk of d, accumulated in fp32 registers)
// that read the slots where they lie, with no gathered copies of the factors. Two parallel phases (shrink
// into an fp32 buffer t, then the expand over (slot, d-block, row tile) items), each split between the
// threads by cost. The tiles are compiled for AVX-512 / AVX2 too (target_clones) on GCC vector extensions:
// the shrink vectorizes along R, the expand along d, with software prefetches ahead of the factors' streams
// (the expand reads R rows of b d apart at once). The tiles' width follows the machine's registers: 16 lanes
// and up to 16 accumulators where AVX-512 runs, 8 lanes and up to 8 elsewhere (g_lanes, below). Arguments
// arrive checked by lora_ext/ops.py; slot and id ranges are checked here.
#include "../check_msg.h"
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "clones.h"
#include "team.h"

namespace {

// the vector helpers are always inlined into the clones: no vector crosses a call boundary
#pragma GCC diagnostic ignored "-Wpsabi"

// ---------------------------------------------------------------------------------------------------
// fp32 vectors of N lanes (GCC vector extensions: one zmm on AVX-512, split into ymm / xmm below), loads of
// float / bfloat16 / float16 into them and the rounded stores

template <int N>
struct V;
template <>
struct V<16> {
  typedef float f __attribute__((vector_size(64)));
  typedef uint32_t u __attribute__((vector_size(64)));
  typedef uint16_t h __attribute__((vector_size(32)));
#ifdef __FLT16_MAX__
  typedef _Float16 hf __attribute__((vector_size(32)));
#endif
};
template <>
struct V<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef uint32_t u __attribute__((vector_size(32)));
  typedef uint16_t h __attribute__((vector_size(16)));
#ifdef __FLT16_MAX__
  typedef _Float16 hf __attribute__((vector_size(16)));
#endif
};

// The tiles' lanes N and the accumulators kAcc<N> a tile keeps in registers: 16 lanes (one zmm) and 16 of them
// where AVX-512 runs (32 registers; the x86-64-v4 clones), else 8 lanes (one ymm) and 8 (AVX2 has 16 registers). A
// 16-lane accumulator takes two of AVX2's registers: the AVX-512 tiles held 32 in accumulators alone there, which
// the compiler kept on the stack (4.3 GFLOP/s against BLAS's 180 on a 2-core AVX2 EPYC, 2026-12-04).
template <int N>
constexpr int kAcc = N >= 16 ? 16 : 8;

int detect_lanes() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();  // the features of x86-64-v4, whose clones run here then
  const bool v4 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
  return v4 ? 16 : 8;
#else
  return 8;
#endif
}

// chosen once at load; lora_ext._cpu.batched_lanes(n) sets it (tests run both tile families on one machine)
std::atomic<int> g_lanes{detect_lanes()};

LORA_INLINE float to_f(float v) { return v; }
LORA_INLINE float to_f(at::BFloat16 v) { return static_cast<float>(v); }
LORA_INLINE float to_f(at::Half v) { return static_cast<float>(v); }

template <int N>
LORA_INLINE typename V<N>::f vload(const float* p) {
  typename V<N>::f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <int N>
LORA_INLINE typename V<N>::f vload(const at::BFloat16* p) {
  typename V<N>::h h;
  std::memcpy(&h, p, sizeof h);
  const typename V<N>::u w = __builtin_convertvector(h, typename V<N>::u) << 16;
  typename V<N>::f v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
template <int N>
LORA_INLINE typename V<N>::f vload(const at::Half* p) {
#ifdef __FLT16_MAX__
  typename V<N>::hf h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, typename V<N>::f);
#else
  typename V<N>::f v;
  for (int i = 0; i < N; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// *p = T(*p + acc), each lane rounded once (round to nearest even, as c10's conversions)
template <int N>
LORA_INLINE void vadd_store(float* p, typename V<N>::f acc) {
  const typename V<N>::f v = vload<N>(p) + acc;
  std::memcpy(p, &v, sizeof v);
}
template <int N>
LORA_INLINE void vadd_store(at::BFloat16* p, typename V<N>::f acc) {
  using U = typename V<N>::u;
  const typename V<N>::f v = vload<N>(p) + acc;
  U w;
  std::memcpy(&w, &v, sizeof w);
  const U nan = (U)((w & 0x7fffffffu) > 0x7f800000u);  // all ones where NaN
  const U rounded = (w + (0x7fffu + ((w >> 16) & 1u))) >> 16;
  const U bits = (nan & 0x7fc0u) | (~nan & rounded);
  const typename V<N>::h h = __builtin_convertvector(bits, typename V<N>::h);
  std::memcpy(p, &h, sizeof h);
}
template <int N>
LORA_INLINE void vadd_store(at::Half* p, typename V<N>::f acc) {
  const typename V<N>::f v = vload<N>(p) + acc;
#ifdef __FLT16_MAX__
  const typename V<N>::hf h = __builtin_convertvector(v, typename V<N>::hf);
  std::memcpy(p, &h, sizeof h);
#else
  for (int i = 0; i < N; ++i) p[i] = static_cast<at::Half>(v[i]);
#endif
}

// The tiles contract a * b + c into fused multiply-adds (one rounding instead of two: fewer instructions, the
// same or better accuracy); the build's -ffp-contract=off is for lora_ext._cpu's lossless pass, which needs the
// unfused products of the torch reference, not for these fp32 accumulations.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
// ---------------------------------------------------------------------------------------------------
// shrink: t[r, 0:NV*N] = scale * sum_c x[r][c] * a[c, 0:NV*N] for RB rows; a points at the chunk's first
// column, rows R apart. U interleaved partial sums over c break the add chains of small tiles.

template <int RB, int NV, int U, int N, typename T>
LORA_CLONES void shrink_tile(const float* const* xr, const T* __restrict a, int64_t k, int64_t R, float scale,
                             float* const* tr) {
  using F = typename V<N>::f;
  const float* x[RB];
  for (int r = 0; r < RB; ++r) x[r] = xr[r];
  F acc[U][RB][NV];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < NV; ++v) acc[u][r][v] = F{};
  int64_t c = 0;
  for (; c + U <= k; c += U) {
    for (int u = 0; u < U; ++u) {
      F av[NV];
      for (int v = 0; v < NV; ++v) {
        if (N * sizeof(T) >= 64 || v % 2 == 0) __builtin_prefetch(a + (c + u + 16) * R + v * N);
        av[v] = vload<N>(a + (c + u) * R + v * N);
      }
      for (int r = 0; r < RB; ++r) {
        const float xv = x[r][c + u];
        for (int v = 0; v < NV; ++v) acc[u][r][v] += xv * av[v];
      }
    }
  }
  for (; c < k; ++c) {
    F av[NV];
    for (int v = 0; v < NV; ++v) av[v] = vload<N>(a + c * R + v * N);
    for (int r = 0; r < RB; ++r) {
      const float xv = x[r][c];
      for (int v = 0; v < NV; ++v) acc[0][r][v] += xv * av[v];
    }
  }
  for (int u = 1; u < U; ++u)
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < NV; ++v) acc[0][r][v] += acc[u][r][v];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) {
      const F s = acc[0][r][v] * scale;
      std::memcpy(tr[r] + v * N, &s, sizeof s);
    }
}

// the columns [j0, j1) of R left over by the vector chunks (fewer than N <= 16), for rb <= 8 rows
template <typename T>
LORA_CLONES void shrink_cols(const float* const* xr, int rb, const T* __restrict a, int64_t k, int64_t R,
                             int64_t j0, int64_t j1, float scale, float* const* tr) {
  for (int r = 0; r < rb; ++r) {
    float acc[16] = {};
    const int64_t n = j1 - j0;
    const float* x = xr[r];
    for (int64_t c = 0; c < k; ++c) {
      const float xv = x[c];
      const T* row = a + c * R + j0;
      for (int64_t j = 0; j < n; ++j) acc[j] += xv * to_f(row[j]);
    }
    for (int64_t j = 0; j < n; ++j) tr[r][j0 + j] = acc[j] * scale;
  }
}

// one chunk of NV vectors of R's columns for RB rows, in tiles of G rows holding at most kAcc<N> accumulators; U
// interleaved sums where a tile's accumulators are few
template <int RB, int NV, int N, typename T>
inline void shrink_chunk(const float* const* x, const T* a, int64_t k, int64_t R, float scale, float* const* t) {
  constexpr int G = RB < kAcc<N> / NV ? RB : kAcc<N> / NV;
  constexpr int U = G * NV >= kAcc<N> / 2 ? 1 : kAcc<N> / 2 / (G * NV);
  for (int h = 0; h < RB; h += G) shrink_tile<G, NV, U, N, T>(x + h, a, k, R, scale, t + h);
}

template <int RB, int N, typename T>
void shrink_rows_rb(const float* const* xr, const T* a, int64_t k, int64_t R, float scale, float* const* tr) {
  const float* x[RB];
  float* t[RB];
  int64_t j = 0;
  auto at_col = [&](int64_t j0) {
    for (int r = 0; r < RB; ++r) t[r] = tr[r] + j0;
  };
  for (int r = 0; r < RB; ++r) x[r] = xr[r];
  for (; j + 4 * N <= R; j += 4 * N) {  // chunks of 4, 2, 1 vectors, then the columns left
    at_col(j);
    shrink_chunk<RB, 4, N, T>(x, a + j, k, R, scale, t);
  }
  if (j + 2 * N <= R) {
    at_col(j);
    shrink_chunk<RB, 2, N, T>(x, a + j, k, R, scale, t);
    j += 2 * N;
  }
  if (j + N <= R) {
    at_col(j);
    shrink_chunk<RB, 1, N, T>(x, a + j, k, R, scale, t);
    j += N;
  }
  if (j < R) shrink_cols<T>(x, RB, a, k, R, j, R, scale, tr);
}

// t rows of n <= 8 rows of one slot
template <typename T, int N>
void shrink_rows(const float* const* xr, int n, const T* a, int64_t k, int64_t R, float scale, float* const* tr) {
  int h = 0;
  if (n - h >= 8) shrink_rows_rb<8, N, T>(xr + h, a, k, R, scale, tr + h), h += 8;
  if (n - h >= 4) shrink_rows_rb<4, N, T>(xr + h, a, k, R, scale, tr + h), h += 4;
  if (n - h >= 2) shrink_rows_rb<2, N, T>(xr + h, a, k, R, scale, tr + h), h += 2;
  if (n - h >= 1) shrink_rows_rb<1, N, T>(xr + h, a, k, R, scale, tr + h), h += 1;
}

// ---------------------------------------------------------------------------------------------------
// expand: out[r][0:DC*N] = T(out + sum_j t[r][j] * b[j, 0:DC*N]) for RB rows; b points at the block's first
// column, rows d apart; R: the tile's ranks up to its last nonzero t (zero-padded ranks are trimmed).

template <int RB, int DC, int N, typename T>
LORA_CLONES void expand_tile(const float* const* tr, const T* __restrict b, int64_t R, int64_t d, int64_t cols,
                             T* const* outr) {
  using F = typename V<N>::f;
  const float* t[RB];
  T* o[RB];
  for (int r = 0; r < RB; ++r) t[r] = tr[r], o[r] = outr[r];
  for (int64_t c0 = 0; c0 + DC * N <= cols; c0 += DC * N) {
    F acc[RB][DC];
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < DC; ++v) acc[r][v] = F{};
    for (int64_t j = 0; j < R; ++j) {
      F bv[DC];
      for (int v = 0; v < DC; ++v) {
        // the rows of b are d apart: more streams than the hardware prefetchers follow, so two chunks ahead
        if (N * sizeof(T) >= 64 || v % 2 == 0) __builtin_prefetch(b + j * d + c0 + (2 * DC + v) * N);
        bv[v] = vload<N>(b + j * d + c0 + v * N);
      }
      for (int r = 0; r < RB; ++r) {
        const float tv = t[r][j];
        for (int v = 0; v < DC; ++v) acc[r][v] += tv * bv[v];
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < DC; ++v) vadd_store<N>(o[r] + c0 + v * N, acc[r][v]);
  }
}

template <typename T>
LORA_CLONES void expand_cols(const float* const* tr, int rb, const T* __restrict b, int64_t R, int64_t d,
                             int64_t c0, int64_t c1, T* const* outr) {
  for (int r = 0; r < rb; ++r) {
    const float* t = tr[r];
    for (int64_t c = c0; c < c1; ++c) {
      float acc = 0.f;
      for (int64_t j = 0; j < R; ++j) acc += t[j] * to_f(b[j * d + c]);
      outr[r][c] = static_cast<T>(to_f(outr[r][c]) + acc);
    }
  }
}

template <int RB, int N, typename T>
void expand_rows_rb(const float* const* tr, const T* b, int64_t R, int64_t d, int64_t cols, T* const* outr) {
  constexpr int DC = kAcc<N> / RB < kAcc<N> / 2 ? kAcc<N> / RB : kAcc<N> / 2;  // RB x DC <= kAcc<N> accumulators
  constexpr int W = DC * N;
  const int64_t main = cols / W * W;
  if (main) expand_tile<RB, DC, N, T>(tr, b, R, d, main, outr);
  int64_t c = main;
  T* o[RB];
  auto at_col = [&](int64_t c0) {
    for (int r = 0; r < RB; ++r) o[r] = outr[r] + c0;
  };
  if (cols - c >= N) {
    at_col(c);
    const int64_t n = (cols - c) / N * N;
    expand_tile<RB, 1, N, T>(tr, b + c, R, d, n, o);
    c += n;
  }
  if constexpr (N > 8) {
    if (cols - c >= 8) {
      at_col(c);
      expand_tile<RB, 1, 8, T>(tr, b + c, R, d, 8, o);
      c += 8;
    }
  }
  if (c < cols) expand_cols<T>(tr, RB, b, R, d, c, cols, outr);
}

template <typename T, int N>
void expand_rows(const float* const* tr, int n, const T* b, int64_t R, int64_t d, int64_t cols, T* const* outr) {
  int h = 0;
  if (n - h >= 8) expand_rows_rb<8, N, T>(tr + h, b, R, d, cols, outr + h), h += 8;
  if (n - h >= 4) expand_rows_rb<4, N, T>(tr + h, b, R, d, cols, outr + h), h += 4;
  if (n - h >= 2) expand_rows_rb<2, N, T>(tr + h, b, R, d, cols, outr + h), h += 2;
  if (n - h >= 1) expand_rows_rb<1, N, T>(tr + h, b, R, d, cols, outr + h), h += 1;
}

#pragma GCC pop_options
// ---------------------------------------------------------------------------------------------------
// the driver

constexpr int kTile = 8;  // rows of one slot per work item

struct Item {
  int64_t slot;
  int64_t r0, r1;  // positions in the slot-sorted row list
  int64_t c0, c1;  // columns of out (expand)
};

// fn(item) over the items, split between the threads at equal shares of the summed cost
template <typename Fn>
void run_items(const std::vector<Item>& items, const std::vector<double>& cost, bool parallel, const Fn& fn) {
  const int64_t n = static_cast<int64_t>(items.size());
  if (!n) return;
  std::vector<double> before(n + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) before[i + 1] = before[i] + cost[i];
  const double total = before[n];
  lora_cpu::parallel_parts(parallel && n > 1, [&](int p, int parts) {
    const double from = total * p / parts, to = total * (p + 1) / parts;
    for (int64_t i = 0; i < n; ++i) {
      // item i belongs to the share holding its midpoint
      const double mid = 0.5 * (before[i] + before[i + 1]);
      if (mid >= from && (mid < to || p == parts - 1)) fn(items[i]);
    }
  });
}

template <typename T, bool kEmbedding>
void run(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
         const at::Tensor& scales, const at::Tensor& index, int64_t tokens) {
  const int64_t M = out.size(0), d = out.size(1), S = a.size(0), k = a.size(1), R = a.size(2);
  T* op = out.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  const float* sp = scales.data_ptr<float>();
  const int32_t* ip = index.data_ptr<int32_t>();
  const int64_t groups = index.numel();
  for (int64_t g = 0; g < groups; ++g) {
    LORA_CHECK_INDEX(ip[g] >= -1 && ip[g] < S, "index[", g, "] = ", ip[g], " is not a slot (", S, " slots; -1: none)");
  }
  const int64_t* ids = nullptr;
  const T* xp = nullptr;
  at::Tensor ids64;
  if constexpr (kEmbedding) {
    ids64 = x.to(at::kLong).contiguous();
    ids = ids64.data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m) {
      LORA_CHECK_INDEX(ids[m] >= 0 && ids[m] < k, "ids[", m, "] = ", ids[m], " is out of range for ", k,
                       " embeddings");
    }
  } else {
    xp = x.data_ptr<T>();
  }
  if (M == 0 || d == 0 || R == 0) return;
  // the live rows grouped by slot (a counting sort of the groups; rows keep their order within a slot)
  std::vector<int64_t> start(S + 1, 0);
  for (int64_t g = 0; g < groups; ++g)
    if (ip[g] >= 0) start[ip[g] + 1] += tokens;
  for (int64_t s = 0; s < S; ++s) start[s + 1] += start[s];
  const int64_t live = start[S];
  if (live == 0) return;
  std::vector<int64_t> rows(live);
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t g = 0; g < groups; ++g) {
      const int32_t s = ip[g];
      if (s < 0) continue;
      for (int64_t m = g * tokens; m < (g + 1) * tokens; ++m) rows[next[s]++] = m;
    }
  }
  std::vector<float> tbuf(live * R);
  const bool wide = g_lanes.load(std::memory_order_relaxed) == 16;
  const bool parallel = live * ((kEmbedding ? 1 : k * R) + R * d) >= (1 << 16);

  // shrink: items of up to kTile rows of one slot
  std::vector<Item> items;
  std::vector<double> cost;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t p = start[s]; p < start[s + 1]; p += kTile) {
      const int64_t q = std::min(p + kTile, start[s + 1]);
      items.push_back({s, p, q, 0, 0});
      cost.push_back(static_cast<double>(q - p) * (kEmbedding ? R : k * R) + 64.0);
    }
  run_items(items, cost, parallel, [&](const Item& it) {
    const int n = static_cast<int>(it.r1 - it.r0);
    const float scale = sp[it.slot];
    float* tr[kTile];
    for (int i = 0; i < n; ++i) tr[i] = tbuf.data() + (it.r0 + i) * R;
    if constexpr (kEmbedding) {
      for (int i = 0; i < n; ++i) {
        const T* row = ap + (it.slot * k + ids[rows[it.r0 + i]]) * R;
        for (int64_t j = 0; j < R; ++j) tr[i][j] = to_f(row[j]) * scale;
      }
    } else {
      const float* xr[kTile];
      if constexpr (std::is_same_v<T, float>) {
        for (int i = 0; i < n; ++i) xr[i] = xp + rows[it.r0 + i] * k;
      } else {
        thread_local std::vector<float> xf;  // 16-bit x rows in fp32, once per item
        if (xf.size() < static_cast<size_t>(n * k)) xf.resize(n * k);
        for (int i = 0; i < n; ++i) {
          const T* src = xp + rows[it.r0 + i] * k;
          float* dst = xf.data() + i * k;
          for (int64_t c = 0; c < k; ++c) dst[c] = to_f(src[c]);
          xr[i] = dst;
        }
      }
      if (wide)
        shrink_rows<T, 16>(xr, n, ap + it.slot * k * R, k, R, scale, tr);
      else
        shrink_rows<T, 8>(xr, n, ap + it.slot * k * R, k, R, scale, tr);
    }
  });

  // expand: items of (slot, block of columns, up to kTile rows), a slot's rows next to each other so that a
  // thread keeps the block of b in cache across them
  const int64_t block = d <= 384 ? d : 256;
  items.clear();
  cost.clear();
  for (int64_t s = 0; s < S; ++s) {
    if (start[s] == start[s + 1]) continue;
    for (int64_t c0 = 0; c0 < d; c0 += block)
      for (int64_t p = start[s]; p < start[s + 1]; p += kTile) {
        const int64_t q = std::min(p + kTile, start[s + 1]);
        items.push_back({s, p, q, c0, std::min(c0 + block, d)});
        cost.push_back(static_cast<double>(q - p + 2) * R * (std::min(c0 + block, d) - c0));
      }
  }
  run_items(items, cost, parallel, [&](const Item& it) {
    const int n = static_cast<int>(it.r1 - it.r0);
    const float* tr[kTile];
    T* outr[kTile];
    int64_t ranks = 0;  // up to the last nonzero t of the item's rows (slots hold lower ranks zero-padded)
    for (int i = 0; i < n; ++i) {
      tr[i] = tbuf.data() + (it.r0 + i) * R;
      outr[i] = op + rows[it.r0 + i] * d + it.c0;
      for (int64_t j = R; j > ranks; --j)
        if (tr[i][j - 1] != 0.f) {
          ranks = j;
          break;
        }
    }
    if (wide)
      expand_rows<T, 16>(tr, n, bp + it.slot * R * d + it.c0, ranks, d, it.c1 - it.c0, outr);
    else
      expand_rows<T, 8>(tr, n, bp + it.slot * R * d + it.c0, ranks, d, it.c1 - it.c0, outr);
  });
}

template <bool kEmbedding>
void dispatch(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
              const at::Tensor& scales, const at::Tensor& index, int64_t tokens) {
  // every argument checked (lora_ext.ops calls this first and words a refusal with its own checks)
  LORA_CHECK_VALUE(out.dim() == 2 && a.dim() == 3 && b.dim() == 3 && index.dim() == 1 && scales.dim() == 1,
                   "batched CPU loops: out 2-D, a_slots and b_slots 3-D, index and scales 1-D");
  LORA_CHECK_VALUE(kEmbedding ? (x.dim() == 1 && (x.scalar_type() == at::kLong || x.scalar_type() == at::kInt))
                              : (x.dim() == 2 && x.scalar_type() == out.scalar_type() && x.size(1) == a.size(1)),
                   "batched CPU loops: x (ids) does not fit");
  LORA_CHECK_VALUE(x.size(0) == out.size(0) && a.scalar_type() == out.scalar_type() &&
                       b.scalar_type() == out.scalar_type() && b.size(0) == a.size(0) && b.size(1) == a.size(2) &&
                       b.size(2) == out.size(1),
                   "batched CPU loops: slot shapes or dtypes do not fit");
  LORA_CHECK_VALUE(scales.scalar_type() == at::kFloat && scales.numel() == a.size(0) &&
                       index.scalar_type() == at::kInt && tokens >= 1 && index.numel() * tokens == out.size(0),
                   "batched CPU loops: scales, index or tokens_per_index do not fit");
  LORA_CHECK_VALUE(out.is_contiguous() && a.is_contiguous() && b.is_contiguous() && x.is_contiguous() &&
                       scales.is_contiguous() && index.is_contiguous() && out.device().is_cpu() &&
                       x.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu() &&
                       scales.device().is_cpu() && index.device().is_cpu(),
                   "batched CPU loops take contiguous CPU tensors");
  switch (out.scalar_type()) {
    case at::kFloat: return run<float, kEmbedding>(out, x, a, b, scales, index, tokens);
    case at::kBFloat16: return run<at::BFloat16, kEmbedding>(out, x, a, b, scales, index, tokens);
    case at::kHalf: return run<at::Half, kEmbedding>(out, x, a, b, scales, index, tokens);
    default: LORA_CHECK(false, "batched CPU loops take float32, bfloat16 or float16, got ", out.scalar_type());
  }
}

}  // namespace

namespace lora_ext_cpu {

void register_batched(pybind11::module_& m) {
  m.def("batched_linear_", &dispatch<false>,
        "out[m] += scales[i] * (x[m] @ a[i]) @ b[i], i = index[m // tokens] >= 0 (lora_ext.ops.batched_linear_)");
  m.def("batched_embedding_", &dispatch<true>,
        "out[m] += scales[i] * a[i, ids[m]] @ b[i], i = index[m // tokens] >= 0 (lora_ext.ops.batched_embedding_)");
  m.def(
      "batched_lanes",
      [](int lanes) {
        LORA_CHECK_VALUE(lanes == 0 || lanes == 8 || lanes == 16, "batched_lanes: lanes must be 0, 8 or 16, got ",
                         lanes);
        return lanes ? g_lanes.exchange(lanes) : g_lanes.load();
      },
      pybind11::arg("lanes") = 0,
      "the lanes of the batched loops' tiles (16 where AVX-512 runs, else 8); lanes=8 or 16 sets them and returns "
      "the previous value (tests), 0 only reads them");
}

}  // namespace lora_ext_cpu
