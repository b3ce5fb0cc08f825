// In-place LoRA merge, W += scale * (B @ A), and the dense delta it adds, for every layer kind:
//
//   not transposed (Linear, Conv viewed 2-D, MergedLinear):  W is (G*nb, k); enabled block j, at position
//       e = id[j], updates rows e*nb .. (e+1)*nb with B_j (nb x r) @ A_j (r x k);
//   transposed (fan_in_fan_out, Embedding):                   W is (k, G*nb); block e updates columns
//       e*nb .. (e+1)*nb with (B_j @ A_j)^T.
//
// A is (n*r, k) and B is (n*nb, r), contiguous; A_j and B_j are their j-th row blocks. A plain layer is
// G = 1, id = {0}. Each output element is computed in fp32 and rounded once: w = round(w + scale * sum).
//
// Memory-bound: each block of 256 threads owns a 64 x 128 tile of W, issues its reads of W first (16-byte
// accesses, coalesced along rows), then computes the tile's delta from A/B chunks staged in shared memory
// (fp32 FMAs, or WMMA tensor cores at r >= 32 for a 16-bit W), then writes W once.
//
// Tensor cores take fp16/bf16 factors of W's dtype as stored. float32 factors on a 16-bit W (the layers'
// default) are split as they are staged into bf16 pairs, v = hi + lo with hi = bf16(v), lo = bf16(v - hi),
// and each product is summed as hi*hi + hi*lo + lo*hi in fp32 accumulators (three MMAs per step, the
// dropped lo*lo and the rounding of lo are about 2^-16 of each product: far under the 2^-9 / 2^-11 of the
// 16-bit W the result is rounded to once). bf16, not fp16, for the split: fp32's exponent range, so no
// factor overflows (the few float32 values above bf16's largest finite keep it as hi, see put()). Below
// 2^-118 in magnitude a value's lo part falls among bf16's subnormals, spaced 2^-133 where float32's are
// 2^-149: such a value is held to an absolute 2^-134 rather than 2^-16 of itself, so a product of x and y
// is off by at most 3 * 2^-16 |x y| + 2^-134 (|x| + |y|) (tests/test_merge.py). Only factors that small
// (under 3.3e-36) beside partners over ~2^100 show it; the FFMA path (r < 32) has no such term.
//
// With 16-byte accesses (kVector) merge and swap blocks are persistent: the host launches as many as fit on the
// GPU at once (Launch::resident) and each walks the tiles blockIdx.x, blockIdx.x + gridDim.x, ... The reads of W
// go to shared memory by cp.async, and a block starts the reads of its next tile before it computes the delta of
// this one, so each SM keeps two tiles of W reads in flight (bf16: 2 x 16 KB per block) where one tile per block
// ran dry while the block computed. Each thread copies, and later reads, only its own 16-byte slots: no barrier
// orders them. The element-wise variant (misaligned W) and the dense delta (no reads of W) run one block per
// tile and load W into registers as before.
//
// swap_kernel replaces one merged adapter by another in the same single pass:
// W += scale * (mult * B @ A + B2 @ A2), one update of rank r + r2 whose rank columns come from two factor
// pairs. The fp32 path folds mult into (A, B)'s L values as they are staged; the tensor-core path sums
// B @ A, multiplies the accumulators by mult, then adds B2 @ A2. No stacked copy of the factors is made and
// nothing but the kernel is launched.
#pragma once

#include "kernels/common.cuh"

