// The kernel variants, one list per kernel family: the template instantiations that exist. Both sides expand
// these lists, so they cannot drift apart:
//   - the host code (ops/merge_host.h, ops/forward_host.h, ops/batched_host.h) selects a kernel by matching the
//     checked arguments against the list's entries (select_variant) and instantiates nothing else; a static_assert
//     there holds each list to exactly the variants the host's checks can lead to (selectable());
//   - the nvcc compile check (kernels/check/*.cu) instantiates every entry for each GPU architecture.
// A new variant is a line here, plus selectable() and the argument checks where they must admit it.
//
// Plain X-macros, torch-free: X is called once per entry with the CUDA element types (float, __half,
// __nv_bfloat16); a file expanding a list includes the kernel headers first.
#pragma once

// merge_kernel, delta_weight_kernel and swap_kernel<T, Tab, kTensorCore, kVector>: W (or out) of type T,
// factors of type Tab (float32, or W's dtype); tensor cores (WMMA) only for a 16-bit W (float32 factors as bf16
// hi/lo pairs);
// kVector (16-byte accesses) or element-wise, as W's pointer, row stride and block offsets allow.
#define LORA_MERGE_VARIANTS(X)                  \
  X(float, float, false, true)                  \
  X(float, float, false, false)                 \
  X(__half, float, false, true)                 \
  X(__half, float, false, false)                \
  X(__half, float, true, true)                  \
  X(__half, float, true, false)                 \
  X(__half, __half, false, true)                \
  X(__half, __half, false, false)               \
  X(__half, __half, true, true)                 \
  X(__half, __half, true, false)                \
  X(__nv_bfloat16, float, false, true)          \
  X(__nv_bfloat16, float, false, false)         \
  X(__nv_bfloat16, float, true, true)           \
  X(__nv_bfloat16, float, true, false)          \
  X(__nv_bfloat16, __nv_bfloat16, false, true)  \
  X(__nv_bfloat16, __nv_bfloat16, false, false) \
  X(__nv_bfloat16, __nv_bfloat16, true, true)   \
  X(__nv_bfloat16, __nv_bfloat16, true, false)

// The forward kernels of activations of type T and factors of type Tab (float32, or T: read as stored, no
// per-call cast): fused_linear_kernel, expand_kernel and embedding_kernel<T, Tab, kVector> and
// shrink_kernel<T, Tab, kTensorCore, kVector>. kTensorCore is the shrink's path for T (WMMA for fp16/bf16,
// float32 A rounded to T as it is staged), so each (T, Tab, kVector) appears once. kVector (16-byte accesses)
// or element-wise, as K and the features per block allow; within a kVector launch a misaligned x_lora or
// embedding table is read element by element (a run-time flag, Args::x_aligned / base_aligned) and a
// misaligned A or bias is copied to aligned storage, so one operand never costs the others their vector
// accesses (ops/forward_host.h).
#define LORA_FORWARD_VARIANTS(X)                \
  X(float, float, false, true)                  \
  X(float, float, false, false)                 \
  X(__half, float, true, true)                  \
  X(__half, float, true, false)                 \
  X(__half, __half, true, true)                 \
  X(__half, __half, true, false)                \
  X(__nv_bfloat16, float, true, true)           \
  X(__nv_bfloat16, float, true, false)          \
  X(__nv_bfloat16, __nv_bfloat16, true, true)   \
  X(__nv_bfloat16, __nv_bfloat16, true, false)

// merge_lossless_kernel, unmerge_lossless_kernel and swap_lossless_kernel<T, Tab, kVector> (kernels/lossless.cuh):
// W of type T, factors of type Tab (float32, or W's dtype), always the fp32 FMA sum (no tensor-core entries);
// kVector (16-byte accesses of W) or element-wise, as for LORA_MERGE_VARIANTS.
#define LORA_LOSSLESS_VARIANTS(X)        \
  X(float, float, true)                  \
  X(float, float, false)                 \
  X(__half, float, true)                 \
  X(__half, float, false)                \
  X(__half, __half, true)                \
  X(__half, __half, false)               \
  X(__nv_bfloat16, float, true)          \
  X(__nv_bfloat16, float, false)         \
  X(__nv_bfloat16, __nv_bfloat16, true)  \
  X(__nv_bfloat16, __nv_bfloat16, false)

// The batched (multi-adapter) forward kernels of one dtype T (kernels/batched.cuh): shrink_kernel<T, kSegment,
// kVector> and expand_kernel<T, kSegment, kVector, kEmbedding> for both kEmbedding values. kSegment: the
// segment variant (tiles of rows of one adapter group; tokens_per_index >= kSegmentMinTokens) or the decode
// variant (a row per CTA); kVector (16-byte accesses) or element-wise, as out's and b_slots' pointers and d
// allow (and x's pointer and k, for linear).
#define LORA_BATCHED_VARIANTS(X) \
  X(float, false, true)          \
  X(float, false, false)         \
  X(float, true, true)           \
  X(float, true, false)          \
  X(__half, false, true)         \
  X(__half, false, false)        \
  X(__half, true, true)          \
  X(__half, true, false)         \
  X(__nv_bfloat16, false, true)  \
  X(__nv_bfloat16, false, false) \
  X(__nv_bfloat16, true, true)   \
  X(__nv_bfloat16, true, false)
