"""Every backend against the float64 reference: odd shapes, all projections, p, reductions, center.

Parametrised over the registered backends that run here, so triton (TRITON_INTERPRET=1) and cuda join
by registering.
"""

import pytest
import torch

import svp_kernels as sk
from svp_kernels.philox import keep_mask

from cases import Case, as_float64, cpu_backends, ground_truth, make_inputs, run
from helpers import assert_close, assert_equal_masks, scaled_error

CASES = [
    Case(1, 5, 3, 4),                                                   # B = 1
    Case(7, 13, 5, 3, p=0.3),                                           # C ≠ C'
    Case(5, 9, 11, 6, projection="implicit", p=0.25),                   # C > B
    Case(33, 17, 4, 4, p=0.1, center=True),                             # C + C' < B: feature-space path
    Case(33, 17, 4, 4, reduction="sum"),
    Case(40, 11, 6, 5, projection="implicit", center=True, reduction="sum"),
    Case(6, 0, 10, 7, projection="identity"),                           # v = h, batch-space path
    Case(24, 0, 5, 3, projection="identity", center=True),              # identity, feature-space path
    Case(9, 21, 7, None, p=0.5),                                        # no v_prev: CE only
    Case(3, 70, 13, 20, projection="implicit", p=0.1, center=True),     # batch-space, C' > C > B
]


def device_backends():
    pairs = [("cpu", name) for name in cpu_backends()]
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        pairs += [("cuda", name) for name in sk.available_backends() if sk.backends.load(name).supports(cuda, torch.float32)]
    return pairs


DEVICE_BACKENDS = device_backends()
FIELDS = ("loss", "ce", "alignment", "v", "dh")


