"""The ``cuda`` backend: fused CUDA C++ kernels of csrc/cuda (float32/64, bfloat16, float16 CUDA tensors)."""

from __future__ import annotations

import torch

from .. import _ops
from .compiled import cosine_gram, epilogue, projection  # noqa: F401  (the backend interface)

NAME = "cuda"


def is_available() -> bool:
    return _ops.extension_has_cuda() and torch.cuda.is_available()


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
