"""The GEMM projection path (projection_path="gemm", csrc/projection_gemm.cpp) on every backend that runs it here:
R̃ written out by dropped_projection (the mask bit for bit, the same values as the fused kernels' tiles), v and dh
and the whole local loss against the float64 reference and the float32 accuracy rule, the op path under the same
bits as the eager node, and the keyword's validation."""

import pytest
import torch

import svp_kernels as sk
from svp_kernels import backends
from svp_kernels.backends import reference
from svp_kernels.philox import keep_mask

from svp_kernels.testing import (assert_close, assert_equal_masks, assert_no_less_accurate, ground_truth, make_inputs,
                                 projection_ground_truth, run)

from cases import LOCAL_LOSS_CASES, project, projection_inputs

GEMM = [(device, backend) for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for backend in ("cpu", "cuda") if backends.is_available(backend)
        and backends.load(backend).supports(torch.device(device), torch.float32)]
PROJECTION_CASES = [  # (B, D, C, implicit, p): B = 1, C > B, odd sizes, several CPU tiles
    (1, 5, 3, False, 0.0), (7, 13, 5, False, 0.3), (5, 9, 11, True, 0.25), (9, 40, 4, True, 0.0),
    (5, 500, 70, False, 0.1), (6, 130, 40, True, 0.2),
]
needs_gemm = pytest.mark.skipif(not GEMM, reason="no backend with the GEMM projection path loaded")


def seed_on(device, value):
    return torch.full((), value, dtype=torch.int64, device=device)


@needs_gemm
@pytest.mark.parametrize("device,backend", GEMM)
@pytest.mark.parametrize("C,D,p,seed", [(3, 5, 0.5, 7), (13, 17, 0.1, 2**40 + 3), (70, 129, 0.25, 12345),
                                        (1, 33, 0.9, 2**63 - 1)])
def test_dropped_projection_is_the_fused_kernels_r_tilde(C, D, p, seed, device, backend):
    """dropped_projection writes R ⊙ M / (1 − p) with the §3 mask, element for element what the fused forward
    multiplies by (h = I makes its v exactly R̃ᵀ), and what the reference builds."""
    for dtype in (torch.float32, torch.float64):
        weight = torch.randn(C, D, generator=torch.Generator().manual_seed(C), dtype=dtype).to(device)
        written = torch.ops.svp_kernels.dropped_projection(weight, C, D, 0, 0.0, p, seed_on(device, seed), dtype)
        assert_equal_masks(written != 0, keep_mask(seed, C, D, p), f"{backend} dropped_projection mask {dtype}")
        fused = sk.dropout_projection(torch.eye(D, dtype=dtype, device=device), weight, p=p, seed=seed,
                                      backend=backend, projection_path="fused")
        assert torch.equal(written, fused.t()), f"{backend} R̃ differs from the fused kernels' ({dtype})"
        expected = reference.dropped_weight(weight.cpu(), D, C, 0, 0.0, p, seed, dtype, "cpu")
        assert torch.equal(written.cpu(), expected), f"{backend} R̃ differs from the reference's ({dtype})"


@needs_gemm
@pytest.mark.parametrize("device,backend", GEMM)
def test_dropped_projection_implicit(device, backend):
    """The implicit R: the fused kernels' values (the same generator), the mask bit for bit."""
    C, D, std = 11, 19, 19**-0.5
    written = torch.ops.svp_kernels.dropped_projection(None, C, D, 123, std, 0.4, seed_on(device, 9), torch.float32)
    assert_equal_masks(written != 0, keep_mask(9, C, D, 0.4), f"{backend} implicit mask")
    fused = sk.dropout_projection(torch.eye(D, device=device), sk.ImplicitProjection(C, seed=123), p=0.4, seed=9,
                                  backend=backend, projection_path="fused")
    assert torch.equal(written, fused.t()), f"{backend} implicit R̃ differs from the fused kernels'"


@needs_gemm
@pytest.mark.parametrize("device,backend", GEMM)
@pytest.mark.parametrize("B,D,C,implicit,p", PROJECTION_CASES)
def test_projection_float64_and_float32(B, D, C, implicit, p, device, backend):
    h, weight, grad_v = projection_inputs(B, D, C, torch.float64, device)
    expected = projection_ground_truth(h, None if implicit else weight, grad_v, C, 77, D**-0.5, p, 5)
    actual = project(backend, h, weight, C, implicit, p, 5, grad_v, "gemm")
    tol = 1e-5 if implicit else 1e-12
    for name, a, e in zip(("v", "dh"), actual, expected):
        assert_close(a, e, tol, f"{backend} gemm {name} float64")
    h, weight, grad_v = projection_inputs(B, D, C, torch.float32, device)
    truth = projection_ground_truth(h, None if implicit else weight, grad_v, C, 77, D**-0.5, p, 5)
    plain = project("reference", h.cpu(), weight.cpu(), C, implicit, p, 5, grad_v.cpu(), "auto")
    actual = project(backend, h, weight, C, implicit, p, 5, grad_v, "gemm")
    for name, a, r, e in zip(("v", "dh"), actual, plain, truth):
        assert_no_less_accurate(a, r, e, f"{backend} gemm {name} B={B} D={D} C={C} implicit={implicit} p={p}")


