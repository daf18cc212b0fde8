"""The CUDA backend's own kernels (csrc/cuda), driven through torch.ops.svp_kernels on CUDA tensors.

The per-op files (test_projection.py, test_alignment.py, ...) already run "cuda" through the public API
when it is available; this file aims at the kernels themselves: masks bit-identical to the reference (including
64-bit offsets), forward/backward/epilogue/cosine_gram against the float64 reference on odd shapes in all
four dtypes, every code path of the launch plans (split-K and its reduction, resident vs regenerated R̃
panels, feature- vs batch-space alignment, split Grams) forced on small shapes through the testing hook
svp_kernels.testing.launch_plan (a LaunchPlan, csrc/cuda/svp_cuda.h), bitwise determinism, and opcheck
of the four ops.

Every test is @pytest.mark.cuda and skipped without a GPU or without a CUDA build of svp_kernels._C.
"""

from __future__ import annotations

import pytest
import torch

import svp_kernels as sk
from svp_kernels import philox
from svp_kernels.backends import reference
from svp_kernels.testing import (ACC_TOL, EPILOGUE_PLANS, EPILOGUE_SHAPES, IMPLICIT_TOL, MASK_SHAPES, OUT_TOL,
                                 PROJECTION_PLANS, PROJECTION_SHAPES, assert_close, assert_equal_masks,
                                 cosine_gram_ground_truth, epilogue_ground_truth, launch_plan,
                                 projection_ground_truth, seed_tensor)

from cases import OP_SAMPLE_COUNT, op_samples

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if not sk._ops.extension_has_cuda():
    pytest.skip("svp_kernels._C was built without the CUDA kernels", allow_module_level=True)

