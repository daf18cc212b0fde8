"""The Bhattacharyya alignment term (fused_local_loss(..., alignment="bhattacharyya"), docs/design.md §2) on every
backend that runs here: the reference against the definition and its gradient against the derivation, every fused
backend against the float64 oracle (values and gradients; B = 1, C > B, C not a power of two, confident rows, −inf
in v_prev, both projection paths), float32 element by element no less accurate than plain float32 torch, no clamp,
bad input eager and compiled, torch.compile(fullgraph=True), and sk.nn.LocalLoss. The fused_local_loss problems of
tests/cases.py (LOCAL_LOSS_CASES) include Bhattacharyya cases, so test_fused_local_loss.py runs them too (oracle,
accuracy rule, eager node against the traced ops bit for bit)."""

import math

import numpy as np
import pytest
import torch

import svp_kernels as sk
from svp_kernels.backends import reference
from svp_kernels.testing import (Case, assert_close, assert_no_less_accurate, assert_no_less_accurate_to_rounding,
                                 bhattacharyya_inputs, device_backends, epilogue_ground_truth, ground_truth,
                                 make_inputs, run, wide_row_inputs)

from cases import param_id, wide_row_params

FUSED = device_backends(include_reference=False)
ALL = device_backends()
FIELDS = ("loss", "ce", "alignment", "g_v")
# (B, C): B = 1, two rows, C > B, C not a power of two, several row tiles, C > the Triton interpreter's 32-wide chunk
SHAPES = [(1, 3), (2, 5), (7, 13), (33, 10), (9, 100), (40, 37)]
WEIGHT = 0.7


def run_epilogue(backend, v, target, v_prev, mean, alignment_weight=WEIGHT):
    """(loss, ce, alignment, g_v) of the backend's epilogue with the Bhattacharyya term, g_v by autograd."""
    v = v.detach().requires_grad_(True)
    loss, ce, alignment = sk.backends.load(backend).epilogue(v, target, v_prev, alignment_weight, mean, False,
                                                             "bhattacharyya")
    (g_v,) = torch.autograd.grad(loss, v)
    return loss.detach(), ce, alignment, g_v


# ----------------------------------------------------------------------------------------------------
# The oracle: the definition, the derivation of the gradient, no clamp
# ----------------------------------------------------------------------------------------------------

def test_reference_matches_the_definition():
    """BD_b = −log Σ_c sqrt(p_c q_c), p = softmax(v_b), q = softmax(v_prev_b), written out in numpy (float64);
    the term is its batch mean ("mean") or sum ("sum"); a −inf in v_prev is a class of probability 0."""
    B, C = 6, 5
    v, target, v_prev = bhattacharyya_inputs(B, C, torch.float64)
    v_prev[1] = v_prev[1] / 40  # moderate: the literal formula is exact enough here
    for mean in (True, False):
        loss, ce, alignment = reference.epilogue(v, target, v_prev, WEIGHT, mean, False, "bhattacharyya")
        a, b, y = v.numpy(), v_prev.numpy(), target.numpy()
        p = np.exp(a) / np.exp(a).sum(1, keepdims=True)
        q = np.exp(b) / np.exp(b).sum(1, keepdims=True)
        distances = [-math.log(sum(math.sqrt(p[i, c] * q[i, c]) for c in range(C))) for i in range(B)]
        expected = sum(distances) / (B if mean else 1)
        expected_ce = sum(math.log(np.exp(a[i]).sum()) - a[i, y[i]] for i in range(B)) / B
        assert math.isclose(alignment.item(), expected, rel_tol=1e-12)
        assert math.isclose(ce.item(), expected_ce, rel_tol=1e-12)
        assert math.isclose(loss.item(), expected_ce + WEIGHT * expected, rel_tol=1e-12)
    assert abs(distances[3]) < 1e-12, "identical rows are at distance 0"
    assert math.isclose(distances[2], -0.5 * math.log(p[2, y[2]]), rel_tol=1e-12), "one-hot: ½ CE"


