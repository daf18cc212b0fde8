"""fused_local_loss on every backend that runs here against the float64 reference, plus its contract:
gradients, NaN/inf, strides, seeds, output dtypes and out-of-range targets (eager and compiled).

Parametrised over the registered backends, so triton (TRITON_INTERPRET=1) and cuda join by registering.
Rows whose expected value is the reference itself leave the reference backend out.
"""

import pytest
import torch

import svp_kernels as sk
from svp_kernels.testing import (Case, as_float64, assert_close, assert_no_less_accurate,
                                 assert_no_less_accurate_to_rounding, device_backends, ground_truth, make_inputs,
                                 run, wide_row_inputs)

from cases import ALIGNED_FEATURE_SPACE, LOCAL_LOSS_CASES, aligned_inputs, param_id, wide_row_params

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
    """The accuracy rule (svp_kernels.testing), element by element, for the loss, both terms, v and dh."""
    inputs = make_inputs(case, torch.float32, device)
    expected = ground_truth(case, *inputs)
    plain = run(case, *inputs, "reference")
    actual = run(case, *inputs, backend)
    for name, a, r, e in zip(FIELDS, actual, plain, expected):
        assert a.dtype == r.dtype, f"{name}: dtype {a.dtype} != plain {r.dtype}"
        assert_no_less_accurate(a, r, e, f"{backend}/{case}: {name}")


def _op_path_loss(case: Case, h, target, v_prev, projection, backend: str, seed: int = 42):
    """(loss, ce, alignment, v) of the leaf `h` through the backend's autograd ops, the path torch.compile traces."""
    from svp_kernels import backends

    module = backends.load(backend)
    seed_tensor = torch.full((), seed, dtype=torch.int64, device=h.device)
    if case.projection == "identity":
        v = h
    elif case.projection == "implicit":
        std = projection.std_for(h.shape[1])
        v = module.projection(h, None, projection.out_features, projection.seed, std, case.p, seed_tensor)
    else:
        v = module.projection(h, projection, projection.shape[0], 0, 0.0, case.p, seed_tensor)
    loss, ce, alignment = module.epilogue(v, target, v_prev, case.alignment_weight, case.reduction == "mean",
                                          case.center, case.alignment)
    return loss, ce, alignment, v


def _op_path(case: Case, h, target, v_prev, projection, backend: str, seed: int = 42):
    """(loss, ce, alignment, v, dh) through the backend's autograd ops."""
    h = h.detach().requires_grad_()
    loss, ce, alignment, v = _op_path_loss(case, h, target, v_prev, projection, backend, seed)
    (dh,) = torch.autograd.grad(loss, h)
    return loss.detach(), ce, alignment, v.detach(), dh


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("case", LOCAL_LOSS_CASES, ids=str)
def test_eager_node_matches_the_traced_ops_bitwise(case, device, backend):
    """Eager calls run one autograd node over the gradient interface; compiled graphs run the ops: same bits."""
    inputs = make_inputs(case, torch.float32, device)
    eager = run(case, *inputs, backend)
    ops = _op_path(case, *inputs, backend)
    for name, a, o in zip(FIELDS, eager, ops):
        assert a.dtype == o.dtype and torch.equal(a, o), f"{backend}/{case}: {name} differs from the op path"


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("case", [Case(7, 30, 5, 4, p=0.2), Case(6, 0, 4, 3, projection="identity"),
                                  Case(9, 21, 3, 2, projection="implicit", p=0.1, center=True)], ids=str)
