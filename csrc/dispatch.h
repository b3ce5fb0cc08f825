// The dtype dispatch of every op, in one place: maps a tensor's ScalarType to the CUDA type the kernels
// are templated on, as `scalar_t`, and calls the given lambda with it.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Weights: float32, float16, bfloat16. WHAT names the op and argument for the error message.
#define LORA_DISPATCH_WEIGHT_TYPES(STYPE, WHAT, ...)                                        \
  [&] {                                                                                     \
    switch (STYPE) {                                                                        \
      case at::ScalarType::Float: {                                                         \
        using scalar_t = float;                                                             \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      case at::ScalarType::Half: {                                                          \
        using scalar_t = __half;                                                            \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      case at::ScalarType::BFloat16: {                                                      \
        using scalar_t = __nv_bfloat16;                                                     \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      default:                                                                              \
        TORCH_CHECK_VALUE(false, WHAT, " must be float32, float16 or bfloat16, got ", STYPE); \
    }                                                                                       \
  }()
