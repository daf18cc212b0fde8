"""The plain PyTorch formulation of the similarity-matching losses, written as local-learning code writes it.

It materialises the one-hot targets, both B×B similarity matrices and the dropped decoder weight, and lets
autograd keep them. Run in float64 it is the oracle of the tests; it is also the `backend="reference"`
path of sk.predsim_loss, sk.similarity_loss and sk.alignment_loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import ADD_EPS, MAX_EPS, dropped_weight


def reduced_rows(x: torch.Tensor, reduce: str) -> torch.Tensor:
    """(B, K): a 4-D x with reduce="std" becomes its per-channel std over H·W; anything else is flattened."""
    if x.dim() == 4 and reduce == "std":
        return x.reshape(x.shape[0], x.shape[1], -1).std(dim=2)
    return x.reshape(x.shape[0], -1)


def similarity_matrix(x: torch.Tensor, reduce: str, center: bool = True, additive: bool = True) -> torch.Tensor:
    """S (B, B) = clamp(û ûᵀ, −1, 1), û = u / (1e-8 + ‖u‖) ("add") or u / max(‖u‖, 1e-12), u the centred rows."""
    rows = reduced_rows(x, reduce)
    if center:
        rows = rows - rows.mean(dim=1, keepdim=True)
    norms = rows.square().sum(dim=1, keepdim=True).sqrt()
    normalized = rows / (ADD_EPS + norms) if additive else rows / norms.clamp_min(MAX_EPS)
    return (normalized @ normalized.t()).clamp(-1, 1)


def similarity_loss(x, target_rows, labels, classes, reduce, center, additive, mean):
    """Σ (S(x) − S(target))² (/ B² when mean); the target is a feature matrix or one-hot labels."""
    if labels is not None:
        target_rows = F.one_hot(labels, classes).to(x.dtype)
    target = similarity_matrix(target_rows.to(x.dtype), reduce, center, additive).detach()
    difference = similarity_matrix(x, reduce, center, additive) - target
    return difference.square().mean() if mean else difference.square().sum()


def predsim_loss(h_dec, weight, bias, h_sim, labels, beta, p, seed, reduce):
    """(loss, ce, sim, logits) of (1 − β)·CE(h_dec W̃ᵀ + b, y) + β·MSE(S(h_sim), S(onehot(y)))."""
    dropped = dropped_weight(weight, p, seed) if p > 0 else weight
    logits = F.linear(h_dec, dropped.to(h_dec.dtype), None if bias is None else bias.to(h_dec.dtype))
    ce = F.cross_entropy(logits, labels)
    sim = similarity_loss(h_sim, None, labels, weight.shape[0], reduce, True, True, True)
    loss = (1 - beta) * ce + beta * sim
    return loss, ce.detach(), sim.detach(), logits.detach()
