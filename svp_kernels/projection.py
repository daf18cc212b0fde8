"""The implicit random projection (R regenerated from a seed wherever it is needed) and the dropout seed
streams of the modules (docs/design.md §3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .philox import implicit_weight

MAX_SEED = 2**63


def draw_seed() -> int:
    """A fresh seed in [0, 2**63) from torch's default CPU generator (so torch.manual_seed reproduces it)."""
    return int(torch.randint(0, MAX_SEED - 1, (), dtype=torch.int64).item())


def _stream_argument(value, name: str, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64 or value.dim() != 0:
            raise TypeError(f"{name} must be an int or a 0-dim int64 tensor, got a {value.dtype} tensor of shape "
                            f"{tuple(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or a 0-dim int64 tensor, got {type(value).__name__}")
    if not 0 <= value < MAX_SEED:
        raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    return torch.full((), value, dtype=torch.int64, device=device)


_GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64
_MASK64 = 2**64 - 1


def _as_int64(value: int) -> int:
    """The int64 with value's 64 bits."""
    return value - 2**64 if value >= 2**63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """The logical (unsigned) right shift of int64 z."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _stream_seed_tensor(base_seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """stream_seed with 15 int64 tensor ops (products and sums wrap mod 2⁶⁴)."""
    z = base_seed + (step + 1) * _as_int64(_GAMMA)
    z = (z ^ _shift_right(z, 30)) * _as_int64(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _as_int64(_MIX2)
    return (z ^ _shift_right(z, 31)) & (MAX_SEED - 1)


def _stream_seed_int(base_seed: int, step: int) -> int:
    """stream_seed on Python ints (unsigned 64-bit arithmetic)."""
    z = (base_seed + (step + 1) * _GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return (z ^ (z >> 31)) & (MAX_SEED - 1)


def stream_seed(base_seed, step) -> torch.Tensor:
    """The dropout seed of step `step` of the seed stream `base_seed`: a 0-dim int64 tensor in [0, 2**63).

    The (step + 1)-th output of SplitMix64 seeded with base_seed, top bit cleared: z = base + (step + 1)·γ,
    z ^= z >> 30, z ·= 0xBF58476D1CE4E5B9, z ^= z >> 27, z ·= 0x94D049BB133111EB, z ^= z >> 31 (all mod 2⁶⁴,
    γ = 0x9E3779B97F4A7C15). On device tensors and under torch.compile it is 15 tensor ops, so it traces and
    replays in a captured CUDA graph with the step's current value; on CPU values outside compilation it is
    computed on the host (two scalar reads, no device to synchronise; 15 tiny tensor ops would cost ~35×
    more). ints and 0-dim int64 tensors (on any one device; the result lives there) give identical seeds.
    """
    device = next((value.device for value in (base_seed, step) if isinstance(value, torch.Tensor)), None)
    base_seed = _stream_argument(base_seed, "base_seed", device)
    step = _stream_argument(step, "step", device)
    if base_seed.device.type == "cpu" and step.device.type == "cpu" and not torch.compiler.is_compiling():
        value = _stream_seed_int(int(base_seed) & _MASK64, int(step) & _MASK64)
        return torch.full((), value, dtype=torch.int64, device=base_seed.device)
    return _stream_seed_tensor(base_seed, step)


@dataclass(frozen=True)
class ImplicitProjection:
    """A fixed Gaussian R (out_features × in_features) that never exists in memory.

    R[c, j] = std · sqrt(−2 ln u1) · cos(2π u2) from Philox(seed, c·D + j); std defaults to 1/√D.
    Pass it as ``projection=`` to the ops; ``materialize`` returns the dense R the kernels use.
    """

    out_features: int
    seed: int
    std: float | None = None

    def __post_init__(self):
        if isinstance(self.out_features, bool) or not isinstance(self.out_features, int) or self.out_features < 1:
            raise ValueError(f"out_features must be a positive int, got {self.out_features!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        std = self.std
        if std is not None and not (isinstance(std, (int, float)) and math.isfinite(std) and std > 0):
            raise ValueError(f"std must be a positive finite float or None, got {self.std!r}")

    def std_for(self, in_features: int) -> float:
        """The standard deviation used for input width D: std, or 1/√D by default."""
        return float(self.std) if self.std is not None else 1.0 / math.sqrt(in_features)

    def materialize(self, in_features: int, device=None, dtype=None) -> torch.Tensor:
        """The dense (out_features, in_features) R the kernels generate (equal up to float32 log/cos rounding)."""
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        return implicit_weight(self.seed, self.out_features, in_features, self.std_for(in_features),
                               dtype=dtype or torch.float32, device=device)
