"""fused_local_loss on every backend that runs here against the float64 reference, plus its contract:
gradients, NaN/inf, strides, seeds and output dtypes.

Parametrised over the registered backends, so triton (TRITON_INTERPRET=1) and cuda join by registering.
Rows whose expected value is the reference itself leave the reference backend out.
"""

import pytest
import torch

import svp_kernels as sk

from cases import LOCAL_LOSS_CASES, Case, as_float64, device_backends, ground_truth, make_inputs, run
from helpers import assert_close, assert_no_less_accurate

FIELDS = ("loss", "ce", "alignment", "v", "dh")
FUSED = device_backends(include_reference=False)
ALL = device_backends()


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("case", LOCAL_LOSS_CASES, ids=str)
def test_float64_matches_ground_truth(case, device, backend):
    inputs = make_inputs(case, torch.float64, device)
    expected = ground_truth(case, *inputs)
    actual = run(case, *inputs, backend)
    # Implicit R is generated in float32 (log/cos of each backend's libm): agree to float32 rounding.
    tol = 1e-5 if case.projection == "implicit" else 1e-10
    for name, a, e in zip(FIELDS, actual, expected):
        assert_close(a, e, tol, f"{backend}/{case}: {name}")


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("case", LOCAL_LOSS_CASES, ids=str)
def test_float32_no_less_accurate_than_plain_torch(case, device, backend):
    """The accuracy rule (tests/helpers.py), element by element, for the loss, both terms, v and dh."""
    inputs = make_inputs(case, torch.float32, device)
    expected = ground_truth(case, *inputs)
    plain = run(case, *inputs, "reference")
    actual = run(case, *inputs, backend)
    for name, a, r, e in zip(FIELDS, actual, plain, expected):
        assert a.dtype == r.dtype, f"{name}: dtype {a.dtype} != plain {r.dtype}"
        assert_no_less_accurate(a, r, e, f"{backend}/{case}: {name}")


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("case", [Case(5, 7, 4, 3, p=0.3, center=True), Case(12, 6, 3, 2, projection="implicit", p=0.2),
                                  Case(4, 0, 6, 5, projection="identity", reduction="sum")], ids=str)
def test_gradcheck_float64(case, device, backend):
    h, target, v_prev, projection = make_inputs(case, torch.float64, device)

    def loss_of(h):
        return sk.fused_local_loss(h, target, v_prev, projection=projection, p=case.p, seed=3,
                                   alignment_weight=case.alignment_weight, reduction=case.reduction,
                                   center=case.center, backend=backend).loss

    assert torch.autograd.gradcheck(loss_of, (h,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", ALL)
def test_nan_and_inf_propagate(device, backend):
    case = Case(6, 9, 4, 3, p=0.2)
    h, target, v_prev, projection = make_inputs(case, torch.float32, device)
    for bad in (float("nan"), float("inf")):
        poisoned = h.detach().clone()
        poisoned[2, 3] = bad
        loss = run(case, poisoned, target, v_prev, projection, backend)[0]
        assert not torch.isfinite(loss), f"{backend}: loss {loss} should not be finite with {bad} in h"


@pytest.mark.parametrize("device,backend", ALL)
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
