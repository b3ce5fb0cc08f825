"""Build lora_ext.

Without torch visible to the build (a plain `pip install .` runs in an isolated build environment) this
stops with instructions. With torch it always builds the CPU simulator module lora_ext._sim (g++ only),
and builds the CUDA kernels as lora_ext._C when torch has CUDA and nvcc is found.

Environment:
  LORA_EXT_CUDA=auto|1|0   build the CUDA extension: when possible (default), always (fail if not
                           possible), never
  TORCH_CUDA_ARCH_LIST     GPU architectures, default "8.0;9.0"
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys

from setuptools import setup


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`, which gives /usr/local where nvcc is a wrapper in
    /usr/local/bin; prefer the toolkit's own directory."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    elif shutil.which("nvcc"):
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))


_find_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
except ImportError:
    sys.stderr.write(
        "\nlora_ext needs PyTorch at build time, and this build cannot see it (pip builds in an isolated\n"
        "environment by default). Install torch first, then build against it:\n\n"
        "    pip install torch\n"
        "    pip install --no-build-isolation .\n\n"
    )
    sys.exit(1)

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted():
    mode = os.environ.get("LORA_EXT_CUDA", "auto").lower()
    if mode not in ("auto", "1", "0"):
        sys.exit(f"LORA_EXT_CUDA must be auto, 1 or 0, got {mode!r}")
    nvcc = CUDA_HOME is not None and (
        shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    )
    possible = torch.version.cuda is not None and nvcc
    if mode == "1" and not possible:
        sys.exit(
            "LORA_EXT_CUDA=1 but the CUDA extension cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc found={nvcc} (CUDA_HOME={CUDA_HOME!r})"
        )
    return possible if mode == "auto" else mode == "1"


def _rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extensions():
    include = [os.path.join(HERE, "csrc")]
    exts = []
    sim_sources = _rel("csrc/sim/*.cpp")
    if sim_sources:
        exts.append(
            CppExtension(
                "lora_ext._sim",
                sim_sources,
                include_dirs=include + [os.path.join(CUDA_HOME or "/usr/local/cuda", "include")],
                extra_compile_args=["-O2"],
            )
        )
    cuda_sources = _rel("csrc/ops/*.cu") + _rel("csrc/bindings.cpp")
    if _cuda_wanted() and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        exts.append(
            CUDAExtension(
                "lora_ext._C",
                cuda_sources,
                include_dirs=include,
                extra_compile_args={
                    "cxx": ["-O3"],
                    "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
                },
            )
        )
    elif not _cuda_wanted():
        print("lora_ext: building without CUDA kernels (pure-torch backend only)")
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension})
