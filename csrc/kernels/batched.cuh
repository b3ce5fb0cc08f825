// Batched ("gather", multi-adapter) LoRA forward: many adapters served in one batch, as Punica's SGMV and
// vLLM's punica kernels do. A layer keeps its adapters stacked in S fixed slots of a common rank R (lower
// ranks zero-padded):
//
//   a_slots (S, k, R)   slot s holds A_s^T (linear) or, for an Embedding adapter, (S, num_embeddings, R)
//   b_slots (S, R, d)   slot s holds B_s^T
//   scales  (S,)        float32, read from device memory (a captured CUDA graph sees new values)
//   index   (M / tpi,)  int32: the slot of each group of tpi = tokens_per_index consecutive rows; -1: no update
//
// For each row m whose group has slot i >= 0:
//
//   t[m, :]   = x[m, :] A_i^T                      (R,) in fp32   (embedding: a_slots[i, ids[m], :])
//   out[m, :] = round(out[m, :] + scales[i] * t[m, :] B_i^T)         fp32 accumulation, one rounding
//
// and rows of slot -1 are left as they are, bit for bit. Two variants (kSegment), chosen by the host from tpi:
//   decode  (kSegment = false, tpi < kSegmentMinTokens): shrink_kernel gives each row its own CTA, which
//           gathers the row's slot (its A read through L2); expand_kernel gives each row its own CTA per
//           column tile (every thread one 16-byte column vector)
//   segment (kSegment = true, tpi >= kSegmentMinTokens): tiles of kSegRows rows of one group share the
//           slot's A and B tiles: shrink_kernel is a 32 x 32 FFMA tile GEMM over k, expand_kernel a 32-row
//           tile with each thread owning one column vector of 4 rows
// The shrink writes t (M, R) fp32; expand_kernel<kEmbedding = false> reads it. The embedding needs no shrink
// launch: expand_kernel<kEmbedding = true> gathers t from a_slots itself.
//
// Argument checks the host cannot make without a device sync are device-side asserts (LORA_KERNEL_ASSERT): a
// slot outside [-1, S) (the shrink, or the embedding's expand, checks each group once per CTA) and an embedding
// id outside [0, num_embeddings) (checked for the rows that are updated: a row of slot -1 reads no id). The
// uses clamp (a bad slot reads as -1, a bad id as row 0) so that nothing reads out of bounds while the assert
// stops the kernel.
#pragma once

#include "kernels/common.cuh"

