"""The ``cpu`` backend: fused C++ kernels of csrc/cpu (float32, float64 CPU tensors)."""

from __future__ import annotations

import torch

from .. import _ops
from .extension_ops import (PROJECTION_PATHS, cosine_gram, dropout_projection, epilogue,  # noqa: F401
                            epilogue_with_grad, fused_local_loss, projection, projection_backward,
                            projection_value)

NAME = "cpu"


def is_available() -> bool:
    return _ops.extension_loaded()


def unavailable_reason():
    """None when available, else why not."""
    return None if is_available() else f"svp_kernels._C did not load: {_ops.EXTENSION_ERROR!r}"


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.float64)
