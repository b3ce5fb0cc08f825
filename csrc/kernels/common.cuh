// Device helpers shared by the kernels: dtype conversions, 16-byte vector accesses, dynamic shared memory.
// Compiled by nvcc for the GPU and by a host compiler through sim/simt.h for the simulator.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <cstdint>
#include <cstring>
#include <type_traits>
#elif !defined(LORA_SIM)
#error "kernels are compiled by nvcc, or on the host after sim/simt.h"
#endif

// Compute capability 8.0 or later only. The host selects the fp16/bf16 tensor-core (WMMA) paths and the bf16
// conversions from the dtype alone, without asking the device, so a build for an older architecture would
// hold kernels that cannot run. setup.py refuses such a TORCH_CUDA_ARCH_LIST with a message saying what to
// set; this stops any other build (CMake's KERNEL_ARCHS, a hand-written nvcc line) at compile time.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "lora_ext's kernels need compute capability 8.0 or later: build for sm_80+ (TORCH_CUDA_ARCH_LIST=\"8.0;9.0\")"
#endif

// LORA_KERNEL_ASSERT(cond, message parts...): a device-side check of an argument the host cannot see without a
// device sync (an embedding id out of range), the way nn.Embedding's kernels check theirs (CUDA_KERNEL_ASSERT):
//   - on a GPU a failed condition calls __assert_fail, which prints the condition, file, line, block and
//     thread, and fails the kernel with cudaErrorAssert ("device-side assert triggered"). It does not depend on
//     NDEBUG, which torch's builds define: nvcc declares __assert_fail for device code (crt/common_functions.h,
//     included in every .cu) whatever NDEBUG says, and this macro calls it directly (scripts/check_kernels.sh
//     compiles with NDEBUG and checks that the call is there). The message parts are not evaluated there;
//   - in the simulator it throws sim::Error with the condition and the message parts streamed together (the
//     values and bounds), which lora_ext._sim raises as a Python RuntimeError.
#if defined(LORA_SIM)
#define LORA_KERNEL_ASSERT(cond, ...)                             \
  do {                                                            \
    if (!(cond)) ::sim::device_assert_failed(#cond, __VA_ARGS__); \
  } while (0)
#elif defined(__CUDA_ARCH__)
#define LORA_KERNEL_ASSERT(cond, ...)                                                 \
  do {                                                                                \
    if (__builtin_expect(!(cond), 0))                                                 \
      __assert_fail(#cond, __FILE__, static_cast<unsigned int>(__LINE__), __func__); \
  } while (0)
#else  // nvcc's host pass parses device code but compiles none of it (and glibc hides __assert_fail under NDEBUG)
#define LORA_KERNEL_ASSERT(cond, ...) \
  do {                                \
    (void)sizeof(cond);               \
  } while (0)
#endif

// Loop unrolling hints: nvcc's pragma, spelled so that a host compiler need not know it.
#if defined(__CUDACC__)
#define LORA_UNROLL _Pragma("unroll")
#define LORA_UNROLL_BY(n) _Pragma(LORA_STRINGIFY(unroll n))
#define LORA_STRINGIFY(x) #x
#else
#define LORA_UNROLL
#define LORA_UNROLL_BY(n)
#endif

namespace lora_ext {
namespace kernels {

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// The largest finite float32 (FLT_MAX, spelled here so that no header is needed on either compiler).
constexpr float kFloatMax = 3.40282347e38f;

// A float a kernel reads from device memory at run time instead of taking it as an argument (a scale that a
// captured CUDA graph must not freeze): one read-only load per thread, or `fallback` when p is null.
__device__ __forceinline__ float load_or(const float* p, float fallback) { return p ? __ldg(p) : fallback; }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// The bits of x as a To of the same size (no conversion): a float32's bits as an int and back.
template <typename To, typename From>
__device__ __forceinline__ To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "a bit cast keeps the size");
  To y;
  memcpy(&y, &x, sizeof(To));
  return y;
}

// 2^e, exactly, for e in [-126, 127] (the normal float32 exponents).
__device__ __forceinline__ float pow2f(int e) { return bit_cast<float>((e + 127) << 23); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 16 bytes of T: the unit of a vector access.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// p must be 16-byte aligned.
template <typename V>
__device__ __forceinline__ V load16(const void* p) {
  static_assert(sizeof(V) == 16, "16-byte accesses only");
#if defined(LORA_SIM)
  ::sim::check_aligned16(p);
  V v;
  std::memcpy(&v, p, 16);
  return v;
#else
  return *reinterpret_cast<const V*>(p);
#endif
}

template <typename V>
__device__ __forceinline__ void store16(void* p, const V& v) {
  static_assert(sizeof(V) == 16, "16-byte accesses only");
#if defined(LORA_SIM)
  ::sim::check_aligned16(p);
  std::memcpy(p, &v, 16);
#else
  *reinterpret_cast<V*>(p) = v;
#endif
}

// A staging walk that writes a shared tile across its rows: element idx of a walk over kAcross runs of kRun
// source-contiguous elements, each run stored down one column of the tile (row = position in the run). A warp
// (32 consecutive idx) takes 8 neighbours of a run (lane % 8) in 4 columns (lane / 8): with rows 4 mod 32 words
// apart its stores hit 32 distinct banks (4 * row + column), where a whole run of 32 down one column hits 8
// banks 4 ways; its reads are 4 runs of 8 elements. idx in [0, kRun * kAcross).
template <int kRun, int kAcross>
struct Block8x4 {
  static_assert(kRun % 8 == 0 && kAcross % 4 == 0, "whole 8 x 4 blocks");
  __host__ __device__ static constexpr int along(int idx) { return (idx / 32) % (kRun / 8) * 8 + idx % 8; }
  __host__ __device__ static constexpr int across(int idx) { return (idx / 32) / (kRun / 8) * 4 + idx % 32 / 8; }
};

// Asynchronous copies from global to shared memory (cp.async, sm_80+), in groups: async_copy16 starts a copy
// of `bytes` (0..16) bytes from src into the 16 bytes at dst, the rest of which read as zero; async_commit closes
// the calling thread's group of copies started since the last one; async_wait<N>() returns once at most N of
// the thread's groups are still in flight. Only the issuing thread may read dst without a __syncthreads() after
// its wait. Both pointers 16-byte aligned. The simulator poisons dst when the copy starts and copies at the wait,
// so a read before the wait sees the poison.
__device__ __forceinline__ void async_copy16(void* dst, const void* src, int bytes) {
#if defined(LORA_SIM)
  ::sim::async_copy16(dst, src, bytes);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(bytes) : "memory");
#endif
}

__device__ __forceinline__ void async_commit() {
#if defined(LORA_SIM)
  ::sim::async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void async_wait() {
#if defined(LORA_SIM)
  ::sim::async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Loads up to Vec16<T>::kN consecutive elements; elements past `valid` read as zero. kVector: the whole
// vector in one 16-byte access when all of it is valid (the caller guarantees alignment).
template <bool kVector, typename T>
__device__ __forceinline__ void load_elems(Vec16<T>& out, const T* p, int valid) {
  constexpr int kN = Vec16<T>::kN;
  if (kVector && valid >= kN) {
    out = load16<Vec16<T>>(p);
    return;
  }
LORA_UNROLL
  for (int i = 0; i < kN; ++i) out.v[i] = i < valid ? p[i] : from_float<T>(0.f);
}

// load_elems with 16-byte accesses only where the variant (kVector) and this operand's own alignment (`aligned`,
// uniform across the launch) both allow them: a misaligned operand is read element by element without costing
// the other operands their vector accesses.
template <bool kVector, typename T>
__device__ __forceinline__ void load_elems_if(Vec16<T>& out, const T* p, int valid, bool aligned) {
  if (kVector && aligned)
    load_elems<true>(out, p, valid);
  else
    load_elems<false>(out, p, valid);
}

template <bool kVector, typename T>
__device__ __forceinline__ void store_elems(T* p, const Vec16<T>& in, int valid) {
  constexpr int kN = Vec16<T>::kN;
  if (kVector && valid >= kN) {
    store16(p, in);
    return;
  }
LORA_UNROLL
  for (int i = 0; i < kN; ++i)
    if (i < valid) p[i] = in.v[i];
}

}  // namespace kernels
}  // namespace lora_ext

// Dynamic shared memory as a typed pointer. The simulator poisons it at the start of every block.
#if defined(LORA_SIM)
#define LORA_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::sim::dynamic_shared())
#else
#define LORA_DYNAMIC_SHARED(T, name)                  \
  extern __shared__ __align__(128) unsigned char name##_bytes[]; \
  T* name = reinterpret_cast<T*>(name##_bytes)
#endif