@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
def test_gradient_matches_the_derivation(mean):
    """dL/dv = (softmax(v) − onehot)/B + λ·(softmax(v) − r)/2 (/B for "mean"), r = sqrt(p q) / Σ_c sqrt(p q):
    against autograd of the reference and against central differences of the literal definition (float64)."""
    B, C = 5, 7
    v, target, v_prev = bhattacharyya_inputs(B, C, torch.float64)
    v_prev[1] = v_prev[1] / 40
    v = v.requires_grad_(True)
    loss, _, _ = reference.epilogue(v, target, v_prev, WEIGHT, mean, False, "bhattacharyya")
    (autograd,) = torch.autograd.grad(loss, v)
    p, q = torch.softmax(v.detach(), 1), torch.softmax(v_prev, 1)
    r = (p * q).sqrt()
    r = r / r.sum(1, keepdim=True)
    onehot = torch.nn.functional.one_hot(target, C).double()
    derived = (p - onehot) / B + WEIGHT * (p - r) / (2 * B if mean else 2)
    assert_close(autograd, derived, 1e-14, "autograd vs derivation")

    def literal(x):
        distances = -torch.log((torch.softmax(x, 1) * q).sqrt().sum(1))
        return torch.nn.functional.cross_entropy(x, target) + WEIGHT * (distances.mean() if mean else distances.sum())

    step = 1e-6
    numeric = torch.zeros_like(derived)
    for index in np.ndindex(B, C):
        shift = torch.zeros_like(derived)
        shift[index] = step
        numeric[index] = (literal(v.detach() + shift) - literal(v.detach() - shift)) / (2 * step)
    assert_close(numeric, derived, 1e-8, "central differences vs derivation")


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_clamp_for_confident_rows(dtype, device, backend):
    """v = (t, 0), v_prev = (0, t): BD = t/2 − log 2 exactly, where a clamp of Σ sqrt(p q) at 1e-12 gives
    −log 1e-12 = 27.63 for t ≥ 57 and no gradient; t = 1000 underflows the product p·q even in float64."""
    for t in (60.0, 1000.0):
        v = torch.tensor([[t, 0.0]], dtype=dtype, device=device)
        v_prev = torch.tensor([[0.0, t]], dtype=dtype, device=device)
        loss, ce, alignment, g_v = run_epilogue(backend, v, None, v_prev, True, alignment_weight=1.0)
        assert math.isclose(alignment.item(), t / 2 - math.log(2), rel_tol=1e-6), (t, alignment.item())
        # ∂BD/∂v = ½(softmax(v) − r), softmax(v) = (1, 0) and r = (½, ½) to float64 rounding
        tol = 1e-12 if dtype == torch.float64 else 1e-6  # float32: a few ulps of plain torch's own rounding
        assert_close(g_v, torch.tensor([[0.25, -0.25]], dtype=torch.float64), tol, f"{backend} g_v t={t}")
    clamped = -math.log(max(2 * math.exp(-30.0), 1e-12))  # the clamped coefficient at t = 60
    assert math.isclose(clamped, 27.631021115928547) and 30 - math.log(2) - clamped > 1.67


