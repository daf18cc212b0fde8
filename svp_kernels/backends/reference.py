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


def epilogue(v, target, v_prev, alignment_weight, mean, center):
    """(loss, ce, alignment): CE(v, y) + λ‖S(v) − S(v_prev)‖²_F (/ B² when mean); loss differentiable w.r.t. v."""
    v = v.to(accumulation_dtype(v.dtype))
    zero = v.new_zeros(())
    ce = cross_entropy(v, target) if target is not None else zero
    alignment = zero
    if v_prev is not None:
        difference = cosine_gram(v, center) - cosine_gram(v_prev.to(v.dtype).detach(), center)
        alignment = difference.square().sum()
        if mean:
            alignment = alignment / (v.shape[0] ** 2)
    loss = ce + alignment_weight * alignment
    return loss, ce.detach(), alignment.detach()