ops = torch.ops.svp_kernels
DEVICE = torch.device("cuda")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def randn(*shape, dtype=torch.float64, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------------
# Masks: bit-identical to the reference, forward and backward, 32- and 64-bit offsets
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,D,p,seed", MASK_SHAPES)
def test_mask_bit_identical_forward_and_backward(C, D, p, seed, dtype):
    """R = 1: forward with h = I gives v = R̃ᵀ, backward with grad_v = I gives dh = R̃; both show the mask."""
    expected = philox.keep_mask(seed, C, D, p)
    ones = torch.ones(C, D, dtype=dtype, device=DEVICE)
    v = ops.projection_forward(torch.eye(D, dtype=dtype, device=DEVICE), ones, C, 0, 0.0, p, seed_tensor(seed, DEVICE))
    assert_equal_masks(v.t() != 0, expected, f"forward mask {dtype} C={C} D={D} p={p} seed={seed}")
    kept = v.t()[expected.to(DEVICE)].double().cpu()
    scale = torch.tensor(1.0 / (1.0 - p), dtype=v.dtype).item()
    assert torch.all(kept == scale), "kept elements must be exactly 1/(1 − p) in the accumulation dtype"

    grad_v = torch.eye(C, dtype=v.dtype, device=DEVICE)
    dh = ops.projection_backward(grad_v, ones, D, 0, 0.0, p, seed_tensor(seed, DEVICE), dtype)
    assert dh.dtype == dtype and dh.shape == (C, D)
    assert_equal_masks(dh != 0, expected, f"backward mask {dtype} C={C} D={D} p={p} seed={seed}")


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_implicit_projection_matches_materialize(p):
    C, D, proj_seed, seed = 37, 45, 123, 9
    implicit = sk.ImplicitProjection(C, seed=proj_seed)
    std = 1.0 / D**0.5
    v = ops.projection_forward(torch.eye(D, device=DEVICE), None, C, proj_seed, std, p, seed_tensor(seed, DEVICE))
    expected = reference.dropped_weight(None, D, C, proj_seed, std, p, seed, torch.float32, "cpu")
    assert_close(v.t(), expected, 2e-6, f"implicit R̃ p={p}")
    assert_equal_masks(v.t() != 0, expected != 0, "implicit mask")
    assert_close(v.t(), implicit.materialize(D) * (philox.keep_mask(seed, C, D, p) / (1 - p)), 2e-6, "materialize")


def test_mask_64bit_offsets():
    """C·D > 2³²: forward picks columns with one-hot rows of h, backward a row of R̃ with a one-hot grad_v."""
    C, D, p, seed, proj_seed, std = 130, 2**25 + 3, 0.5, 2**62 + 11, 77, 0.01
    columns = [0, 5, D // 2, D - 1]
    h = torch.zeros(len(columns), D, device=DEVICE)
    h[torch.arange(len(columns)), torch.tensor(columns)] = 1.0
    # v[b, c] = R̃[c, columns[b]]
    v = ops.projection_forward(h, None, C, proj_seed, std, p, seed_tensor(seed, DEVICE)).cpu()

    def r_tilde(c, j):
        offsets = c.to(torch.int64) * D + j.to(torch.int64)
        keep = philox.u24(philox.philox4x32_10(seed, offsets)[0]) >= p
        words = philox.philox4x32_10(proj_seed, offsets)
        u1 = ((words[0] >> 8) + 1).to(torch.float32) * 2.0**-24
        u2 = philox.u24(words[1])
        r = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(torch.tensor(philox.TWO_PI_F32, dtype=torch.float32) * u2)
        scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
        return keep, (r * torch.tensor(std, dtype=torch.float32)) * keep * scale

    cs = torch.arange(C)
    for b, j in enumerate(columns):
        keep, value = r_tilde(cs, torch.full((C,), j))
        assert (cs * D + j).max() >= 2**32
        assert_equal_masks(v[b] != 0, keep, f"forward 64-bit mask, column {j}")
        assert_close(v[b], value, IMPLICIT_TOL, f"forward 64-bit values, column {j}")

    row = C - 1
    grad_v = torch.zeros(1, C, device=DEVICE)
    grad_v[0, row] = 1.0
    dh = ops.projection_backward(grad_v, None, D, proj_seed, std, p, seed_tensor(seed, DEVICE), torch.float32)[0].cpu()
    js = torch.cat([torch.arange(1000), torch.arange(D - 1000, D)])
    keep, value = r_tilde(torch.full_like(js, row), js)
    assert_equal_masks(dh[js] != 0, keep, "backward 64-bit mask")
    assert_close(dh[js], value, IMPLICIT_TOL, "backward 64-bit values")


# ----------------------------------------------------------------------------------------------------
# Projection forward / backward against float64
# ----------------------------------------------------------------------------------------------------

def projection_case(B, D, C, dtype, implicit, p, seed=0):
    h = randn(B, D, seed=seed, dtype=dtype)
    weight = None if implicit else randn(C, D, seed=seed + 1, dtype=dtype, scale=D**-0.5)
    grad_v = randn(B, C, seed=seed + 2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return h, weight, grad_v


def run_projection(h, weight, grad_v, C, proj_seed, std, p, seed):
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    v = ops.projection_forward(to(h), to(weight), C, proj_seed, std, p, seed_tensor(seed, DEVICE))
    dh = ops.projection_backward(to(grad_v), to(weight), h.shape[1], proj_seed, std, p, seed_tensor(seed, DEVICE),
                                 h.dtype)
    return v, dh


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("implicit,p", [(False, 0.0), (False, 0.3), (True, 0.0), (True, 0.25)])
@pytest.mark.parametrize("B,D,C", PROJECTION_SHAPES)
def test_projection_matches_float64(B, D, C, implicit, p, dtype):
    proj_seed, std, seed = 31, D**-0.5, 2024
    h, weight, grad_v = projection_case(B, D, C, dtype, implicit, p)
    v, dh = run_projection(h, weight, grad_v, C, proj_seed, std, p, seed)
    v_expected, dh_expected = projection_ground_truth(h, weight, grad_v, C, proj_seed, std, p, seed)
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    assert v.dtype == accumulation and v.shape == (B, C)
    assert dh.dtype == dtype and dh.shape == (B, D)
    v_tol = max(ACC_TOL[dtype], IMPLICIT_TOL if implicit else 0.0)
    dh_tol = max(OUT_TOL[dtype], IMPLICIT_TOL if implicit else 0.0)
    assert_close(v, v_expected, v_tol, f"v {dtype} B={B} D={D} C={C} implicit={implicit} p={p}")
    assert_close(dh, dh_expected, dh_tol, f"dh {dtype} B={B} D={D} C={C} implicit={implicit} p={p}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("plan_value", PROJECTION_PLANS[1:])
@pytest.mark.parametrize("B,D,C", PROJECTION_SHAPES)
def test_projection_plans(B, D, C, plan_value, dtype):
    """Every forced launch plan gives the heuristic's answer (to rounding: split-K changes the sum order)."""
    proj_seed, std, seed, p = 5, D**-0.5, 77, 0.2
    for implicit in (False, True):
        h, weight, grad_v = projection_case(B, D, C, dtype, implicit, p, seed=3)
        with launch_plan(plan_value):
            v, dh = run_projection(h, weight, grad_v, C, proj_seed, std, p, seed)
        v_expected, dh_expected = projection_ground_truth(h, weight, grad_v, C, proj_seed, std, p, seed)
        tol = max(ACC_TOL[dtype], IMPLICIT_TOL if implicit else 0.0)
        assert_close(v, v_expected, tol, f"v plan={plan_value!r} {dtype} implicit={implicit}")
        assert_close(dh, dh_expected, tol, f"dh plan={plan_value!r} {dtype} implicit={implicit}")


def test_projection_is_deterministic():
    h, weight, grad_v = projection_case(64, 3000, 10, torch.float32, False, 0.3)
    with launch_plan(forward_panels_per_split=1):  # many D splits: the split-K reduction must be bitwise stable
        first = run_projection(h, weight, grad_v, 10, 0, 0.0, 0.3, 5)
        for _ in range(3):
            again = run_projection(h, weight, grad_v, 10, 0, 0.0, 0.3, 5)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_projection_unaligned_and_non_contiguous_h():
    """A storage offset breaks 16-byte alignment: the kernels must fall back to scalar loads."""
    B, D, C = 9, 64, 7
    base = randn(B * D + 1, dtype=torch.float32).to(DEVICE)
    h = base[1:].view(B, D)  # 4-byte aligned only
    weight = randn(C, D, seed=1, dtype=torch.float32, scale=D**-0.5).to(DEVICE)
    v = ops.projection_forward(h, weight, C, 0, 0.0, 0.1, seed_tensor(3, DEVICE))
    expected, _ = projection_ground_truth(h.cpu(), weight.cpu(), torch.zeros(B, C), C, 0, 0.0, 0.1, 3)
    assert_close(v, expected, 1e-5, "unaligned h")
    v_t = ops.projection_forward(h.t().contiguous().t(), weight, C, 0, 0.0, 0.1, seed_tensor(3, DEVICE))
    assert_close(v_t, expected, 1e-5, "non-contiguous h")


# ----------------------------------------------------------------------------------------------------
# Loss epilogue and cosine Gram against float64
# ----------------------------------------------------------------------------------------------------

def epilogue_inputs(B, C, Cp, dtype, with_target=True, seed=0):
    v = randn(B, C, seed=seed, dtype=dtype, scale=2.0)
    target = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(seed + 1)) if with_target else None
    v_prev = None if Cp is None else randn(B, Cp, seed=seed + 2, dtype=dtype)
    return v, target, v_prev


def run_epilogue(v, target, v_prev, weight, mean, center):
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return ops.loss_epilogue(to(v), to(target), to(v_prev), weight, mean, center)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mean,center", [(True, False), (False, True)])
@pytest.mark.parametrize("with_target", [True, False])
@pytest.mark.parametrize("B,C,Cp", EPILOGUE_SHAPES)
def test_epilogue_matches_float64(B, C, Cp, with_target, mean, center, dtype):
    v, target, v_prev = epilogue_inputs(B, C, Cp, dtype, with_target)
    weight = 0.7
    actual = run_epilogue(v, target, v_prev, weight, mean, center)
    expected = epilogue_ground_truth(v, target, v_prev, weight, mean, center)
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a, e in zip(("loss", "ce", "alignment", "g_v"), actual, expected):
        assert a.dtype == accumulation, f"{name}: dtype {a.dtype}"
        assert_close(a, e, ACC_TOL[dtype], f"{name} {dtype} B={B} C={C} C'={Cp} target={with_target} "
                                           f"mean={mean} center={center}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("plan_value", EPILOGUE_PLANS[1:])
@pytest.mark.parametrize("B,C,Cp", [s for s in EPILOGUE_SHAPES if s[2] is not None])
def test_epilogue_plans(B, C, Cp, plan_value, dtype):
    """Both alignment paths (and split Grams / split column tiles) agree on every shape."""
    for mean, center in ((True, True), (False, False)):
        v, target, v_prev = epilogue_inputs(B, C, Cp, dtype, seed=B)
        with launch_plan(plan_value):
            actual = run_epilogue(v, target, v_prev, 1.3, mean, center)
        expected = epilogue_ground_truth(v, target, v_prev, 1.3, mean, center)
        for name, a, e in zip(("loss", "ce", "alignment", "g_v"), actual, expected):
            assert_close(a, e, ACC_TOL[dtype], f"{name} plan={plan_value!r} {dtype} mean={mean} center={center}")


def test_epilogue_zero_rows_and_constant_rows():
    """‖v_b‖ ≤ ε (a zero row; a constant row under center) takes the g / ε branch, like autograd."""
    v, target, v_prev = epilogue_inputs(6, 5, 4, torch.float64)
    v[2] = 0.0
    v[4] = 3.0
    for center in (False, True):
        actual = run_epilogue(v, target, v_prev, 0.5, True, center)
        expected = epilogue_ground_truth(v, target, v_prev, 0.5, True, center)
        for name, a, e in zip(("loss", "ce", "alignment", "g_v"), actual, expected):
            assert_close(a, e, 1e-10, f"{name} center={center}")


def test_epilogue_is_deterministic():
    for plan_cases in ((300, 10, 12), (70, 70, 50)):
        v, target, v_prev = epilogue_inputs(*plan_cases, torch.float32)
        first = run_epilogue(v, target, v_prev, 0.7, True, True)
        for _ in range(3):
            again = run_epilogue(v, target, v_prev, 0.7, True, True)
            assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("B,C", [(1, 3), (70, 5), (130, 33), (65, 130)])
def test_cosine_gram_matches_float64(B, C, center, dtype):
    v = randn(B, C, seed=B + C, dtype=dtype)
    S = ops.cosine_gram(v.to(DEVICE), center)
    expected = cosine_gram_ground_truth(v, center)
    assert S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and S.shape == (B, B)
    assert_close(S, expected, ACC_TOL[dtype], f"cosine_gram {dtype} B={B} C={C} center={center}")


# ----------------------------------------------------------------------------------------------------
# The public API on CUDA tensors, and opcheck
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_local_loss_cuda_backend(dtype):
    B, D, C, Cp = 24, 50, 7, 5
    h = randn(B, D, dtype=dtype).to(DEVICE).requires_grad_(True)
    weight = randn(C, D, seed=1, dtype=dtype, scale=D**-0.5).to(DEVICE)
    target = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    v_prev = randn(B, Cp, seed=3, dtype=dtype).to(DEVICE)
    out = sk.fused_local_loss(h, target, v_prev, projection=weight, p=0.2, seed=8, center=True, backend="cuda")
    out.loss.backward()
    h64 = h.detach().double().cpu().requires_grad_(True)
    expected = sk.fused_local_loss(h64, target.cpu(), v_prev.double().cpu(), projection=weight.double().cpu(), p=0.2,
                                   seed=8, center=True, backend="reference")
    expected.loss.backward()
    tol = OUT_TOL[dtype] if dtype in (torch.bfloat16, torch.float16) else ACC_TOL[dtype]
    assert_close(out.loss, expected.loss, ACC_TOL[dtype], f"loss {dtype}")
    assert_close(h.grad, h64.grad, tol, f"dh {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index", range(OP_SAMPLE_COUNT))
def test_opcheck_cuda(index, dtype):
    op, args = op_samples(dtype, DEVICE)[index]
    torch.library.opcheck(op, args)
