"""Builds the svp_kernels._C extension; the package metadata lives in pyproject.toml.

Always compiled: the C++ CPU kernels (csrc/bindings.cpp, csrc/cpu/*.cpp). The CUDA kernels
(csrc/bindings_cuda.cpp, csrc/cuda/*.cu) join them when torch is a CUDA build and a CUDA toolkit is found
(torch.utils.cpp_extension.CUDA_HOME, with its include/cuda_runtime_api.h); no GPU needs to be visible at
build time.

Environment knobs:
    SVP_KERNELS_SKIP_EXT=1     build no extension at all (a pure-Python install: reference/Triton backends)
    SVP_KERNELS_FORCE_CUDA=1   fail the build, instead of building CPU kernels only, when the CUDA kernels
                               cannot be built (no CUDA build of torch or no toolkit)
    TORCH_CUDA_ARCH_LIST=9.0   build the CUDA kernels for these architectures only (torch's own syntax, e.g.
                               "8.0;9.0" or "9.0a"); unset: sm_80 and sm_90
    MAX_JOBS=N                 parallel compile jobs (honoured by torch's BuildExtension)
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def relative_sources(*patterns: str) -> list[str]:
    """Sorted source paths relative to the repository root (setuptools wants relative paths)."""
    found = []
    for pattern in patterns:
        found += glob.glob(os.path.join(ROOT, pattern))
    return sorted(os.path.relpath(path, ROOT) for path in found)


def cuda_sources(torch) -> list[str]:
    """The CUDA sources to compile, or [] when the CUDA kernels are not built here."""
    from torch.utils.cpp_extension import CUDA_HOME

    forced = env_flag("SVP_KERNELS_FORCE_CUDA")
    # torch guesses CUDA_HOME from any nvcc on the PATH (a wrapper script in /usr/local/bin gives /usr/local):
    # a toolkit counts only when its headers are there, else the CPU kernels are built alone
    headers = CUDA_HOME is not None and os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h"))
    if torch.version.cuda is None or not headers:
        if forced:
            raise RuntimeError(
                "SVP_KERNELS_FORCE_CUDA=1 needs a CUDA build of torch and a CUDA toolkit "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}, "
                f"{'with' if headers else 'without'} include/cuda_runtime_api.h); set CUDA_HOME to the toolkit"
            )
        if torch.version.cuda is not None:
            print(f"svp_kernels: building the CPU kernels only: no CUDA toolkit with headers at CUDA_HOME={CUDA_HOME} "
                  "(set CUDA_HOME, or SVP_KERNELS_FORCE_CUDA=1 to make this an error)", file=sys.stderr)
        return []
    return relative_sources("csrc/bindings_cuda.cpp", "csrc/cuda/*.cu")


def nvcc_arch_flags() -> list[str]:
    """-gencode flags for sm_80 and sm_90, or [] when TORCH_CUDA_ARCH_LIST is set.

    torch's CUDAExtension adds the -gencode flags of TORCH_CUDA_ARCH_LIST only when the extension's own
    nvcc flags name no architecture, so leaving ours out is what makes that variable choose the targets.
    """
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return []
    return ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def extensions() -> tuple[list, dict]:
    if env_flag("SVP_KERNELS_SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # No -march: hot loops are multi-versioned in the source (csrc/cpu/simd.h). OpenMP backs at::parallel_for.
    # No -std either: torch's BuildExtension adds the standard its headers need (C++20 since torch 2.10);
    # the sources themselves are C++17.
    # -fno-math-errno: the kernels never read errno, and without it sqrt cannot be vectorised.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-fno-math-errno", "-Wno-psabi"] + openmp
    sources = relative_sources("csrc/bindings.cpp", "csrc/autograd.cpp", "csrc/cpu/*.cpp")
    options = dict(
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")],
        extra_link_args=openmp,
    )
    gpu_sources = cuda_sources(torch)
    if gpu_sources:
        # No --use_fast_math: the implicit R needs accurate log/cos to agree with the other backends.
        nvcc_flags = ["-O3", "-std=c++17", *nvcc_arch_flags()]
        extension = CUDAExtension(
            "svp_kernels._C",
            sources + gpu_sources,
            define_macros=[("SVP_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            **options,
        )
    else:
        extension = CppExtension("svp_kernels._C", sources, extra_compile_args={"cxx": cxx_flags}, **options)
    return [extension], {"build_ext": BuildExtension}


if __name__ == "__main__":  # also under pip: setuptools runs this file as __main__
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
