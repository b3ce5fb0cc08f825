// Mixed batches on the CPU (lora_ext.ops.batched_linear_ / batched_embedding_; reference.py has their
// definition in pure torch): for each row m whose group has a slot i = index[m / tokens] >= 0,
//   t = x[m] @ a[i]            (shrink: a[i] is the adapter's A^T, (k, R), fp32 accumulation)
//   out[m] = T(out[m] + scales[i] * t @ b[i])   (expand: b[i] is B^T, (R, d); one rounding per element)
// reading each row's slot where it lies: no gathered copies of the factors, one pass over the rows, parallel
// over rows. The loops are compiled for AVX-512 / AVX2 too (target_clones) and vectorize along R (shrink)
// and d (expand). Arguments arrive checked by lora_ext/ops.py; slot and id ranges are checked here.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LORA_CLONES
#endif

// t[0:R] = sum_k x[k] * a[k, 0:R]
template <typename T>
LORA_CLONES void shrink_row(const T* __restrict x, const T* __restrict a, int64_t k, int64_t R,
                            float* __restrict t) {
  for (int64_t j = 0; j < R; ++j) t[j] = 0.f;
  for (int64_t c = 0; c < k; ++c) {
    const float xv = static_cast<float>(x[c]);
    const T* __restrict row = a + c * R;
    for (int64_t j = 0; j < R; ++j) t[j] += xv * static_cast<float>(row[j]);
  }
}

// out[0:d] = T(out + sum_j t[j] * b[j, 0:d]), acc the fp32 staging row
template <typename T>
LORA_CLONES void expand_row(const float* __restrict t, const T* __restrict b, int64_t R, int64_t d,
                            float* __restrict acc, T* __restrict out) {
  for (int64_t c = 0; c < d; ++c) acc[c] = 0.f;
  for (int64_t j = 0; j < R; ++j) {
    const float tv = t[j];
    if (tv == 0.f) continue;  // zero-padded ranks
    const T* __restrict row = b + j * d;
    for (int64_t c = 0; c < d; ++c) acc[c] += tv * static_cast<float>(row[c]);
  }
  for (int64_t c = 0; c < d; ++c) out[c] = static_cast<T>(static_cast<float>(out[c]) + acc[c]);
}

template <typename T, bool kEmbedding>
void run(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
         const at::Tensor& scales, const at::Tensor& index, int64_t tokens) {
  const int64_t M = out.size(0), d = out.size(1), S = a.size(0), k = a.size(1), R = a.size(2);
  T* op = out.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  const float* sp = scales.data_ptr<float>();
  const int32_t* ip = index.data_ptr<int32_t>();
  const int64_t groups = index.numel();
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK_INDEX(ip[g] >= -1 && ip[g] < S, "index[", g, "] = ", ip[g], " is not a slot (", S, " slots; -1: none)");
  }
  const int64_t* ids = nullptr;
  const T* xp = nullptr;
  at::Tensor ids64;
  if constexpr (kEmbedding) {
    ids64 = x.to(at::kLong).contiguous();
    ids = ids64.data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m) {
      TORCH_CHECK_INDEX(ids[m] >= 0 && ids[m] < k, "ids[", m, "] = ", ids[m], " is out of range for ", k,
                  " embeddings");
    }
  } else {
    xp = x.data_ptr<T>();
  }
  const int64_t work = (kEmbedding ? R : k * R) + R * d;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work));
  at::parallel_for(0, M, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> t(R), acc(d);
    for (int64_t m = lo; m < hi; ++m) {
      const int32_t s = ip[m / tokens];
      if (s < 0) continue;
      if constexpr (kEmbedding) {
        const T* row = ap + (s * k + ids[m]) * R;
        for (int64_t j = 0; j < R; ++j) t[j] = static_cast<float>(row[j]);
      } else {
        shrink_row<T>(xp + m * k, ap + s * k * R, k, R, t.data());
      }
      const float scale = sp[s];
      for (int64_t j = 0; j < R; ++j) t[j] *= scale;
      expand_row<T>(t.data(), bp + s * R * d, R, d, acc.data(), op + m * d);
    }
  });
}

template <bool kEmbedding>
void dispatch(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
              const at::Tensor& scales, const at::Tensor& index, int64_t tokens) {
  // every argument checked (lora_ext.ops calls this first and words a refusal with its own checks)
  TORCH_CHECK_VALUE(out.dim() == 2 && a.dim() == 3 && b.dim() == 3 && index.dim() == 1 && scales.dim() == 1,
                    "batched CPU loops: out 2-D, a_slots and b_slots 3-D, index and scales 1-D");
  TORCH_CHECK_VALUE(kEmbedding ? (x.dim() == 1 && (x.scalar_type() == at::kLong || x.scalar_type() == at::kInt))
                               : (x.dim() == 2 && x.scalar_type() == out.scalar_type() && x.size(1) == a.size(1)),
                    "batched CPU loops: x (ids) does not fit");
  TORCH_CHECK_VALUE(x.size(0) == out.size(0) && a.scalar_type() == out.scalar_type() &&
                        b.scalar_type() == out.scalar_type() && b.size(0) == a.size(0) && b.size(1) == a.size(2) &&
                        b.size(2) == out.size(1),
                    "batched CPU loops: slot shapes or dtypes do not fit");
  TORCH_CHECK_VALUE(scales.scalar_type() == at::kFloat && scales.numel() == a.size(0) &&
                        index.scalar_type() == at::kInt && tokens >= 1 && index.numel() * tokens == out.size(0),
                    "batched CPU loops: scales, index or tokens_per_index do not fit");
  TORCH_CHECK_VALUE(out.is_contiguous() && a.is_contiguous() && b.is_contiguous() && x.is_contiguous() &&
                        scales.is_contiguous() && index.is_contiguous() && out.device().is_cpu() &&
                        x.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu() &&
                        scales.device().is_cpu() && index.device().is_cpu(),
                    "batched CPU loops take contiguous CPU tensors");
  switch (out.scalar_type()) {
    case at::kFloat: return run<float, kEmbedding>(out, x, a, b, scales, index, tokens);
    case at::kBFloat16: return run<at::BFloat16, kEmbedding>(out, x, a, b, scales, index, tokens);
    case at::kHalf: return run<at::Half, kEmbedding>(out, x, a, b, scales, index, tokens);
    default: TORCH_CHECK(false, "batched CPU loops take float32, bfloat16 or float16, got ", out.scalar_type());
  }
}

}  // namespace

namespace lora_ext_cpu {

void register_batched(pybind11::module_& m) {
  m.def("batched_linear_", &dispatch<false>,
        "out[m] += scales[i] * (x[m] @ a[i]) @ b[i], i = index[m // tokens] >= 0 (lora_ext.ops.batched_linear_)");
  m.def("batched_embedding_", &dispatch<true>,
        "out[m] += scales[i] * a[i, ids[m]] @ b[i], i = index[m // tokens] >= 0 (lora_ext.ops.batched_embedding_)");
}

}  // namespace lora_ext_cpu