def test_eager_node_scales_by_the_incoming_gradient(case, device, backend):
    """dh of (−2.5 · loss) through the eager node equals the op path's bit for bit (not the unscaled dh)."""
    h, target, v_prev, projection = make_inputs(case, torch.float32, device)
    grads = []
    for path in ("eager", "ops"):
        leaf = h.detach().requires_grad_()
        if path == "eager":
            loss = sk.fused_local_loss(leaf, target, v_prev, projection=projection, p=case.p, seed=3,
                                       alignment_weight=case.alignment_weight, reduction=case.reduction,
                                       center=case.center, backend=backend).loss
        else:
            loss = _op_path_loss(case, leaf, target, v_prev, projection, backend, seed=3)[0]
        (-2.5 * loss).backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1]), f"{backend}/{case}: the eager node's dh differs from the op path's"


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("op", ["fused_local_loss", "dropout_projection"])
def test_eager_node_refuses_a_second_derivative(op, device, backend):
    """The kernels have no second derivative: with create_graph, differentiating dh again raises (as Python's
    once_differentiable does), instead of returning gradients with the second-order terms missing."""
    case = Case(6, 20, 4, 3, p=0.1)
    h, target, v_prev, projection = make_inputs(case, torch.float32, device)
    h.requires_grad_()
    if op == "fused_local_loss":
        out = sk.fused_local_loss(h, target, v_prev, projection=projection, p=0.1, seed=1, backend=backend).loss
    else:
        out = sk.dropout_projection(h, projection, p=0.1, seed=1, backend=backend)
    incoming = torch.ones_like(out, requires_grad=True)
    (dh,) = torch.autograd.grad(out, h, grad_outputs=incoming, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dh.sum().backward()


@pytest.mark.parametrize("device,backend", FUSED)
def test_eager_node_saves_only_g_v_the_seed_and_r(device, backend):
    """docs/design.md §2: autograd keeps g_v (B, C), the seed and a dense R — nothing of size B·D."""
    case = Case(9, 40, 6, 5, p=0.2)
    h, target, v_prev, projection = make_inputs(case, torch.float32, device)
    h.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = sk.fused_local_loss(h, target, v_prev, projection=projection, p=0.2, seed=1, backend=backend)
    # cpu and cuda: the C++ node of csrc/autograd.cpp; triton: the Python node of svp_kernels/backends/triton/nodes.py
    native = "torch::autograd::CppNode<svp::nodes::FusedLocalLoss>"
    assert out.loss.grad_fn.name() == (native if backend in ("cpu", "cuda") else "FusedLocalLossBackward")
    assert sorted(saved) == sorted([(9, 6), (6, 40), ()]), saved


# Wide rows (svp_kernels.testing): identity projection (v = h, dh = dloss/dv), reduction "sum" (gradients of order one).
@pytest.mark.parametrize("center", [True, False], ids=["center", "raw"])
@pytest.mark.parametrize("device,backend,shape", wide_row_params(FUSED), ids=param_id)
def test_float32_wide_rows_no_less_accurate_than_plain_torch(device, backend, shape, center):
    """Loss, alignment and dh, element by element, within two float32 ulps of plain torch's own error."""
    B, C, C_prev = shape
    case = Case(B, 0, C, C_prev, projection="identity", reduction="sum", center=center)
    h, target, v_prev = wide_row_inputs(B, C, C_prev, device)
    expected = ground_truth(case, h, target, v_prev, None)
    plain = run(case, h, target, v_prev, None, "reference")
    actual = run(case, h, target, v_prev, None, backend)
    for name, a, r, e in zip(FIELDS, actual, plain, expected):
        if name in ("loss", "alignment", "dh"):
            assert_no_less_accurate_to_rounding(a, r, e, f"{backend} {shape} center={center}: {name}")


@pytest.mark.parametrize("center", [True, False], ids=["center", "raw"])
@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("B,C", ALIGNED_FEATURE_SPACE, ids=param_id)
def test_float32_aligned_feature_space_no_less_accurate_than_plain_torch(B, C, device, backend, center):
    """C + C' < B and v_prev ≈ v: the feature-space identity's cancellation, against plain torch's batch space.
    Loss and alignment to two float32 ulps; dh by the suite's rule (its component along â, large in the
    identity and projected out by the normalisation's backward, is rounded to float32 first: centred, a few
    elements reach 5× plain's error, 1.1e-6 against 2.0e-7 at B = 40, C = 6)."""
    case = Case(B, 0, C, C, projection="identity", reduction="sum", center=center)
    h, target, v_prev = aligned_inputs(B, C, device)
    expected = ground_truth(case, h, target, v_prev, None)
    plain = run(case, h, target, v_prev, None, "reference")
    actual = run(case, h, target, v_prev, None, backend)
    for name, a, r, e in zip(FIELDS, actual, plain, expected):
        if name in ("loss", "alignment"):
            assert_no_less_accurate_to_rounding(a, r, e, f"{backend} B={B} C={C} center={center}: {name}")
        elif name == "dh":
            assert_no_less_accurate(a, r, e, f"{backend} B={B} C={C} center={center}: {name}")


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


# ----------------------------------------------------------------------------------------------------
# Out-of-range targets: an error naming target and the range, or NaN loss and gradient; never a number
# ----------------------------------------------------------------------------------------------------

TARGET_CASE = Case(4, 6, 3, 2, p=0.1)
BAD_TARGETS = [TARGET_CASE.C, -1, 10**9]  # C itself, negative, far outside (any read there would fault)
# The Triton interpreter (numpy) warns about the NaN it is asked to produce.
quiet_nan = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def bad_target(device, value):
    return torch.tensor([0, value, 2, 1], device=device)


def assert_nan_loss_and_gradient(loss, grad_h, name):
    assert torch.isnan(loss), f"{name}: loss {loss.item()} should be NaN"
    assert torch.isnan(grad_h[1]).all(), f"{name}: the gradient of the sample with a bad target should be NaN"


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("value", BAD_TARGETS)
def test_out_of_range_target_eager(value, device, backend, monkeypatch):
    """Eager: the API's range check raises for CPU tensors; on CUDA it is opt-in (SVP_KERNELS_CHECK_TARGETS=1)
    and the kernels give NaN without it."""
    from svp_kernels.validation import CHECK_TARGETS_ENV

    h, _, v_prev, projection = make_inputs(TARGET_CASE, device=device)
    target = bad_target(device, value)
    monkeypatch.delenv(CHECK_TARGETS_ENV, raising=False)
    if target.device.type != "cpu":
        loss, _, _, _, grad_h = run(TARGET_CASE, h, target, v_prev, projection, backend)
        assert_nan_loss_and_gradient(loss, grad_h, f"{backend} target {value}")
        monkeypatch.setenv(CHECK_TARGETS_ENV, "1")
    with pytest.raises(ValueError, match=r"target values must be in \[0, 3\)"):
        run(TARGET_CASE, h, target, v_prev, projection, backend)


@quiet_nan
@pytest.mark.parametrize("device,backend", ALL)
def test_out_of_range_target_in_the_epilogue_is_nan(device, backend):
    """Below the API (no range check): the backend's epilogue never reads through a bad target."""
    generator = torch.Generator().manual_seed(5)
    for value in BAD_TARGETS:
        v = torch.randn(4, 3, generator=generator).to(device).requires_grad_(True)
        v_prev = torch.randn(4, 2, generator=generator).to(device)
        loss, ce, _ = sk.backends.load(backend).epilogue(v, bad_target(device, value), v_prev, 0.5, True, False)
        (grad,) = torch.autograd.grad(loss, v)
        assert torch.isnan(ce), f"{backend} target {value}: ce {ce.item()}"
        assert_nan_loss_and_gradient(loss, grad, f"{backend} epilogue target {value}")
        assert torch.isfinite(grad[[0, 2, 3]]).all(), f"{backend}: rows with valid targets stay finite"


@quiet_nan
@pytest.mark.parametrize("device,backend", ALL)
def test_out_of_range_target_compiled(device, backend):
    """Under torch.compile the host check is skipped: every backend returns NaN loss and gradient."""
    torch._dynamo.reset()
    h, _, v_prev, projection = make_inputs(TARGET_CASE, device=device)

    def loss_of(h, target):
        return sk.fused_local_loss(h, target, v_prev, projection=projection, p=TARGET_CASE.p, seed=3,
                                   backend=backend).loss

    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    for value in BAD_TARGETS:
        leaf = h.detach().requires_grad_(True)
        loss = compiled(leaf, bad_target(device, value))
        (grad_h,) = torch.autograd.grad(loss, leaf)
        assert_nan_loss_and_gradient(loss, grad_h, f"compiled {backend} target {value}")


def test_cuda_target_check_is_opt_in(monkeypatch):
    """The host range check synchronises, so device tensors get it only with SVP_KERNELS_CHECK_TARGETS=1."""
    from svp_kernels.validation import CHECK_TARGETS_ENV, checks_target_range

    on_device = torch.zeros(3, dtype=torch.int64, device="meta")
    monkeypatch.delenv(CHECK_TARGETS_ENV, raising=False)
    assert checks_target_range(torch.zeros(3, dtype=torch.int64)) and not checks_target_range(on_device)
    monkeypatch.setenv(CHECK_TARGETS_ENV, "1")
    assert checks_target_range(on_device)
