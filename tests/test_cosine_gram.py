"""cosine_gram on every backend that runs here against the float64 reference; the reference against the
definition S_ij = cos(u_i, u_j)."""

import math

import pytest
import torch

import svp_kernels as sk

from cases import cosine_gram_ground_truth, device_backends
from helpers import assert_close

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