namespace lora_ext {
namespace kernels {
namespace batched {

constexpr int kThreads = 256;
constexpr int kMaxRank = kThreads;      // the decode shrink sums one rank per thread
constexpr int kSegmentMinTokens = 8;    // tokens_per_index from which the host picks the segment variant

// segment shrink tile: kSegRows rows x kSegJ ranks, kSegK of k per step; each thread 2 rows x 2 ranks
constexpr int kSegRows = 32;
constexpr int kSegJ = 32;
constexpr int kSegK = 32;
constexpr int kLdXs = kSegK + 1;  // x staging [row][k], floats
constexpr int kLdAs = kSegJ;      // A staging [k][rank], floats

// expand: ranks staged per step, and the tile of each variant
constexpr int kRChunk = 64;
constexpr int kLdTs = kRChunk + 1;  // t staging [row][rank], floats

template <bool kSegment>
struct ExpandShape {
  static constexpr int kColVecs = kSegment ? 32 : kThreads;  // 16-byte column vectors per tile row
  static constexpr int kRowGroups = kThreads / kColVecs;
  static constexpr int kRowsPerThread = kSegment ? 4 : 1;
  static constexpr int kRows = kRowGroups * kRowsPerThread;  // rows per tile: 32 or 1
};

template <typename T, bool kSegment>
__host__ __device__ constexpr int expand_tile_cols() {
  return ExpandShape<kSegment>::kColVecs * Vec16<T>::kN;
}

template <bool kSegment>
__host__ __device__ constexpr int expand_tile_rows() {
  return ExpandShape<kSegment>::kRows;
}

template <bool kSegment>
__host__ __device__ constexpr int shrink_tile_rows() {
  return kSegment ? kSegRows : 1;
}

template <bool kSegment>
constexpr size_t shrink_smem_bytes() {
  return kSegment ? (size_t)(kSegRows * kLdXs + kSegK * kLdAs) * sizeof(float) : (size_t)kThreads * sizeof(float);
}

template <bool kSegment>
constexpr size_t expand_smem_bytes() {
  return (size_t)ExpandShape<kSegment>::kRows * kLdTs * sizeof(float);
}

template <typename T>
struct Args {
  const T* x;               // linear: (M, k), contiguous
  const long long* ids;     // embedding: (M,) token ids
  const T* a;               // (S, k, R) linear, (S, num, R) embedding
  const T* b;               // (S, R, d)
  const float* scales;      // (S,)
  const int* index;         // (M / tpi,) slot per group, -1: none
  float* t;                 // (M, R) fp32: the shrink's output, the linear expand's input
  T* out;                   // (M, d), contiguous
  int M, k, d, R, S;
  int tpi;                  // tokens per index
  int tiles_per_group;      // row tiles of the launched kernel per group of tpi rows (grid x = groups * this)
  long long num;            // embedding rows per slot
};

// The rows [m0, m0 + rows) of row tile blockIdx.x (tiles of `tile_rows` rows, never across a group) and their
// group.
struct Tile {
  int group, m0, rows;
};

template <typename T>
__device__ __forceinline__ Tile tile_of(const Args<T>& p, int tile_rows) {
  Tile t;
  const int tile = blockIdx.x;
  t.group = tile / p.tiles_per_group;
  t.m0 = t.group * p.tpi + (tile % p.tiles_per_group) * tile_rows;
  t.rows = imin(tile_rows, (t.group + 1) * p.tpi - t.m0);
  return t;
}

// The slot of `group`, or -1 (no update) for -1 and, while the assert stops the kernel, for one out of range.
// kCheck: thread 0 asserts the range.
template <bool kCheck, typename T>
__device__ __forceinline__ int slot_of(const Args<T>& p, int group) {
  const int slot = __ldg(p.index + group);
  if (kCheck && threadIdx.x == 0) {
    LORA_KERNEL_ASSERT(-1 <= slot && slot < p.S, "adapter slot out of range: index[", group, "] = ", slot,
                       ", not in [-1, S=", p.S, ")");
  }
  return 0 <= slot && slot < p.S ? slot : -1;
}

// Decode shrink: t[m, :] = x[m, :] A^T for one row m (one CTA). A's (k, R) elements are walked as one
// contiguous array, so that the CTA's loads coalesce for any R: thread (q, j), q = tid / R < kThreads / R,
// accumulates rank j over k = q, q + kThreads / R, ...; the partial sums of each rank then meet in shared
// memory.
template <typename T>
__device__ __forceinline__ void shrink_row(const Args<T>& p, float* red) {
  const int m = blockIdx.x;
  const int slot = slot_of<true>(p, m / p.tpi);
  if (slot < 0) return;  // uniform per CTA
  const int R = p.R, per_pass = kThreads / R;
  const int j = threadIdx.x % R, q = threadIdx.x / R;
  float acc = 0.f;
  if (q < per_pass) {
    const T* xr = p.x + (long long)m * p.k;
    const T* a = p.a + (long long)slot * p.k * R + j;
    LORA_UNROLL_BY(4)
    for (int kk = q; kk < p.k; kk += per_pass) acc = fmaf(to_float(xr[kk]), to_float(a[(long long)kk * R]), acc);
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  if ((int)threadIdx.x < R) {
    float s = 0.f;
    for (int qq = 0; qq < per_pass; ++qq) s += red[qq * R + threadIdx.x];
    p.t[(long long)m * R + threadIdx.x] = s;
  }
}

// Segment shrink: a kSegRows x kSegJ tile of t for rows of one group (grid x: row tiles, y: rank tiles), over
// all of k in kSegK steps; x and the slot's A staged in shared memory as fp32, 2 rows x 2 ranks per thread.
template <typename T, bool kVector>
__device__ __forceinline__ void shrink_tile(const Args<T>& p, float* smem) {
  constexpr int kVec = Vec16<T>::kN, kVecPerRow = kSegK / kVec;
  const Tile tile = tile_of(p, kSegRows);
  const int slot = slot_of<true>(p, tile.group);
  if (slot < 0) return;  // uniform per CTA
  const int j0 = blockIdx.y * kSegJ, cols = imin(kSegJ, p.R - j0);
  float* xs = smem;                     // [row][k]
  float* as = smem + kSegRows * kLdXs;  // [k][rank]
  const T* a = p.a + (long long)slot * p.k * p.R + j0;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  float acc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

  for (int k0 = 0; k0 < p.k; k0 += kSegK) {
    if (k0) __syncthreads();
    for (int idx = threadIdx.x; idx < kSegRows * kVecPerRow; idx += kThreads) {
      const int row = idx / kVecPerRow, kk = (idx % kVecPerRow) * kVec;
      const int valid = row < tile.rows ? imin(kVec, p.k - (k0 + kk)) : 0;
      Vec16<T> v;
      load_elems<kVector>(v, p.x + (long long)(tile.m0 + row) * p.k + k0 + kk, valid);
      LORA_UNROLL
      for (int u = 0; u < kVec; ++u) xs[row * kLdXs + kk + u] = to_float(v.v[u]);
    }
    // The slot's rows of A are R contiguous ranks: the rank fastest, so that the reads coalesce.
    for (int idx = threadIdx.x; idx < kSegK * kSegJ; idx += kThreads) {
      const int kr = idx / kSegJ, jj = idx % kSegJ;
      as[kr * kLdAs + jj] = k0 + kr < p.k && jj < cols ? to_float(a[(long long)(k0 + kr) * p.R + jj]) : 0.f;
    }
    __syncthreads();
    LORA_UNROLL_BY(8)
    for (int kk = 0; kk < kSegK; ++kk) {
      const float x0 = xs[ty * kLdXs + kk], x1 = xs[(ty + 16) * kLdXs + kk];
      const float a0 = as[kk * kLdAs + tx], a1 = as[kk * kLdAs + tx + 16];
      acc[0][0] = fmaf(x0, a0, acc[0][0]);
      acc[0][1] = fmaf(x0, a1, acc[0][1]);
      acc[1][0] = fmaf(x1, a0, acc[1][0]);
      acc[1][1] = fmaf(x1, a1, acc[1][1]);
    }
  }
  LORA_UNROLL
  for (int u = 0; u < 2; ++u) {
    const int row = ty + u * 16;
    LORA_UNROLL
    for (int w = 0; w < 2; ++w) {
      const int col = tx + w * 16;
      if (row < tile.rows && col < cols) p.t[(long long)(tile.m0 + row) * p.R + j0 + col] = acc[u][w];
    }
  }
}

// t = x A^T for every row of a group with a slot. Decode: grid x = M rows. Segment: grid x = groups x row
// tiles per group, y = rank tiles.
template <typename T, bool kSegment, bool kVector>
__global__ void __launch_bounds__(kThreads) shrink_kernel(Args<T> p) {
  LORA_DYNAMIC_SHARED(float, smem);
  if constexpr (kSegment)
    shrink_tile<T, kVector>(p, smem);
  else
    shrink_row<T>(p, smem);
}

// The expand's launch bound. Without one, ptxas keeps the fp16/bf16 decode embedding expands at 48 registers
// and spills 16 bytes around the assert's call; decode: 4 CTAs per multiprocessor (at most 64 registers, none
// spilled); segment: 2 (its 4 rows x 16-byte accumulators and the unrolled B loads take 60 to 126 registers).
template <bool kSegment>
constexpr int expand_min_blocks() {
  return kSegment ? 2 : 4;
}

// out[rows of a tile] = round(out + scales[i] * t B_i^T), t read from p.t (linear) or gathered from a_slots at
// the rows' ids (kEmbedding). Grid: x = groups x row tiles per group, y = column tiles of d. Thread (g, cv)
// owns column vector cv (16 bytes of out) of rows g, g + kRowGroups, ...; B_i's rows are read as 16-byte
// vectors along d (the CTA's other row groups hit the same lines in L1).
template <typename T, bool kSegment, bool kVector, bool kEmbedding>
__global__ void __launch_bounds__(kThreads, expand_min_blocks<kSegment>()) expand_kernel(Args<T> p) {
  using Shape = ExpandShape<kSegment>;
  constexpr int kVec = Vec16<T>::kN, kRows = Shape::kRows, kRowGroups = Shape::kRowGroups;
  constexpr int kRowsPerThread = Shape::kRowsPerThread;
  LORA_DYNAMIC_SHARED(float, ts);  // [row][rank of the chunk]
  const Tile tile = tile_of(p, kRows);
  const int slot = slot_of<kEmbedding>(p, tile.group);  // the linear shrink has checked it
  if (slot < 0) return;  // uniform per CTA: these rows stay as they are
  if constexpr (kEmbedding) {
    static_assert(kRows <= kThreads, "one thread per id of the tile");
    if ((int)threadIdx.x < tile.rows) {
      const int m = tile.m0 + threadIdx.x;
      const long long id = p.ids[m], num = p.num;
      LORA_KERNEL_ASSERT(0 <= id && id < num, "embedding id out of range: ids[", m, "] = ", id,
                         ", not in [0, num_embeddings=", num, ")");
    }
  }
  const int R = p.R, d = p.d;
  const int cv = threadIdx.x % Shape::kColVecs, g = threadIdx.x / Shape::kColVecs;
  const int col = blockIdx.y * expand_tile_cols<T, kSegment>() + cv * kVec;
  const int valid = imin(kVec, d - col);
  const T* bcol = p.b + (long long)slot * R * d + col;

  float acc[kRowsPerThread][kVec];
  LORA_UNROLL
  for (int q = 0; q < kRowsPerThread; ++q)
    LORA_UNROLL
    for (int v = 0; v < kVec; ++v) acc[q][v] = 0.f;

  for (int r0 = 0; r0 < R; r0 += kRChunk) {
    const int rn = imin(kRChunk, R - r0);
    if (r0) __syncthreads();
    for (int idx = threadIdx.x; idx < kRows * kRChunk; idx += kThreads) {
      const int mm = idx / kRChunk, i = idx % kRChunk;
      float v = 0.f;
      if (mm < tile.rows && i < rn) {
        const int m = tile.m0 + mm;
        if constexpr (kEmbedding) {
          const long long id = p.ids[m];
          const long long row = (unsigned long long)id < (unsigned long long)p.num ? id : 0LL;  // row 0 exists
          v = to_float(p.a[((long long)slot * p.num + row) * R + r0 + i]);
        } else {
          v = p.t[(long long)m * R + r0 + i];
        }
      }
      ts[mm * kLdTs + i] = v;
    }
    __syncthreads();
    if (valid > 0) {
      LORA_UNROLL_BY(4)
      for (int i = 0; i < rn; ++i) {
        Vec16<T> bv;
        load_elems<kVector>(bv, bcol + (long long)(r0 + i) * d, valid);
        LORA_UNROLL
        for (int q = 0; q < kRowsPerThread; ++q) {
          const float tv = ts[(g + q * kRowGroups) * kLdTs + i];
          LORA_UNROLL
          for (int v = 0; v < kVec; ++v) acc[q][v] = fmaf(tv, to_float(bv.v[v]), acc[q][v]);
        }
      }
    }
  }

  if (valid <= 0) return;
  const float scale = __ldg(p.scales + slot);
  LORA_UNROLL
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int row = g + q * kRowGroups;
    if (row >= tile.rows) continue;
    T* o = p.out + (long long)(tile.m0 + row) * d + col;
    Vec16<T> ov;
    load_elems<kVector>(ov, o, valid);
    LORA_UNROLL
    for (int v = 0; v < kVec; ++v) ov.v[v] = from_float<T>(fmaf(scale, acc[q][v], to_float(ov.v[v])));
    store_elems<kVector>(o, ov, valid);
  }
}

}  // namespace batched
}  // namespace kernels
}  // namespace lora_ext
