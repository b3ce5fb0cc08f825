// How the CUDA launchers start a kernel chosen by the shared host code (merge_host.h, forward_host.h):
// on the current stream, with the launch checked, on the device of the tensor the op is about. The
// simulator module has its own launch policy.
#pragma once

#include "check_msg.h"
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers

#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

namespace lora_ext {

// Multiprocessors of the current device, read once per device (the forward's split-K and the persistent merge
// kernels fill them).
inline int sm_count() {
  static int counts[64] = {};
  const int dev = c10::cuda::current_device();
  if (dev < 0 || dev >= 64) return 132;
  if (!counts[dev]) C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[dev], cudaDevAttrMultiProcessorCount, dev));
  return counts[dev];
}

struct CudaLaunch {
  // Above 48 KB of dynamic shared memory a kernel must opt in first (the merge kernels' prefetch buffers), once
  // per device (opt_in remembers).
  template <typename Kernel, typename Args>
  static void run(Kernel kernel, dim3 grid, dim3 block, size_t smem, const Args& args) {
    if (smem > kDefaultShared) opt_in(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<grid, block, smem, c10::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // How many blocks of `kernel` fit on the current device at once (blocks per SM x SMs), for persistent
  // kernels; read once per kernel, device and shared-memory size.
  template <typename Kernel>
  static long long resident(Kernel kernel, int threads, size_t smem) {
    const void* fn = reinterpret_cast<const void*>(kernel);
    const int dev = c10::cuda::current_device();
    static std::mutex mu;
    static std::map<std::tuple<const void*, int, size_t>, long long> cache;
    const auto key = std::make_tuple(fn, dev, smem);
    {
      std::lock_guard<std::mutex> lock(mu);
      const auto it = cache.find(key);
      if (it != cache.end()) return it->second;
    }
    if (smem > kDefaultShared) opt_in(fn, smem);
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, threads, smem));
    LORA_CHECK(per_sm > 0, "lora_ext: a kernel needing ", smem, " bytes of shared memory and ", threads,
               " threads per block does not fit on CUDA device ", dev);
    const long long n = (long long)per_sm * sm_count();
    std::lock_guard<std::mutex> lock(mu);
    cache[key] = n;
    return n;
  }

  // The host code reports each kernel variant it selects (a function describing it); the simulator keeps the
  // description for tests (lora_ext._sim.last_variant()), a GPU launch has no use for it.
  static void selected(std::string (*)()) {}

 private:
  static constexpr size_t kDefaultShared = 48 * 1024;
  static void opt_in(const void* fn, size_t smem) {
    static std::mutex mu;
    static std::map<std::pair<const void*, int>, size_t> done;  // (kernel, device) -> the size opted into
    const auto key = std::make_pair(fn, (int)c10::cuda::current_device());
    std::lock_guard<std::mutex> lock(mu);
    size_t& have = done[key];
    if (have >= smem) return;
    C10_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    have = smem;
  }
};

// Runs f() on t's device, after checking that t (called `name` in messages) is a CUDA tensor: the CUDA
// launchers' counterpart of the simulator module's simulated().
template <typename F>
auto on_cuda(const char* op, const char* name, const at::Tensor& t, F&& f) {
  LORA_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  const c10::cuda::CUDAGuard guard(t.device());
  return f();
}

}  // namespace lora_ext
