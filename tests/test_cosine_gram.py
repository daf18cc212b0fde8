"""cosine_gram on every backend that runs here against the float64 reference; the reference against the
definition S_ij = cos(u_i, u_j)."""

import math

import pytest
import torch

import svp_kernels as sk
from svp_kernels.backends import reference
from svp_kernels.testing import (assert_close, assert_no_less_accurate_to_rounding, cosine_gram_ground_truth,
                                 device_backends, wide_row_inputs)

from cases import param_id, wide_row_params

FUSED = device_backends(include_reference=False)


def vectors(B, C, device, dtype=torch.float64):
    generator = torch.Generator().manual_seed(B * C)
    return torch.randn(B, C, dtype=torch.float64, generator=generator).to(dtype).to(device)


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("B,C", [(1, 3), (7, 13), (20, 6)])
def test_cosine_gram_matches_ground_truth(B, C, center, device, backend):
    v = vectors(B, C, device)
    S = sk.backends.load(backend).cosine_gram(v, center)
    assert S.shape == (B, B) and S.dtype == torch.float64
    assert_close(S, cosine_gram_ground_truth(v, center), 1e-12, f"{backend} cosine_gram")
    assert sk.backends.load(backend).cosine_gram(v.float(), center).dtype == torch.float32


# Wide float32 rows (svp_kernels.testing): v_prev's U[0, 1) rows and v's post-ReLU rows, B × C' and B × C.
@pytest.mark.parametrize("center", [True, False], ids=["center", "raw"])
@pytest.mark.parametrize("device,backend,shape", wide_row_params(FUSED), ids=param_id)
def test_float32_wide_rows_no_less_accurate_than_plain_torch(device, backend, shape, center):
    """S of float32 rows up to 8192 wide, element by element within two float32 ulps of plain torch's error."""
    B, C, C_prev = shape
    v, _, v_prev = wide_row_inputs(B, C, C_prev, device)
    for rows in (v, v_prev):
        S = sk.backends.load(backend).cosine_gram(rows, center)
        assert_no_less_accurate_to_rounding(S, reference.cosine_gram(rows.cpu(), center),
                                            cosine_gram_ground_truth(rows, center),
                                            f"{backend} cosine_gram {tuple(rows.shape)} center={center}")


def test_public_cosine_gram_and_zero_rows():
    """A zero row (and a constant row once centred) has â = 0: its similarities are 0, not NaN."""
    v = vectors(4, 5, "cpu")
    v[1] = 0.0
    v[2] = 3.0
    for center in (False, True):
        S = sk.cosine_gram(v, center=center)
        assert torch.isfinite(S).all() and (S[1] == 0).all()
        assert_close(S, cosine_gram_ground_truth(v, center), 1e-12, f"cosine_gram center={center}")


def test_ground_truth_matches_the_definition():
    v = vectors(6, 4, "cpu")
    S = cosine_gram_ground_truth(v, False)
    rows = v.tolist()
    for i in range(6):
        for j in range(6):
            dot = sum(x * y for x, y in zip(rows[i], rows[j]))
            norms = math.sqrt(sum(x * x for x in rows[i]) * sum(y * y for y in rows[j]))
            assert math.isclose(S[i, j].item(), dot / norms, rel_tol=1e-12, abs_tol=1e-15)
