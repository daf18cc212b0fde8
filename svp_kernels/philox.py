"""Philox4x32-10 in PyTorch, and the conversions of docs/design.md §3 (the reference for every backend).

Counter ``(lo32(n), hi32(n), 0, 0)``, key ``(lo32(seed), hi32(seed))``, 10 rounds. Words are held in
int64 tensors with values in [0, 2³²); a wrapping 64-bit product keeps every bit of the 32×32 product.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_TWO_POW_MINUS_24 = 1.0 / 16777216.0
TWO_PI_F32 = 6.28318530717958647692


def philox4x32_10(seed, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four raw Philox words for each element offset. offsets: int64 tensor (any shape) of n ≥ 0.

    seed: an int in [0, 2**63) or a 0-dim int64 tensor on offsets' device (the same words for the same value).
    """
    offsets = offsets.to(torch.int64)
    c0 = offsets & MASK32
    c1 = (offsets >> 32) & MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(10):
        product0 = c0 * _M0  # wraps: bits 0..63 of the unsigned product
        product1 = c2 * _M1
        hi0, lo0 = (product0 >> 32) & MASK32, product0 & MASK32
        hi1, lo1 = (product1 >> 32) & MASK32, product1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & MASK32, (k1 + _W1) & MASK32
    return c0, c1, c2, c3


def u24(word: torch.Tensor) -> torch.Tensor:
    """(word >> 8) · 2⁻²⁴ as float32: exact, in [0, 1)."""
    return (word >> 8).to(torch.float32) * _TWO_POW_MINUS_24


def element_offsets(rows: int, cols: int, device=None) -> torch.Tensor:
    """(rows, cols) int64 offsets n = r·cols + c of a row-major (rows, cols) matrix."""
    return torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)


def keep_mask(seed, out_features: int, in_features: int, p: float, device=None) -> torch.Tensor:
    """(C, D) bool dropout mask on R: element (c, j) is kept iff u24(word0(seed, c·D + j)) ≥ p.

    seed: an int or a 0-dim int64 tensor on `device`."""
    word0 = philox4x32_10(seed, element_offsets(out_features, in_features, device))[0]
    return u24(word0) >= p


def implicit_weight(proj_seed: int, out_features: int, in_features: int, std: float,
                    dtype=torch.float32, device=None) -> torch.Tensor:
    """(C, D) implicit R: std · sqrt(−2 ln u1) · cos(2π u2), computed in float32, then cast to dtype."""
    word0, word1, _, _ = philox4x32_10(proj_seed, element_offsets(out_features, in_features, device))
    u1 = ((word0 >> 8) + 1).to(torch.float32) * _TWO_POW_MINUS_24
    u2 = u24(word1)
    two_pi = torch.tensor(TWO_PI_F32, dtype=torch.float32)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    weight = radius * torch.cos(two_pi.to(u2.device) * u2) * torch.tensor(std, dtype=torch.float32)
    return weight.to(dtype)
