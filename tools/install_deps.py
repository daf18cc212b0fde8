"""Installs what `make test` / `make demo` need into the current Python, only what is missing: the core
dependencies (torch, numpy) and the extras [train], [triton] and [test] of pyproject.toml.

torch is installed only when none is importable, and then pinned (a CPU build on machines without CUDA);
an already-installed torch (say a CUDA build) is never replaced.
"""

import importlib.util
import subprocess
import sys

TORCH_PIN = "torch==2.13.0"
# import name -> pip requirement
REQUIREMENTS = {
    "numpy": "numpy",  # core
    "sklearn": "scikit-learn",  # [train]
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "PIL": "pillow",
    "triton": "triton>=3.5",  # [triton]: the oldest the backend supports (svp_kernels/backends/triton)
    "pytest": "pytest",  # [test]
    "pytest_benchmark": "pytest-benchmark",
    "ninja": "ninja",
    "ruff": "ruff",  # the linter of `make lint` (pyproject.toml [tool.ruff])
}


def main() -> int:
    missing = [] if importlib.util.find_spec("torch") else [TORCH_PIN]
    missing += [requirement for module, requirement in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]
    import setuptools  # noqa: F401  (editable installs need setuptools >= 64)

    if int(setuptools.__version__.split(".")[0]) < 64:
        missing.append("setuptools>=64")
    if not missing:
        return 0
    print("installing:", " ".join(missing), flush=True)
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", *missing])


if __name__ == "__main__":
    sys.exit(main())
