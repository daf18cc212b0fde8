"""The public ops. Each validates its arguments once, picks a backend, and dispatches (docs/design.md §2, §4)."""

from __future__ import annotations

from typing import NamedTuple, Union

import torch

from . import backends, gradient_interface, predsim
from ._ops import accumulation_dtype
from .projection import ImplicitProjection
from .validation import (ProjectionArgs, check_alignment, check_alignment_weight, check_bool, check_features, check_p,
                         check_projection, check_projection_path, check_reduction, check_seed, check_target,
                         check_v_prev, is_compiling)

Projection = Union[None, torch.Tensor, ImplicitProjection]


class LocalLossOutput(NamedTuple):
    """What fused_local_loss returns (``sk.LocalLoss`` is the same class under its first name).

    loss: scalar CE + λ·alignment term, differentiable w.r.t. h (float32, float64 when h is float64).
    ce, alignment: detached scalars for logging (the alignment term after the reduction, before λ).
    v: (B, C) projection, detached, in h's dtype: the next layer's v_prev.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    alignment: torch.Tensor
    v: torch.Tensor


# The result's first name, pinned by docs/design.md §4: ``sk.LocalLoss`` keeps working (the module of the
# same name is ``sk.nn.LocalLoss``).
LocalLoss = LocalLossOutput


def _gemm_keyword(gemm: bool) -> dict:
    """The backend functions' projection-path keyword: passed only when the GEMM path runs, so that backends
    with the fused path alone keep their signatures."""
    return {"gemm": True} if gemm else {}


def _choose(backend: str, path: str, h: torch.Tensor, projection: ProjectionArgs) -> tuple:
    """(backend module, gemm) of a call on h (B, D): backends.choose with the projection's shape (B, D, C)."""
    shape = None if projection.identity else (h.shape[0], h.shape[1], projection.out_features)
    return backends.choose(backend, path, h.device, h.dtype, shape, implicit=projection.weight is None)


def _project(module, h, projection: ProjectionArgs, p: float, seed: torch.Tensor, gemm: bool = False) -> torch.Tensor:
    """v (B, C) in the accumulation dtype, differentiable w.r.t. h (the op path that torch.compile traces)."""
    if projection.identity:
        return h.to(accumulation_dtype(h.dtype))
    return module.projection(h, projection.weight, projection.out_features, projection.proj_seed,
                             projection.proj_std, p, seed, **_gemm_keyword(gemm))


def _save_projection(ctx, h, module, projection: ProjectionArgs, p: float) -> None:
    """What the backward of the eager nodes needs besides the saved tensors."""
    ctx.module, ctx.projection, ctx.p, ctx.in_features, ctx.h_dtype = module, projection, p, h.shape[1], h.dtype


def _input_grad(ctx, grad_v: torch.Tensor, weight, seed: torch.Tensor) -> torch.Tensor:
    """dh (B, D) in h's dtype from the arguments kept by _save_projection (weight: the saved dense R)."""
    return gradient_interface.input_grad(ctx.module, grad_v, ctx.projection._replace(weight=weight), ctx.in_features,
                                         ctx.p, seed, ctx.h_dtype)


class _FusedLocalLoss(torch.autograd.Function):
    """fused_local_loss outside torch.compile on a fused backend without a native node (triton): one autograd
    node in place of the ops' two (cpu and cuda run the same node in C++: their ``fused_local_loss``).

    The forward runs the backend's gradient interface (svp_kernels/gradient_interface.py) and keeps only g_v
    (B, C), the seed tensor and a dense R; the backward is dh = grad_loss · g_v R̃, the mask regenerated from
    the seed. Same kernels and the same arithmetic as the op path that torch.compile traces, so the same bits.
    """

    @staticmethod
    def forward(ctx, h, module, projection: ProjectionArgs, p, seed, target, v_prev, alignment_weight, mean,
                center, alignment_kind):
        loss, ce, alignment, v, grad_v = gradient_interface.local_loss_with_grad(
            module, h, projection, p, seed, target, v_prev, alignment_weight, mean, center, alignment_kind)
        ctx.save_for_backward(grad_v, projection.weight, seed)
        _save_projection(ctx, h, module, projection, p)
        ctx.mark_non_differentiable(ce, alignment, v)
        return loss, ce, alignment, v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_ce, grad_alignment, grad_v_out):
        grad_v, weight, seed = ctx.saved_tensors
        return (_input_grad(ctx, grad_loss * grad_v, weight, seed),) + (None,) * 10