# ----------------------------------------------------------------------------------------------------
# Every fused backend against the oracle
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("B,C", SHAPES, ids=param_id)
def test_epilogue_float64_matches_ground_truth(B, C, device, backend):
    """Confident rows, log-one-hot rows (−inf) and rows equal to v in v_prev (bhattacharyya_inputs); with and
    without a target, mean and sum."""
    v, target, v_prev = bhattacharyya_inputs(B, C, torch.float64, device)
    for t in (target, None):
        for mean in (True, False):
            actual = run_epilogue(backend, v, t, v_prev, mean)
            expected = epilogue_ground_truth(v, t, v_prev, WEIGHT, mean, False, "bhattacharyya")
            for name, a, e in zip(FIELDS, actual, expected):
                assert a.dtype == torch.float64, name
                assert_close(a, e, 1e-12, f"{backend} B={B} C={C} target={t is not None} mean={mean}: {name}")


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("B,C", SHAPES, ids=param_id)
def test_epilogue_float32_no_less_accurate_than_plain_torch(B, C, device, backend):
    v, target, v_prev = bhattacharyya_inputs(B, C, torch.float32, device)
    for t in (target, None):
        for mean in (True, False):
            actual = run_epilogue(backend, v, t, v_prev, mean)
            plain = run_epilogue("reference", v.cpu(), None if t is None else t.cpu(), v_prev.cpu(), mean)
            truth = epilogue_ground_truth(v, t, v_prev, WEIGHT, mean, False, "bhattacharyya")
            for name, a, r, e in zip(FIELDS, actual, plain, truth):
                assert a.dtype == torch.float32, name
                assert_no_less_accurate(a, r, e, f"{backend} B={B} C={C} target={t is not None} mean={mean}: {name}")


@pytest.mark.parametrize("device,backend,shape", wide_row_params(FUSED), ids=param_id)
def test_float32_wide_rows_no_less_accurate_than_plain_torch(device, backend, shape):
    """Rows up to 8192 wide (v_prev of v's width): loss, alignment and g_v within two float32 ulps of plain
    torch's error."""
    B, C, _ = shape
    v, target, v_prev = wide_row_inputs(B, C, C, device)
    actual = run_epilogue(backend, v, target, v_prev, False)
    plain = run_epilogue("reference", v.cpu(), target.cpu(), v_prev.cpu(), False)
    truth = epilogue_ground_truth(v, target, v_prev, WEIGHT, False, False, "bhattacharyya")
    for name, a, r, e in zip(FIELDS, actual, plain, truth):
        if name != "ce":
            assert_no_less_accurate_to_rounding(a, r, e, f"{backend} {shape}: {name}")


BD_CASES = [Case(7, 13, 5, 5, p=0.3, alignment="bhattacharyya"),
            Case(3, 40, 11, 11, projection="implicit", p=0.1, reduction="sum", alignment="bhattacharyya")]


@pytest.mark.parametrize("device,backend", [pair for pair in FUSED if pair[1] in ("cpu", "cuda")])
@pytest.mark.parametrize("case", BD_CASES, ids=str)
def test_gemm_projection_path(case, device, backend):
    """projection_path="gemm" (R̃ written out, the device's GEMM) with the Bhattacharyya epilogue: the oracle in
    float64, and float32 equal to the fused path's epilogue on the same v."""
    inputs = make_inputs(case, torch.float64, device)
    expected = ground_truth(case, *inputs)
    actual = run(case, *inputs, backend, projection_path="gemm")
    for name, a, e in zip(("loss", "ce", "alignment", "v", "dh"), actual, expected):
        assert_close(a, e, 1e-5 if case.projection == "implicit" else 1e-10, f"{backend} gemm {case}: {name}")


