// The low-rank half of a LoRA layer's forward pass. For Linear / MergedLinear (x is (M, K), out is
// (M, N), N = G*nb output features in G blocks of nb; block e is enabled with group j = slot[e] or
// disabled with slot[e] = -1):
//
//   t = x A^T                       (M, R) in fp32, R = n*r, A = (n*r, K): group j owns ranks j*r..j*r+r
//   out[:, block e] = bias + scale * t_j B_j^T      B = (n*nb, r): group j owns rows j*nb..j*nb+nb
//   out[:, disabled block] = bias (or 0)
//
// The kernels write `out` once; the launcher then lets the base GEMM accumulate onto it (beta = 1), so the
// output is never read back by a separate pass (bench/NOTES-forward.md counts the bytes). Embedding is the
// same expand with the A columns of the token ids as t and the embedding rows as the base.
//
// The factors A and B are float32 or of the activations' dtype T (Tab, a template argument, as for the merge
// kernels): float32 factors on a fp16/bf16 model, the layers' default, are read as they are stored, with no
// cast launched per call. The FFMA paths (the fused kernel's x A^T, every expand, the embedding's gather)
// compute with their float32 values; the WMMA shrink rounds A to T while staging it in shared memory (the
// rounding a cast to T would make, within float16's range by a power-of-two scale per rank), keeping the tensor
// cores (see shrink_kernel).
//
// Kernels:
//   fused_linear_kernel  M <= kFusedMaxM (decode): one launch; each CTA recomputes its group's t from x and
//                        A (read through L2), then expands its column tile
//   shrink_kernel        larger M: 64 x 32 tiles of t, WMMA for fp16/bf16, split-K over grid z into fp32
//                        partials (splits, M, R) so that small M still fills the GPU
//   expand_kernel        sums the partials and expands a 32-row x (32 vectors) column tile
//   embedding_kernel     gathers A's columns of the ids and expands onto the gathered embedding rows
#pragma once

#include "kernels/common.cuh"

