"""The plain PyTorch formulation of the SVP local loss: what a user writes without svp_kernels.

The benchmarks time it eagerly (`eager`) and through torch.compile (`compile`); it is a baseline,
not the oracle (the oracle is svp_kernels.testing's float64 ground truth). It materialises R̃ with
F.dropout (torch's RNG, not the Philox stream of docs/design.md §3) and both B×B Gram matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_loss(h, target, v_prev, weight, p: float, alignment_weight: float = 1.0, alignment: str = "cosine_gram"):
    """CE(v, y) + λ·‖â âᵀ − b̂ b̂ᵀ‖²_F / B² with v = h (dropout(R, p))ᵀ, or with alignment="bhattacharyya"
    CE(v, y) + λ·mean_b BD(v_b, v_prev_b) (bhattacharyya).

    h: (B, D); target: (B,) int64; v_prev: (B, C') (C' = C for bhattacharyya); weight: R (C, D). Returns the
    scalar loss.
    """
    dropped = F.dropout(weight, p)
    v = h @ dropped.T
    if alignment == "bhattacharyya":
        return F.cross_entropy(v, target) + alignment_weight * bhattacharyya(v, v_prev)
    a = F.normalize(v, dim=1)
    b = F.normalize(v_prev, dim=1)
    difference = a @ a.T - b @ b.T
    alignment = difference.square().sum() / h.shape[0] ** 2
    return F.cross_entropy(v, target) + alignment_weight * alignment


def bhattacharyya(v, v_prev):
    """mean_b −log Σ_c sqrt(softmax(v_b)_c softmax(v_prev_b)_c), written the way a user does in log space:
    −logsumexp(½(log_softmax(v) + log_softmax(v_prev))), v_prev detached."""
    mixed = 0.5 * (F.log_softmax(v, dim=1) + F.log_softmax(v_prev.detach(), dim=1))
    return -torch.logsumexp(mixed, dim=1).mean()


def implicit_local_loss(h, target, v_prev, out_features: int, proj_seed: int, p: float,
                        alignment_weight: float = 1.0, alignment: str = "cosine_gram"):
    """local_loss with a Gaussian R (C, D) of std 1/√D regenerated from `proj_seed` on every call.

    What a user writes to avoid storing R: a seeded generator and torch.randn each step.
    """
    in_features = h.shape[1]
    generator = torch.Generator(device=h.device).manual_seed(proj_seed)
    weight = torch.randn(out_features, in_features, generator=generator, device=h.device, dtype=h.dtype)
    return local_loss(h, target, v_prev, weight * in_features ** -0.5, p, alignment_weight, alignment)
