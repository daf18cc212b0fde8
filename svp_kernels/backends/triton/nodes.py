"""The triton backend's eager autograd nodes: fused_local_loss and dropout_projection under one node each.

What csrc/autograd.cpp is for the cpu and cuda backends (docs/backends.md, "gradient interface"), in Python
over the launchers of ops.py, with two savings a generic node cannot make:

- the forward hands the projection's partial sums over D to the loss epilogue, which reduces them in its
  first launch (no separate reduction);
- the backward passes the loss's incoming gradient to the projection's backward kernel, which scales g_v
  as it loads it (no ``grad_loss * g_v``), and gradients of the non-differentiable outputs (ce, alignment,
  v) are never materialised as zeros.

Autograd saves only g_v (B, C), the seed tensor and a dense R; the mask is regenerated in the backward.
The nodes run only in eager mode (svp_kernels/api.py), so they launch the kernels directly
(ops.direct_launches): no higher-order-op dispatch per launch.
The arithmetic is that of the registered ops that torch.compile traces: the same bits.
"""

from __future__ import annotations

import torch

from ..._ops import accumulation_dtype
from . import ops


class FusedLocalLoss(torch.autograd.Function):
    """(loss, ce, alignment, v) of fused_local_loss; only loss is differentiable (w.r.t. h)."""

    @staticmethod
    def forward(ctx, h, weight, out_features, proj_seed, proj_std, p, seed, target, v_prev, alignment_weight, mean,
                center, identity, alignment_kind):
        with ops.direct_launches():
            if identity:
                x = h.to(accumulation_dtype(h.dtype))
            else:
                x = ops.projection_partials(h, weight, out_features, proj_seed, proj_std, p, seed)
            loss, ce, alignment, grad_v, v = ops.epilogue(x, target, v_prev, alignment_weight, mean, center,
                                                          alignment=alignment_kind)
        if identity:
            v = v.detach()  # an output must not be the input itself
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_v, weight, seed)
        ctx.arguments = (identity, h.shape[1], proj_seed, proj_std, p, h.dtype)
        ctx.mark_non_differentiable(ce, alignment, v)
        return loss, ce, alignment, v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_ce, grad_alignment, grad_v_out):
        none = (None,) * 13
        if grad_loss is None:
            return (None,) + none
        grad_v, weight, seed = ctx.saved_tensors
        identity, in_features, proj_seed, proj_std, p, h_dtype = ctx.arguments
        if identity:
            return ((grad_loss * grad_v).to(h_dtype),) + none
        with ops.direct_launches():
            return (ops.projection_backward(grad_v, weight, in_features, proj_seed, proj_std, p, seed, h_dtype,
                                            grad_scale=grad_loss),) + none


class DropoutProjection(torch.autograd.Function):
    """v = h R̃ᵀ (B, C) in the accumulation dtype; dh = grad_v R̃, the mask regenerated from the seed."""

    @staticmethod
    def forward(ctx, h, weight, out_features, proj_seed, proj_std, p, seed):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(weight, seed)
        ctx.arguments = (h.shape[1], proj_seed, proj_std, p, h.dtype)
        with ops.direct_launches():
            return ops.projection_forward(h, weight, out_features, proj_seed, proj_std, p, seed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_v):
        none = (None,) * 6
        if grad_v is None:
            return (None,) + none
        weight, seed = ctx.saved_tensors
        in_features, proj_seed, proj_std, p, h_dtype = ctx.arguments
        with ops.direct_launches():
            return (ops.projection_backward(grad_v.contiguous(), weight, in_features, proj_seed, proj_std, p, seed,
                                            h_dtype),) + none
