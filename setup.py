"""Build lora_ext.

Without torch visible to the build (a plain `pip install .` runs in an isolated build environment) this
stops with instructions. With torch it builds the CPU simulator module lora_ext._sim (unless LORA_EXT_SIM=0)
and the CPU lossless pass lora_ext._cpu (g++ only),
and builds the CUDA kernels as lora_ext._C when torch has CUDA and nvcc is found.

Environment:
  LORA_EXT_CUDA=auto|1|0   build the CUDA extension: when possible (default), always (fail if not
                           possible), never
  LORA_EXT_SIM=1|0|only    build the SIMT simulator lora_ext._sim (default 1): the CPU tests of the kernels
                           need it; a GPU machine does not (bench/gpu_check.sh builds with 0: it is one large
                           translation unit, the longest compile of the build). `only`: the simulator alone
                           (scripts/setup.sh builds it so, beside the other modules)
  TORCH_CUDA_ARCH_LIST     GPU architectures, default "8.0;9.0"; each must be 8.0 or later
  MAX_JOBS                 parallel compile jobs (ninja)

Importing this file builds nothing (the build runs under `__main__`, as pip and `python setup.py` run it),
so that tests can call its functions.
"""
import glob
import os
import re
import shutil
import sys

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"

# The kernels need compute capability 8.0 or later, and a TORCH_CUDA_ARCH_LIST with an older architecture
# (one inherited from an environment built for older GPUs, say) is refused here, before anything compiles,
# rather than served by a slower path chosen at run time. Why: the host code selects the fp16/bf16 tensor-core
# (WMMA) paths and the bf16 conversions from the dtype alone, and pre-Ampere GPUs would need their own FMA
# variants of the shrink and merge kernels, a device query on every call's path and tests on hardware this
# project never runs on. Such GPUs are still served by the pure-torch backend (LORA_EXT_CUDA=0).
# csrc/kernels/common.cuh stops any other build for such an architecture with an #error.
MIN_CUDA_ARCH = (8, 0)

# torch.utils.cpp_extension's architecture names, as it expands them.
_NAMED_CUDA_ARCHES = {
    "kepler+tesla": "3.7",
    "kepler": "3.5+PTX",
    "maxwell+tegra": "5.3",
    "maxwell": "5.0;5.2+PTX",
    "pascal": "6.0;6.1+PTX",
    "volta+tegra": "7.2",
    "volta": "7.0+PTX",
    "turing": "7.5+PTX",
    "ampere+tegra": "8.7",
    "ampere": "8.0;8.6+PTX",
    "ada": "8.9+PTX",
    "hopper": "9.0+PTX",
}