namespace lora_ext {
namespace kernels {
namespace merge {

constexpr int kThreads = 256;
constexpr int kTileM = 64;   // tile rows
constexpr int kTileN = 128;  // tile columns
constexpr int kChunk = 32;   // rank columns staged per step
constexpr int kMaxBlocks = 256;

// Which blocks a launch's tiles cover: merge walks the enabled blocks (id), delta walks all G blocks
// and needs the operand block of each (slot, -1 for a disabled block).
struct BlockMap {
  int count;
  short id[kMaxBlocks];
  short slot[kMaxBlocks];
};

template <typename T, typename Tab>
struct Args {
  T* w;           // the weight (merge) or the output buffer (delta); column stride 1
  long long ldw;  // its row stride, in elements
  const Tab* a;   // (n*r, k)
  const Tab* b;   // (n*nb, r)
  int nb, k, r;
  float scale;
  // swap_kernel only: the second factor pair, of rank r2 (same layout), and the first pair's multiplier
  const Tab* a2;
  const Tab* b2;
  int r2;
  float mult;
  bool transposed;
  BlockMap map;
};

// How a thread covers its tile: one 16-byte vector of a row per pass.
template <typename T>
struct ThreadMap {
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kVecPerRow = kTileN / kVec;
  static constexpr int kRowsPerPass = kThreads / kVecPerRow;
  static constexpr int kPasses = kTileM / kRowsPerPass;
  static_assert(kTileM % kRowsPerPass == 0, "tile rows must be a multiple of the rows per pass");
};

// Shared memory leading dimensions (elements). fp32 path: L odd-strided so column reads are
// conflict-free; R and the accumulator tile padded by 16 bytes per row. Tensor-core path: strides are
// multiples of 16 bytes and tiles 32-byte aligned, as WMMA requires.
constexpr int kLdLf = kChunk + 1;
constexpr int kLdRf = kTileN + 4;
constexpr int kLdLh = kChunk + 8;
constexpr int kLdRh = kTileN + 8;
constexpr int kLdAcc = kTileN + 4;

// The tensor-core path's operand type: W's for factors of W's dtype, bf16 (hi/lo pairs) for float32 factors.
template <typename T, typename Tab>
using MmaType = typename std::conditional<std::is_same<Tab, float>::value, __nv_bfloat16, T>::type;
template <typename Tab>
constexpr bool kSplit = std::is_same<Tab, float>::value;

// Tensor-core staging: L (64 x kLdLh) then R (kChunk x kLdRh) of the MMA type, then (split) their lo parts.
constexpr size_t kStageHalfElems = kTileM * kLdLh + kChunk * kLdRh;

// The operand staging (and the tensor-core path's accumulator tile, which reuses it), in bytes.
template <typename T, typename Tab, bool kTensorCore>
__host__ __device__ constexpr size_t smem_bytes() {
  constexpr size_t staged = kStageHalfElems * 2 * (kSplit<Tab> ? 2 : 1);
  constexpr size_t acc = kTileM * kLdAcc * sizeof(float);
  return kTensorCore ? (staged > acc ? staged : acc) : (kTileM * kLdLf + kChunk * kLdRf) * sizeof(float);
}
static_assert(smem_bytes<float, float, false>() % 16 == 0 && smem_bytes<__half, float, true>() % 16 == 0 &&
                  smem_bytes<__half, __half, true>() % 16 == 0,
              "the prefetch buffers after the staging must be 16-byte aligned");

// Whether a kernel prefetches W through shared memory: 16-byte accesses, and a W to read.
template <bool kVector, bool kDelta>
constexpr bool kPrefetch = kVector && !kDelta;

// A launch's dynamic shared memory: the staging, then (prefetching) two tiles of W, one per thread and pass:
// bf16/fp16 W with tensor cores 33 + 32 KB, float32 W 25 + 64 KB; over the 48 KB default, so the launch
// policies opt in (at most 99 KB, what sm_86/sm_89 allow).
template <typename T, typename Tab, bool kTensorCore, bool kVector, bool kDelta>
constexpr size_t launch_smem_bytes() {
  return smem_bytes<T, Tab, kTensorCore>() + (kPrefetch<kVector, kDelta> ? 2 * kTileM * kTileN * sizeof(T) : 0);
}
static_assert(launch_smem_bytes<float, float, false, true, false>() <= 99 * 1024, "over sm_86's opt-in limit");

// The tiles of a launch: 64 x 128 tiles of each of map.count blocks' regions, column tiles fastest.
template <typename T, typename Tab>
__host__ __device__ inline long long tile_count(const Args<T, Tab>& p) {
  const long long m_total = p.transposed ? p.k : p.nb, n_total = p.transposed ? p.nb : p.k;
  return ((n_total + kTileN - 1) / kTileN) * ((m_total + kTileM - 1) / kTileM) * p.map.count;
}

// Where a tile's L (rows x rank) and R (rank x cols) values come from, for one factor pair:
// L(i, kk) = l[i * l_si + kk * l_sk] and R(kk, c) = r[c * r_sc + kk * r_sk].
template <typename Tab>
struct Operands {
  const Tab* l;
  const Tab* r;
  int l_si, l_sk, r_sk, r_sc;  // 32-bit to save registers; products are taken in 64 bits
  int rank;
};

// Block j's operands of factors (a, b) of rank r for the tile at (m0, n0): L = B_j rows, R = A_j columns
// (transposed storage: L = A_j^T, R = B_j^T).
template <typename Tab>
__device__ __forceinline__ Operands<Tab> operands(const Tab* a, const Tab* b, int r, int j, int nb, int k,
                                                  bool transposed, int m0, int n0) {
  const Tab* a_j = a + (long long)j * r * k;
  const Tab* b_j = b + (long long)j * nb * r;
  Operands<Tab> o;
  o.l_si = transposed ? 1 : r;
  o.l_sk = transposed ? k : 1;
  o.r_sk = transposed ? 1 : k;
  o.r_sc = transposed ? r : 1;
  o.l = (transposed ? a_j : b_j) + (long long)m0 * o.l_si;
  o.r = (transposed ? b_j : a_j) + (long long)n0 * o.r_sc;
  o.rank = r;
  return o;
}

// The largest finite bf16, 0x7F7F.
constexpr float kBf16Max = 3.38953139e38f;

// Stores v as S at hi[at]; kLo (S is bf16): v as the pair hi + lo, hi the nearest bf16 and lo the nearest bf16
// to what is left. A finite v whose nearest bf16 is infinite (|v| >= 0x7F7F8000, 3.3962e38) takes the largest
// finite bf16 as hi instead (inf - v would make lo infinite and the sum NaN); an infinite v, lo = 0.
template <typename S, bool kLo>
__device__ __forceinline__ void put(S* hi, S* lo, int at, float v) {
  S h = from_float<S>(v);
  if (kLo) {
    float hf = to_float(h);
    if (fabsf(hf) > kBf16Max && fabsf(v) <= kFloatMax) {
      hf = copysignf(kBf16Max, v);
      h = from_float<S>(hf);
    }
    lo[at] = from_float<S>(fabsf(v) > kFloatMax ? 0.f : v - hf);
  }
  hi[at] = h;
}

// One staging walk of kIters elements per thread (elements t >= `count` hold nothing to stage), in groups of
// kGroup whose loads are all issued before any of their values is stored. A load followed by its store, then the
// next load, waits out one L2 round trip per element: the compiler does not move a global load above a shared
// store it may alias, and version 2's walks, whose branch picked between two sources, were not unrolled at all
// (16-24 dependent round trips per tile in its SASS: bench/NOTES-merge.md, version 3). fetch(t) loads element t's
// raw value (the source's type; zero where nothing is read), place(t, raw) converts and stores it.
template <int kIters, int kGroup, typename Tab, typename Fetch, typename Place>
__device__ __forceinline__ void staged_walk(int count, const Fetch& fetch, const Place& place) {
  static_assert(kIters % kGroup == 0, "whole groups");
  LORA_UNROLL_BY(1)
  for (int g = 0; g < kIters && g < count; g += kGroup) {
    Tab raw[kGroup];
    LORA_UNROLL
    for (int u = 0; u < kGroup; ++u) raw[u] = fetch(g + u);
    LORA_UNROLL
    for (int u = 0; u < kGroup; ++u) place(g + u, raw[u]);
  }
}

// Copies chunk [k0, k0+kn) of the tile's L and R into shared memory as S, zero-padded to the ranks its reader
// reads and to the full tile: the FFMA loops (S float32) read ranks below kn, the MMAs (16-bit S) whole steps of
// 16; ranks past those are neither read nor written. Threads walk each source's contiguous dimension so reads
// coalesce. kTwo: rank columns below x.rank come from x, their L values multiplied by x_mult, the rest from y
// (merge: x alone, unscaled). kLo: the hi/lo split, each value's remainder stored at the same place of ls_lo /
// rs_lo.
//
// Shared-memory banks: where the source's contiguous dimension is the one along a shared row (L's rank when
// not transposed, R's column when not), a warp writes 32 neighbours of one row: no conflict. Otherwise a warp
// walking one source run would write 32 rows of one column, and rows kLdL / kLdR elements apart share banks
// (R: 132 floats or 68 words of 16-bit values, 4 mod 32: 8 banks for 32 lanes, 4-way; 16-bit L: 20 words, the
// same). There a warp takes an 8 x 4 block instead, 8 neighbours along the source run (lane % 8) in 4 shared
// columns (lane / 8): the rows' banks 4 * row + column (R), or 20 * row + column / 2 words (16-bit L) are
// distinct or shared by one 32-bit word, and the reads are 4 runs of 8 elements. float32 L (kLdLf = 33, odd)
// is conflict-free walking its run.
template <typename S, int kLdL, int kLdR, bool kTwo, bool kLo = false, typename Tab>
__device__ __forceinline__ void stage(S* ls, S* rs, const Operands<Tab>& x, const Operands<Tab>& y, float x_mult,
                                      int rows, int cols, int k0, int kn, S* ls_lo = nullptr, S* rs_lo = nullptr) {
  constexpr int kLIters = kTileM * kChunk / kThreads;
  constexpr int kRIters = kChunk * kTileN / kThreads;
  constexpr int kGroup = 4;                  // loads in flight per thread (8 spill in the tensor-core swaps)
  constexpr bool kLBlocks = sizeof(S) == 2;  // 16-bit L rows share banks 4 ways; float32 L rows (odd) do not
  using LB = Block8x4<kTileM, kChunk>;       // L transposed: runs along i (A_j's columns), ranks across
  using RB = Block8x4<kChunk, kTileN>;       // R transposed: runs along the rank (B_j's rows), columns across
  const int kn_read = sizeof(S) == 4 ? kn : (kn + 15) / 16 * 16;  // the ranks the reader reads (see above)
  const Tab zero = from_float<Tab>(0.f);
  // Each walk's element-to-thread map is compiled for both cases (a uniform branch on x's strides picks one): the
  // index arithmetic of a runtime choice took about 45 instructions per staged element. Strides the map implies
  // are constants: L's rank stride 1 (untransposed, or transposed with k = 1: both pairs alike), its run stride 1
  // otherwise (transposed); R's rank stride 1 when transposed. R's column stride is the pair's own: a transposed
  // first pair of rank 1 takes the untransposed map (its column stride r = 1) and the second pair of a swap has
  // column stride r2 (a version that took it from the map read that pair's B at stride 1: 12-27 off,
  // tests/test_swap_layouts.py).
  auto walk_l = [&](auto fast) {
    constexpr bool kKFast = decltype(fast)::value;  // the source's rank is contiguous (L = B_j, not transposed)
    auto at = [&](int t, int& i, int& kk) {
      const int idx = threadIdx.x + t * kThreads;
      i = kKFast ? idx / kChunk : kLBlocks ? LB::along(idx) : idx % kTileM;
      kk = kKFast ? idx % kChunk : kLBlocks ? LB::across(idx) : idx / kTileM;
    };
    // (float32 L walked down its runs takes the ranks in order: the walk stops after the last one read)
    const int count = kKFast || kLBlocks ? kLIters : (kn_read * kTileM + kThreads - 1) / kThreads;
    staged_walk<kLIters, kGroup, Tab>(
        count,
        [&](int t) {
          int i, kk;
          at(t, i, kk);
          if (!(i < rows && kk < kn)) return zero;
          const int kr = k0 + kk;
          const bool second = kTwo && kr >= x.rank;  // (a select of the source, no branch around the load)
          const Tab* l = second ? y.l : x.l;
          const long long si = kKFast ? (second ? y.l_si : x.l_si) : 1, sk = kKFast ? 1 : x.l_sk;
          return l[i * si + (second ? kr - x.rank : kr) * sk];
        },
        [&](int t, Tab raw) {
          int i, kk;
          at(t, i, kk);
          if (kk >= kn_read) return;
          float v = to_float(raw);
          if (kTwo && i < rows && kk < kn && k0 + kk < x.rank) v *= x_mult;  // (x's values, as fetched)
          put<S, kLo>(ls, ls_lo, i * kLdL + kk, v);
        });
  };
  auto walk_r = [&](auto fast) {
    constexpr bool kCFast = decltype(fast)::value;  // the source's columns are contiguous (R = A_j, not transposed)
    auto at = [&](int t, int& kk, int& cc) {
      const int idx = threadIdx.x + t * kThreads;
      kk = kCFast ? idx / kTileN : RB::along(idx);
      cc = kCFast ? idx % kTileN : RB::across(idx);
    };
    // (walked along its rows, R takes the ranks in order: the walk stops after the last one read)
    const int count = kCFast ? (kn_read * kTileN + kThreads - 1) / kThreads : kRIters;
    staged_walk<kRIters, kGroup, Tab>(
        count,
        [&](int t) {
          int kk, cc;
          at(t, kk, cc);
          if (!(cc < cols && kk < kn)) return zero;
          const int kr = k0 + kk;
          const bool second = kTwo && kr >= x.rank;
          const Tab* r = second ? y.r : x.r;
          // (x.r_sc is 1 in this map, y's its own: a transposed first pair of rank 1 is mapped so)
          const long long sc = second ? y.r_sc : kCFast ? 1 : x.r_sc, sk = kCFast ? x.r_sk : 1;
          return r[cc * sc + (second ? kr - x.rank : kr) * sk];
        },
        [&](int t, Tab raw) {
          int kk, cc;
          at(t, kk, cc);
          if (kk >= kn_read) return;
          put<S, kLo>(rs, rs_lo, kk * kLdR + cc, to_float(raw));
        });
  };
  if (x.l_sk == 1)
    walk_l(std::true_type{});
  else
    walk_l(std::false_type{});
  if (x.r_sc == 1)
    walk_r(std::true_type{});
  else
    walk_r(std::false_type{});
}

template <int kN>
__device__ __forceinline__ void load_floats(float (&out)[kN], const float* p) {
  static_assert(kN % 4 == 0, "whole float4s");
  LORA_UNROLL
  for (int i = 0; i < kN / 4; ++i) {
    const float4 t = load16<float4>(p + 4 * i);
    out[4 * i] = t.x;
    out[4 * i + 1] = t.y;
    out[4 * i + 2] = t.z;
    out[4 * i + 3] = t.w;
  }
}

// Where tile t of a launch lies: its operand block (j, -1 for a disabled one in the dense delta), its first row
// and column in the block's region, its size, and its first element of W.
template <typename T>
struct TileAt {
  int j, m0, n0, rows, cols;
  T* w;
};

template <typename T, typename Tab, bool kDelta>
__device__ __forceinline__ TileAt<T> locate(const Args<T, Tab>& p, long long t) {
  const int m_total = p.transposed ? p.k : p.nb;
  const int n_total = p.transposed ? p.nb : p.k;
  const int tiles_x = (n_total + kTileN - 1) / kTileN, tiles_y = (m_total + kTileM - 1) / kTileM;
  TileAt<T> at;
  const int z = (int)(t / ((long long)tiles_x * tiles_y));
  const long long in_block = t - (long long)z * tiles_x * tiles_y;
  const int e = kDelta ? z : p.map.id[z];  // the block's position in W
  at.j = kDelta ? p.map.slot[z] : z;
  at.m0 = (int)(in_block / tiles_x) * kTileM;
  at.n0 = (int)(in_block % tiles_x) * kTileN;
  at.rows = imin(kTileM, m_total - at.m0);
  at.cols = imin(kTileN, n_total - at.n0);
  const long long row0 = (p.transposed ? 0LL : (long long)e * p.nb) + at.m0;
  const long long col0 = (p.transposed ? (long long)e * p.nb : 0LL) + at.n0;
  at.w = p.w + row0 * p.ldw + col0;
  return at;
}

// Starts the copies of this thread's vectors of tile `at` of W into its slots of `buf` (slot q * kThreads +
// threadIdx.x for pass q) and closes the group.
template <typename T>
__device__ __forceinline__ void prefetch(const TileAt<T>& at, long long ldw, Vec16<T>* buf) {
  using M = ThreadMap<T>;
  const int c = (threadIdx.x % M::kVecPerRow) * M::kVec, ty = threadIdx.x / M::kVecPerRow;
  const int valid = imin(at.cols - c, M::kVec);
  LORA_UNROLL
  for (int q = 0; q < M::kPasses; ++q) {
    const int row = ty + q * M::kRowsPerPass;
    if (row < at.rows && valid > 0)
      async_copy16(buf + q * kThreads + threadIdx.x, at.w + row * ldw + c, valid * (int)sizeof(T));
  }
  async_commit();
}

// One tile: W += scale * delta (or out = scale * delta). `mine`: this thread's prefetched slots of the tile
// (kPrefetch), whose group is the older of the two in flight.
template <typename T, typename Tab, bool kTensorCore, bool kVector, bool kDelta, bool kTwo>
__device__ __forceinline__ void merge_tile(const Args<T, Tab>& p, const TileAt<T>& at, const Vec16<T>* mine) {
  using M = ThreadMap<T>;
  constexpr int kVec = M::kVec, kPasses = M::kPasses, kRowsPerPass = M::kRowsPerPass;
  constexpr bool kFetched = kPrefetch<kVector, kDelta>;
  LORA_DYNAMIC_SHARED(unsigned char, smem);

  const int j = at.j, m0 = at.m0, n0 = at.n0, rows = at.rows, cols = at.cols;
  T* tile = at.w;
  const int tx = threadIdx.x % M::kVecPerRow, ty = threadIdx.x / M::kVecPerRow;
  const int c = tx * kVec;
  const int valid = imin(cols - c, kVec);

  // W's reads go out first: they are the traffic that matters, and stay in flight during the delta (prefetched:
  // they went out during the previous tile).
  Vec16<T> w[kPasses];
  if (!kDelta && !kFetched) {
    LORA_UNROLL
    for (int q = 0; q < kPasses; ++q) {
      const int row = ty + q * kRowsPerPass;
      if (row < rows) load_elems<kVector>(w[q], tile + row * p.ldw + c, valid);
    }
  } else if (kDelta && j < 0) {  // a disabled block in the dense delta: zeros (uniform per tile, before any barrier)
    Vec16<T> zero;
    LORA_UNROLL
    for (int v = 0; v < kVec; ++v) zero.v[v] = from_float<T>(0.f);
    LORA_UNROLL
    for (int q = 0; q < kPasses; ++q) {
      const int row = ty + q * kRowsPerPass;
      if (row < rows) store_elems<kVector>(tile + row * p.ldw + c, zero, valid);
    }
    return;
  }

  // This tile's delta is L @ R over the rank (merge: r; swap: r + r2).
  const Operands<Tab> x = operands(p.a, p.b, p.r, j, p.nb, p.k, p.transposed, m0, n0);

  // The delta of this thread's vector in pass q is acc[q] (fp32 path) or a row of acc_tile (tensor cores).
  [[maybe_unused]] float acc[kTensorCore ? 1 : kPasses][kVec];
  [[maybe_unused]] float* acc_tile = reinterpret_cast<float*>(smem);
  if constexpr (!kTensorCore) {
    float* ls = reinterpret_cast<float*>(smem);
    float* rs = ls + kTileM * kLdLf;
    LORA_UNROLL
    for (int q = 0; q < kPasses; ++q)
      LORA_UNROLL
      for (int v = 0; v < kVec; ++v) acc[q][v] = 0.f;
    const Operands<Tab> y = kTwo ? operands(p.a2, p.b2, p.r2, j, p.nb, p.k, p.transposed, m0, n0) : x;
    const int rank = kTwo ? p.r + p.r2 : p.r;
    for (int k0 = 0; k0 < rank; k0 += kChunk) {
      const int kn = imin(kChunk, rank - k0);
      if (k0) __syncthreads();  // everyone is done reading the previous chunk
      stage<float, kLdLf, kLdRf, kTwo>(ls, rs, x, y, p.mult, rows, cols, k0, kn);
      __syncthreads();
      LORA_UNROLL_BY(4)
      for (int kk = 0; kk < kn; ++kk) {
        float rv[kVec];
        load_floats(rv, rs + kk * kLdRf + c);
        LORA_UNROLL
        for (int q = 0; q < kPasses; ++q) {
          const float l = ls[(ty + q * kRowsPerPass) * kLdLf + kk];
          LORA_UNROLL
          for (int v = 0; v < kVec; ++v) acc[q][v] = fmaf(l, rv[v], acc[q][v]);
        }
      }
    }
  } else {
    static_assert(!std::is_same<T, float>::value, "tensor-core path is for a 16-bit W");
    namespace wmma = nvcuda::wmma;
    using F = MmaType<T, Tab>;
    constexpr bool kLo = kSplit<Tab>;
    F* ls = reinterpret_cast<F*>(smem);
    F* rs = ls + kTileM * kLdLh;
    F* ls_lo = ls + kStageHalfElems;  // split only
    F* rs_lo = ls_lo + kTileM * kLdLh;
    // acc_tile reuses the staging space once the products are done
    const int warp = threadIdx.x / 32;
    const int fm = warp % 4, fn0 = (warp / 4) * 4;  // 8 warps: 4 row fragments x 2 groups of 4 column fragments
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> cf[4];
    LORA_UNROLL
    for (int f = 0; f < 4; ++f) wmma::fill_fragment(cf[f], 0.f);
    auto accumulate = [&](const Operands<Tab>& o, bool after_other) {
      for (int k0 = 0; k0 < o.rank; k0 += kChunk) {
        const int kn = imin(kChunk, o.rank - k0);
        if (k0 || after_other) __syncthreads();  // everyone is done reading the previous chunk
        stage<F, kLdLh, kLdRh, false, kLo>(ls, rs, o, o, 1.f, rows, cols, k0, kn, ls_lo, rs_lo);
        __syncthreads();
        const int steps = (kn + 15) / 16;
        for (int s = 0; s < steps; ++s) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, F, wmma::row_major> af, af_lo;
          wmma::load_matrix_sync(af, ls + fm * 16 * kLdLh + s * 16, kLdLh);
          if constexpr (kLo) wmma::load_matrix_sync(af_lo, ls_lo + fm * 16 * kLdLh + s * 16, kLdLh);
          LORA_UNROLL
          for (int f = 0; f < 4; ++f) {
            const int at = s * 16 * kLdRh + (fn0 + f) * 16;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, F, wmma::row_major> bf;
            if constexpr (kLo) {  // the small terms first: hi*lo, lo*hi, then hi*hi
              wmma::load_matrix_sync(bf, rs_lo + at, kLdRh);
              wmma::mma_sync(cf[f], af, bf, cf[f]);
              wmma::load_matrix_sync(bf, rs + at, kLdRh);
              wmma::mma_sync(cf[f], af_lo, bf, cf[f]);
            } else {
              wmma::load_matrix_sync(bf, rs + at, kLdRh);
            }
            wmma::mma_sync(cf[f], af, bf, cf[f]);
          }
        }
      }
    };
    accumulate(x, false);
    if constexpr (kTwo) {
      // Operands in T cannot carry a multiplier exactly, so a swap sums each pair apart: x's sum is scaled
      // by mult in the fp32 accumulators before y's is added.
      LORA_UNROLL
      for (int f = 0; f < 4; ++f)
        LORA_UNROLL
        for (int e = 0; e < cf[f].num_elements; ++e) cf[f].x[e] *= p.mult;
      accumulate(operands(p.a2, p.b2, p.r2, j, p.nb, p.k, p.transposed, m0, n0), true);
    }
    __syncthreads();
    LORA_UNROLL
    for (int f = 0; f < 4; ++f)
      wmma::store_matrix_sync(acc_tile + fm * 16 * kLdAcc + (fn0 + f) * 16, cf[f], kLdAcc, wmma::mem_row_major);
    __syncthreads();
  }

