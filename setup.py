"""Build cl_fast._C from csrc/ with torch.utils.cpp_extension (ninja).

CPU sources are always built. CUDA sources are added only where the installed torch
has CUDA and nvcc is found, so the same setup.py works on a CPU-only laptop and on a GPU node.
Build with `pip install --no-build-isolation -e .` so the build uses the torch already installed.
"""
import glob
import os
import platform
import shutil

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _with_cuda():
    if os.environ.get("CL_FAST_NO_CUDA") == "1":
        return False
    nvcc = shutil.which("nvcc") or (
        os.environ.get("CUDA_HOME") and os.path.exists(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    )
    return torch.version.cuda is not None and bool(nvcc)


def _cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST as given; else the visible GPUs' (torch's default); else Ampere + Hopper."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        return None  # torch.utils.cpp_extension reads the devices
    return "8.0;9.0a"


def _extension():
    sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")  # schemas + checks, then the CPU kernels
    # x86-64: AVX2 + FMA (csrc/cpu/cpu_vec.h picks at::vec's AVX2 path); any other CPU (ARM, Apple silicon): no
    # x86 flags, at::vec's portable path; CL_FAST_NATIVE=1: everything the build machine has.
    native, x86_64 = os.environ.get("CL_FAST_NATIVE") == "1", platform.machine().lower() in ("x86_64", "amd64")
    cxx = ["-O3", "-std=c++17", "-fopenmp"] + (["-march=native"] if native else ["-mavx2", "-mfma"] if x86_64 else [])
    if _with_cuda():
        # CUDA kernels: csrc/cuda/*.cu (kernels with hand-written mma.sync / cp.async PTX, no CUTLASS
        # needed) and their torch registrations. MAX_JOBS sets ninja's parallel compiles; nvcc
        # --threads compiles the arches of one file in parallel.
        arch_list = _cuda_arch_list()
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        sources += _sources("csrc/cuda/*.cu")
        nvcc = ["-O3", "-std=c++20", "-lineinfo", "--threads", os.environ.get("NVCC_THREADS", "2"),
                "-diag-suppress", "3306,20013,20015"]
        return CUDAExtension(
            "cl_fast._C",
            sources,
            define_macros=[("CL_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    return CppExtension("cl_fast._C", sources, extra_compile_args={"cxx": cxx})


setup(
    name="cl_fast",
    version="0.1.0",
    description="Fused, memory-lean contrastive losses (InfoNCE family) for PyTorch",
    packages=find_packages(include=["cl_fast", "cl_fast.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