class _DropoutProjection(torch.autograd.Function):
    """dropout_projection outside torch.compile on a fused backend without a native node (triton): v = h R̃ᵀ
    through the gradient interface, dh = grad_v R̃ in the backward (the mask regenerated from the seed); saves
    the seed and a dense R (cpu and cuda run the same node in C++: their ``dropout_projection``)."""

    @staticmethod
    def forward(ctx, h, module, projection: ProjectionArgs, p, seed):
        ctx.save_for_backward(projection.weight, seed)
        _save_projection(ctx, h, module, projection, p)
        return gradient_interface.projection_value(module, h, projection, p, seed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_v):
        weight, seed = ctx.saved_tensors
        return _input_grad(ctx, grad_v, weight, seed), None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------

def fused_local_loss(h, target, v_prev=None, *, projection: Projection = None, p: float = 0.0, seed=None,
                     alignment_weight: float = 1.0, reduction: str = "mean", center: bool = False,
                     backend: str = "auto", projection_path: str = "auto",
                     alignment: str = "cosine_gram") -> LocalLossOutput:
    """The SVP local loss of one layer and its gradient, without materialising R̃ or any B×B matrix.

    v = h R̃ᵀ with R̃ = R ⊙ M / (1 − p); loss = CE(v, target) + λ·A(v, v_prev), the alignment term A being
    "cosine_gram": ‖S(v) − S(v_prev)‖²_F (/ B² for "mean"), S the batch cosine-similarity Gram (Pearson when
    center=True); or "bhattacharyya": Σ_b BD(v_b, v_prev_b) (/ B for "mean"), BD the Bhattacharyya distance
    between the rows' softmax distributions, −logsumexp_c(½(log_softmax(v_b)_c + log_softmax(v_prev_b)_c)).

    Args:
        h: (B, D) activations, or (B, *) flattened to (B, D); float32/float64 (bf16/fp16 on CUDA).
        target: (B,) int64 class indices in [0, C).
        v_prev: (B, C') previous layer's projection (a constant), or None for no alignment term.
        projection: None (identity: v = h, needs D = C and p = 0), a (C, D) tensor R, or ImplicitProjection.
        p: dropout probability on R's elements, in [0, 1).
        seed: the dropout mask's seed: an int in [0, 2**63), a 0-dim int64 tensor (best on h's device: the
            kernels read it there, so it traces and a captured CUDA graph replays with its current value), or
            None to draw one from torch's default generator (inside torch.compile: from the compiled RNG).
        alignment_weight: λ ≥ 0.
        reduction: "mean" or "sum" of the alignment term (cosine_gram: FA / B² or FA; bhattacharyya: the batch
            mean or sum of BD_b); CE is always a batch mean.
        center: subtract each row's mean before normalising (Pearson similarity); cosine_gram only.
        backend: "auto" | "reference" | "cpu" | "triton" | "cuda".
        projection_path: "auto" | "fused" (R̃ generated tile by tile inside the kernels) | "gemm" (R̃ (C, D)
            written out once per direction, then the device's GEMM: cuBLAS tensor cores for bfloat16/float16;
            C·D extra transient memory); cpu and cuda backends. "auto": on CUDA, the path (and with backend
            "auto" the backend) measured fastest at the nearest benchmark shape (svp_kernels/backends/auto_table.py);
            "fused" where nothing is measured.
        alignment: "cosine_gram" (SVP's term, the default) or "bhattacharyya" (the later formulation of the
            method; v_prev must then be (B, C), and may hold −inf: a class of probability 0, e.g. log of a
            one-hot distribution; each row needs one finite value).

    Returns:
        LocalLossOutput(loss, ce, alignment, v): loss differentiable w.r.t. h; ce, alignment detached; v (B, C)
        detached in h's dtype.
    """
    h = check_features(h)
    p = check_p(p)
    projection_args = check_projection(projection, h, p)
    target = check_target(target, h, projection_args.out_features)
    v_prev = check_v_prev(v_prev, h)
    mean = check_reduction(reduction)
    center = check_bool(center, "center")
    alignment = check_alignment(alignment, v_prev, projection_args.out_features, center)
    alignment_weight = check_alignment_weight(alignment_weight)
    seed = check_seed(seed, p, h.device)
    path = check_projection_path(projection_path)
    module, gemm = _choose(backend, path, h, projection_args)

    h = h.contiguous()
    if not is_compiling() and backends.has_gradient_interface(module):
        if backends.has_native_node(module):
            loss, ce, term, v = module.fused_local_loss(h, projection_args.weight, projection_args.out_features,
                                                        projection_args.proj_seed, projection_args.proj_std, p, seed,
                                                        target, v_prev, alignment_weight, mean, center,
                                                        projection_args.identity, **_gemm_keyword(gemm),
                                                        alignment=alignment)
        else:
            loss, ce, term, v = _FusedLocalLoss.apply(h, module, projection_args, p, seed, target, v_prev,
                                                      alignment_weight, mean, center, alignment)
        return LocalLossOutput(loss, ce, term, v.to(h.dtype))
    v = _project(module, h, projection_args, p, seed, gemm)
    loss, ce, term = module.epilogue(v, target, v_prev, alignment_weight, mean, center, alignment)
    return LocalLossOutput(loss, ce.detach(), term.detach(), v.detach().to(h.dtype))