def compiled_backend(backend):
    return backend != "reference"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_float64_matches_ground_truth(case, device, backend):
    inputs = make_inputs(case, torch.float64, device)
    expected = ground_truth(case, *[x.cpu() if isinstance(x, torch.Tensor) else x for x in inputs])
    actual = run(case, *inputs, backend)
    # Implicit R is generated in float32 (log/cos of each backend's libm): agree to float32 rounding.
    tol = 1e-5 if case.projection == "implicit" and backend != "reference" else 1e-10
    for name, a, e in zip(FIELDS, actual, expected):
        assert_close(a, e, tol, f"{backend}/{case}: {name}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_float32_error_no_worse_than_reference(case, device, backend):
    """The accuracy rule: float32 error against float64 ≤ the plain PyTorch float32 error + a small tolerance."""
    inputs = make_inputs(case, torch.float32, device)
    expected = ground_truth(case, *[x.cpu() if isinstance(x, torch.Tensor) else x for x in inputs])
    reference = run(case, *inputs, "reference")
    actual = run(case, *inputs, backend)
    for name, a, r, e in zip(FIELDS, actual, reference, expected):
        assert a.dtype == r.dtype, f"{name}: dtype {a.dtype} != reference {r.dtype}"
        backend_error, reference_error = scaled_error(a, e), scaled_error(r, e)
        assert backend_error <= reference_error + 1e-5, (
            f"{backend}/{case}: {name} float32 error {backend_error:.2e} > reference {reference_error:.2e} + 1e-5")


MASK_SHAPES = [(3, 5, 0.5, 7), (13, 17, 0.1, 2**40 + 3), (1, 33, 0.9, 0), (8, 1, 0.3, 2**63 - 1), (4, 6, 0.0, 5)]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("C,D,p,seed", MASK_SHAPES)
def test_mask_bit_identical(C, D, p, seed, device, backend):
    """With R = 1 and h = I, v = R̃ᵀ: its non-zero pattern is the mask, its values 1/(1 − p)."""
    h = torch.eye(D, dtype=torch.float32, device=device)
    ones = torch.ones(C, D, dtype=torch.float32, device=device)
    v = sk.dropout_projection(h, ones, p=p, seed=seed, backend=backend)
    expected = keep_mask(seed, C, D, p)
    assert_equal_masks(v.t() != 0, expected, f"{backend} mask C={C} D={D} p={p} seed={seed}")
    kept = v.t()[expected].cpu()
    assert torch.allclose(kept, torch.full_like(kept, 1.0 / (1.0 - p)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_implicit_projection_matches_materialize(device, backend):
    C, D = 11, 19
    implicit = sk.ImplicitProjection(C, seed=123)
    h = torch.eye(D, dtype=torch.float32, device=device)
    v = sk.dropout_projection(h, implicit, p=0.0, backend=backend)
    assert_close(v.t(), implicit.materialize(D), 2e-6, f"{backend} implicit R")
    dropped = sk.dropout_projection(h, implicit, p=0.4, seed=9, backend=backend)
    assert_equal_masks(dropped.t() != 0, keep_mask(9, C, D, 0.4), f"{backend} implicit mask")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", [Case(5, 7, 4, 3, p=0.3, center=True), Case(12, 6, 3, 2, projection="implicit", p=0.2),
                                  Case(4, 0, 6, 5, projection="identity", reduction="sum")], ids=str)
def test_gradcheck_float64(case, device, backend):
    h, target, v_prev, projection = make_inputs(case, torch.float64, device)

    def loss_of(h):
        return sk.fused_local_loss(h, target, v_prev, projection=projection, p=case.p, seed=3,
                                   alignment_weight=case.alignment_weight, reduction=case.reduction,
                                   center=case.center, backend=backend).loss

    assert torch.autograd.gradcheck(loss_of, (h,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("B,C,C_prev,center,reduction", [(1, 3, 2, False, "mean"), (9, 4, 3, True, "sum"),
                                                         (5, 8, 6, False, "mean"), (30, 5, 7, True, "mean")])
def test_alignment_loss_and_cosine_gram(B, C, C_prev, center, reduction, device, backend):
    generator = torch.Generator().manual_seed(B + C)
    v = torch.randn(B, C, dtype=torch.float64, generator=generator).to(device).requires_grad_(True)
    v_prev = torch.randn(B, C_prev, dtype=torch.float64, generator=generator).to(device)
    loss = sk.alignment_loss(v, v_prev, reduction=reduction, center=center, backend=backend)
    (grad,) = torch.autograd.grad(loss, v)
    v_ref = v.detach().cpu().requires_grad_(True)
    s, s_prev = sk.backends.reference.cosine_gram(v_ref, center), sk.backends.reference.cosine_gram(v_prev.cpu(), center)
    expected = (s - s_prev).square().sum() / (B * B if reduction == "mean" else 1)
    (expected_grad,) = torch.autograd.grad(expected, v_ref)
    assert_close(loss, expected, 1e-10, f"{backend} alignment")
    assert_close(grad, expected_grad, 1e-10, f"{backend} alignment grad")
    gram = sk.backends.load(backend).cosine_gram(v.detach(), center)
    assert_close(gram, s.detach(), 1e-12, f"{backend} cosine_gram")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_and_inf_propagate(device, backend):
    case = Case(6, 9, 4, 3, p=0.2)
    h, target, v_prev, projection = make_inputs(case, torch.float32, device)
    for bad in (float("nan"), float("inf")):
        poisoned = h.detach().clone()
        poisoned[2, 3] = bad
        loss = run(case, poisoned, target, v_prev, projection, backend)[0]
        assert not torch.isfinite(loss), f"{backend}: loss {loss} should not be finite with {bad} in h"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_contiguous_and_flattened_inputs(device, backend):
    case = Case(6, 12, 5, 4, p=0.2)
    h, target, v_prev, projection = make_inputs(case, torch.float64, device)
    expected = run(case, h, target, v_prev, projection, backend)
    h4 = h.detach().reshape(6, 3, 4).transpose(1, 2).contiguous().transpose(1, 2)  # (B, 3, 4), not contiguous
    assert not h4.is_contiguous()
    strided_projection = projection.t().contiguous().t()
    strided_v_prev = v_prev.t().contiguous().t()
    strided_target = torch.stack([target, target], 1)[:, 0]
    actual = run(case, h4, strided_target, strided_v_prev, strided_projection, backend)
    for name, a, e in zip(FIELDS, actual, expected):
        assert_close(a.reshape(e.shape), e, 1e-12, f"{backend} {name}")


def test_seed_none_is_reproducible_under_manual_seed():
    case = Case(5, 8, 3, 2, p=0.5)
    h, target, v_prev, projection = make_inputs(case)
    losses = []
    for _ in range(2):
        torch.manual_seed(1234)
        losses.append(sk.fused_local_loss(h, target, v_prev, projection=projection, p=0.5).loss)
    assert torch.equal(losses[0], losses[1])
    other = sk.fused_local_loss(h, target, v_prev, projection=projection, p=0.5).loss
    assert not torch.equal(losses[0], other), "a fresh draw should give another mask"


def test_outputs_dtypes_and_detached():
    case = Case(4, 6, 3, 3, p=0.1)
    h, target, v_prev, projection = make_inputs(case)
    out = sk.fused_local_loss(h, target, v_prev, projection=projection, p=0.1, seed=1, alignment_weight=0.5)
    assert out.loss.dtype == torch.float32 and out.loss.requires_grad and out.loss.dim() == 0
    assert not out.ce.requires_grad and not out.alignment.requires_grad and not out.v.requires_grad
    assert out.v.shape == (4, 3) and out.v.dtype == h.dtype
    assert torch.allclose(out.loss.detach(), out.ce + 0.5 * out.alignment)
    double = sk.fused_local_loss(as_float64(h), target, as_float64(v_prev), projection=as_float64(projection))
    assert double.loss.dtype == torch.float64 and double.v.dtype == torch.float64


def test_available_backends_lists_reference():
    names = sk.available_backends()
    assert names[0] == "reference" and set(names) <= {"reference", "cpu", "triton", "cuda"}
