"""Closeness assertions that name the worst mismatching index, and the accuracy rule of docs/design.md §6."""

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
    assert differ.numel() == 0, (f"{name}: {differ.shape[0]} of {actual.numel()} mask bits differ, first at "
                                 f"{differ[:5].tolist()}")


# The accuracy rule, element-wise: each element of a float32 result is no less accurate than plain PyTorch's
# float32 result of the same formula (the reference backend in float32), both measured against the float64
# reference, plus ACCURACY_ATOL·scale + ACCURACY_RTOL·|truth|, scale = max(1, max |truth|) of the tensor (a
# sum's rounding error follows its largest terms, so a tiny element of a large gradient may carry it).
# The worst case of the suite needs 1.2e-7·scale (cpu, dh of B40-D11-C6-Cp5-implicit-sum-center).
ACCURACY_ATOL = 1e-6
ACCURACY_RTOL = 1e-5


def assert_no_less_accurate(actual: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, name: str,
                            atol: float = ACCURACY_ATOL, rtol: float = ACCURACY_RTOL) -> None:
    """Every element: |actual − truth| ≤ |plain − truth| + atol·scale + rtol·|truth| (NaN fails), else name the
    worst."""
    actual, plain, truth = (x.detach().double().cpu() for x in (actual, plain, truth))
    assert actual.shape == truth.shape == plain.shape, (
        f"{name}: shapes {tuple(actual.shape)}, plain {tuple(plain.shape)}, truth {tuple(truth.shape)}")
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    error, plain_error = (actual - truth).abs(), (plain - truth).abs()
    excess = error - plain_error - atol * scale - rtol * truth.abs()
    failed = ~(excess <= 0)
    if failed.any():
        worst = torch.unravel_index(excess.nan_to_num(float("inf")).argmax(), excess.shape) if excess.dim() else ()
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{name}: {int(failed.sum())} of {truth.numel()} elements less accurate than plain float32; worst at "
            f"{worst}: got {actual[worst].item()!r}, plain {plain[worst].item()!r}, float64 {truth[worst].item()!r} "
            f"(error {error[worst].item():.2e} > plain's {plain_error[worst].item():.2e} + {atol:.0e}·{scale:.3g} + "
            f"{rtol:.0e}·|x|)")


# Two float32 ulps (2⁻²²) of a tensor's largest |truth|: the rounding of the result itself. The tolerance of
# the checks whose inputs make the float32 sums the dominant error (wide rows), where plain PyTorch's own
# error is the bar and nothing else should be granted.
FLOAT32_ROUNDING = 2.0 ** -22


def assert_no_less_accurate_to_rounding(actual: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor,
                                        name: str) -> None:
    """assert_no_less_accurate with atol·scale = 2⁻²²·max |truth| and no rtol."""
    largest = truth.detach().double().abs().max().item() if truth.numel() else 0.0
    assert_no_less_accurate(actual, plain, truth, name, atol=FLOAT32_ROUNDING * largest / max(1.0, largest), rtol=0.0)


def seed_tensor(value: int, device="cpu") -> torch.Tensor:
    """The ops' dropout seed: a 0-dim int64 tensor on the op's device."""
    return torch.tensor(value, dtype=torch.int64, device=device)
