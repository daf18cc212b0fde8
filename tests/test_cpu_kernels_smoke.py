"""Direct checks of the compiled CPU ops (torch.ops.svp_kernels.*) against the float64 ground truth.

The per-op files run every backend through the public API; these pin the C++ kernels themselves: the
Philox words, the dropout mask bit for bit, v and dh against an explicit R̃, the epilogue against the
reference's autograd on both alignment paths, and bitwise determinism across thread counts.
"""

from __future__ import annotations

import pytest
import torch

_C = pytest.importorskip("svp_kernels._C", reason="the C++ extension is not built")
from svp_kernels.philox import keep_mask, philox4x32_10  # noqa: E402
from svp_kernels.testing import cosine_gram_ground_truth, epilogue_ground_truth, philox_words, projection_ground_truth  # noqa: E402

ops = torch.ops.svp_kernels
DTYPES = (torch.float32, torch.float64)


def test_philox_words_known_answer_and_64_bit_offsets():
    assert philox_words(0, torch.arange(1), backend="cpu").tolist() == [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C,
                                                                         0x9B00DBD8]]
    start, seed = 2**32 - 3, 2**62 + 12345
    expected = torch.stack(philox4x32_10(seed, torch.arange(start, start + 8)), dim=1)
    assert torch.equal(philox_words(seed, torch.arange(start, start + 8), backend="cpu"), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1e-7, 0.1, 0.5, 0.999])
def test_mask_is_bit_exact(dtype, p):
    # With R = 1 and h = I the forward returns R̃ᵀ and the backward (grad_v = I) returns R̃: exactly M / q.
    out_features, in_features, seed = 13, 777, 2**62 + 99
    ones = torch.ones(out_features, in_features, dtype=dtype)
    expected = keep_mask(seed, out_features, in_features, p).to(dtype) * torch.tensor(1.0 / (1.0 - p), dtype=dtype)
    v = ops.projection_forward(torch.eye(in_features, dtype=dtype), ones, out_features, 0, 0.0, p, torch.tensor(seed))
    dh = ops.projection_backward(torch.eye(out_features, dtype=dtype), ones, in_features, 0, 0.0, p,
                              torch.tensor(seed), dtype)
    assert torch.equal(v.t(), expected)
    assert torch.equal(dh, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 100, 3), (33, 5000, 10), (5, 70, 130), (70, 300, 17)])