namespace lora_ext {
namespace kernels {
namespace forward {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBlocks = 256;  // MergedLinear output blocks
constexpr int kFusedMaxM = 8;    // rows handled by the fused decode kernel
constexpr int kFusedMaxR = 256;  // ranks per group it stages in shared memory

// expand tile: 32 column vectors (16 bytes each) x 8 row groups, kRowsPerThread rows per group
constexpr int kColVecs = 32;
constexpr int kRowGroups = kThreads / kColVecs;
constexpr int kRChunk = 32;  // ranks staged per step
constexpr int kExpandRowsPerThread = 4;
constexpr int kExpandRows = kRowGroups * kExpandRowsPerThread;

// shrink tile
constexpr int kShrinkM = 64;
constexpr int kShrinkJ = 32;
constexpr int kShrinkK = 32;

template <typename T>
__host__ __device__ constexpr int tile_cols() {
  return kColVecs * Vec16<T>::kN;
}

// Shared memory layouts, in floats (fp32 staging) or elements (WMMA staging); the kernels use them too.
template <typename T>
__host__ __device__ constexpr int ld_bs() {
  return tile_cols<T>() + 4;  // B chunk transposed: [rank][column], rows 16-byte aligned
}
constexpr int kLdTs = kRChunk + 1;  // t chunk: [row][rank]

template <typename T>
__host__ __device__ constexpr size_t expand_smem_floats(int rows) {
  return (size_t)kRChunk * ld_bs<T>() + (size_t)rows * kLdTs;
}

template <typename T>
constexpr size_t expand_smem_bytes() {
  return expand_smem_floats<T>(kExpandRows) * sizeof(float);
}

template <typename T>
constexpr size_t fused_smem_bytes() {
  return (expand_smem_floats<T>(kRowGroups) + (size_t)kFusedMaxM * kFusedMaxR) * sizeof(float);
}

constexpr int kLdXh = kShrinkK + 8;     // WMMA staging, elements (80 bytes for 16-bit types)
constexpr int kLdAcc = kShrinkJ + 4;    // WMMA accumulator tile, floats
constexpr int kLdXf = kShrinkK + 1;     // FFMA staging, floats

// The WMMA staging, the accumulator tile and the rank shifts (rank_shift); the FFMA staging.
template <typename T, bool kTensorCore>
constexpr size_t shrink_smem_bytes() {
  return kTensorCore ? (size_t)(kShrinkM + kShrinkJ) * kLdXh * sizeof(T) + (size_t)kShrinkM * kLdAcc * sizeof(float) +
                           (size_t)kShrinkJ * sizeof(int)
                     : (size_t)(kShrinkM + kShrinkJ) * kLdXf * sizeof(float);
}

// The WMMA shrink's power-of-two scaling of a float32 rank for float16 (shrink_kernel): A's row times 2^shift
// has its largest finite magnitude in [2^14, 2^15), inside float16's normal range whatever the row's own range;
// a row whose largest is in [2^15, 65504] already fits and keeps 0 (scaling it down would cost its smallest
// elements a bit). `top` is the largest finite |A| of the row as float32 bits (sign cleared); zero: 0. An inf or
// NaN element stays one (times a power of two), as in the plain product.
__device__ __forceinline__ int rank_shift(int top) {
  constexpr int kHalfMaxBits = 0x477FE000;  // 65504.f
  const int shift = 14 - ((top >> 23) - 127);
  return top == 0 || (shift < 0 && top <= kHalfMaxBits) ? 0 : shift;
}

// v * 2^e, exactly whenever the result is a normal float32, for e in [-253, 254] (a shift and its inverse):
// two steps, each a power of two that float32 holds.
__device__ __forceinline__ float times_pow2(float v, int e) {
  const int half = e / 2;
  return v * pow2f(half) * pow2f(e - half);
}

template <typename T, typename Tab>
struct Args {
  const T* x;                // (M, K): the LoRA path's input, contiguous
  const Tab* a;              // linear: (R, K); embedding: (r, num)
  const Tab* b;              // (n*nb, r)
  const T* bias;             // (N,) or null
  const T* table;            // embedding weight (num, N); null for linear
  const long long* ids;      // embedding token ids (M,)
  float* part;               // (splits, M, R) partial t
  T* out;                    // (M, N), contiguous
  int M, K, R, r, nb, N;
  int splits, k_per_split;   // split-K of the shrink: split z covers [z*k_per_split, (z+1)*k_per_split)
  long long num;             // embedding rows
  float scale;
  const float* scale_ptr;    // or, when not null, the scale in device memory, read at run time (a captured
                             // CUDA graph then follows the value, not the launch argument); scale is unused
  bool x_aligned;            // x's data pointer is 16-byte aligned (kVector variants read it with 16-byte
                             // accesses only then; the other operands are aligned whenever kVector is chosen)
  bool base_aligned;         // the same for the base rows: bias (linear) or the table (embedding)
  short slot[kMaxBlocks];    // output block -> group j, or -1 when disabled
};

__device__ __forceinline__ float warp_sum(float v) {
  LORA_UNROLL
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Vec16<T>::kN consecutive factor elements (Tab: float32, or T itself): what a 16-byte vector of T meets in the
// factors. Kept in Tab until used, so that 16-bit factors stay packed in registers.
template <typename T, typename Tab>
struct alignas(16) FactorVec {
  static constexpr int kN = Vec16<T>::kN;
  Tab v[kN];
};

// Loads a FactorVec; elements past `valid` read as zero. kVector: whole 16-byte accesses when all kN are valid
// (the caller guarantees the alignment): one when Tab is T, two for float32 factors of a 16-bit T.
template <bool kVector, typename T, typename Tab>
__device__ __forceinline__ void load_factors(FactorVec<T, Tab>& out, const Tab* p, int valid) {
  constexpr int kN = Vec16<T>::kN, kPer = Vec16<Tab>::kN;
  static_assert(kN % kPer == 0, "whole 16-byte vectors of Tab");
  if (kVector && valid >= kN) {
    LORA_UNROLL
    for (int h = 0; h < kN / kPer; ++h) {
      const Vec16<Tab> v = load16<Vec16<Tab>>(p + h * kPer);
      LORA_UNROLL
      for (int u = 0; u < kPer; ++u) out.v[h * kPer + u] = v.v[u];
    }
    return;
  }
  LORA_UNROLL
  for (int i = 0; i < kN; ++i) out.v[i] = i < valid ? p[i] : from_float<Tab>(0.f);
}

// An element as type U: itself when it is a U, else through float32 (exact to float32; rounded to nearest even
// to a 16-bit U, as a cast rounds).
template <typename U, typename V>
__device__ __forceinline__ U as_type(V v) {
  if constexpr (std::is_same<U, V>::value)
    return v;
  else
    return from_float<U>(to_float(v));
}

// acc + a . x over one 16-byte vector of x, in float32 (factors unrounded).
template <typename T, typename Tab>
__device__ __forceinline__ float dot16(const FactorVec<T, Tab>& a, const Vec16<T>& x, float acc) {
  LORA_UNROLL
  for (int v = 0; v < Vec16<T>::kN; ++v) acc = fmaf(to_float(a.v[v]), to_float(x.v[v]), acc);
  return acc;
}

// out[m0 + rows, e*nb + c0 + cols] = base + scale * t_j B_j^T for one tile of kRowGroups*kRowsPerThread
// rows and tile_cols<T>() columns of output block e (group j, -1: disabled, base only); scale is p.scale, or
// *p.scale_ptr read once per thread.
//   t(m, i):   rank i of group j for row m (fp32), only called for j >= 0
//   base(m):   pointer to the base row at this block's column 0 (bias, an embedding row), or null for 0
// Thread (g, v) owns column vector v (16 bytes of out) for rows g, g + 8, ...: the stores coalesce along rows.
// kBaseFlag: the base rows' 16-byte accesses also depend on p.base_aligned (the embedding table; a linear
// layer's bias is always aligned when kVector, see ops/forward_host.h, and the flag would cost registers).
template <typename T, typename Tab, bool kVector, int kRowsPerThread, bool kBaseFlag = false, typename TSource,
          typename BaseRow>
__device__ __forceinline__ void expand_tile(const Args<T, Tab>& p, float* smem, int e, int j, int m0, int c0,
                                            const TSource& t_of, const BaseRow& base) {
  constexpr int kVec = Vec16<T>::kN, kCols = tile_cols<T>(), kLdB = ld_bs<T>();
  constexpr int kRows = kRowGroups * kRowsPerThread;
  const int rows = imin(kRows, p.M - m0), cols = imin(kCols, p.nb - c0);
  const int cv = threadIdx.x % kColVecs, g = threadIdx.x / kColVecs;
  const int c = cv * kVec, valid = imin(cols - c, kVec);
  float* bs = smem;                  // [rank][column]
  float* ts = smem + kRChunk * kLdB; // [row][rank]

  float acc[kRowsPerThread][kVec];
  LORA_UNROLL
  for (int q = 0; q < kRowsPerThread; ++q)
    LORA_UNROLL
    for (int v = 0; v < kVec; ++v) acc[q][v] = 0.f;

  if (j >= 0) {  // uniform per CTA: the barriers below are reached by every thread or by none
    const Tab* b_j = p.b + ((long long)j * p.nb + c0) * p.r;
    using BWalk = Block8x4<kRChunk, kCols>;
    constexpr int kBStep = BWalk::across(kThreads);
    static_assert(kWarps % (kRChunk / 8) == 0 && kCols % kBStep == 0,
                  "kThreads elements of the B walk keep each thread's rank and advance whole columns");
    const int bi = BWalk::along(threadIdx.x);  // the block walk's rank: the same at every step
    for (int k0 = 0; k0 < p.r; k0 += kRChunk) {
      const int kn = imin(kRChunk, p.r - k0);
      if (k0) __syncthreads();
      // B_j's rows are r contiguous ranks (read rank-fastest, so that the reads coalesce), stored transposed with
      // the Block8x4 walk: a warp stores 8 ranks x 4 columns, 32 banks (rows 4 mod 32 words apart), where a warp
      // storing the 32 ranks of one column hit 8 banks 4 ways. A thread's rank is the same at every step, and
      // ranks from kn on are not read below: their threads stage nothing. The loads go out in groups of
      // kBGroup before any of them is stored (one load, its store, then the next waited out an L2 round trip
      // each: about 11 per chunk in run 3's SASS, where the decode kernel cost 2.9x the plain layer).
      constexpr int kBIters = kCols / kBStep, kBGroup = 8;
      static_assert(kBIters % kBGroup == 0, "whole groups");
      if (bi < kn) {
        const Tab* b_i = b_j + k0 + bi;
        const int cc0 = BWalk::across(threadIdx.x);
        LORA_UNROLL_BY(1)
        for (int g = 0; g < kBIters; g += kBGroup) {
          Tab raw[kBGroup];
          LORA_UNROLL
          for (int u = 0; u < kBGroup; ++u) {
            const int cc = cc0 + (g + u) * kBStep;
            raw[u] = cc < cols ? b_i[(long long)cc * p.r] : from_float<Tab>(0.f);
          }
          LORA_UNROLL
          for (int u = 0; u < kBGroup; ++u) bs[bi * kLdB + cc0 + (g + u) * kBStep] = to_float(raw[u]);
        }
      }
      for (int idx = threadIdx.x; idx < kRows * kRChunk; idx += kThreads) {
        const int mm = idx / kRChunk, i = idx % kRChunk;
        ts[mm * kLdTs + i] = mm < rows && i < kn ? t_of(m0 + mm, k0 + i) : 0.f;
      }
      __syncthreads();
      for (int i = 0; i < kn; ++i) {
        float bv[kVec];
        LORA_UNROLL
        for (int v = 0; v < kVec; v += 4) {
          const float4 f = load16<float4>(bs + i * kLdB + c + v);
          bv[v] = f.x;
          bv[v + 1] = f.y;
          bv[v + 2] = f.z;
          bv[v + 3] = f.w;
        }
        LORA_UNROLL
        for (int q = 0; q < kRowsPerThread; ++q) {
          const float tv = ts[(g + q * kRowGroups) * kLdTs + i];
          LORA_UNROLL
          for (int v = 0; v < kVec; ++v) acc[q][v] = fmaf(tv, bv[v], acc[q][v]);
        }
      }
    }
  }

  if (valid <= 0) return;
  const float scale = load_or(p.scale_ptr, p.scale);
  const long long col = (long long)e * p.nb + c0 + c;
  LORA_UNROLL
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int row = g + q * kRowGroups;
    if (row >= rows) continue;
    Vec16<T> bv;
    const T* brow = base(m0 + row);
    if (brow) {
      load_elems_if<kVector>(bv, brow + col, valid, !kBaseFlag || p.base_aligned);
    } else {
      LORA_UNROLL
      for (int v = 0; v < kVec; ++v) bv.v[v] = from_float<T>(0.f);
    }
    Vec16<T> o;
    LORA_UNROLL
    for (int v = 0; v < kVec; ++v) o.v[v] = from_float<T>(fmaf(scale, acc[q][v], to_float(bv.v[v])));
    store_elems<kVector>(p.out + (long long)(m0 + row) * p.N + col, o, valid);
  }
}

// Decode: M <= kFusedMaxM rows. Grid: x = column tiles of one output block, y = output block.
// Each CTA of an enabled block computes t_j = x A_j^T (its group's r ranks, full K; one warp per rank,
// lanes along K with 16-byte loads, M accumulators per lane), then expands its column tile. A lane's vectors
// along K are kStride = 32 vectors apart; it takes kFusedSteps of them per iteration, every load issued
// before the first FMA and each step into its own accumulators, so that kFusedSteps * (1 + M) independent
// loads are in flight rather than one dependent load per iteration. The vectors that do not fill a whole
// group of kFusedSteps (the end of K) take a second loop, one vector at a time.
constexpr int kFusedSteps = 4;

// acc[s][m] += A_row[k_s, k_s + kVec) . x[m][k_s, k_s + kVec) for s < kSteps, k_s = k + s * 32 * kVec.
// kFull: every one of the vectors lies inside K (no bounds checks); otherwise elements past K read as zeros.
// A is read in Tab's precision (float32 factors unrounded).
template <int kSteps, bool kFull, bool kVector, typename T, typename Tab>
__device__ __forceinline__ void fused_dot(float (&acc)[kFusedSteps][kFusedMaxM], const Tab* a_row, const T* x,
                                          int K, int M, int k, bool x_aligned) {
  constexpr int kVec = Vec16<T>::kN, kStride = 32 * kVec;
  FactorVec<T, Tab> av[kSteps];
  LORA_UNROLL
  for (int s = 0; s < kSteps; ++s) {
    const int ks = k + s * kStride;
    load_factors<kVector>(av[s], a_row + ks, kFull ? kVec : imin(kVec, K - ks));
  }
  LORA_UNROLL
  for (int m = 0; m < kFusedMaxM; ++m) {
    if (m < M) {
      LORA_UNROLL
      for (int s = 0; s < kSteps; ++s) {
        const int ks = k + s * kStride;
        Vec16<T> xv;
        load_elems_if<kVector>(xv, x + (long long)m * K + ks, kFull ? kVec : imin(kVec, K - ks), x_aligned);
        acc[s][m] = dot16(av[s], xv, acc[s][m]);
      }
    }
  }
}

template <typename T, typename Tab, bool kVector>
__global__ void __launch_bounds__(kThreads) fused_linear_kernel(Args<T, Tab> p) {
  constexpr int kVec = Vec16<T>::kN, kStride = 32 * kVec;
  LORA_DYNAMIC_SHARED(float, smem);
  float* t_s = smem + expand_smem_floats<T>(kRowGroups);  // [m][rank], r per row
  const int e = blockIdx.y, j = p.slot[e];
  if (j >= 0) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int i = warp; i < p.r; i += kWarps) {
      const Tab* a_row = p.a + (long long)(j * p.r + i) * p.K;
      float acc[kFusedSteps][kFusedMaxM];
      LORA_UNROLL
      for (int s = 0; s < kFusedSteps; ++s)
        LORA_UNROLL
        for (int m = 0; m < kFusedMaxM; ++m) acc[s][m] = 0.f;
      int k = lane * kVec;
      for (; k + (kFusedSteps - 1) * kStride + kVec <= p.K; k += kFusedSteps * kStride)
        fused_dot<kFusedSteps, true, kVector>(acc, a_row, p.x, p.K, p.M, k, p.x_aligned);
      for (; k < p.K; k += kStride) fused_dot<1, false, kVector>(acc, a_row, p.x, p.K, p.M, k, p.x_aligned);
      LORA_UNROLL
      for (int m = 0; m < kFusedMaxM; ++m) {
        if (m < p.M) {  // uniform: every lane of the warp joins the shuffles
          float sum = acc[0][m];
          LORA_UNROLL
          for (int s = 1; s < kFusedSteps; ++s) sum += acc[s][m];
          const float tot = warp_sum(sum);
          if (lane == 0) t_s[m * p.r + i] = tot;
        }
      }
    }
    __syncthreads();
  }
  const float* ts = t_s;
  const int r = p.r;
  const T* bias = p.bias;
  expand_tile<T, Tab, kVector, 1>(
      p, smem, e, j, 0, blockIdx.x * tile_cols<T>(), [&](int m, int i) { return ts[m * r + i]; },
      [&](int) { return bias; });
}

// t partials: part[z, m, jj] = sum over split z's K range of x[m, k] * A[jj, k].
// Grid: x = 64-row tiles of M, y = 32-column tiles of R, z = K splits. kTensorCore: WMMA m16n16k16 on
// fp16/bf16 (8 warps = 4 row x 2 column fragments); otherwise each thread computes 2 rows x 4 columns.
// float32 factors with fp16/bf16 activations (Tab float, T 16-bit) take the WMMA path: A is rounded to T as
// it is staged, the rounding the per-call cast this replaced made (the MMA sees the same operands, so t is as
// before), and the shrink keeps the tensor cores. The FFMA path would keep A exact but do the shrink's
// 2*M*K*R flops at the FFMA rate, several times the tensor cores' time at r >= 32. A is then read in float32,
// twice its 16-bit bytes, mostly from L2 (every row tile of M reads it again), and is small beside x.
// float16's range is not float32's: a cast would make |A| past 65504 infinite and a rank below 2^-14 subnormal
// or zero. So for float16 (kRankScale) each rank of the tile is staged times a power of two, 2^shift
// (rank_shift, from a first pass over the rank's K range), that puts its largest finite |A| in [2^14, 2^15)
// (or leaves a rank that fits as it is), and its column of t is multiplied by 2^-shift before it is written:
// exact both ways, so each element of A keeps the 11 significant bits a cast gives a normal float16, at any
// magnitude of the rank; within a rank, elements about 2^28 below its largest become float16 subnormals
// (fewer bits), past about 2^38 zero. The pass reads the CTA's A range once more. bfloat16 has float32's exponent
// range and needs none.
template <typename T, typename Tab, bool kTensorCore, bool kVector>
__global__ void __launch_bounds__(kThreads) shrink_kernel(Args<T, Tab> p) {
  constexpr int kVec = Vec16<T>::kN;
  using S = typename std::conditional<kTensorCore, T, float>::type;
  constexpr int kLd = kTensorCore ? kLdXh : kLdXf;
  LORA_DYNAMIC_SHARED(unsigned char, smem);
  S* xs = reinterpret_cast<S*>(smem);  // [row][k]
  S* as = xs + kShrinkM * kLd;          // [column of t][k]
  const int m0 = blockIdx.x * kShrinkM, j0 = blockIdx.y * kShrinkJ;
  const int k_begin = blockIdx.z * p.k_per_split;
  const int k_end = imin(p.K, k_begin + p.k_per_split);
  const int rows = imin(kShrinkM, p.M - m0), cols = imin(kShrinkJ, p.R - j0);
  constexpr int kVecPerRow = kShrinkK / kVec;
  constexpr bool kRankScale = kTensorCore && std::is_same<T, __half>::value && std::is_same<Tab, float>::value;
  [[maybe_unused]] float* acc_s = reinterpret_cast<float*>(smem + (size_t)(kShrinkM + kShrinkJ) * kLdXh * sizeof(T));
  [[maybe_unused]] int* shift_s = reinterpret_cast<int*>(acc_s + kShrinkM * kLdAcc);  // per column of t
  const int warp = threadIdx.x / 32;

  if constexpr (kRankScale) {
    // A warp per rank, lanes along K: the largest |A| of each of the tile's ranks over this split's K range
    const int lane = threadIdx.x % 32;
    for (int c = warp; c < kShrinkJ; c += kWarps) {
      int top = 0;
      if (c < cols) {
        const Tab* a_row = p.a + (long long)(j0 + c) * p.K;
        for (int k = k_begin + lane; k < k_end; k += 32) {
          const int bits = bit_cast<int>(a_row[k]) & 0x7FFFFFFF;
          if (bits < 0x7F800000) top = imax(top, bits);  // finite elements only (rank_shift)
        }
      }
      LORA_UNROLL
      for (int o = 16; o > 0; o >>= 1) top = imax(top, __shfl_xor_sync(0xffffffffu, top, o));
      if (lane == 0) shift_s[c] = rank_shift(top);
    }
    __syncthreads();
  }

  [[maybe_unused]] float acc[2][4];
  if constexpr (!kTensorCore) {
    LORA_UNROLL
    for (int a = 0; a < 2; ++a)
      LORA_UNROLL
      for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
  }
  namespace wmma = nvcuda::wmma;
  [[maybe_unused]] wmma::fragment<wmma::accumulator, 16, 16, 16, float> cf;
  if constexpr (kTensorCore) wmma::fill_fragment(cf, 0.f);
  const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;

  for (int k0 = k_begin; k0 < k_end; k0 += kShrinkK) {
    if (k0 != k_begin) __syncthreads();
    // Stage x rows and A rows of this K chunk, 16 bytes per access along K, zero-padded.
    for (int idx = threadIdx.x; idx < (kShrinkM + kShrinkJ) * kVecPerRow; idx += kThreads) {
      const int row = idx / kVecPerRow, kk = (idx % kVecPerRow) * kVec;
      const bool is_x = row < kShrinkM;
      const int rr = is_x ? row : row - kShrinkM;
      const bool inside = rr < (is_x ? rows : cols);
      const int valid = inside ? imin(kVec, k_end - (k0 + kk)) : 0;
      // (a warp's 32 accesses cover whole rows, 8 or 4 of them, and 64 is a multiple: is_x is uniform per warp)
      const T* x_src = p.x + (long long)(m0 + rr) * p.K + k0 + kk;
      const Tab* a_src = p.a + (long long)(j0 + rr) * p.K + k0 + kk;
      S* dst = xs + row * kLd + kk;  // xs and as are one array of kShrinkM + kShrinkJ rows
      // A (Tab) meets T here: the tensor cores take it rounded to T (as_type: to nearest even, as a cast to T
      // rounds), the FFMA path (S = T = Tab = float32) as it is
      if (is_x) {
        Vec16<T> v;
        load_elems_if<kVector>(v, x_src, valid, p.x_aligned);
        LORA_UNROLL
        for (int u = 0; u < kVec; ++u) dst[u] = as_type<S>(v.v[u]);
      } else {
        FactorVec<T, Tab> v;
        load_factors<kVector>(v, a_src, valid);
        if constexpr (kRankScale) {
          const int shift = inside ? shift_s[rr] : 0;
          LORA_UNROLL
          for (int u = 0; u < kVec; ++u) dst[u] = as_type<S>(times_pow2(v.v[u], shift));
        } else {
          LORA_UNROLL
          for (int u = 0; u < kVec; ++u) dst[u] = as_type<S>(v.v[u]);
        }
      }
    }
    __syncthreads();
    if constexpr (kTensorCore) {
      const int fm = warp % 4, fn = warp / 4;
      LORA_UNROLL
      for (int s = 0; s < kShrinkK / 16; ++s) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;  // A^T: (k, j) at as[j][k]
        wmma::load_matrix_sync(af, xs + fm * 16 * kLd + s * 16, kLd);
        wmma::load_matrix_sync(bf, as + fn * 16 * kLd + s * 16, kLd);
        wmma::mma_sync(cf, af, bf, cf);
      }
    } else {
      LORA_UNROLL_BY(8)
      for (int kk = 0; kk < kShrinkK; ++kk) {
        const float x0 = xs[ty * kLd + kk], x1 = xs[(ty + 32) * kLd + kk];
        LORA_UNROLL
        for (int b = 0; b < 4; ++b) {
          const float av = as[(tx * 4 + b) * kLd + kk];
          acc[0][b] = fmaf(x0, av, acc[0][b]);
          acc[1][b] = fmaf(x1, av, acc[1][b]);
        }
      }
    }
  }

