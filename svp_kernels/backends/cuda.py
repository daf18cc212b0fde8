"""The ``cuda`` backend: fused CUDA C++ kernels of csrc/cuda (float32/64, bfloat16, float16 CUDA tensors)."""

from __future__ import annotations

import torch

from .. import _ops
from .compiled import (cosine_gram, epilogue, epilogue_with_grad, projection,  # noqa: F401
                       projection_backward, projection_value)  # (the backend interface)

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
