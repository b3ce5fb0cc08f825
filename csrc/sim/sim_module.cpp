// lora_ext._sim: the CUDA kernels run on CPU tensors through the SIMT simulator, with the same argument
// checks and kernel selection as lora_ext._C. For tests: it is slow, and says nothing about speed.
#include "sim/simt.h"  // first: see the note there

#include <torch/extension.h>

#include <limits>
#include <mutex>
#include <optional>
#include <string>

#include "ops/batched_host.h"
#include "ops/bindings_table.h"
#include "ops/forward_host.h"
#include "ops/merge_host.h"

namespace {

// The kernel variant the host code selected in the latest op call (empty when it launched nothing), for
// tests: last_variant().
struct LastVariant {
  std::mutex mu;
  std::string name;
};

LastVariant& last_variant_store() {
  static LastVariant v;
  return v;
}

void set_last_variant(std::string name) {
  LastVariant& v = last_variant_store();
  std::lock_guard<std::mutex> lock(v.mu);
  v.name = std::move(name);
}

std::string last_variant() {
  LastVariant& v = last_variant_store();
  std::lock_guard<std::mutex> lock(v.mu);
  return v.name;
}

struct SimLaunch {
  template <typename Kernel, typename Args>
  static void run(Kernel kernel, dim3 grid, dim3 block, size_t smem, const Args& args) {
    // Over 48 KB a CUDA launch opts in first (ops/cuda_launch.cuh); the simulator then allows what every
    // architecture lora_ext builds for does.
    if (smem > sim::kMaxDynamicShared)
      sim::launch_opted_in(grid, block, smem, kernel, args);
    else
      sim::launch(grid, block, smem, kernel, args);
  }

  // Persistent kernels get this many blocks: few, and odd, so that blocks walk several tiles each and the
  // tiles do not divide evenly among them (as on a GPU, where the count is blocks per SM x SMs).
  template <typename Kernel>
  static long long resident(Kernel, int, size_t) {
    return 3;
  }

  static void selected(std::string (*describe)()) { set_last_variant(describe()); }