@pytest.mark.parametrize("device,backend", ALL)
def test_gradcheck_float64(device, backend):
    case = Case(5, 7, 4, 4, p=0.2, alignment="bhattacharyya")
    h, target, v_prev, projection = make_inputs(case, torch.float64, device)

    def loss_of(h):
        return sk.fused_local_loss(h, target, v_prev, projection=projection, p=case.p, seed=3, alignment_weight=0.9,
                                   backend=backend, alignment="bhattacharyya").loss

    assert torch.autograd.gradcheck(loss_of, (h,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", ALL)
def test_no_v_prev_is_the_cross_entropy_and_lambda_zero_keeps_the_report(device, backend):
    """v_prev=None: no alignment term, the cosine_gram call's bits; λ = 0: the CE gradient, the term reported."""
    h, target, v_prev, projection = make_inputs(Case(6, 9, 4, 4, p=0.1), torch.float32, device)
    cross_entropy_only, no_term = (run(Case(6, 9, 4, None, p=0.1, alignment=alignment), h, target, None, projection,
                                       backend) for alignment in ("cosine_gram", "bhattacharyya"))
    for a, b in zip(cross_entropy_only, no_term):
        assert torch.equal(a, b)
    weightless = run(Case(6, 9, 4, 4, p=0.1, alignment_weight=0.0, alignment="bhattacharyya"), h, target, v_prev,
                     projection, backend)
    assert weightless[2] > 0 and torch.equal(weightless[0], weightless[1])
    assert_close(weightless[4], cross_entropy_only[4], 1e-6, f"{backend} dh with λ = 0")


# ----------------------------------------------------------------------------------------------------
# Bad input, torch.compile, the module
# ----------------------------------------------------------------------------------------------------

BAD = [  # (id, keyword changes, v_prev columns, exception, message)
    ("unknown", dict(alignment="kl"), 4, ValueError, "alignment must be 'cosine_gram' or 'bhattacharyya', got 'kl'"),
    ("not-a-string", dict(alignment=1), 4, ValueError, "alignment must be"),
    ("v_prev-width", dict(alignment="bhattacharyya"), 3, ValueError, r"v_prev has C' = 3 columns but v has C = 4"),
    ("center", dict(alignment="bhattacharyya", center=True), 4, ValueError, "center=True has no meaning"),
]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("changes,columns,exception,message", [case[1:] for case in BAD], ids=[c[0] for c in BAD])
def test_bad_input_raises(changes, columns, exception, message, device, backend, compiled):
    """The API's ValueError, eager and compiled (torch.compile without fullgraph: under fullgraph=True dynamo turns
    any Python raise into its own Unsupported error, for every argument check alike)."""
    torch._dynamo.reset()
    h, target, _, projection = make_inputs(Case(5, 6, 4, 4, p=0.1), torch.float32, device)
    v_prev = torch.randn(5, columns, device=device)

    def loss_of(h):
        return sk.fused_local_loss(h, target, v_prev, projection=projection, p=0.1, seed=1, backend=backend,
                                   **changes).loss

    with pytest.raises(exception, match=message):
        (torch.compile(loss_of, backend="aot_eager") if compiled else loss_of)(h)


@pytest.mark.parametrize("device,backend", ALL)
def test_torch_compile_fullgraph_matches_eager(device, backend):
    """Forward and backward of a compiled step, without a graph break: eager's numbers."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    case = Case(9, 14, 5, 5, p=0.2, alignment="bhattacharyya")
    h, target, v_prev, projection = make_inputs(case, torch.float32, device)

    def step(h):
        return sk.fused_local_loss(h, target, v_prev, projection=projection, p=0.2, seed=7, backend=backend,
                                   alignment="bhattacharyya").loss

    leaf = h.detach().requires_grad_(True)
    eager = step(leaf)
    (eager_grad,) = torch.autograd.grad(eager, leaf)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(leaf)
    (compiled_grad,) = torch.autograd.grad(compiled, leaf)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert_close(compiled, eager, 1e-6, f"{backend} compiled loss")
    assert_close(compiled_grad, eager_grad, 1e-6, f"{backend} compiled dh")


def test_local_loss_module_takes_the_option():
    torch.manual_seed(0)
    module = sk.nn.LocalLoss(10, 4, p=0.2, alignment_weight=0.3, seed=5, alignment="bhattacharyya")
    h = torch.randn(6, 10, requires_grad=True)
    target, v_prev = torch.randint(0, 4, (6,)), torch.randn(6, 4)
    out = module(h, target, v_prev, seed=9)
    expected = sk.fused_local_loss(h, target, v_prev, projection=module.projection.projection, p=0.2, seed=9,
                                   alignment_weight=0.3, alignment="bhattacharyya")
    for a, b in zip(out, expected):
        assert torch.equal(a, b)
    assert module.alignment == "bhattacharyya"
    with pytest.raises(ValueError, match="alignment must be"):
        sk.nn.LocalLoss(10, 4, alignment="cosine")