def cuda_arch_list_error(arch_list):
    """The refusal for a TORCH_CUDA_ARCH_LIST value naming an architecture below MIN_CUDA_ARCH, or None.

    Entries are separated by ';', spaces or commas and spelled as torch takes them: "8.6", "8.0+PTX",
    "9.0a", "Ampere". Entries that are not architectures are left for torch to judge."""
    low, kept = [], []
    for entry in filter(None, re.split(r"[;,\s]+", arch_list.strip())):
        named = _NAMED_CUDA_ARCHES.get(entry.lower())
        for arch in (named.split(";") if named else [entry]):
            m = re.fullmatch(r"(\d+)\.(\d+)[a-z]?(\+PTX)?", arch.strip(), flags=re.IGNORECASE)
            if m is None:
                kept.append(arch)
                continue
            version = (int(m.group(1)), int(m.group(2)))
            shown = f"{entry} ({version[0]}.{version[1]})" if named else entry
            if version < MIN_CUDA_ARCH:
                low.append(f"{shown}, sm_{version[0]}{version[1]}")
            else:
                kept.append(arch)
    if not low:
        return None
    minimum = f"{MIN_CUDA_ARCH[0]}.{MIN_CUDA_ARCH[1]}"
    suggestion = ";".join(dict.fromkeys(kept)) or DEFAULT_CUDA_ARCH_LIST
    return (
        f"lora_ext: TORCH_CUDA_ARCH_LIST={arch_list!r} names {'; '.join(low)}, below compute capability "
        f"{minimum}. lora_ext's CUDA kernels need sm_80 or later (bf16, and fp16/bf16 tensor cores through "
        f"WMMA). Set TORCH_CUDA_ARCH_LIST to your GPUs' architectures from {minimum} up, e.g.\n\n"
        f"    TORCH_CUDA_ARCH_LIST=\"{suggestion}\" pip install --no-build-isolation .\n\n"
        "or build without the CUDA kernels (LORA_EXT_CUDA=0): CUDA tensors then use the pure-torch backend."
    )


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`, which gives /usr/local where nvcc is a wrapper in
    /usr/local/bin; prefer the toolkit's own directory."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    elif shutil.which("nvcc"):
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))


def _import_torch():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.stderr.write(
            "\nlora_ext needs PyTorch at build time, and this build cannot see it (pip builds in an isolated\n"
            "environment by default). Install torch first, then build against it:\n\n"
            "    pip install torch\n"
            "    pip install --no-build-isolation .\n\n"
        )
        sys.exit(1)
    return torch, cpp_extension


def _cuda_wanted(torch, cuda_home):
    mode = os.environ.get("LORA_EXT_CUDA", "auto").lower()
    if mode not in ("auto", "1", "0"):
        sys.exit(f"LORA_EXT_CUDA must be auto, 1 or 0, got {mode!r}")
    nvcc = cuda_home is not None and (
        shutil.which(os.path.join(cuda_home, "bin", "nvcc")) is not None
    )
    possible = torch.version.cuda is not None and nvcc
    if mode == "1" and not possible:
        sys.exit(
            "LORA_EXT_CUDA=1 but the CUDA extension cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc found={nvcc} (CUDA_HOME={cuda_home!r})"
        )
    return possible if mode == "auto" else mode == "1"


def _here():
    return os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, _here()) for p in glob.glob(os.path.join(_here(), pattern)))


def extensions(torch, cpp_extension):
    cuda_home = cpp_extension.CUDA_HOME
    include = [os.path.join(_here(), "csrc")]
    exts = []
    sim = os.environ.get("LORA_EXT_SIM", "1")
    if sim not in ("1", "0", "only"):
        sys.exit(f"LORA_EXT_SIM must be 1, 0 or only, got {sim!r}")
    sim_sources = _rel("csrc/sim/*.cpp") if sim != "0" else []
    if sim_sources:
        exts.append(
            cpp_extension.CppExtension(
                "lora_ext._sim",
                sim_sources,
                include_dirs=include + [os.path.join(cuda_home or "/usr/local/cuda", "include")],
                extra_compile_args=["-O2"],
            )
        )
    if sim == "only":
        return exts
    cpu_sources = _rel("csrc/cpu/*.cpp")
    if cpu_sources:
        # The CPU lossless pass (lora_ext/lossless_cpu.py). -ffp-contract=off keeps a*b+c unfused in the
        # AVX2/AVX-512 clones (bit-identity with the pure-torch reference); -fno-trapping-math lets the float16
        # loops vectorize without changing any rounding.
        exts.append(
            cpp_extension.CppExtension(
                "lora_ext._cpu",
                cpu_sources,
                extra_compile_args=["-O3", "-ffp-contract=off", "-fno-trapping-math"],
            )
        )
    cuda_sources = _rel("csrc/ops/*.cu") + _rel("csrc/bindings.cpp")
    wanted = _cuda_wanted(torch, cuda_home)
    if wanted and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        error = cuda_arch_list_error(os.environ["TORCH_CUDA_ARCH_LIST"])
        if error:
            sys.exit(error)
        exts.append(
            cpp_extension.CUDAExtension(
                "lora_ext._C",
                cuda_sources,
                include_dirs=include,
                extra_compile_args={
                    "cxx": ["-O3"],
                    "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
                },
            )
        )
    elif not wanted:
        print("lora_ext: building without CUDA kernels (pure-torch backend only)")
    return exts


def main():
    from setuptools import setup

    _find_cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME
    torch, cpp_extension = _import_torch()
    setup(ext_modules=extensions(torch, cpp_extension), cmdclass={"build_ext": cpp_extension.BuildExtension})


if __name__ == "__main__":
    main()