  // The outputs the forward ops allocate start as NaN (ops/forward_host.h, poison_fresh): an element that no
  // kernel writes is NaN in the result (the base GEMM adds onto it), where a GPU's fresh memory could hold
  // anything, zeros included.
  static void poison(at::Tensor& out) {
    if (out.is_floating_point()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
};

// The poison hook must be seen by forward_host.h's detection, or the outputs would silently go unpoisoned.
static_assert(lora_ext::forward_host::HasPoison<SimLaunch>::value, "SimLaunch::poison is not detected");

// The simulator fills the split-K shrink as for a GPU of this many multiprocessors (an H100/H200), so that
// CI runs the same kernel selection as the GPU.
constexpr int kSimSmCount = 132;

template <typename F>
auto simulated(const char* op, F&& f) {
  pybind11::gil_scoped_release no_gil;
  set_last_variant("");
  try {
    return f();
  } catch (const sim::Error& e) {
    throw std::runtime_error(std::string(op) + ": " + e.what());
  }
}

template <bool kDelta>
void apply(const char* op, const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
           int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed) {
  simulated(op, [&] {
    lora_ext::merge_host::apply<SimLaunch, kDelta>(op, w, a, b, scale, num_blocks, block_ids, transposed,
                                                  c10::DeviceType::CPU);
  });
}

// The ops through the simulator, as bindings_table.h's Ops.
struct SimOps {
  static void merge_(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
                     int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed) {
    apply<false>("lora_ext._sim.merge_", w, a, b, scale, num_blocks, block_ids, transposed);
  }

  static void delta_weight_(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scale,
                            int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed) {
    apply<true>("lora_ext._sim.delta_weight_", out, a, b, scale, num_blocks, block_ids, transposed);
  }

  static void swap_(const at::Tensor& w, const at::Tensor& old_a, const at::Tensor& old_b, double old_scale,
                    const at::Tensor& new_a, const at::Tensor& new_b, double new_scale, int64_t num_blocks,
                    const std::vector<int64_t>& block_ids, bool transposed) {
    const char* op = "lora_ext._sim.swap_";
    simulated(op, [&] {
      lora_ext::merge_host::apply_swap<SimLaunch>(op, w, old_a, old_b, old_scale, new_a, new_b, new_scale,
                                                 num_blocks, block_ids, transposed, c10::DeviceType::CPU);
    });
  }

  static void merge_lossless_(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
                              int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed,
                              const at::Tensor& lnorm, const at::Tensor& rnorm, double gamma, const at::Tensor& codes,
                              const at::Tensor& exc_index, const at::Tensor& exc_bits, const at::Tensor& counter) {
    const char* op = "lora_ext._sim.merge_lossless_";
    simulated(op, [&] {
      lora_ext::merge_host::merge_lossless<SimLaunch>(op, w, a, b, scale, num_blocks, block_ids, transposed, lnorm,
                                                      rnorm, gamma, codes, exc_index, exc_bits, counter,
                                                      c10::DeviceType::CPU);
    });
  }

  static void unmerge_lossless_(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
                                int64_t num_blocks, const std::vector<int64_t>& block_ids, bool transposed,
                                const at::Tensor& codes, const at::Tensor& exc_index, const at::Tensor& exc_bits) {
    const char* op = "lora_ext._sim.unmerge_lossless_";
    simulated(op, [&] {
      lora_ext::merge_host::unmerge_lossless<SimLaunch>(op, w, a, b, scale, num_blocks, block_ids, transposed, codes,
                                                        exc_index, exc_bits, c10::DeviceType::CPU);
    });
  }

  static void swap_lossless_(const at::Tensor& w, const at::Tensor& old_a, const at::Tensor& old_b, double old_scale,
                             const at::Tensor& old_codes, const at::Tensor& old_exc_index,
                             const at::Tensor& old_exc_bits, const at::Tensor& new_a, const at::Tensor& new_b,
                             double new_scale, int64_t num_blocks, const std::vector<int64_t>& block_ids,
                             bool transposed, const at::Tensor& lnorm, const at::Tensor& rnorm, double gamma,
                             const at::Tensor& codes, const at::Tensor& exc_index, const at::Tensor& exc_bits,
                             const at::Tensor& counter) {
    const char* op = "lora_ext._sim.swap_lossless_";
    simulated(op, [&] {
      lora_ext::merge_host::swap_lossless<SimLaunch>(op, w, old_a, old_b, old_scale, old_codes, old_exc_index,
                                                     old_exc_bits, new_a, new_b, new_scale, num_blocks, block_ids,
                                                     transposed, lnorm, rnorm, gamma, codes, exc_index, exc_bits,
                                                     counter, c10::DeviceType::CPU);
    });
  }

  static at::Tensor linear(const at::Tensor& x, const at::Tensor& x_lora, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b,
                           double scale, int64_t num_blocks, const std::vector<int64_t>& block_ids,
                           bool fan_in_fan_out, const std::optional<at::Tensor>& scale_tensor) {
    const char* op = "lora_ext._sim.linear";
    return simulated(op, [&] {
      return lora_ext::forward_host::linear<SimLaunch>(op, x, x_lora, weight, bias, a, b, scale, num_blocks,
                                                       block_ids, fan_in_fan_out, scale_tensor, c10::DeviceType::CPU,
                                                       kSimSmCount);
    });
  }

  static at::Tensor embedding(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& a,
                              const at::Tensor& b, double scale, std::optional<int64_t> padding_idx,
                              const std::optional<at::Tensor>& scale_tensor) {
    const char* op = "lora_ext._sim.embedding";
    return simulated(op, [&] {
      return lora_ext::forward_host::embedding<SimLaunch>(op, ids, weight, a, b, scale, padding_idx, scale_tensor,
                                                          c10::DeviceType::CPU);
    });
  }

  static void batched_linear_(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a_slots,
                              const at::Tensor& b_slots, const at::Tensor& scales, const at::Tensor& index,
                              int64_t tokens_per_index) {
    const char* op = "lora_ext._sim.batched_linear_";
    simulated(op, [&] {
      lora_ext::batched_host::linear<SimLaunch>(op, out, x, a_slots, b_slots, scales, index, tokens_per_index,
                                                c10::DeviceType::CPU);
    });
  }

  static void batched_embedding_(const at::Tensor& out, const at::Tensor& ids, const at::Tensor& a_slots,
                                 const at::Tensor& b_slots, const at::Tensor& scales, const at::Tensor& index,
                                 int64_t tokens_per_index) {
    const char* op = "lora_ext._sim.batched_embedding_";
    simulated(op, [&] {
      lora_ext::batched_host::embedding<SimLaunch>(op, out, ids, a_slots, b_slots, scales, index, tokens_per_index,
                                                   c10::DeviceType::CPU);
    });
  }
};

void set_schedule(std::optional<int64_t> seed) {
  TORCH_CHECK_VALUE(!seed || *seed >= 0, "set_schedule: seed must be None or >= 0, got ", *seed);
  sim::options().seed = seed ? *seed : -1;
}

void set_workers(int64_t n) {
  TORCH_CHECK_VALUE(n >= 0, "set_workers: n must be >= 0 (0: one per core), got ", n);
  sim::options().workers = (int)n;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "lora_ext's CUDA kernels on CPU tensors, through the SIMT simulator (for tests)";
  lora_ext::bindings::define_ops<SimOps>(m);
  m.def("set_schedule", &set_schedule,
        "None: threads run in index order between barriers; an int: a fresh shuffled order per phase, seeded",
        py::arg("seed"));
  m.def("set_workers", &set_workers, "OS threads running blocks (0: one per core)", py::arg("n"));
  m.def("last_variant", &last_variant,
        "The kernel variant the host code selected in the latest op call, e.g. "
        "'forward<Float, factors=Float, tensor_core=0, vector=1>', 'merge<W=Half, factors=Half, tensor_core=1, vector=0>' or "
        "'batched<BFloat16, segment=1, vector=1>'; "
        "'' when that call launched no kernel");
}
