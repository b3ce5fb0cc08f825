// How the CUDA launchers start a kernel chosen by the shared host code (merge_host.h, forward_host.h):
// on the current stream, with the launch checked. The simulator module has its own launch policy.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers

namespace lora_ext {

struct CudaLaunch {
  template <typename Kernel, typename Args>
  static void run(Kernel kernel, dim3 grid, dim3 block, size_t smem, const Args& args) {
    kernel<<<grid, block, smem, c10::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace lora_ext
