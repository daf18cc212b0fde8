"""Comparison helpers that name the worst mismatching index."""

from __future__ import annotations

import torch


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max(1, max |expected|), in float64."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    return (actual - expected).abs().max().item() / scale if expected.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    """Scaled error ≤ tol, else fail with the worst index and both values."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = scaled_error(actual, expected)
    if not error <= tol:  # also catches NaN
        difference = (actual - expected).abs().nan_to_num(float("inf"))
        worst = torch.unravel_index(difference.argmax(), difference.shape) if difference.dim() else ()
        worst = tuple(int(i) for i in worst)
        raise AssertionError(f"{name}: scaled error {error:.3e} > {tol:.1e}; worst at index {worst}: "
                             f"got {actual[worst].item()!r}, expected {expected[worst].item()!r}")


def assert_equal_masks(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Bit-exact boolean equality, naming the first few differing (row, col) positions."""
    actual, expected = actual.cpu(), expected.cpu()
    differ = (actual != expected).nonzero()
    assert differ.numel() == 0, f"{name}: {differ.shape[0]} of {actual.numel()} mask bits differ, first at {differ[:5].tolist()}"


def seed_tensor(value: int, device="cpu") -> torch.Tensor:
    """The ops' dropout seed: a 0-dim int64 tensor on the op's device."""
    return torch.tensor(value, dtype=torch.int64, device=device)
