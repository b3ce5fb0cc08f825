// How the CUDA launchers start a kernel chosen by the shared host code (merge_host.h, forward_host.h):
// on the current stream, with the launch checked, on the device of the tensor the op is about. The
// simulator module has its own launch policy.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers

#include <string>

namespace lora_ext {

struct CudaLaunch {
  template <typename Kernel, typename Args>
  static void run(Kernel kernel, dim3 grid, dim3 block, size_t smem, const Args& args) {
    kernel<<<grid, block, smem, c10::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // The host code reports each kernel variant it selects (a function describing it); the simulator keeps the
  // description for tests (lora_ext._sim.last_variant()), a GPU launch has no use for it.
  static void selected(std::string (*)()) {}
};

// Runs f() on t's device, after checking that t (called `name` in messages) is a CUDA tensor: the CUDA
// launchers' counterpart of the simulator module's simulated().
template <typename F>
auto on_cuda(const char* op, const char* name, const at::Tensor& t, F&& f) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  const c10::cuda::CUDAGuard guard(t.device());
  return f();
}

}  // namespace lora_ext
