"""Builds the svp_kernels._C extension; the package metadata lives in pyproject.toml.

Always compiled: the C++ CPU kernels (csrc/bindings.cpp, csrc/cpu/*.cpp). The CUDA kernels
(csrc/bindings_cuda.cpp, csrc/cuda/*.cu) join them when torch is a CUDA build and a CUDA toolkit is found;
no GPU needs to be visible at build time.

The toolkit is the first of $CUDA_HOME, $CUDA_PATH, the toolkit of the `nvcc` on PATH (followed through
links and through a wrapper script that execs another nvcc), /usr/local/cuda and /usr/local/cuda-* that
holds both bin/nvcc and include/cuda_runtime_api.h. torch's own guess (the folder above the first `nvcc` on
PATH) is wrong when that nvcc is a wrapper outside the toolkit, so setup.py sets CUDA_HOME for torch before
torch looks. With a CUDA build of torch and an nvcc on PATH but no such toolkit, the build fails and says to
set CUDA_HOME.

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
import re
import shutil
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


def is_cuda_toolkit(folder) -> bool:
    """Whether `folder` is a CUDA toolkit: its own nvcc and the runtime's headers."""
    return bool(folder) and os.path.isfile(os.path.join(folder, "bin", "nvcc")) and os.path.isfile(
        os.path.join(folder, "include", "cuda_runtime_api.h"))


def nvcc_toolkits(nvcc: str) -> list[str]:
    """Toolkit folders that an `nvcc` on PATH points to: through symbolic links, and through a wrapper script
    that runs another nvcc by its absolute path (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`)."""
    real = os.path.realpath(nvcc)
    found = [os.path.dirname(os.path.dirname(real))]
    try:
        with open(real, "rb") as script:
            head = script.read(4096)
    except OSError:
        return found
    if head.startswith(b"#!"):
        for target in re.findall(rb"(/[^\s\"']*/bin/nvcc)\b", head):
            found.append(os.path.dirname(os.path.dirname(os.path.realpath(target.decode()))))
    return found


def find_cuda_toolkit() -> tuple[str | None, list[str]]:
    """(the CUDA toolkit folder or None, the folders looked at), in the order of the module docstring."""
    looked = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", "")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        looked += nvcc_toolkits(nvcc)
    looked += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    looked = [folder for folder in dict.fromkeys(looked) if folder]
    return next((folder for folder in looked if is_cuda_toolkit(folder)), None), looked


def point_torch_at_toolkit() -> None:
    """Set CUDA_HOME to the toolkit find_cuda_toolkit finds (before torch.utils.cpp_extension reads it), unless
    CUDA_HOME already names a toolkit. A CUDA_HOME that is set but is no toolkit fails the build."""
    given = os.environ.get("CUDA_HOME", "")
    if given and not is_cuda_toolkit(given):
        raise RuntimeError(f"CUDA_HOME={given} is not a CUDA toolkit (no bin/nvcc and include/cuda_runtime_api.h "
                           "there): set CUDA_HOME to the toolkit's folder, e.g. /usr/local/cuda-13.0")
    toolkit, _ = find_cuda_toolkit()
    if toolkit is not None:
        os.environ["CUDA_HOME"] = toolkit


def cuda_sources(torch) -> list[str]:
    """The CUDA sources to compile, or [] when the CUDA kernels are not built here."""
    from torch.utils.cpp_extension import CUDA_HOME

    forced = env_flag("SVP_KERNELS_FORCE_CUDA")
    if torch.version.cuda is None:
        if forced:
            raise RuntimeError("SVP_KERNELS_FORCE_CUDA=1 needs a CUDA build of torch "
                               f"(this torch is {torch.__version__})")
        return []
    if not is_cuda_toolkit(CUDA_HOME):
        _, looked = find_cuda_toolkit()
        if forced or shutil.which("nvcc"):
            raise RuntimeError(
                "torch is a CUDA build but no CUDA toolkit (bin/nvcc and include/cuda_runtime_api.h) was found in "
                f"{', '.join(looked) or 'any usual place'}: set CUDA_HOME to the toolkit's folder "
                "(or SVP_KERNELS_SKIP_EXT=1 to build no extension)"
            )
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
    point_torch_at_toolkit()
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # No -march: hot loops are multi-versioned in the source (csrc/cpu/simd.h). OpenMP backs at::parallel_for.
    # No -std either: torch's BuildExtension adds the standard its headers need (C++20 since torch 2.10);
    # the sources themselves are C++17.
    # -fno-math-errno: the kernels never read errno, and without it sqrt cannot be vectorised.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-fno-math-errno", "-Wno-psabi"] + openmp
    sources = relative_sources("csrc/bindings.cpp", "csrc/autograd.cpp", "csrc/projection_gemm.cpp", "csrc/cpu/*.cpp")
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
