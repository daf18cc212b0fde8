"""The loss epilogue (CE + λ·FA and g_v) and alignment_loss on every backend that runs here, against the
float64 reference; and the reference itself against the definition, element by element in numpy."""

import math

import numpy as np
import pytest
import torch

import svp_kernels as sk
from svp_kernels.backends import reference
from svp_kernels.testing import assert_close, assert_no_less_accurate, device_backends, epilogue_ground_truth

FUSED = device_backends(include_reference=False)
EPILOGUE_CASES = [  # (B, C, C' or None, has_target, λ, mean, center): both alignment paths, C ≠ C', B = 1
    (1, 3, 2, True, 0.7, True, False), (9, 4, 3, True, 1.3, False, True), (5, 8, 6, True, 0.7, True, False),
    (30, 5, 7, False, 1.0, True, True), (40, 3, 4, True, 0.0, False, False), (6, 7, None, True, 1.0, True, False),
]


def epilogue_inputs(B, C, C_prev, has_target, dtype, device):
    generator = torch.Generator().manual_seed(B + C)
    v = 2 * torch.randn(B, C, dtype=torch.float64, generator=generator)
    v_prev = torch.randn(B, C_prev, dtype=torch.float64, generator=generator) if C_prev else None
    target = torch.randint(0, C, (B,), generator=generator) if has_target else None
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    return v.to(dtype).to(device), move(target), None if v_prev is None else v_prev.to(dtype).to(device)


def run_epilogue(backend, v, target, v_prev, alignment_weight, mean, center):
    """(loss, ce, alignment, g_v) of the backend's epilogue, g_v by autograd."""
    v = v.detach().requires_grad_(True)
    loss, ce, alignment = sk.backends.load(backend).epilogue(v, target, v_prev, alignment_weight, mean, center)
    (g_v,) = torch.autograd.grad(loss, v) if loss.requires_grad else (torch.zeros_like(v),)
    return loss.detach(), ce, alignment, g_v


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("B,C,C_prev,has_target,weight,mean,center", EPILOGUE_CASES)
def test_epilogue_float64_matches_ground_truth(B, C, C_prev, has_target, weight, mean, center, device, backend):
    v, target, v_prev = epilogue_inputs(B, C, C_prev, has_target, torch.float64, device)
    actual = run_epilogue(backend, v, target, v_prev, weight, mean, center)
    expected = epilogue_ground_truth(v, target, v_prev, weight, mean, center)
    for name, a, e in zip(("loss", "ce", "alignment", "g_v"), actual, expected):
        assert_close(a, e, 1e-10, f"{backend} {name}")


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("B,C,C_prev,has_target,weight,mean,center", EPILOGUE_CASES)
def test_epilogue_float32_no_less_accurate_than_plain_torch(B, C, C_prev, has_target, weight, mean, center, device,
                                                            backend):
    v, target, v_prev = epilogue_inputs(B, C, C_prev, has_target, torch.float32, device)
    truth = epilogue_ground_truth(v, target, v_prev, weight, mean, center)
    plain = run_epilogue("reference", v, target, v_prev, weight, mean, center)
    actual = run_epilogue(backend, v, target, v_prev, weight, mean, center)
    for name, a, r, e in zip(("loss", "ce", "alignment", "g_v"), actual, plain, truth):
        assert_no_less_accurate(a, r, e, f"{backend} {name} B={B} C={C} C'={C_prev}")


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("C", [1, 8, 13, 100, 131])
@pytest.mark.parametrize("spread", [1.0, 40.0])
def test_cross_entropy_float32_no_less_accurate_than_plain_torch(C, spread, device, backend):
    """The cross-entropy alone over whole vectors and tails of columns, with logits spread far enough
    (× 40) that most of e^(v − max) underflows."""
    v, target, _ = epilogue_inputs(37, C, None, True, torch.float64, device)
    v = (v * spread).to(torch.float32)
    truth = epilogue_ground_truth(v, target, None, 1.0, True, False)
    plain = run_epilogue("reference", v, target, None, 1.0, True, False)
    actual = run_epilogue(backend, v, target, None, 1.0, True, False)
    for name, a, r, e in zip(("loss", "ce", "g_v"), actual[:2] + actual[3:], plain[:2] + plain[3:],
                             truth[:2] + truth[3:]):
        assert_no_less_accurate(a, r, e, f"{backend} {name} C={C} spread={spread}")


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_alignment_loss_matches_ground_truth(reduction, device, backend):
    v, _, v_prev = epilogue_inputs(11, 4, 6, False, torch.float64, device)
    v = v.requires_grad_(True)
    loss = sk.alignment_loss(v, v_prev, reduction=reduction, center=True, backend=backend)
    (grad,) = torch.autograd.grad(loss, v)
    expected_loss, _, _, expected_grad = epilogue_ground_truth(v, None, v_prev, 1.0, reduction == "mean", True)
    assert_close(loss, expected_loss, 1e-10, f"{backend} alignment_loss")
    assert_close(grad, expected_grad, 1e-10, f"{backend} alignment_loss gradient")


