"""The svp_kernels._C extension's ops as the ``cpu`` and ``cuda`` backends run them (they dispatch on the
tensors' device); backends/cpu.py and backends/cuda.py re-export these functions with their own NAME,
is_available() and supports().

csrc/cpu implements them for CPU tensors (float32, float64), csrc/cuda for CUDA tensors (float32,
float64, bfloat16, float16). Autograd and fake rules are attached in svp_kernels/_ops.py.

The gradient interface (projection_value, epilogue_with_grad, projection_backward) runs the same ops below
autograd: the value and the gradient with no autograd node, for callers that apply the chain rule
themselves (the trainer's per-block step); fused_local_loss and dropout_projection wrap them in one C++ autograd
node each (the eager paths of svp_kernels/api.py).

Every projection function takes ``gemm``: False runs the fused kernels (projection_forward/backward), True the
GEMM projection path (projection_forward_gemm/backward_gemm: R̃ written out once, then the device's GEMM;
csrc/projection_gemm.cpp, docs/backends.md "projection paths").
"""

from __future__ import annotations

import torch

from .._ops import _C

_OPS = torch.ops.svp_kernels
# The projection paths these backends run (svp_kernels.backends.gemm_projection picks one per call).
PROJECTION_PATHS = ("fused", "gemm")


def _forward_op(gemm: bool):
    return _OPS.projection_forward_gemm if gemm else _OPS.projection_forward


def _backward_op(gemm: bool):
    return _OPS.projection_backward_gemm if gemm else _OPS.projection_backward


def projection(h, weight, out_features, proj_seed, proj_std, p, seed, gemm=False):
    """v (B, C) = h R̃ᵀ, differentiable w.r.t. h; R̃ and its mask are generated tile by tile (gemm: R̃ written
    out once and multiplied by the device's GEMM)."""
    return _forward_op(gemm)(h, weight, out_features, proj_seed, proj_std, p, seed)


def epilogue(v, target, v_prev, alignment_weight, mean, center, alignment="cosine_gram"):
    """(loss, ce, alignment) from v (B, C) in one pass; autograd keeps only g_v (B, C)."""
    loss, ce, alignment, _ = torch.ops.svp_kernels.loss_epilogue(v, target, v_prev, alignment_weight, mean, center,
                                                                 alignment)
    return loss, ce, alignment


def cosine_gram(v, center):
    """S (B, B) = â âᵀ."""
    return torch.ops.svp_kernels.cosine_gram(v, center)


def projection_value(h, weight, out_features, proj_seed, proj_std, p, seed, gemm=False):
    """v (B, C) = h R̃ᵀ with no autograd node."""
    with torch._C._AutoDispatchBelowAutograd():
        return _forward_op(gemm)(h, weight, out_features, proj_seed, proj_std, p, seed)


def epilogue_with_grad(v, target, v_prev, alignment_weight, mean, center, alignment="cosine_gram"):
    """(loss, ce, alignment, g_v) with g_v = dloss/dv (B, C), computed in the same pass; no autograd node."""
    with torch._C._AutoDispatchBelowAutograd():
        return _OPS.loss_epilogue(v, target, v_prev, alignment_weight, mean, center, alignment)


def fused_local_loss(h, weight, out_features, proj_seed, proj_std, p, seed, target, v_prev, alignment_weight, mean,
                     center, identity, gemm=False, alignment="cosine_gram"):
    """(loss, ce, alignment, v) under one C++ autograd node (csrc/autograd.cpp): projection_value and
    epilogue_with_grad forward, dh = grad_loss · g_v R̃ backward; loss differentiable w.r.t. h only."""
    return _C.fused_local_loss(h, weight, out_features, proj_seed, proj_std, p, seed, target, v_prev,
                               alignment_weight, mean, center, identity, gemm, alignment)


def dropout_projection(h, weight, out_features, proj_seed, proj_std, p, seed, gemm=False):
    """v (B, C) = h R̃ᵀ under one C++ autograd node (csrc/autograd.cpp): projection_value forward, dh = grad_v R̃
    backward."""
    return _C.dropout_projection(h, weight, out_features, proj_seed, proj_std, p, seed, gemm)


def projection_backward(grad_v, weight, in_features, proj_seed, proj_std, p, seed, dtype, gemm=False):
    """dh (B, D) = grad_v R̃ in `dtype`, the mask regenerated from `seed`; no autograd node."""
    with torch._C._AutoDispatchBelowAutograd():
        return _backward_op(gemm)(grad_v, weight, in_features, proj_seed, proj_std, p, seed, dtype)
