"""The reference backend: plain PyTorch that materialises everything, as SVP code is written today.

It is the oracle of the tests (run in float64) and the fallback where no compiled backend applies.
R̃ = R ⊙ M / (1 − p) and the B×B cosine Grams exist in memory and autograd keeps them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._ops import accumulation_dtype
from ..philox import implicit_weight, keep_mask

NAME = "reference"
NORM_EPS = 1e-12


def is_available() -> bool:
    return True


def unavailable_reason():
    return None


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def dropped_weight(weight, in_features, out_features, proj_seed, proj_std, p, seed, dtype, device):
    """R̃ (C, D) = R ⊙ M / (1 − p) in dtype; R is `weight` or the implicit R of (proj_seed, proj_std)."""
    if weight is None:
        weight = implicit_weight(proj_seed, out_features, in_features, proj_std, dtype=dtype, device=device)
    weight = weight.to(dtype)
    if p > 0:
        scale = torch.tensor(1.0 / (1.0 - p), dtype=dtype, device=device)
        weight = weight * keep_mask(seed, out_features, in_features, p, device) * scale
    return weight


def projection(h, weight, out_features, proj_seed, proj_std, p, seed):
    """v (B, C) = h R̃ᵀ in the accumulation dtype, differentiable w.r.t. h."""
    dtype = accumulation_dtype(h.dtype)
    dropped = dropped_weight(weight, h.shape[1], out_features, proj_seed, proj_std, p, seed, dtype, h.device)
    return h.to(dtype) @ dropped.t()


def normalize_rows(v, center):
    """â (B, C): rows divided by max(‖row‖, ε), after subtracting the row mean when `center`."""
    if center:
        v = v - v.mean(dim=1, keepdim=True)
    return F.normalize(v, dim=1, eps=NORM_EPS)


def cosine_gram(v, center):
    """S (B, B) = â âᵀ."""
    normalized = normalize_rows(v.to(accumulation_dtype(v.dtype)), center)
    return normalized @ normalized.t()


def cross_entropy(v, target):
    """mean_b CE(v_b, y_b); a target outside [0, C) makes its row's loss and gradient NaN (never an index)."""
    classes = v.shape[1]
    in_range = (target >= 0) & (target < classes)
    poison = torch.where(in_range, 0.0, float("nan")).to(v.dtype)
    return F.cross_entropy(v + poison[:, None], target.clamp(0, classes - 1))


def bhattacharyya_distances(v, v_prev):
    """BD_b (B,) = −log Σ_c sqrt(softmax(v_b)_c · softmax(v_prev_b)_c), the Bhattacharyya distance between the
    rows' softmax distributions, in log space with no clamp: −logsumexp_c(½(log_softmax(v_b)_c +
    log_softmax(v_prev_b)_c)). v_prev may hold −inf (a class of probability 0); a row of v_prev with no finite
    value gives NaN."""
    return -torch.logsumexp(0.5 * (F.log_softmax(v, dim=1) + F.log_softmax(v_prev, dim=1)), dim=1)


def epilogue(v, target, v_prev, alignment_weight, mean, center, alignment="cosine_gram"):
    """(loss, ce, alignment): CE(v, y) + λ·A, A = ‖S(v) − S(v_prev)‖²_F (/ B² when mean) for "cosine_gram", or
    Σ_b BD(v_b, v_prev_b) (/ B when mean) for "bhattacharyya" (bhattacharyya_distances; v_prev (B, C), no
    center); loss differentiable w.r.t. v."""
    if alignment not in ("cosine_gram", "bhattacharyya"):
        raise ValueError(f"alignment must be 'cosine_gram' or 'bhattacharyya', got {alignment!r}")
    v = v.to(accumulation_dtype(v.dtype))
    zero = v.new_zeros(())
    ce = cross_entropy(v, target) if target is not None else zero
    term = zero
    if v_prev is not None:
        v_prev = v_prev.to(v.dtype).detach()
        if alignment == "bhattacharyya":
            if center or v_prev.shape[1] != v.shape[1]:
                raise ValueError("alignment='bhattacharyya' needs v_prev (B, C) like v and center=False, got "
                                 f"v_prev {tuple(v_prev.shape)}, v {tuple(v.shape)}, center={center}")
            distances = bhattacharyya_distances(v, v_prev)
            term = distances.mean() if mean else distances.sum()
        else:
            difference = cosine_gram(v, center) - cosine_gram(v_prev, center)
            term = difference.square().sum()
            if mean:
                term = term / (v.shape[0] ** 2)
    loss = ce + alignment_weight * term
    return loss, ce.detach(), term.detach()