@needs_gemm
@pytest.mark.parametrize("device,backend", GEMM)
@pytest.mark.parametrize("case", LOCAL_LOSS_CASES, ids=str)
def test_local_loss_matches_ground_truth(case, device, backend):
    """The whole local loss through the GEMM path: float64 against the oracle, float32 by the accuracy rule."""
    h, target, v_prev, projection = make_inputs(case, torch.float64, device)
    expected = ground_truth(case, h, target, v_prev, projection)
    tol = 1e-5 if case.projection == "implicit" else 1e-11
    for name, a, e in zip(("loss", "ce", "alignment", "v", "dh"),
                          run(case, h, target, v_prev, projection, backend, projection_path="gemm"), expected):
        assert_close(a, e, tol, f"{backend} gemm {name} {case}")
    h, target, v_prev, projection = make_inputs(case, torch.float32, device)
    truth = ground_truth(case, h, target, v_prev, projection)
    def cpu(x):
        return x.cpu() if isinstance(x, torch.Tensor) else x

    plain = run(case, cpu(h), cpu(target), cpu(v_prev), cpu(projection), "reference")
    actual = run(case, h, target, v_prev, projection, backend, projection_path="gemm")
    for name, a, r, e in zip(("loss", "ce", "alignment", "v", "dh"), actual, plain, truth):
        assert_no_less_accurate(a, r, e, f"{backend} gemm {name} {case}")


@needs_gemm
@pytest.mark.parametrize("device,backend", GEMM)
def test_op_path_matches_the_eager_node_bitwise(device, backend):
    """torch.compile runs projection_forward_gemm with its registered autograd; eager calls the C++ node with
    gemm=True: the same ops, so the same bits. The node saves R and the seed only (R̃ is transient)."""
    B, D, C, p = 6, 130, 40, 0.2
    h, weight, grad_v = projection_inputs(B, D, C, torch.float32, device)
    eager = project(backend, h, weight, C, False, p, 5, grad_v, "gemm")
    leaf = h.detach().requires_grad_(True)
    v = backends.load(backend).projection(leaf, weight, C, 0, 0.0, p, seed_on(device, 5), gemm=True)
    v.backward(grad_v)
    for name, a, o in zip(("v", "dh"), eager, (v.detach(), leaf.grad)):
        assert torch.equal(a, o), f"{backend} gemm {name} differs between the node and the op path"
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        sk.dropout_projection(leaf, weight, p=p, seed=5, backend=backend, projection_path="gemm")
    assert sorted(saved) == sorted([(C, D), ()]), saved


@needs_gemm
def test_auto_is_the_fused_path():
    """Until a GPU measurement decides, "auto" runs the fused kernels: their bits, not the GEMM's."""
    B, D, C = 5, 500, 70
    h, weight, grad_v = projection_inputs(B, D, C, torch.float32, "cpu")
    auto, fused, gemm = (project("cpu", h, weight, C, False, 0.1, 3, grad_v, path)
                         for path in ("auto", "fused", "gemm"))
    assert all(torch.equal(a, f) for a, f in zip(auto, fused))
    assert not torch.equal(auto[0], gemm[0]), "the two paths should differ in rounding at D = 500"


@pytest.mark.parametrize("bad", ["GEMM", "cublas", None, 1])
def test_projection_path_is_validated(bad):
    h = torch.randn(4, 6)
    with pytest.raises(ValueError, match="projection_path"):
        sk.fused_local_loss(h, torch.tensor([0, 1, 2, 0]), projection=torch.randn(3, 6), projection_path=bad)
    with pytest.raises(ValueError, match="projection_path"):
        sk.dropout_projection(h, torch.randn(3, 6), projection_path=bad)


def test_gemm_on_the_reference_backend_is_its_own_formulation():
    """The reference backend's projection already multiplies a dense R̃: "gemm" is accepted and changes nothing."""
    case = LOCAL_LOSS_CASES[1]
    h, target, v_prev, projection = make_inputs(case, torch.float64)
    a = run(case, h, target, v_prev, projection, "reference", projection_path="gemm")
    b = run(case, h, target, v_prev, projection, "reference")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.skipif(not backends.is_available("triton"), reason="triton not available")
def test_gemm_on_a_backend_without_it_is_a_value_error():
    with pytest.raises(ValueError, match="projection_path='gemm' is not available on backend 'triton'"):
        sk.dropout_projection(torch.randn(4, 6), torch.randn(3, 6), backend="triton", projection_path="gemm")
