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
// (fp32 FMAs, or WMMA tensor cores for fp16/bf16 operands at r >= 32), then writes W once.
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

// Which block each grid z-slice handles: merge walks the enabled blocks (id), delta walks all G blocks
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

template <typename T, bool kTensorCore>
constexpr size_t smem_bytes() {
  return kTensorCore ? ((kTileM * kLdLh + kChunk * kLdRh) * sizeof(T) > kTileM * kLdAcc * sizeof(float)
                            ? (kTileM * kLdLh + kChunk * kLdRh) * sizeof(T)
                            : kTileM * kLdAcc * sizeof(float))
                     : (kTileM * kLdLf + kChunk * kLdRf) * sizeof(float);
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

// Copies chunk [k0, k0+kn) of the tile's L and R into shared memory as S, zero-padded to kChunk and to the
// full tile. Threads walk each source's contiguous dimension so reads coalesce. kTwo: rank columns below
// x.rank come from x, their L values multiplied by x_mult, the rest from y (merge: x alone, unscaled).
template <typename S, int kLdL, int kLdR, bool kTwo, typename Tab>
__device__ __forceinline__ void stage(S* ls, S* rs, const Operands<Tab>& x, const Operands<Tab>& y, float x_mult,
                                      int rows, int cols, int k0, int kn) {
  constexpr int kLIters = kTileM * kChunk / kThreads;
  constexpr int kRIters = kChunk * kTileN / kThreads;
  const bool l_k_fast = x.l_sk == 1;
  LORA_UNROLL_BY(4)
  for (int t = 0; t < kLIters; ++t) {
    const int idx = threadIdx.x + t * kThreads;
    const int i = l_k_fast ? idx / kChunk : idx % kTileM;
    const int kk = l_k_fast ? idx % kChunk : idx / kTileM;
    float v = 0.f;
    if (i < rows && kk < kn) {
      const int kr = k0 + kk;
      if (kTwo && kr >= x.rank) {
        v = to_float(y.l[(long long)i * y.l_si + (long long)(kr - x.rank) * y.l_sk]);
      } else {
        v = to_float(x.l[(long long)i * x.l_si + (long long)kr * x.l_sk]);
        if (kTwo) v *= x_mult;
      }
    }
    ls[i * kLdL + kk] = from_float<S>(v);
  }
  const bool r_c_fast = x.r_sc == 1;
  LORA_UNROLL_BY(4)
  for (int t = 0; t < kRIters; ++t) {
    const int idx = threadIdx.x + t * kThreads;
    const int kk = r_c_fast ? idx / kTileN : idx % kChunk;
    const int cc = r_c_fast ? idx % kTileN : idx / kChunk;
    float v = 0.f;
    if (cc < cols && kk < kn) {
      const int kr = k0 + kk;
      if (kTwo && kr >= x.rank)
        v = to_float(y.r[(long long)cc * y.r_sc + (long long)(kr - x.rank) * y.r_sk]);
      else
        v = to_float(x.r[(long long)cc * x.r_sc + (long long)kr * x.r_sk]);
    }
    rs[kk * kLdR + cc] = from_float<S>(v);
  }
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

template <typename T, typename Tab, bool kTensorCore, bool kVector, bool kDelta, bool kTwo = false>
__device__ __forceinline__ void merge_tile(const Args<T, Tab>& p) {
  using M = ThreadMap<T>;
  constexpr int kVec = M::kVec, kPasses = M::kPasses, kRowsPerPass = M::kRowsPerPass;
  LORA_DYNAMIC_SHARED(unsigned char, smem);

  const int z = blockIdx.z;
  const int e = kDelta ? z : p.map.id[z];
  const int j = kDelta ? p.map.slot[z] : z;
  const int m_total = p.transposed ? p.k : p.nb;
  const int n_total = p.transposed ? p.nb : p.k;
  const int m0 = blockIdx.y * kTileM, n0 = blockIdx.x * kTileN;
  const int rows = imin(kTileM, m_total - m0), cols = imin(kTileN, n_total - n0);
  const long long row0 = (p.transposed ? 0LL : (long long)e * p.nb) + m0;
  const long long col0 = (p.transposed ? (long long)e * p.nb : 0LL) + n0;
  T* tile = p.w + row0 * p.ldw + col0;
  const int tx = threadIdx.x % M::kVecPerRow, ty = threadIdx.x / M::kVecPerRow;
  const int c = tx * kVec;
  const int valid = imin(cols - c, kVec);

  // W's reads go out first: they are the traffic that matters, and stay in flight during the delta.
  Vec16<T> w[kPasses];
  if (!kDelta) {
    LORA_UNROLL
    for (int q = 0; q < kPasses; ++q) {
      const int row = ty + q * kRowsPerPass;
      if (row < rows) load_elems<kVector>(w[q], tile + row * p.ldw + c, valid);
    }
  } else if (j < 0) {  // a disabled block in the dense delta: zeros (uniform per block, before any barrier)
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
    static_assert(!std::is_same<T, float>::value, "tensor-core path is for fp16/bf16");
    namespace wmma = nvcuda::wmma;
    T* ls = reinterpret_cast<T*>(smem);
    T* rs = ls + kTileM * kLdLh;
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
        stage<T, kLdLh, kLdRh, false>(ls, rs, o, o, 1.f, rows, cols, k0, kn);
        __syncthreads();
        const int steps = (kn + 15) / 16;
        for (int s = 0; s < steps; ++s) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
          wmma::load_matrix_sync(af, ls + fm * 16 * kLdLh + s * 16, kLdLh);
          LORA_UNROLL
          for (int f = 0; f < 4; ++f) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
            wmma::load_matrix_sync(bf, rs + s * 16 * kLdRh + (fn0 + f) * 16, kLdRh);
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

// kVector: W's data pointer, row stride and block offsets are multiples of 16 bytes, so every full vector
// of a tile row is one aligned 16-byte access; otherwise elements are accessed one by one.
template <typename T, typename Tab, bool kTensorCore, bool kVector>
__global__ void __launch_bounds__(kThreads, 2) merge_kernel(Args<T, Tab> p) {
  merge_tile<T, Tab, kTensorCore, kVector, false>(p);
}

template <typename T, typename Tab, bool kTensorCore, bool kVector>
__global__ void __launch_bounds__(kThreads, 2) delta_weight_kernel(Args<T, Tab> p) {
  merge_tile<T, Tab, kTensorCore, kVector, true>(p);
}

template <typename T, typename Tab, bool kTensorCore, bool kVector>
__global__ void __launch_bounds__(kThreads, 2) swap_kernel(Args<T, Tab> p) {
  merge_tile<T, Tab, kTensorCore, kVector, false, true>(p);
}

}  // namespace merge
}  // namespace kernels
}  // namespace lora_ext
