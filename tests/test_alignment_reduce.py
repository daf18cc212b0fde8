"""sk.alignment_loss on 4-D inputs (reduce="std" | "flatten"), v_prev dtypes, clamp, and errors naming v."""

from __future__ import annotations

import pytest
import torch

import svp_kernels as sk
from svp_kernels import backends
from svp_kernels.similarity import reference as similarity_reference
from svp_kernels.testing import assert_close


def grad_of(loss_fn, v):
    v = v.detach().clone().requires_grad_(True)
    loss = loss_fn(v)
    return loss.detach(), torch.autograd.grad(loss, v)[0]


def eager_alignment(v, v_prev, center, mean):
    """The eager SVP line on 2-D rows: ‖F.normalize(u) F.normalize(u)ᵀ − …‖² (/ B²)."""
    s, s_prev = (sk.backends.reference.cosine_gram(x, center) for x in (v, v_prev))
    total = (s - s_prev).square().sum()
    return total / v.shape[0] ** 2 if mean else total


@pytest.mark.parametrize("v_shape,prev_shape,reduce,center,reduction", [
    ((6, 4, 3, 2), (6, 5), "std", True, "mean"),
    ((6, 4, 3, 2), (6, 3, 2, 2), "std", False, "sum"),
    ((5, 2, 3, 3), (5, 2, 2, 2), "flatten", True, "mean"),
    ((9, 3, 1, 4), (9, 2), "std", True, "sum"),
    ((40, 2, 2, 2), (40, 4), "std", True, "mean"),   # feature space after the reduction
])
def test_four_d_inputs_match_the_reduced_rows(v_shape, prev_shape, reduce, center, reduction):
    generator = torch.Generator().manual_seed(len(v_shape) + v_shape[0])
    v = torch.randn(*v_shape, dtype=torch.float64, generator=generator)
    v_prev = torch.randn(*prev_shape, dtype=torch.float64, generator=generator)
    loss, grad = grad_of(lambda v: sk.alignment_loss(v, v_prev, reduction, center, reduce=reduce), v)

    def expected_fn(v):
        rows, prev_rows = (similarity_reference.reduced_rows(x, reduce) for x in (v, v_prev))
        return eager_alignment(rows, prev_rows, center, reduction == "mean")

    expected, expected_grad = grad_of(expected_fn, v)
    assert_close(loss, expected, 1e-12, "loss")
    assert_close(grad, expected_grad, 1e-12, "grad")
    plain, plain_grad = grad_of(lambda v: sk.alignment_loss(v, v_prev, reduction, center, backend="reference",
                                                            reduce=reduce), v)
    assert_close(plain, expected, 1e-12, "reference loss")
    assert_close(plain_grad, expected_grad, 1e-12, "reference grad")


def test_default_reduce_is_std_never_a_silent_flatten():
    v = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    v_prev = torch.randn(8, 6, dtype=torch.float64)
    std_rows = v.reshape(8, 4, 9).std(dim=2)
    assert_close(sk.alignment_loss(v, v_prev), sk.alignment_loss(std_rows, v_prev), 1e-13, "default = std")
    flat = sk.alignment_loss(v, v_prev, reduce="flatten")
    assert_close(flat, sk.alignment_loss(v.reshape(8, -1), v_prev), 1e-13, "flatten")
    with pytest.raises(ValueError, match="reduce='std' reduces a 4-D v "):
        sk.alignment_loss(torch.randn(8, 3, 4), v_prev)


def test_v_prev_of_another_dtype_is_cast():
    v = torch.randn(7, 5, dtype=torch.float64)
    v_prev = torch.randn(7, 3)
    assert_close(sk.alignment_loss(v, v_prev), sk.alignment_loss(v, v_prev.double()), 0.0, "float32 v_prev")
    assert sk.alignment_loss(v.float(), v_prev.double()).dtype == torch.float32
    loss_bf16 = sk.alignment_loss(v.to(torch.bfloat16), v_prev)
    assert loss_bf16.dtype == torch.float32
    assert_close(loss_bf16, sk.alignment_loss(v.to(torch.bfloat16).float(), v_prev), 0.0, "bf16 in float32")