  float* out = p.part + ((long long)blockIdx.z * p.M + m0) * p.R + j0;
  if constexpr (kTensorCore) {
    const int fm = warp % 4, fn = warp / 4;
    wmma::store_matrix_sync(acc_s + fm * 16 * kLdAcc + fn * 16, cf, kLdAcc, wmma::mem_row_major);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kShrinkM * kShrinkJ; idx += kThreads) {
      const int row = idx / kShrinkJ, col = idx % kShrinkJ;
      if (row < rows && col < cols) {
        const float t = acc_s[row * kLdAcc + col];
        out[(long long)row * p.R + col] = kRankScale ? times_pow2(t, -shift_s[col]) : t;
      }
    }
  } else {
    LORA_UNROLL
    for (int a = 0; a < 2; ++a) {
      const int row = ty + a * 32;
      LORA_UNROLL
      for (int b = 0; b < 4; ++b) {
        const int col = tx * 4 + b;
        if (row < rows && col < cols) out[(long long)row * p.R + col] = acc[a][b];
      }
    }
  }
}

// The expand's occupancy bound, CTAs per multiprocessor, per architecture as the CUDA programming guide's
// __launch_bounds__ example does: with the block walk of B (expand_tile) ptxas fits the 16-bit variants in 64
// registers (4 CTAs) on sm_90 but spills 16-24 bytes there on sm_80/86/89, which take 80 (3 CTAs; sm_90 ran
// 80 before that walk); float32 keeps 48 (5 CTAs) everywhere. scripts/check_kernels.sh shows the counts.
template <typename T>
__host__ __device__ constexpr int expand_min_blocks() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  return sizeof(T) == 4 ? 5 : 3;
#else
  return sizeof(T) == 4 ? 5 : 4;