def test_projection_matches_explicit_dropped_weight(dtype, implicit, p, shape):
    batch, in_features, out_features = shape
    torch.manual_seed(0)
    h = torch.randn(batch, in_features, dtype=dtype)
    grad_v = torch.randn(batch, out_features, dtype=dtype)
    weight = None if implicit else torch.randn(out_features, in_features, dtype=dtype)
    proj_seed, proj_std, seed = 5, 0.1, 2**40 + 9
    expected_v, expected_dh = projection_ground_truth(h, weight, grad_v, out_features, proj_seed, proj_std, p, seed)

    v = ops.projection_forward(h, weight, out_features, proj_seed, proj_std, p, torch.tensor(seed))
    dh = ops.projection_backward(grad_v, weight, in_features, proj_seed, proj_std, p, torch.tensor(seed), dtype)

    assert v.dtype == dtype and v.shape == (batch, out_features)
    assert dh.dtype == dtype and dh.shape == (batch, in_features)
    # float32 accumulation error, plus float32 log/cos rounding of an implicit R.
    tolerance = 1e-4 if dtype == torch.float32 or implicit else 1e-10
    torch.testing.assert_close(v.double(), expected_v, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(dh.double(), expected_dh, rtol=tolerance, atol=tolerance)


EPILOGUE_SHAPES = [
    (1, 5, 3),  # B = 1: batch space
    (2, 1, 1),
    (64, 10, 10),  # feature space (C + C' < B)
    (64, 10, 100),  # batch space, C ≠ C'
    (300, 10, 7),
    (129, 64, 64),  # batch space across several 64-row tiles
    (513, 3, 200),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", EPILOGUE_SHAPES)
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("with_target,with_prev", [(True, True), (True, False), (False, True), (False, False)])
def test_epilogue_matches_autograd(dtype, shape, center, mean, with_target, with_prev):
    batch, features, prev_features = shape
    torch.manual_seed(1)
    v = 3 * torch.randn(batch, features, dtype=dtype)
    target = torch.randint(0, features, (batch,)) if with_target else None
    v_prev = torch.randn(batch, prev_features, dtype=torch.float32) if with_prev else None

    outputs = ops.loss_epilogue(v, target, v_prev, 0.7, mean, center)
    expected = epilogue_ground_truth(v, target, v_prev, 0.7, mean, center)

    tolerance = 2e-5 if dtype == torch.float32 else 1e-11
    for name, got, want in zip(("loss", "ce", "alignment", "g_v"), outputs, expected):
        assert got.dtype == dtype, name
        assert got.shape == want.shape, name
        scale = want.abs().max().item() + 1e-3
        assert (got.double() - want).abs().max().item() <= tolerance * scale, name


@pytest.mark.parametrize("center", [False, True])
def test_epilogue_degenerate_rows(center):
    # A zero row (and with center, a constant row) has norm ≤ ε: the gradient is g / ε there.
    v = torch.randn(6, 4, dtype=torch.float64)
    v[1] = 0.0
    v[2] = 5.0
    v_prev = torch.randn(6, 4, dtype=torch.float64)
    v_prev[3] = 0.0
    outputs = ops.loss_epilogue(v, None, v_prev, 1.0, True, center)
    expected = epilogue_ground_truth(v, None, v_prev, 1.0, True, center)
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("center", [False, True])
def test_cosine_gram(center):
    v = torch.randn(9, 5, dtype=torch.float64)
    torch.testing.assert_close(ops.cosine_gram(v, center), cosine_gram_ground_truth(v, center))
    assert ops.cosine_gram(v.float(), center).dtype == torch.float32


def test_results_do_not_depend_on_thread_count():
    torch.manual_seed(2)
    h = torch.randn(130, 9000)
    weight = torch.randn(10, 9000)
    target = torch.randint(0, 10, (130,))
    v_prev = torch.randn(130, 12)
    previous_threads = torch.get_num_threads()

    def run_all():
        v = ops.projection_forward(h, weight, 10, 0, 0.0, 0.1, torch.tensor(7))
        loss, ce, alignment, grad_v = ops.loss_epilogue(v, target, v_prev, 1.0, True, False)
        dh = ops.projection_backward(grad_v, None, 9000, 3, 0.01, 0.1, torch.tensor(7), torch.float32)
        return v, loss, alignment, grad_v, dh

    try:
        torch.set_num_threads(1)
        single = run_all()
        torch.set_num_threads(max(2, previous_threads))
        multi = run_all()
    finally:
        torch.set_num_threads(previous_threads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


def test_bad_inputs_raise():
    h = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="target must be"):
        ops.loss_epilogue(torch.randn(4, 3), torch.tensor([0, 1, 2]), None, 1.0, True, False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.projection_forward(h.to(torch.int32), None, 3, 0, 1.0, 0.0, torch.tensor(0))
    with pytest.raises(RuntimeError, match="weight"):
        ops.projection_forward(h, torch.randn(3, 9), 3, 0, 1.0, 0.0, torch.tensor(0))
    with pytest.raises(RuntimeError, match="p must be"):
        ops.projection_forward(h, None, 3, 0, 1.0, 1.0, torch.tensor(0))
    with pytest.raises(RuntimeError, match="seed must be a 0-dim int64 CPU tensor"):
        ops.projection_forward(h, None, 3, 0, 1.0, 0.1, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="seed must be a 0-dim int64 CPU tensor"):
        ops.projection_backward(torch.randn(4, 3), None, 8, 0, 1.0, 0.1, torch.tensor(1.0), torch.float32)