def test_errors_name_v_not_h():
    with pytest.raises(TypeError, match="v must be a floating-point tensor"):
        sk.alignment_loss(torch.ones(4, 3, dtype=torch.int64), torch.randn(4, 2))
    with pytest.raises(TypeError, match="v_prev must be a floating-point tensor"):
        sk.alignment_loss(torch.randn(4, 3), torch.ones(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="v_prev has 3 rows but v has B = 4"):
        sk.alignment_loss(torch.randn(4, 3), torch.randn(3, 2))
    with pytest.raises(ValueError, match="H·W ≥ 2 values per channel of v_prev"):
        sk.alignment_loss(torch.randn(4, 3), torch.randn(4, 2, 1, 1))


def test_clamped_similarity_of_identical_rows():
    """Duplicated rows: S_ij of two equal rows can round above 1; clamped, it equals the target's 1."""
    base = torch.relu(torch.randn(4, 4096, generator=torch.Generator().manual_seed(1))) + 5.0
    v = base.repeat(8, 1)
    v_prev = base.double().repeat(8, 1)[:, :7]
    similarity = similarity_reference.similarity_matrix(v, "flatten", center=True, additive=False)
    assert similarity.max().item() <= 1.0
    loss = sk.alignment_loss(v, v, center=True)
    assert loss.item() == 0.0
    assert torch.isfinite(sk.alignment_loss(v, v_prev, center=True))


def test_similarity_is_clamped_where_rounding_exceeds_one():
    """Equal rows: r_i G_ij r_j rounds to 1 + 2⁻²³ for some pairs; S is clamped to 1 there."""
    from svp_kernels.similarity import fused as similarity_fused

    base = torch.relu(torch.randn(4, 4096, generator=torch.Generator().manual_seed(0))) + 5.0
    u = base.repeat(8, 1)
    r = 1.0 / similarity_fused.row_norms(u)
    raw = (u @ u.t()) * r[:, None] * r[None, :]
    assert raw.max().item() > 1.0  # the rounding excess the clamp removes
    _, similarity = similarity_fused._scaled_gram(u, slice(0, 32), r)
    assert similarity.max().item() == 1.0 and similarity.min().item() >= -1.0


def test_no_gradient_under_no_grad():
    v = torch.randn(6, 5, requires_grad=True)
    with torch.no_grad():
        loss = sk.alignment_loss(v, torch.randn(6, 4))
    assert not loss.requires_grad


@pytest.mark.skipif(not backends.is_available("triton"), reason="the triton backend is not available here")
@pytest.mark.parametrize("center", [False, True])
def test_triton_backend_returns_the_clamped_similarity(center):
    """Rows that are positive multiples of one row have S_ij = 1, which their unclamped Gram exceeds by
    rounding; backend="triton" (batch space here: C + C' ≥ B) returns the clamped value of every path."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # triton runs on CPU only in its interpreter
    generator = torch.Generator().manual_seed(20)
    multiples = torch.arange(1, 9, dtype=torch.float32)[:, None]
    v = (torch.randn(1, 6, generator=generator) * multiples).to(device).requires_grad_(True)
    v_prev = (torch.randn(1, 5, generator=generator) * multiples).to(device)
    u = v.detach() - v.detach().mean(dim=1, keepdim=True) if center else v.detach()
    unit = u / torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min(1e-12)
    assert (unit @ unit.t()).max().item() > 1.0  # the rounding excess the clamp removes
    triton = sk.alignment_loss(v, v_prev, reduction="sum", center=center, backend="triton")
    fused = sk.alignment_loss(v, v_prev, reduction="sum", center=center)
    assert torch.equal(triton, fused)
    assert torch.equal(torch.autograd.grad(triton, v)[0], torch.autograd.grad(fused, v)[0])
    plain = sk.alignment_loss(v.detach().double(), v_prev.double(), reduction="sum", center=center)
    assert abs(triton.item() - plain.item()) <= 1e-12
