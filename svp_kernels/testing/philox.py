"""The raw Philox4x32-10 words of docs/design.md §3 from each implementation, for comparing them bit for bit."""

from __future__ import annotations

import torch

from .. import _ops, backends
from ..philox import philox4x32_10


def philox_words(seed: int, offsets: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """(N, 4) int64 words (values in [0, 2³²)) of Philox(key = seed, counter = n) for the N offsets n ≥ 0.

    backend: "reference" (svp_kernels.philox, PyTorch ops), "cpu" (the C++ of csrc/include/svp/philox.h, which
    the CPU and CUDA kernels share; contiguous offsets only) or "triton" (a Triton kernel on offsets' device).
    """
    offsets = offsets.to(torch.int64).reshape(-1)
    if backend == "reference":
        return torch.stack(philox4x32_10(seed, offsets), dim=1)
    if backend == "cpu":
        if not _ops.extension_loaded():
            raise RuntimeError(f"philox_words(backend='cpu') needs svp_kernels._C: {_ops.EXTENSION_ERROR!r}")
        start = int(offsets[0]) if len(offsets) else 0
        if not torch.equal(offsets.cpu(), torch.arange(start, start + len(offsets))):
            raise ValueError("philox_words(backend='cpu') takes contiguous offsets start, start + 1, …")
        return _ops._C.philox_words(seed, len(offsets), start)
    if backend == "triton":
        return torch.stack(backends.load("triton").load_ops().philox_words(seed, offsets), dim=1)
    raise ValueError(f"backend must be 'reference', 'cpu' or 'triton', got {backend!r}")