def dropout_projection(h, projection: Projection, p: float = 0.0, seed=None, backend: str = "auto", *,
                       projection_path: str = "auto") -> torch.Tensor:
    """v (B, C) = h (R ⊙ M / (1 − p))ᵀ in h's dtype, differentiable w.r.t. h; R̃ is never stored (with
    projection_path="gemm": written out as one transient (C, D) tensor per direction and multiplied by the
    device's GEMM; see fused_local_loss).

    Replaces ``h @ (R * (torch.rand_like(R) >= p) / (1 - p)).T`` (with the mask of docs/design.md §3).
    """
    h = check_features(h)
    p = check_p(p)
    projection_args = check_projection(projection, h, p)
    seed = check_seed(seed, p, h.device)
    path = check_projection_path(projection_path)
    module, gemm = _choose(backend, path, h, projection_args)
    h = h.contiguous()
    if not is_compiling() and backends.has_gradient_interface(module) and not projection_args.identity:
        if backends.has_native_node(module):
            return module.dropout_projection(h, projection_args.weight, projection_args.out_features,
                                             projection_args.proj_seed, projection_args.proj_std, p,
                                             seed, **_gemm_keyword(gemm)).to(h.dtype)
        return _DropoutProjection.apply(h, module, projection_args, p, seed).to(h.dtype)
    return _project(module, h, projection_args, p, seed, gemm).to(h.dtype)


def alignment_loss(v, v_prev, reduction: str = "mean", center: bool = False, backend: str = "auto", *,
                   reduce: str = "std") -> torch.Tensor:
    """‖S(v) − S(v_prev)‖²_F (/ B² for "mean"), differentiable w.r.t. v; no B×B matrix is kept.

    v: (B, C) or (B, Ch, H, W); v_prev: the same kinds of shape (a constant, cast to v's dtype). S is the
    cosine Gram (Pearson when center=True) clamped to [−1, 1]; a 4-D input is reduced by `reduce`
    ("std": each channel's std over H·W, the default; "flatten"). Implemented in svp_kernels/predsim.py.
    """
    return predsim.alignment_loss(v, v_prev, reduction, center, backend, reduce)


def cosine_gram(v, center: bool = False) -> torch.Tensor:
    """S (B, B) = â âᵀ, â the rows of v (centred when center=True) divided by max(‖row‖, 1e-12).

    The inspection helper: it does store the B×B matrix. Replaces ``F.normalize(v) @ F.normalize(v).T``.
    """
    v = check_features(v, "v")
    center = check_bool(center, "center")
    module = backends.resolve("auto", v.device, v.dtype)
    return module.cosine_gram(v.contiguous(), center)


def available_backends() -> list[str]:
    """Backends usable in this process, e.g. ["reference", "cpu", "triton"]."""
    return backends.available_backends()
