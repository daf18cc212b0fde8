"""dropout_projection on every backend that runs here: the mask bit for bit, the implicit R, v and dh
against the float64 reference and the float32 accuracy rule."""

import pytest
import torch

import svp_kernels as sk
from svp_kernels.philox import keep_mask
from svp_kernels.testing import (assert_close, assert_equal_masks, assert_no_less_accurate, device_backends,
                                 projection_ground_truth)

from cases import project, projection_inputs

FUSED = device_backends(include_reference=False)
MASK_CASES = [(3, 5, 0.5, 7), (13, 17, 0.1, 2**40 + 3), (1, 33, 0.9, 0), (8, 1, 0.3, 2**63 - 1), (4, 6, 0.0, 5)]
PROJECTION_CASES = [  # (B, D, C, implicit, p)
    (1, 5, 3, False, 0.0), (7, 13, 5, False, 0.3), (5, 9, 11, True, 0.25), (9, 40, 4, True, 0.0),
    (5, 500, 70, False, 0.1),  # C ≥ 24: the CPU forward's transposed tile; D over two tiles and groups
    (6, 130, 40, True, 0.2),
]


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("C,D,p,seed", MASK_CASES)
def test_mask_bit_identical(C, D, p, seed, device, backend):
    """With R = 1 and h = I, v = R̃ᵀ: its non-zero pattern is the mask, its values 1/(1 − p)."""
    h = torch.eye(D, dtype=torch.float32, device=device)
    ones = torch.ones(C, D, dtype=torch.float32, device=device)
    v = sk.dropout_projection(h, ones, p=p, seed=seed, backend=backend)
    expected = keep_mask(seed, C, D, p)
    assert_equal_masks(v.t() != 0, expected, f"{backend} mask C={C} D={D} p={p} seed={seed}")
    kept = v.t()[expected.to(device)].cpu()
    assert torch.allclose(kept, torch.full_like(kept, 1.0 / (1.0 - p)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device,backend", FUSED)
def test_implicit_projection_matches_materialize(device, backend):
    C, D = 11, 19
    implicit = sk.ImplicitProjection(C, seed=123)
    h = torch.eye(D, dtype=torch.float32, device=device)
    v = sk.dropout_projection(h, implicit, p=0.0, backend=backend)
    assert_close(v.t(), implicit.materialize(D), 2e-6, f"{backend} implicit R")
    dropped = sk.dropout_projection(h, implicit, p=0.4, seed=9, backend=backend)
    assert_equal_masks(dropped.t() != 0, keep_mask(9, C, D, 0.4), f"{backend} implicit mask")


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("B,D,C,implicit,p", PROJECTION_CASES)
def test_float64_matches_ground_truth(B, D, C, implicit, p, device, backend):
    h, weight, grad_v = projection_inputs(B, D, C, torch.float64, device)
    v, dh = project(backend, h, weight, C, implicit, p, 5, grad_v)
    expected_v, expected_dh = projection_ground_truth(h, None if implicit else weight, grad_v, C, 77, D**-0.5, p, 5)
    tol = 1e-5 if implicit else 1e-12  # an implicit R is float32 log/cos of each backend's libm
    assert_close(v, expected_v, tol, f"{backend} v")
    assert_close(dh, expected_dh, tol, f"{backend} dh")


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("B,D,C,implicit,p", PROJECTION_CASES)
def test_float32_no_less_accurate_than_plain_torch(B, D, C, implicit, p, device, backend):
    h, weight, grad_v = projection_inputs(B, D, C, torch.float32, device)
    truth = projection_ground_truth(h, None if implicit else weight, grad_v, C, 77, D**-0.5, p, 5)
    plain = project("reference", h, weight, C, implicit, p, 5, grad_v)
    actual = project(backend, h, weight, C, implicit, p, 5, grad_v)
    for name, a, r, e in zip(("v", "dh"), actual, plain, truth):
        assert_no_less_accurate(a, r, e, f"{backend} {name} B={B} D={D} C={C} implicit={implicit} p={p}")


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("B,D,C,implicit,p", PROJECTION_CASES)
def test_eager_node_matches_the_traced_op_bitwise(B, D, C, implicit, p, device, backend):
    """Eager calls run one autograd node over the gradient interface; compiled graphs run the op: same bits."""
    from svp_kernels import backends

    h, weight, grad_v = projection_inputs(B, D, C, torch.float32, device)
    eager = project(backend, h, weight, C, implicit, p, 5, grad_v)
    leaf = h.detach().requires_grad_(True)
    seed = torch.full((), 5, dtype=torch.int64, device=h.device)
    std = sk.ImplicitProjection(C, seed=77).std_for(D)
    v = backends.load(backend).projection(leaf, None if implicit else weight, C, 77 if implicit else 0,
                                          std if implicit else 0.0, p, seed)
    v.backward(grad_v)
    for name, a, o in zip(("v", "dh"), eager, (v.detach(), leaf.grad)):
        assert torch.equal(a, o), f"{backend} {name} differs from the op path"
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = sk.dropout_projection(leaf, weight, p=p, seed=5, backend=backend)
    # cpu and cuda: the C++ node of csrc/autograd.cpp; triton: the Python node of svp_kernels/backends/triton/nodes.py
    native = "torch::autograd::CppNode<svp::nodes::DropoutProjection>"
    assert out.grad_fn.name() == (native if backend in ("cpu", "cuda") else "DropoutProjectionBackward")
    assert sorted(saved) == sorted([(C, D), ()]), saved  # R and the seed: nothing of size B·D


def transparent_huge_pages() -> bool:
    """Whether the kernel grants MADV_HUGEPAGE requests (THP mode "always" or "madvise")."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as modes:
            return "[never]" not in modes.read()
    except OSError:
        return False


@pytest.mark.skipif(not sk.backends.is_available("cpu"), reason="the cpu backend did not load")
def test_cpu_large_dh_correct_and_written_through_huge_pages():
    """A dh of ≥ 32 MiB is a fresh mapping on every call; the cpu backend asks for 2 MiB pages before
    writing it (csrc/cpu/memory.h): the values are unchanged and the call takes far fewer page faults than
    one per 4 KiB page."""
    import resource

    from svp_kernels.backends import cpu

    B, C, D = 3, 2, (12 << 20) // 4 + 5  # dh: 36 MiB of float32
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(C, D, generator=generator, dtype=torch.float64)
    grad_v = torch.randn(B, C, generator=generator, dtype=torch.float64)
    seed = torch.tensor(11)
    expected = grad_v @ (weight * keep_mask(11, C, D, 0.2) / 0.8)
    args = (grad_v.float(), weight.float(), D, 0, 0.0, 0.2, seed, torch.float32)
    cpu.projection_backward(*args)  # warm-up: the thread pool and the tiles' scratch
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    dh = cpu.projection_backward(*args)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert_close(dh, expected, 1e-5, "cpu dh of 36 MiB")
    small_pages = B * D * 4 // 4096
    if transparent_huge_pages():
        assert faults < small_pages // 4, f"{faults} page faults writing {small_pages} pages of dh"
