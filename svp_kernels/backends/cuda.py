"""The ``cuda`` backend: fused CUDA C++ kernels of csrc/cuda (float32/64, bfloat16, float16 CUDA tensors).

The testing and diagnostic hook over the kernels' launch plans is svp_kernels.testing.launch_plan.
"""

from __future__ import annotations

import torch

from .. import _ops
from .extension_ops import (PROJECTION_PATHS, cosine_gram, dropout_projection, epilogue,  # noqa: F401
                            epilogue_with_grad, fused_local_loss, projection, projection_backward,
                            projection_value)

NAME = "cuda"


def is_available() -> bool:
    return _ops.extension_has_cuda() and torch.cuda.is_available()


def unavailable_reason():
    """None when available, else why not."""
    if not _ops.extension_loaded():
        return f"svp_kernels._C did not load: {_ops.EXTENSION_ERROR!r}"
    if not _ops.extension_has_cuda():
        return "svp_kernels._C was built without the CUDA kernels"
    return None if torch.cuda.is_available() else "no CUDA device"


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def __getattr__(name):
    """LAUNCH_PLAN_FIELDS and parse_launch_plan moved to svp_kernels.testing; the CUDA emulator
    (tools/emulate_cuda/run_emulation.py) still imports them from this module."""
    if name in ("LAUNCH_PLAN_FIELDS", "parse_launch_plan"):
        from ..testing import launch_plans

        return getattr(launch_plans, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
