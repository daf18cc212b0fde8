"""The gradient interface of the fused backends (docs/backends.md), composed once for Python callers.

    v = h R̃ᵀ (projection_value),  (loss, ce, alignment, g_v) = epilogue_with_grad(v, ...)    forward
    dh = grad_v R̃ (projection_backward, the mask regenerated from the seed)                  backward

fused_local_loss's Python autograd node (api.py, the triton backend) and the trainer's per-block step
(train/trainer.py) run these two functions; the cpu and cuda backends' C++ node (csrc/autograd.cpp)
composes the same three ops in the same order, so every path gives the same bits.
"""

from __future__ import annotations

import torch

from ._ops import accumulation_dtype
from .validation import ProjectionArgs


def projection_value(module, h: torch.Tensor, projection: ProjectionArgs, p: float,
                     seed: torch.Tensor) -> torch.Tensor:
    """v (B, C) = h R̃ᵀ in the accumulation dtype with no autograd node (v = h for the identity)."""
    if projection.identity:
        return h.to(accumulation_dtype(h.dtype)).detach()  # detached: an output must not be the input itself
    return module.projection_value(h, projection.weight, projection.out_features, projection.proj_seed,
                                   projection.proj_std, p, seed)


def local_loss_with_grad(module, h: torch.Tensor, projection: ProjectionArgs, p: float, seed: torch.Tensor,
                         target, v_prev, alignment_weight: float, mean: bool, center: bool,
                         alignment_kind: str = "cosine_gram"):
    """(loss, ce, alignment, v, g_v) of the local loss on h (B, D), g_v = dloss/dv (B, C), from one pass of the
    epilogue; no autograd node. Arguments as validated by svp_kernels.validation (alignment_kind: the term,
    "cosine_gram" or "bhattacharyya")."""
    v = projection_value(module, h, projection, p, seed)
    loss, ce, alignment, grad_v = module.epilogue_with_grad(v, target, v_prev, alignment_weight, mean, center,
                                                            alignment_kind)
    return loss, ce, alignment, v, grad_v


def input_grad(module, grad_v: torch.Tensor, projection: ProjectionArgs, in_features: int, p: float,
               seed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dh (B, D) = grad_v R̃ in `dtype` (grad_v itself for the identity), the mask regenerated from `seed`."""
    if projection.identity:
        return grad_v.to(dtype)
    return module.projection_backward(grad_v.contiguous(), projection.weight, in_features, projection.proj_seed,
                                      projection.proj_std, p, seed, dtype)