#endif
}

// Grid: x = kExpandRows-row tiles of M, y = column tiles of one output block, z = output block.
template <typename T, typename Tab, bool kVector>
__global__ void __launch_bounds__(kThreads, expand_min_blocks<T>()) expand_kernel(Args<T, Tab> p) {
  LORA_DYNAMIC_SHARED(float, smem);
  const int e = blockIdx.z, j = p.slot[e];
  const float* part = p.part;
  const int splits = p.splits, M = p.M, R = p.R, base_col = j * p.r;
  const T* bias = p.bias;
  expand_tile<T, Tab, kVector, kExpandRowsPerThread>(
      p, smem, e, j, blockIdx.x * kExpandRows, blockIdx.y * tile_cols<T>(),
      [&](int m, int i) {
        float s = 0.f;
        for (int z = 0; z < splits; ++z) s += part[((long long)z * M + m) * R + base_col + i];
        return s;
      },
      [&](int) { return bias; });
}

// out[m] = table[ids[m]] + scale * A[:, ids[m]] B^T (A is (r, num): the id's column holds its r ranks).
// Grid: x = kExpandRows-row tiles of the ids, y = column tiles of the embedding dimension.
// An id outside [0, num_embeddings) fails the kernel with a device-side assert, as nn.Embedding's does (the
// host cannot look at the ids without a device sync). Each id of the tile is read once, by one thread, checked,
// clamped into range (an id out of range reads row 0, so that no thread reads outside A or the table while the
// assert stops the kernel) and kept in shared memory (embedding_smem_bytes), where the expand's gathers of A's
// columns and of the table rows read it.
// The launch bound: with the expand's conflict-free staging of B (expand_tile's block walk), fp16/bf16 tables
// take 78 registers and three blocks per multiprocessor (they ran four at 64 with the 4-way column walk, which
// the block walk spills at), float32 64 and four (five at 48 before; 4-12 bytes spilled at 48).
template <typename T, typename Tab>
constexpr int embedding_min_blocks() {
  return sizeof(T) == 4 ? 4 : 3;
}