  if constexpr (kFetched) {  // this tile's copies; the next tile's stay in flight
    async_wait<1>();
    LORA_UNROLL
    for (int q = 0; q < kPasses; ++q) w[q] = load16<Vec16<T>>(mine + q * kThreads + threadIdx.x);
  }
  LORA_UNROLL
  for (int q = 0; q < kPasses; ++q) {
    const int row = ty + q * kRowsPerPass;
    if (row >= rows) continue;
    float d[kVec];
    if constexpr (kTensorCore) {
      load_floats(d, acc_tile + row * kLdAcc + c);
    } else {
      LORA_UNROLL
      for (int v = 0; v < kVec; ++v) d[v] = acc[q][v];
    }
    Vec16<T> out;
    LORA_UNROLL
    for (int v = 0; v < kVec; ++v)
      out.v[v] = from_float<T>(kDelta ? p.scale * d[v] : fmaf(p.scale, d[v], to_float(w[q].v[v])));
    store_elems<kVector>(tile + row * p.ldw + c, out, valid);
  }
}

// The persistent walk over a launch's tiles (see the top of this file).
template <typename T, typename Tab, bool kTensorCore, bool kVector, bool kDelta, bool kTwo = false>
__device__ __forceinline__ void merge_tiles(const Args<T, Tab>& p) {
  constexpr int kSlots = ThreadMap<T>::kPasses * kThreads;
  LORA_DYNAMIC_SHARED(unsigned char, shared);  // (a name other than smem: the macro declares name##_bytes)
  Vec16<T>* bufs = reinterpret_cast<Vec16<T>*>(shared + smem_bytes<T, Tab, kTensorCore>());
  if constexpr (!kPrefetch<kVector, kDelta>) {  // one tile per block: no walk to keep in registers
    merge_tile<T, Tab, kTensorCore, kVector, kDelta, kTwo>(p, locate<T, Tab, kDelta>(p, blockIdx.x), nullptr);
    return;
  }
  const long long total = tile_count(p);
  long long t = blockIdx.x;
  if (t < total) prefetch(locate<T, Tab, kDelta>(p, t), p.ldw, bufs);
  for (int i = 0; t < total; t += gridDim.x, ++i) {
    if (i) __syncthreads();  // everyone is done with the previous tile's staging and accumulators
    if (t + gridDim.x < total)
      prefetch(locate<T, Tab, kDelta>(p, t + gridDim.x), p.ldw, bufs + ((i + 1) & 1) * kSlots);
    else
      async_commit();  // an empty group: the wait below still leaves one group in flight at most
    merge_tile<T, Tab, kTensorCore, kVector, kDelta, kTwo>(p, locate<T, Tab, kDelta>(p, t), bufs + (i & 1) * kSlots);
  }
}

// kVector: W's data pointer, row stride and block offsets are multiples of 16 bytes, so every full vector
// of a tile row is one aligned 16-byte access; otherwise elements are accessed one by one.
template <typename T, typename Tab, bool kTensorCore, bool kVector>
__global__ void __launch_bounds__(kThreads, 2) merge_kernel(Args<T, Tab> p) {
  merge_tiles<T, Tab, kTensorCore, kVector, false>(p);
}

template <typename T, typename Tab, bool kTensorCore, bool kVector>
__global__ void __launch_bounds__(kThreads, 2) delta_weight_kernel(Args<T, Tab> p) {
  merge_tiles<T, Tab, kTensorCore, kVector, true>(p);
}

template <typename T, typename Tab, bool kTensorCore, bool kVector>
__global__ void __launch_bounds__(kThreads, 2) swap_kernel(Args<T, Tab> p) {
  merge_tiles<T, Tab, kTensorCore, kVector, false, true>(p);
}

}  // namespace merge
}  // namespace kernels
}  // namespace lora_ext
