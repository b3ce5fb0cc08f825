// Lossless merge, unmerge and swap (docs/LOSSLESS.md; the reference arithmetic is lora_ext/lossless.py):
//
//   merge_lossless_kernel    W' = T(fmaf(s, acc, W)) and, in the same pass, one code per element of the
//                            enabled blocks (o(W) mod M, or the escape M with an exception-list entry);
//   unmerge_lossless_kernel  W = the base restored from W', the update and the code (escapes: the sorted
//                            exception list, binary search; not found: the element is left as it is);
//   swap_lossless_kernel     the base restored with the old pair and its record, in registers, then the new
//                            pair merged from it as merge_lossless_kernel does (same sum, same epilogue), so a
//                            swap is bit-identical to a fresh merge on this backend.
//
// Tiling, thread map and the fp32 sum are merge.cuh's: 256 threads own a 64 x 128 tile of W, the rank is
// staged in chunks of 32 into shared memory and summed with fp32 FMAs. The lossless kernels use only the fp32
// FMA path (no tensor cores, whatever the factors' dtype), so one sum order serves merge, unmerge and swap.
// A swap sums the two pairs one after the other, reusing the same accumulator registers.
//
// The record's region: enabled block j (block_ids order) is an M_rows x N matrix (not transposed: rows
// e*nb.. of W, M_rows = nb, N = k; transposed: columns e*nb.. of W, M_rows = k, N = nb); element (m, n) has the
// canonical index (j * M_rows + m) * N + n. Codes: (n, M_rows, ceil(N/4)) bytes of four 2-bit codes (element
// 4i+q at bits 2q) for 16-bit W, or (n, M_rows, 4*ceil(N/4)) uint16 for float32 W. A thread's vector (8
// elements of fp16/bf16, 4 of fp32) starts at a multiple of 4 columns, so it owns whole code bytes; the
// padding codes it covers are written as 0.
//
// Exceptions: one atomicAdd on a 64-bit counter per exception; past the capacity the element keeps its base
// value (not W') and its escape, and the counter still counts (the op wrapper then unmerges and refuses).
#pragma once

#include "kernels/merge.cuh"

