"""The public ops. Each validates its arguments once, picks a backend, and dispatches (docs/design.md §2, §4)."""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Union

import torch

from . import backends
from ._ops import accumulation_dtype, index_bounds
from .projection import MAX_SEED, ImplicitProjection, draw_seed

Projection = Union[None, torch.Tensor, ImplicitProjection]
# Set to 1 to check target's range on the host for CUDA tensors too (one synchronisation per call).
CHECK_TARGETS_ENV = "SVP_KERNELS_CHECK_TARGETS"


class LocalLoss(NamedTuple):
    """What fused_local_loss returns.

    loss: scalar CE + λ·FA, differentiable w.r.t. h (float32, float64 when h is float64).
    ce, alignment: detached scalars for logging (alignment after the reduction, before λ).
    v: (B, C) projection, detached, in h's dtype: the next layer's v_prev.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    alignment: torch.Tensor
    v: torch.Tensor


# ----------------------------------------------------------------------------------------------------
# Validation: every check names the argument and what was expected.
# ----------------------------------------------------------------------------------------------------

def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_features(h, name: str = "h") -> torch.Tensor:
    """h as (B, D): a float tensor with a non-empty batch, (B, *) flattened."""
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, D), got {type(h).__name__}")
    if not h.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {h.dtype}")
    if h.dim() < 2:
        raise ValueError(f"{name} must have shape (B, D) or (B, *), got shape {tuple(h.shape)}")
    if h.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (B = 0); at least one row is needed")
    if h.numel() == 0:
        raise ValueError(f"{name} has no features: shape {tuple(h.shape)}")
    return h if h.dim() == 2 else h.reshape(h.shape[0], -1)  # a (B, D) h takes no view node in the graph


def _check_same_place(tensor: torch.Tensor, name: str, h: torch.Tensor, check_dtype: bool = True) -> None:
    if tensor.device != h.device:
        raise ValueError(f"{name} is on {tensor.device} but h is on {h.device}; move both to one device")
    if check_dtype and tensor.dtype != h.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but h has dtype {h.dtype}; use one dtype")


def _check_v_prev(v_prev, h: torch.Tensor, name: str = "v_prev") -> Optional[torch.Tensor]:
    if v_prev is None:
        return None
    if not isinstance(v_prev, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C') or None, got {type(v_prev).__name__}")
    if not v_prev.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {v_prev.dtype}")
    if v_prev.dim() != 2 or v_prev.shape[1] == 0:
        raise ValueError(f"{name} must have shape (B, C') with C' ≥ 1, got shape {tuple(v_prev.shape)}")
    if v_prev.shape[0] != h.shape[0]:
        raise ValueError(f"{name} has {v_prev.shape[0]} rows but the batch has B = {h.shape[0]}")
    _check_same_place(v_prev, name, h)
    return v_prev.detach().contiguous()


def _checks_target_range(target: torch.Tensor) -> bool:
    """Whether the host checks target's range: in eager mode for CPU tensors, and for device tensors only when
    SVP_KERNELS_CHECK_TARGETS=1 (the check synchronises). Unchecked, an out-of-range row gives NaN loss and
    gradient in every backend (docs/design.md §4)."""
    if _is_compiling():
        return False
    return target.device.type == "cpu" or os.environ.get(CHECK_TARGETS_ENV) == "1"


def _check_target(target, h: torch.Tensor, num_classes: int) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, shape (B,), got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices (int64), got dtype {target.dtype}")
    if target.dim() != 1 or target.shape[0] != h.shape[0]:
        raise ValueError(f"target must have shape (B,) = ({h.shape[0]},), got shape {tuple(target.shape)}")
    _check_same_place(target, "target", h, check_dtype=False)
    if _checks_target_range(target):
        low, high = index_bounds(target)
        if low < 0 or high >= num_classes:
            raise ValueError(f"target values must be in [0, {num_classes}) (C = {num_classes} classes), "
                             f"got values in [{low}, {high}]")
    if target.dtype != torch.int64:
        target = target.to(torch.int64)
    return target if target.is_contiguous() else target.contiguous()


def _check_in_range(ok, requirement: str, value) -> None:
    """ValueError "{requirement}, got {value}" unless `ok`. Under torch.compile `ok` and `value` may be
    symbolic (dynamic=True turns float arguments and attributes into SymFloats): torch._check records `ok`
    as a guard or a runtime assertion, with a message that formats no symbol (a failed trace falls back to
    eager, which raises the ValueError); math.* on a symbol would not trace."""
    if ok is True:  # a plain bool that holds: nothing to record, eager or compiled
        return
    if _is_compiling():
        torch._check(ok, lambda: requirement)
    elif not ok:
        raise ValueError(f"{requirement}, got {value}")


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p must be a float in [0, 1), got {type(p).__name__}")
    _check_in_range(0.0 <= p < 1.0, "p must be in [0, 1)", p)  # also rejects NaN
    return float(p)


def _check_seed(seed, p: float, device: torch.device) -> torch.Tensor:
    """The dropout seed as a 0-dim int64 tensor on `device`, the form every backend reads (on the device).

    An int (or None: a fresh draw from torch's default generator) becomes ``torch.full`` on `device`: a fill
    kernel with the value as its argument on CUDA, no host-to-device copy and no synchronisation. A seed
    tensor is used as it is; one on another device is moved (a CPU seed for CUDA h costs a small copy: create
    it on h's device). Its value is checked against [0, 2**63) only on the CPU outside torch.compile: reading
    a device tensor would synchronise (and break CUDA-graph capture); the kernels use its 64 bits as the key.
    """
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0:
            raise TypeError("seed must be an int in [0, 2**63), a 0-dim int64 tensor or None, got a "
                            f"{seed.dtype} tensor of shape {tuple(seed.shape)}")
        if seed.device.type == "cpu" and not _is_compiling():
            value = int(seed)
            if not 0 <= value < MAX_SEED:
                raise ValueError(f"seed must be in [0, 2**63), got {value}")
        return seed if seed.device == device else seed.to(device)
    if seed is None:
        if _is_compiling():  # a draw inside the graph (a host .item() would break it); compiled RNG, not eager's
            return torch.randint(0, MAX_SEED - 1, (), dtype=torch.int64, device=device)
        if p > 0 and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError("seed=None inside CUDA-graph capture would bake one draw into the graph, the same mask "
                             "at every replay; pass seed= a 0-dim int64 tensor on the device (e.g. from "
                             "svp_kernels.projection.stream_seed) or use the svp_kernels.nn modules")
        seed = draw_seed() if p > 0 else 0  # p = 0: no mask to draw
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int in [0, 2**63), a 0-dim int64 tensor or None, got {type(seed).__name__}")
    else:
        _check_in_range(0 <= seed < MAX_SEED, "seed must be in [0, 2**63)", seed)
    return torch.full((), seed, dtype=torch.int64, device=device)


def _check_reduction(reduction) -> bool:
    """True for "mean", False for "sum"."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return reduction == "mean"


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_alignment_weight(alignment_weight) -> float:
    if isinstance(alignment_weight, bool) or not isinstance(alignment_weight, (int, float)):
        raise TypeError(f"alignment_weight must be a float, got {type(alignment_weight).__name__}")
    # 0 <= λ < inf rejects NaN as well
    _check_in_range(0.0 <= alignment_weight < math.inf, "alignment_weight must be finite and ≥ 0", alignment_weight)
    return float(alignment_weight)


def _check_projection_path(projection_path) -> str:
    """One of backends.PROJECTION_PATHS: "auto", "fused" (the fused kernels) or "gemm" (R̃ written out, then the
    device's GEMM; docs/backends.md "projection paths")."""
    if projection_path not in backends.PROJECTION_PATHS:
        raise ValueError(f"projection_path must be one of {backends.PROJECTION_PATHS}, got {projection_path!r}")
    return projection_path


class _ProjectionArgs(NamedTuple):
    """A validated projection: weight (C, D) or None for implicit; identity when `identity`."""

    identity: bool
    weight: Optional[torch.Tensor]
    out_features: int
    proj_seed: int
    proj_std: float


def _check_projection(projection, h: torch.Tensor, p: float) -> _ProjectionArgs:
    in_features = h.shape[1]
    if projection is None:
        if p > 0:
            raise ValueError(f"p = {p} needs a projection: dropout applies to R's elements, and "
                             "projection=None is the identity (pass a (C, D) tensor or ImplicitProjection)")
        return _ProjectionArgs(True, None, in_features, 0, 0.0)
    if isinstance(projection, ImplicitProjection):
        return _ProjectionArgs(False, None, projection.out_features, projection.seed,
                               projection.std_for(in_features))
    if not isinstance(projection, torch.Tensor):
        raise TypeError("projection must be None (identity), a (C, D) torch.Tensor or an ImplicitProjection, "
                        f"got {type(projection).__name__}")
    if projection.dim() != 2 or projection.shape[0] == 0:
        raise ValueError(f"projection must have shape (C, D) with C ≥ 1, got shape {tuple(projection.shape)}")
    if projection.shape[1] != in_features:
        raise ValueError(f"projection has {projection.shape[1]} columns but h has {in_features} features; "
                         f"R must be (C, D) with D = h.shape[1]")
    if projection.requires_grad:
        raise ValueError("projection requires grad, but R is a fixed random matrix that gets no gradient; "
                         "pass projection.detach() or register it as a buffer")
    _check_same_place(projection, "projection", h)
    return _ProjectionArgs(False, projection.contiguous(), projection.shape[0], 0, 0.0)


def _gemm_keyword(gemm: bool) -> dict:
    """The backend functions' projection-path keyword: passed only when the GEMM path runs, so that backends
    with the fused path alone keep their signatures."""
    return {"gemm": True} if gemm else {}


def _project(module, h, projection: _ProjectionArgs, p: float, seed: torch.Tensor, gemm: bool = False) -> torch.Tensor:
    """v (B, C) in the accumulation dtype, differentiable w.r.t. h."""
    if projection.identity:
        return h.to(accumulation_dtype(h.dtype))
    return module.projection(h, projection.weight, projection.out_features, projection.proj_seed,
                             projection.proj_std, p, seed, **_gemm_keyword(gemm))


def _save_projection(ctx, h, module, projection: _ProjectionArgs, p: float) -> None:
    """What the backward of the eager nodes needs besides the saved tensors."""
    ctx.module, ctx.projection, ctx.p, ctx.in_features, ctx.h_dtype = module, projection, p, h.shape[1], h.dtype


def _projection_value(module, h, projection: _ProjectionArgs, p: float, seed: torch.Tensor) -> torch.Tensor:
    """v (B, C) = h R̃ᵀ through the gradient interface (no autograd node)."""
    return module.projection_value(h, projection.weight, projection.out_features, projection.proj_seed,
                                   projection.proj_std, p, seed)


def _projection_grad(ctx, grad_v: torch.Tensor, weight, seed: torch.Tensor) -> torch.Tensor:
    """dh (B, D) = grad_v R̃ in h's dtype, the mask regenerated from the seed (arguments kept by _save_projection)."""
    projection = ctx.projection
    return ctx.module.projection_backward(grad_v.contiguous(), weight, ctx.in_features, projection.proj_seed,
                                          projection.proj_std, ctx.p, seed, ctx.h_dtype)


class _FusedLocalLoss(torch.autograd.Function):
    """fused_local_loss outside torch.compile on a fused backend without a native node (triton): one autograd
    node in place of the ops' two (cpu and cuda run the same node in C++: their ``local_loss``).

    The forward runs the backend's gradient interface (docs/backends.md) and keeps only g_v (B, C), the seed
    tensor and a dense R; the backward is dh = grad_loss · g_v R̃, the mask regenerated from the seed. Same
    kernels and the same arithmetic as the op path that torch.compile traces, so the same bits.
    """

    @staticmethod
    def forward(ctx, h, module, projection: _ProjectionArgs, p, seed, target, v_prev, alignment_weight, mean,
                center):
        if projection.identity:
            v = h.to(accumulation_dtype(h.dtype)).detach()  # an output must not be the input itself
        else:
            v = _projection_value(module, h, projection, p, seed)
        loss, ce, alignment, grad_v = module.epilogue_with_grad(v, target, v_prev, alignment_weight, mean, center)
        ctx.save_for_backward(grad_v, projection.weight, seed)
        _save_projection(ctx, h, module, projection, p)
        ctx.mark_non_differentiable(ce, alignment, v)
        return loss, ce, alignment, v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_ce, grad_alignment, grad_v_out):
        grad_v, weight, seed = ctx.saved_tensors
        grad_v = grad_loss * grad_v
        grad_h = grad_v.to(ctx.h_dtype) if ctx.projection.identity else _projection_grad(ctx, grad_v, weight, seed)
        return (grad_h,) + (None,) * 9


class _DropoutProjection(torch.autograd.Function):
    """dropout_projection outside torch.compile on a fused backend without a native node (triton): v = h R̃ᵀ
    through the gradient interface, dh = grad_v R̃ in the backward (the mask regenerated from the seed); saves
    the seed and a dense R (cpu and cuda run the same node in C++: their ``dropout_projection``)."""

    @staticmethod
    def forward(ctx, h, module, projection: _ProjectionArgs, p, seed):
        ctx.save_for_backward(projection.weight, seed)
        _save_projection(ctx, h, module, projection, p)
        return _projection_value(module, h, projection, p, seed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_v):
        weight, seed = ctx.saved_tensors
        return _projection_grad(ctx, grad_v, weight, seed), None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------

def fused_local_loss(h, target, v_prev=None, *, projection: Projection = None, p: float = 0.0, seed=None,
                     alignment_weight: float = 1.0, reduction: str = "mean", center: bool = False,
                     backend: str = "auto", projection_path: str = "auto") -> LocalLoss:
    """The SVP local loss of one layer and its gradient, without materialising R̃ or any B×B matrix.

    v = h R̃ᵀ with R̃ = R ⊙ M / (1 − p); loss = CE(v, target) + λ‖S(v) − S(v_prev)‖²_F (/ B² for "mean"),
    S the batch cosine-similarity Gram (Pearson when center=True).

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
        reduction: "mean" (FA / B²) or "sum" of the alignment term; CE is always a batch mean.
        center: subtract each row's mean before normalising (Pearson similarity).
        backend: "auto" | "reference" | "cpu" | "triton" | "cuda".
        projection_path: "auto" | "fused" (R̃ generated tile by tile inside the kernels) | "gemm" (R̃ (C, D)
            written out once per direction, then the device's GEMM: cuBLAS tensor cores for bfloat16/float16;
            C·D extra transient memory); cpu and cuda backends. "auto" is "fused" for now.

    Returns:
        LocalLoss(loss, ce, alignment, v): loss differentiable w.r.t. h; ce, alignment detached; v (B, C)
        detached in h's dtype.
    """
    h = _check_features(h)
    p = _check_p(p)
    projection_args = _check_projection(projection, h, p)
    target = _check_target(target, h, projection_args.out_features)
    v_prev = _check_v_prev(v_prev, h)
    mean = _check_reduction(reduction)
    center = _check_bool(center, "center")
    alignment_weight = _check_alignment_weight(alignment_weight)
    seed = _check_seed(seed, p, h.device)
    path = _check_projection_path(projection_path)
    module = backends.resolve(backend, h.device, h.dtype)
    gemm = backends.gemm_projection(path, module)

    h = h.contiguous()
    if not _is_compiling() and backends.has_gradient_interface(module):
        if backends.has_native_node(module):
            loss, ce, alignment, v = module.local_loss(h, projection_args.weight, projection_args.out_features,
                                                       projection_args.proj_seed, projection_args.proj_std, p, seed,
                                                       target, v_prev, alignment_weight, mean, center,
                                                       projection_args.identity, **_gemm_keyword(gemm))
        else:
            loss, ce, alignment, v = _FusedLocalLoss.apply(h, module, projection_args, p, seed, target, v_prev,
                                                            alignment_weight, mean, center)
        return LocalLoss(loss, ce, alignment, v.to(h.dtype))
    v = _project(module, h, projection_args, p, seed, gemm)
    loss, ce, alignment = module.epilogue(v, target, v_prev, alignment_weight, mean, center)
    return LocalLoss(loss, ce.detach(), alignment.detach(), v.detach().to(h.dtype))


def dropout_projection(h, projection: Projection, p: float = 0.0, seed=None, backend: str = "auto", *,
                       projection_path: str = "auto") -> torch.Tensor:
    """v (B, C) = h (R ⊙ M / (1 − p))ᵀ in h's dtype, differentiable w.r.t. h; R̃ is never stored (with
    projection_path="gemm": written out as one transient (C, D) tensor per direction and multiplied by the
    device's GEMM; see fused_local_loss).

    Replaces ``h @ (R * (torch.rand_like(R) >= p) / (1 - p)).T`` (with the mask of docs/design.md §3).
    """
    h = _check_features(h)
    p = _check_p(p)
    projection_args = _check_projection(projection, h, p)
    seed = _check_seed(seed, p, h.device)
    path = _check_projection_path(projection_path)
    module = backends.resolve(backend, h.device, h.dtype)
    gemm = backends.gemm_projection(path, module)
    h = h.contiguous()
    if not _is_compiling() and backends.has_gradient_interface(module) and not projection_args.identity:
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
    from . import predsim

    return predsim.alignment_loss(v, v_prev, reduction, center, backend, reduce)


def cosine_gram(v, center: bool = False) -> torch.Tensor:
    """S (B, B) = â âᵀ, â the rows of v (centred when center=True) divided by max(‖row‖, 1e-12).

    The inspection helper: it does store the B×B matrix. Replaces ``F.normalize(v) @ F.normalize(v).T``.
    """
    v = _check_features(v, "v")
    center = _check_bool(center, "center")
    module = backends.resolve("auto", v.device, v.dtype)
    return module.cosine_gram(v.contiguous(), center)


def available_backends() -> list[str]:
    """Backends usable in this process, e.g. ["reference", "cpu", "triton"]."""
    return backends.available_backends()
