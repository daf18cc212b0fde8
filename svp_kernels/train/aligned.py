"""64-byte alignment of every tensor the trainer hands to compute.

BLAS libraries pick code paths by the address of their operands: MKL's GEMM kernels on some CPUs (AMD Zen 4
with AVX-512 among them) sum a dot product in another order when a row starts off a 64-byte boundary, and
cuBLAS picks kernels by 16-byte alignment. The same GEMM on the same numbers then differs in the last bits
depending on where its operands live. Fresh allocations start on a 64-byte boundary (torch's CPU allocator
aligns to 64 bytes, the CUDA caching allocator to 512), so a computation that sees only fresh tensors or views
at 64-byte offsets repeats bit for bit whichever process runs it (docs/design.md §7). Everything the trainer
receives from a link, a share of a batch, a checkpoint or a data loader goes through `aligned` (a no-op for
aligned tensors), and the pipeline lays its messages out so that every field already is.
"""

from __future__ import annotations

import torch

ALIGNMENT = 64  # bytes: a cache line, and the strictest alignment MKL's reproducibility conditions ask for


def is_aligned(tensor: torch.Tensor) -> bool:
    """Whether tensor's first element starts on an ALIGNMENT-byte boundary (an empty tensor always does)."""
    return tensor.numel() == 0 or tensor.data_ptr() % ALIGNMENT == 0


def aligned_empty(nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised uint8 buffer of nbytes starting on an ALIGNMENT-byte boundary: a fresh allocation, or
    an aligned slice of a slightly larger one where the allocator does not align (a custom allocator)."""
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if is_aligned(buffer):
        return buffer
    larger = torch.empty(nbytes + ALIGNMENT - 1, dtype=torch.uint8, device=device)
    start = -larger.data_ptr() % ALIGNMENT
    return larger[start:start + nbytes]


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """tensor itself when it starts on an ALIGNMENT-byte boundary, else a contiguous copy that does (same
    values, same dtype and device; autograd sees a copy)."""
    if is_aligned(tensor):
        return tensor
    copy = tensor.clone(memory_format=torch.contiguous_format)
    if is_aligned(copy):
        return copy
    nbytes = copy.numel() * copy.element_size()
    return aligned_empty(nbytes, copy.device).view(copy.dtype).view(copy.shape).copy_(copy)