template <typename T>
constexpr size_t embedding_smem_bytes() {
  static_assert(expand_smem_floats<T>(kExpandRows) * sizeof(float) % alignof(long long) == 0, "ids aligned");
  return expand_smem_bytes<T>() + kExpandRows * sizeof(long long);
}

template <typename T, typename Tab, bool kVector>
__global__ void __launch_bounds__(kThreads, embedding_min_blocks<T, Tab>()) embedding_kernel(Args<T, Tab> p) {
  static_assert(kExpandRows <= kThreads, "one thread per id of the tile");
  LORA_DYNAMIC_SHARED(float, smem);
  long long* ids = reinterpret_cast<long long*>(smem + expand_smem_floats<T>(kExpandRows));  // [row of the tile]
  const int m0 = blockIdx.x * kExpandRows;
  if (threadIdx.x < kExpandRows) {
    const int m = m0 + threadIdx.x;
    long long id = 0;
    if (m < p.M) {
      id = p.ids[m];
      LORA_KERNEL_ASSERT(0 <= id && id < p.num, "embedding id out of range: ids[", m, "] = ", id,
                         ", not in [0, num_embeddings=", p.num, ")");
      if ((unsigned long long)id >= (unsigned long long)p.num) id = 0;  // row 0 exists (host check)
    }
    ids[threadIdx.x] = id;
  }
  __syncthreads();  // every thread of the tile reads the ids from here on
  const Tab* a = p.a;
  const T* table = p.table;
  const long long num_embeddings = p.num, ld = p.N;
  expand_tile<T, Tab, kVector, kExpandRowsPerThread, true>(
      p, smem, 0, 0, m0, blockIdx.y * tile_cols<T>(),
      [&](int m, int i) { return to_float(a[(long long)i * num_embeddings + ids[m - m0]]); },
      [&](int m) { return table + ids[m - m0] * ld; });
}

}  // namespace forward
}  // namespace kernels
}  // namespace lora_ext
