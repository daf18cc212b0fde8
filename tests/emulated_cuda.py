"""The CUDA kernels of csrc/cuda built for the CPU emulator (tools/emulate_cuda), once per test session.

`emulator()` returns run_emulation.Emulated over a library built into a temporary folder, or skips the calling
test when no CUDA toolkit headers (cuda_runtime.h) are found: the emulator compiles the .cu files with g++
against them, no GPU or nvcc run involved.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EMULATOR = {}


def _cuda_headers() -> bool:
    folders = [os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "include"), "/usr/local/cuda/include"]
    return any(os.path.exists(os.path.join(folder, "cuda_runtime.h")) for folder in folders)


def emulator():
    """The emulated launchers (built on first use); skips without the CUDA headers."""
    if not _cuda_headers():
        pytest.skip("the CUDA emulator needs the CUDA toolkit's headers (set CUDA_HOME)")
    if "emu" not in _EMULATOR:
        sys.path.insert(0, os.path.join(ROOT, "tools", "emulate_cuda"))
        import run_emulation

        folder = tempfile.mkdtemp(prefix="svp_emu_tests_")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _EMULATOR["emu"] = run_emulation.Emulated(run_emulation.build(folder))
    return _EMULATOR["emu"]