namespace lora_ext {
namespace kernels {
namespace lossless {

namespace mk = ::lora_ext::kernels::merge;

enum class Mode { kMerge, kUnmerge, kSwap };

// Code storage: bytes of 2-bit codes (16-bit W), uint16 codes (float32 W).
template <typename T>
using Code = typename std::conditional<std::is_same<T, float>::value, unsigned short, unsigned char>::type;

template <typename T, typename Tab>
struct Args {
  T* w;           // the weight, column stride 1
  long long ldw;  // its row stride, in elements
  int nb, k;
  bool transposed;
  // the pair merged (merge, swap): (n*r, k) and (n*nb, r), contiguous
  const Tab* a;
  const Tab* b;
  int r;
  float scale;
  // the pair restored (unmerge: the one given; swap: the old one)
  const Tab* old_a;
  const Tab* old_b;
  int old_r;
  float old_scale;
  // the record written (merge, swap)
  const float* lnorm;  // (n, M_rows)
  const float* rnorm;  // (n, N)
  double delta_scale;  // gamma(r) * |scale| (scale as float32)
  Code<T>* codes;
  long long* exc_index;
  int* exc_bits;
  long long cap;
  unsigned long long* counter;
  // the record read (unmerge, swap)
  const Code<T>* old_codes;
  const long long* old_exc_index;  // sorted
  const int* old_exc_bits;
  long long old_count;
  mk::BlockMap map;
};

// ---- the arithmetic of docs/LOSSLESS.md, per element ------------------------------------------------------

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  static constexpr int kMod = 65535;
  static constexpr int kMag = 0x7FFFFFFF;
  __device__ __forceinline__ static int bits(float x) { return bit_cast<int>(x); }
  __device__ __forceinline__ static float value(int v) { return bit_cast<float>(v); }
  __device__ __forceinline__ static int zero_extended(int v) { return v; }
};
template <>
struct Traits<__half> {
  static constexpr int kMod = 3;
  static constexpr int kMag = 0x7FFF;
  __device__ __forceinline__ static int bits(__half x) { return (short)__half_as_ushort(x); }
  __device__ __forceinline__ static __half value(int v) { return __ushort_as_half((unsigned short)v); }
  __device__ __forceinline__ static int zero_extended(int v) { return v & 0xFFFF; }
};
template <>
struct Traits<__nv_bfloat16> {
  static constexpr int kMod = 3;
  static constexpr int kMag = 0x7FFF;
  __device__ __forceinline__ static int bits(__nv_bfloat16 x) { return (short)__bfloat16_as_ushort(x); }
  __device__ __forceinline__ static __nv_bfloat16 value(int v) { return __ushort_as_bfloat16((unsigned short)v); }
  __device__ __forceinline__ static int zero_extended(int v) { return v & 0xFFFF; }
};

// The ordinal of a (sign-extended) bit pattern, and back: the map is its own inverse.
template <typename T>
__device__ __forceinline__ int ordinal(int v) {
  return v >= 0 ? v : v ^ Traits<T>::kMag;
}

// ordinal (truncated to T's width) -> value of T
template <typename T>
__device__ __forceinline__ T from_ordinal(long long x) {
  const int v = std::is_same<T, float>::value ? (int)x : (int)(short)x;
  return Traits<T>::value(ordinal<T>(v));
}

// restore(c, code): y = o(T(float(c))) (round-to-nearest-even twice); the ordinal = code (mod M) nearest y.
template <typename T>
__device__ __forceinline__ long long restore(double c, int code) {
  constexpr int kM = Traits<T>::kMod;
  const int y = ordinal<T>(Traits<T>::bits(from_float<T>((float)c)));
  int ym = y % kM;
  if (ym < 0) ym += kM;
  int t = code - ym;
  if (t < 0) t += kM;
  return (long long)y + (t > kM / 2 ? t - kM : t);
}

__device__ __forceinline__ bool finite(double x) { return x - x == 0.0; }

// The position of `index` in the sorted exception list (binary search), or -1 when it is not there.
__device__ __forceinline__ long long lookup(const long long* list, long long count, long long index) {
  long long lo = 0, hi = count;
  while (lo < hi) {
    const long long mid = lo + (hi - lo) / 2;
    if (list[mid] < index)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < count && list[lo] == index ? lo : -1;
}

__device__ __forceinline__ unsigned long long reserve(unsigned long long* counter) {
  return atomicAdd(counter, 1ULL);
}

// ---- the fp32 sum of one pair over the tile (merge.cuh's fp32 path) ---------------------------------------

template <typename T, typename Tab>
__device__ __forceinline__ void sum(float (&acc)[mk::ThreadMap<T>::kPasses][mk::ThreadMap<T>::kVec],
                                    const mk::Operands<Tab>& x, float* ls, float* rs, int rows, int cols, int ty,
                                    int c, bool after_other) {
  using M = mk::ThreadMap<T>;
  constexpr int kVec = M::kVec, kPasses = M::kPasses, kRowsPerPass = M::kRowsPerPass;
  LORA_UNROLL
  for (int q = 0; q < kPasses; ++q)
    LORA_UNROLL
    for (int v = 0; v < kVec; ++v) acc[q][v] = 0.f;
  for (int k0 = 0; k0 < x.rank; k0 += mk::kChunk) {
    const int kn = imin(mk::kChunk, x.rank - k0);
    if (k0 || after_other) __syncthreads();  // everyone is done reading the previous chunk
    mk::stage<float, mk::kLdLf, mk::kLdRf, false>(ls, rs, x, x, 1.f, rows, cols, k0, kn);
    __syncthreads();
    LORA_UNROLL_BY(4)
    for (int kk = 0; kk < kn; ++kk) {
      float rv[kVec];
      mk::load_floats(rv, rs + kk * mk::kLdRf + c);
      LORA_UNROLL
      for (int q = 0; q < kPasses; ++q) {
        const float l = ls[(ty + q * kRowsPerPass) * mk::kLdLf + kk];
        LORA_UNROLL
        for (int v = 0; v < kVec; ++v) acc[q][v] = fmaf(l, rv[v], acc[q][v]);
      }
    }
  }
}

// ---- the tile --------------------------------------------------------------------------------------------

template <typename T, typename Tab, bool kVector, Mode kMode>
__device__ __forceinline__ void lossless_tile(const Args<T, Tab>& p) {
  using M = mk::ThreadMap<T>;
  using Tr = Traits<T>;
  constexpr int kVec = M::kVec, kPasses = M::kPasses, kRowsPerPass = M::kRowsPerPass;
  constexpr int kM = Tr::kMod;
  constexpr bool kWide = std::is_same<T, float>::value;  // uint16 codes, else 2-bit codes four to a byte
  static_assert(kVec % 4 == 0, "a thread's vector owns whole code bytes");
  LORA_DYNAMIC_SHARED(unsigned char, smem);
  float* ls = reinterpret_cast<float*>(smem);
  float* rs = ls + mk::kTileM * mk::kLdLf;

  const int j = blockIdx.z;
  const int e = p.map.id[j];
  const int m_total = p.transposed ? p.k : p.nb;
  const int n_total = p.transposed ? p.nb : p.k;
  const int m0 = blockIdx.y * mk::kTileM, n0 = blockIdx.x * mk::kTileN;
  const int rows = imin(mk::kTileM, m_total - m0), cols = imin(mk::kTileN, n_total - n0);
  const long long row0 = (p.transposed ? 0LL : (long long)e * p.nb) + m0;
  const long long col0 = (p.transposed ? (long long)e * p.nb : 0LL) + n0;
  T* tile = p.w + row0 * p.ldw + col0;
  const int tx = threadIdx.x % M::kVecPerRow, ty = threadIdx.x / M::kVecPerRow;
  const int c = tx * kVec;
  const int valid = imin(cols - c, kVec);
  // codes per record row, and the index of this thread's first element in its tile row 0
  const long long code_ld = kWide ? 4LL * ((n_total + 3) / 4) : (n_total + 3) / 4;
  const long long index0 = ((long long)j * m_total + m0) * n_total + n0 + c;

  Vec16<T> w[kPasses];
  LORA_UNROLL
  for (int q = 0; q < kPasses; ++q) {
    const int row = ty + q * kRowsPerPass;
    if (row < rows) load_elems<kVector>(w[q], tile + row * p.ldw + c, valid);
  }

  float acc[kPasses][kVec];
  if constexpr (kMode != Mode::kMerge) {
    // The base, from W', the restored pair's update and its record (in w, in place).
    sum<T>(acc, mk::operands(p.old_a, p.old_b, p.old_r, j, p.nb, p.k, p.transposed, m0, n0), ls, rs, rows, cols,
           ty, c, false);
    LORA_UNROLL
    for (int q = 0; q < kPasses; ++q) {
      const int row = ty + q * kRowsPerPass;
      if (row >= rows || valid <= 0) continue;
      const long long rec_row = (long long)j * m_total + m0 + row;
      const Code<T>* crow = p.old_codes + rec_row * code_ld + (kWide ? n0 + c : (n0 + c) / 4);
      unsigned packed = 0;
      if constexpr (!kWide) {
        LORA_UNROLL
        for (int b = 0; b < kVec / 4; ++b)
          if (4 * b < valid) packed |= (unsigned)crow[b] << (8 * b);
      }
      LORA_UNROLL
      for (int v = 0; v < kVec; ++v) {
        if (v >= valid) continue;
        const int code = kWide ? (int)crow[v] : (int)((packed >> (2 * v)) & 3u);
        const T wp = w[q].v[v];
        const double cc = (double)to_float(wp) - (double)p.old_scale * (double)acc[q][v];
        if (code != kM) {
          // (a merged value that is not finite was written while merged, as no merge codes one: it stays)
          // (a coded element's base is finite: a restore past the largest value is of a value written there,
          // which takes its lossy unmerge T(c); one code step past the top is inf or NaN)
          if (finite((double)to_float(wp))) {
            const T r = from_ordinal<T>(restore<T>(cc, code));
            w[q].v[v] = finite((double)to_float(r)) ? r : from_float<T>((float)cc);
          }
        } else {
          const long long at = lookup(p.old_exc_index, p.old_count, index0 + (long long)row * n_total + v);
          if (at >= 0) w[q].v[v] = Tr::value(p.old_exc_bits[at]);
        }
      }
      // an unmerge is done with this row (stored now, its registers are free for the next pass)
      if constexpr (kMode == Mode::kUnmerge) store_elems<kVector>(tile + row * p.ldw + c, w[q], valid);
    }
    if constexpr (kMode == Mode::kUnmerge) return;
  }

  if constexpr (kMode != Mode::kUnmerge) {
    sum<T>(acc, mk::operands(p.a, p.b, p.r, j, p.nb, p.k, p.transposed, m0, n0), ls, rs, rows, cols, ty, c,
           kMode == Mode::kSwap);  // a swap's second sum waits for everyone to finish with the first's operands
    const float* rn = p.rnorm + (long long)j * n_total + n0 + c;  // this thread's columns' right norms
    LORA_UNROLL
    for (int q = 0; q < kPasses; ++q) {
      const int row = ty + q * kRowsPerPass;
      if (row >= rows || valid <= 0) continue;
      const long long rec_row = (long long)j * m_total + m0 + row;
      const double ln = (double)p.lnorm[rec_row];
      Vec16<T> out;
      unsigned packed = 0;
      Code<T>* crow = p.codes + rec_row * code_ld + (kWide ? n0 + c : (n0 + c) / 4);
      LORA_UNROLL
      for (int v = 0; v < kVec; ++v) {
        const T base = w[q].v[v];
        out.v[v] = base;
        if (v >= valid) continue;
        const float wf = to_float(base);
        const T wp = from_float<T>(fmaf(p.scale, acc[q][v], wf));
        const double cc = (double)to_float(wp) - (double)p.scale * (double)acc[q][v];
        const double delta = ln * (double)__ldg(rn + v) * p.delta_scale + fabs(cc) * 0x1p-50;
        const int bits = Tr::bits(base);
        const int o = ordinal<T>(bits);
        int code = o % kM;
        if (code < 0) code += kM;
        const bool ok = fabsf(wf) <= kFloatMax && finite(cc) && restore<T>(cc - delta, code) == o &&
                        restore<T>(cc + delta, code) == o;
        if (ok) {
          out.v[v] = wp;
        } else {
          code = kM;
          const unsigned long long slot = reserve(p.counter);
          if (slot < (unsigned long long)p.cap) {
            p.exc_index[slot] = index0 + (long long)row * n_total + v;
            p.exc_bits[slot] = Tr::zero_extended(bits);
            out.v[v] = wp;
          }  // else: past the capacity, the element keeps its base
        }
        if constexpr (kWide)
          crow[v] = (unsigned short)code;
        else
          packed |= (unsigned)code << (2 * v);
      }
      if constexpr (kWide) {
        LORA_UNROLL
        for (int v = 0; v < kVec; ++v)
          if (v >= valid) crow[v] = 0;  // padding codes (the vector is one group of 4)
      } else {
        LORA_UNROLL
        for (int b = 0; b < kVec / 4; ++b)
          if (4 * b < valid) crow[b] = (unsigned char)(packed >> (8 * b));
      }
      store_elems<kVector>(tile + row * p.ldw + c, out, valid);
    }
  }
}

template <typename T, typename Tab, bool kVector>
__global__ void __launch_bounds__(mk::kThreads, 2) merge_lossless_kernel(Args<T, Tab> p) {
  lossless_tile<T, Tab, kVector, Mode::kMerge>(p);
}

template <typename T, typename Tab, bool kVector>
__global__ void __launch_bounds__(mk::kThreads, 2) unmerge_lossless_kernel(Args<T, Tab> p) {
  lossless_tile<T, Tab, kVector, Mode::kUnmerge>(p);
}

template <typename T, typename Tab, bool kVector>
__global__ void __launch_bounds__(mk::kThreads, 2) swap_lossless_kernel(Args<T, Tab> p) {
  lossless_tile<T, Tab, kVector, Mode::kSwap>(p);
}

// Shared memory: merge.cuh's fp32 staging.
template <typename T>
constexpr size_t smem_bytes() {
  return mk::smem_bytes<T, float, false>();
}

}  // namespace lossless
}  // namespace kernels
}  // namespace lora_ext
