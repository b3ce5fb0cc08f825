// The torch dtype of each CUDA element type the kernels are templated on. The host code selects a kernel
// variant by matching the arguments' dtypes against the variant lists in kernels/variants.cuh (see
// merge_host::select_variant and forward_host::select_variant): scalar_type_of<T> is that match.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lora_ext {

template <typename T>
struct ScalarTypeOf;  // no torch dtype: not an element type of any kernel
template <>
struct ScalarTypeOf<float> {
  static constexpr at::ScalarType value = at::ScalarType::Float;
};
template <>
struct ScalarTypeOf<__half> {
  static constexpr at::ScalarType value = at::ScalarType::Half;
};
template <>
struct ScalarTypeOf<__nv_bfloat16> {
  static constexpr at::ScalarType value = at::ScalarType::BFloat16;
};

template <typename T>
constexpr at::ScalarType scalar_type_of = ScalarTypeOf<T>::value;

}  // namespace lora_ext