def test_ground_truth_matches_the_definition():
    """The oracle itself: CE = mean_b (log Σ_c e^{v_bc} − v_{b,y_b}) and FA = Σ_ij (S_ij − S'_ij)² (/ B²) with
    S_ij = cos(u_i, u_j), written out element by element in numpy (float64)."""
    B, C, C_prev, weight = 5, 3, 4, 0.7
    v, target, v_prev = epilogue_inputs(B, C, C_prev, True, torch.float64, "cpu")
    for center in (False, True):
        for mean in (True, False):
            loss, ce, alignment = reference.epilogue(v, target, v_prev, weight, mean, center)
            a, b, y = v.numpy(), v_prev.numpy(), target.numpy()
            expected_ce = sum(math.log(np.exp(a[i]).sum()) - a[i, y[i]] for i in range(B)) / B
            if center:
                a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
            expected_fa = sum((a[i] @ a[j] / math.sqrt((a[i] @ a[i]) * (a[j] @ a[j]))
                               - b[i] @ b[j] / math.sqrt((b[i] @ b[i]) * (b[j] @ b[j]))) ** 2
                              for i in range(B) for j in range(B)) / (B * B if mean else 1)
            assert math.isclose(ce.item(), expected_ce, rel_tol=1e-12)
            assert math.isclose(alignment.item(), expected_fa, rel_tol=1e-12)
            assert math.isclose(loss.item(), expected_ce + weight * expected_fa, rel_tol=1e-12)


@pytest.mark.skipif(not sk.backends.is_available("cpu"), reason="the cpu backend did not load")
def test_cpu_epilogue_concurrent_calls_keep_their_own_scratch():
    """The CPU epilogue keeps its large temporaries in per-thread blocks reused across calls (ThreadScratch,
    csrc/cpu/memory.h): calls from two threads at once, on two shapes, give the bits of sequential calls."""
    import threading

    from svp_kernels.backends import cpu

    generator = torch.Generator().manual_seed(5)
    problems = []
    for B, C in ((300, 40), (257, 23)):  # feature space, different scratch sizes
        problems.append((torch.randn(B, C, generator=generator), torch.randint(0, C, (B,), generator=generator),
                         torch.randn(B, C + 3, generator=generator)))
    expected = [cpu.epilogue_with_grad(v, t, vp, 0.5, True, True) for v, t, vp in problems]
    failures = []

    def hammer(index):
        v, t, vp = problems[index]
        for _ in range(30):
            result = cpu.epilogue_with_grad(v, t, vp, 0.5, True, True)
            if not all(torch.equal(a, b) for a, b in zip(result, expected[index])):
                failures.append(index)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, f"concurrent epilogue calls differ from sequential ones: {failures}"
