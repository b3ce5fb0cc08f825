// Device helpers shared by the kernels: dtype conversions, 16-byte vector accesses, dynamic shared memory.
// Compiled by nvcc for the GPU and by a host compiler through sim/simt.h for the simulator.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <cstdint>
#include <type_traits>
#elif !defined(LORA_SIM)
#error "kernels are compiled by nvcc, or on the host after sim/simt.h"
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

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

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
