"""Launchers for the Triton kernels (block sizes, grids, scratch) and their torch.library ops.

The four ops ``svp_kernels::triton_projection_forward``, ``triton_projection_backward``,
``triton_loss_epilogue`` and ``triton_cosine_gram`` take the arguments of the compiled ops of
docs/backends.md (integers appear as ``SymInt`` in the inferred schemas; the dropout seed is a 0-dim
int64 tensor that the kernels load). On a GPU they are
``torch.library.triton_op`` with every launch wrapped in ``wrap_triton``, so torch.compile sees the
kernels; under TRITON_INTERPRET=1 the kernels are interpreter functions, which neither fake tensors nor
the functional decomposition of ``triton_op`` can run, so the ops are plain ``torch.library.custom_op``
there. Fake and autograd rules come from svp_kernels/_ops.py, shared with the compiled backends.

The launchers below are also callable directly with a ``config`` (block sizes, D splits, the alignment
path), which the tests use to force multi-tile and split paths on tiny shapes.
"""

import math
import os
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
from triton.runtime.jit import JITFunction

from ... import _ops
from ..._ops import accumulation_dtype
from . import kernels

NAMESPACE = "svp_kernels"
PREFIX = "triton_"
MAX_INT32_OFFSET = 2**31
# The D-split workspace (splits × B × C in the accumulation dtype) stays below this many elements.
MAX_WORKSPACE_ELEMENTS = 1 << 24

# The kernels were decorated in interpreter mode (TRITON_INTERPRET=1 when this module was imported).
INTERPRETED = not isinstance(kernels.projection_forward_kernel, JITFunction)
# libdevice exp/log/cos/sqrt on the GPU (tl.* lowers to approximations there); the interpreter's are exact enough.
PRECISE_MATH = not INTERPRETED and kernels.libdevice is not None


def input_precision() -> str:
    """The float32 tl.dot precision: "ieee" (full float32 products) unless SVP_KERNELS_ALLOW_TF32=1."""
    return "tf32" if os.environ.get("SVP_KERNELS_ALLOW_TF32") == "1" else "ieee"


def keep_threshold(p: float) -> int:
    """t such that (word0 >> 8) >= t  ⟺  u24(word0) >= float32(p), the keep rule of docs/design.md §3."""
    p32 = struct.unpack("f", struct.pack("f", p))[0]  # float32(p), as the C++ backends compare
    return math.ceil(p32 * 2**24)  # exact: p32 · 2²⁴ is a double without rounding


def _launch(kernel):
    """The kernel, wrapped for torch.compile when it is a compiled (not interpreted) Triton kernel."""
    if INTERPRETED:
        return kernel
    return torch.library.wrap_triton(kernel)


def _next_pow2(n: int, low: int = 16, high: Optional[int] = None) -> int:
    value = max(low, triton.next_power_of_2(max(int(n), 1)))
    return min(value, high) if high is not None else value


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# ----------------------------------------------------------------------------------------------------
# Projection
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectionConfig:
    """Block sizes of the projection kernels; splits = number of D splits of the forward (None: auto)."""

    block_b: int
    block_c: int
    block_d: int
    num_warps: int = 4
    splits: Optional[int] = None


def projection_config(B: int, C: int, D: int, dtype: torch.dtype, device: torch.device,
                      dense: bool = True) -> ProjectionConfig:
    """Fixed small blocks in the interpreter; on the GPU by the kind of dot (see kernels.py).

    Tensor-core dots (bf16/fp16 h with a dense R of its dtype) take wide tiles; float32/float64 dots
    (input_precision="ieee", and any implicit R, which is float32) run on the FMA units, whose operands
    all sit in registers, so the reduction width BLOCK_D stays at 16. These sizes compile for sm_90
    without spills (checked with Triton 3.9); their speed is still to be tuned on a GPU.
    """
    if INTERPRETED:
        return ProjectionConfig(block_b=_next_pow2(B, high=32), block_c=_next_pow2(C, high=32), block_d=32)
    if dense and dtype in (torch.bfloat16, torch.float16):
        if B >= 128:
            return ProjectionConfig(block_b=128, block_c=_next_pow2(C, high=64), block_d=64, num_warps=8)
        return ProjectionConfig(block_b=_next_pow2(B, high=64), block_c=_next_pow2(C, high=64), block_d=32)
    high_b = 32 if dtype == torch.float64 else 64
    return ProjectionConfig(block_b=_next_pow2(B, high=high_b), block_c=_next_pow2(C, high=32), block_d=16)


def _weight_arguments(weight, h, C: int, D: int, proj_seed: int, proj_std: float, p: float, seed: torch.Tensor,
                      block_c: int):
    """Kernel arguments shared by forward and backward: (weight_ptr, stride, seeds, threshold, flags).

    The dropout seed is a 0-dim int64 tensor on the kernels' device; they load it themselves."""
    has_weight = weight is not None
    offset_64 = (C + block_c + 1) * D >= MAX_INT32_OFFSET  # a padded tile's offsets could pass int32
    return dict(
        weight_ptr=weight if has_weight else h,
        stride_wc=weight.stride(0) if has_weight else 0,
        proj_seed_lo=proj_seed % 2**32, proj_seed_hi=proj_seed // 2**32, proj_std=float(proj_std),
        seed_ptr=seed, keep_threshold=keep_threshold(p),
        HAS_WEIGHT=has_weight, HAS_DROPOUT=p > 0, OFFSET_64=offset_64, PRECISE_MATH=PRECISE_MATH,
        INPUT_PRECISION=input_precision(),
    )


def projection_forward(h: torch.Tensor, weight: Optional[torch.Tensor], out_features: int, proj_seed: int,
                       proj_std: float, p: float, seed: torch.Tensor,
                       config: Optional[ProjectionConfig] = None) -> torch.Tensor:
    """v (B, C) = h (B, D) · R̃ᵀ in the accumulation dtype; R̃ = R ⊙ M / (1 − p) is never stored."""
    B, D = h.shape
    C = int(out_features)
    acc = accumulation_dtype(h.dtype)
    h = h.contiguous()
    weight = weight.contiguous() if weight is not None else None
    config = config or projection_config(B, C, D, h.dtype, h.device, dense=weight is not None)
    b_tiles, c_tiles = triton.cdiv(B, config.block_b), triton.cdiv(C, config.block_c)
    chunks = triton.cdiv(D, config.block_d)
    splits = config.splits
    if splits is None:  # enough programs to fill the GPU, a bounded workspace
        splits = triton.cdiv(2 * _sm_count(h.device), b_tiles * c_tiles)
        splits = min(splits, max(1, MAX_WORKSPACE_ELEMENTS // max(1, B * C)))
    splits = max(1, min(int(splits), chunks))
    d_per_split = triton.cdiv(chunks, splits) * config.block_d
    splits = triton.cdiv(D, d_per_split)

    scale = torch.full((), 1.0 / (1.0 - p), dtype=acc, device=h.device)
    out = torch.empty((splits, B, C) if splits > 1 else (B, C), dtype=acc, device=h.device)
    stride_os = out.stride(0) if splits > 1 else 0
    _launch(kernels.projection_forward_kernel)[(splits, b_tiles, c_tiles)](
        h_ptr=h, out_ptr=out, scale_ptr=scale, B=B, C=C, D=D, stride_hb=h.stride(0), stride_os=stride_os,
        stride_ob=C, d_per_split=d_per_split,
        BLOCK_B=config.block_b, BLOCK_C=config.block_c, BLOCK_D=config.block_d, num_warps=config.num_warps,
        **_weight_arguments(weight, h, C, D, proj_seed, proj_std, p, seed, config.block_c),
    )
    return out.sum(dim=0) if splits > 1 else out  # fixed-order reduction: deterministic


def projection_backward_config(B: int, C: int, D: int, dtype: torch.dtype, device: torch.device) -> ProjectionConfig:
    """dh tiles BLOCK_B × BLOCK_D over a reduction of BLOCK_C = 16 (grad_v is float32/float64: FMA dots)."""
    if INTERPRETED:
        return ProjectionConfig(block_b=_next_pow2(B, high=32), block_c=_next_pow2(C, high=32), block_d=32)
    if dtype == torch.float64:
        return ProjectionConfig(block_b=_next_pow2(B, high=32), block_c=16, block_d=64)
    block_b = _next_pow2(B, high=64)
    return ProjectionConfig(block_b=block_b, block_c=16, block_d=128, num_warps=8 if block_b == 64 else 4)


def projection_backward(grad_v: torch.Tensor, weight: Optional[torch.Tensor], in_features: int, proj_seed: int,
                        proj_std: float, p: float, seed: torch.Tensor, dtype: torch.dtype,
                        config: Optional[ProjectionConfig] = None) -> torch.Tensor:
    """dh (B, D) = grad_v (B, C) · R̃ in `dtype` (h's); the mask and an implicit R are regenerated."""
    B, C = grad_v.shape
    D = int(in_features)
    acc = accumulation_dtype(dtype)
    grad_v = grad_v.to(acc).contiguous()
    weight = weight.contiguous() if weight is not None else None
    config = config or projection_backward_config(B, C, D, acc, grad_v.device)
    scale = torch.full((), 1.0 / (1.0 - p), dtype=acc, device=grad_v.device)
    dh = torch.empty((B, D), dtype=dtype, device=grad_v.device)
    grid = (triton.cdiv(D, config.block_d), triton.cdiv(B, config.block_b))
    _launch(kernels.projection_backward_kernel)[grid](
        grad_ptr=grad_v, dh_ptr=dh, scale_ptr=scale, B=B, C=C, D=D, stride_gb=grad_v.stride(0), stride_dhb=dh.stride(0),
        BLOCK_B=config.block_b, BLOCK_C=config.block_c, BLOCK_D=config.block_d, num_warps=config.num_warps,
        **_weight_arguments(weight, grad_v, C, D, proj_seed, proj_std, p, seed, config.block_c),
    )
    return dh


def weight_window(weight: Optional[torch.Tensor], out_features: int, in_features: int, proj_seed: int,
                  proj_std: float, p: float, seed: int, row_start: int = 0, col_start: int = 0,
                  n_rows: Optional[int] = None, n_cols: Optional[int] = None,
                  dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(R ⊙ M)[row_start:row_start+n_rows, col_start:col_start+n_cols], unscaled, as the kernels generate it
    (float32 for an implicit R). Only the window is computed, so offsets beyond 2³¹ cost nothing.
    seed: the dropout seed, an int or a 0-dim int64 tensor."""
    C, D = int(out_features), int(in_features)
    n_rows = C - row_start if n_rows is None else n_rows
    n_cols = D - col_start if n_cols is None else n_cols
    device = weight.device if weight is not None else torch.device(device or "cpu")
    out_dtype = weight.dtype if weight is not None else dtype
    out = torch.empty((n_rows, n_cols), dtype=out_dtype, device=device)
    seed = torch.as_tensor(seed, dtype=torch.int64, device=device)
    block_r, block_k = 16, 32
    args = _weight_arguments(weight.contiguous() if weight is not None else None, out, C, D, proj_seed, proj_std,
                             p, seed, block_r)
    args.pop("INPUT_PRECISION")
    args["OFFSET_64"] = args["OFFSET_64"] or (row_start + n_rows + block_r) * D + col_start >= MAX_INT32_OFFSET
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_k))
    kernels.weight_window_kernel[grid](out_ptr=out, row_start=row_start, col_start=col_start, n_rows=n_rows,
                                       n_cols=n_cols, C=C, D=D, BLOCK_R=block_r, BLOCK_K=block_k, **args)
    return out


def philox_words(seed: int, offsets: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The four Philox words (int64 tensors in [0, 2³²)) of int64 `offsets` as the kernels compute them."""
    flat = offsets.to(torch.int64).contiguous().view(-1)
    words = torch.empty((4, flat.numel()), dtype=torch.int64, device=flat.device)
    block = 64
    kernels.philox_words_kernel[(triton.cdiv(flat.numel(), block),)](
        offsets_ptr=flat, words_ptr=words, N=flat.numel(), seed_lo=seed % 2**32, seed_hi=seed // 2**32, BLOCK=block)
    return tuple(w.view(offsets.shape) for w in words)


# ----------------------------------------------------------------------------------------------------
# Loss epilogue and cosine Gram
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpilogueConfig:
    """Blocks of the epilogue kernels. path: "feature" | "batch" | None (by cost, docs/backends.md)."""

    row_block_b: int  # row_statistics_kernel, normalization_backward_kernel: BLOCK_B × BLOCK_C row tiles
    row_block_c: int
    matmul_tile: int  # matmul_kernel: BLOCK_M = BLOCK_N
    matmul_block_k: int
    batch_tile: int  # batch_alignment_kernel: BLOCK_B (S tiles are batch_tile × batch_tile)
    batch_block_k: int
    grad_block_c: int  # gradient columns per batch_alignment_kernel program
    num_warps: int = 4
    matmul_warps: int = 4
    path: Optional[str] = None


def epilogue_config(B: int, C: int, dtype: torch.dtype) -> EpilogueConfig:
    """Row kernels hold ≤ 1024 elements per tile; the dots are float32/float64 (FMA) with K = 16.
    Compiles for sm_90 without spills (Triton 3.9); to be tuned on a GPU."""
    if INTERPRETED:
        return EpilogueConfig(row_block_b=_next_pow2(B, low=1, high=32), row_block_c=_next_pow2(C, high=32),
                              matmul_tile=32, matmul_block_k=32, batch_tile=32, batch_block_k=32,
                              grad_block_c=_next_pow2(C, high=32))
    row_block_c = _next_pow2(C, high=256)
    row_block_b = max(2, min(_next_pow2(B, low=2), 1024 // row_block_c))
    return EpilogueConfig(row_block_b=row_block_b, row_block_c=row_block_c, matmul_tile=64, matmul_block_k=16,
                          batch_tile=32, batch_block_k=16, grad_block_c=_next_pow2(C, high=64), num_warps=4,
                          matmul_warps=8)


def use_feature_space(B: int, C: int, C_prev: int) -> bool:
    """B·(C + C')² < B²·(C + C'): the Grams over features cost less than the B×B ones."""
    return C + C_prev < B


def _row_statistics(x, target, config: EpilogueConfig, acc, center: bool, normalize: bool, grad_v=None):
    """Launch row_statistics_kernel; returns (ce_rows or None, xhat or None, norm or None)."""
    B, C = x.shape
    device = x.device
    has_target = target is not None
    inv_batch = torch.full((), 1.0 / B, dtype=acc, device=device)
    ce_rows = torch.empty(B, dtype=acc, device=device) if has_target else inv_batch
    xhat = torch.empty((B, C), dtype=acc, device=device) if normalize else inv_batch
    norm = torch.empty(B, dtype=acc, device=device) if normalize else inv_batch
    _launch(kernels.row_statistics_kernel)[(triton.cdiv(B, config.row_block_b),)](
        x_ptr=x, target_ptr=target if has_target else x, ce_ptr=ce_rows,
        grad_ptr=grad_v if has_target else inv_batch, xhat_ptr=xhat, norm_ptr=norm, inv_batch_ptr=inv_batch,
        B=B, C=C, stride_xb=x.stride(0), HAS_TARGET=has_target, NORMALIZE=normalize, CENTER=center,
        PRECISE_MATH=PRECISE_MATH,
        BLOCK_B=config.row_block_b, BLOCK_C=config.row_block_c, num_warps=config.num_warps,
    )
    return (ce_rows if has_target else None, xhat if normalize else None, norm if normalize else None)


def _matmul(a, b, config: EpilogueConfig, second: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """a (M, K) · b (K, N) [− a2 · b2] with any strides (views such as xhat.t() cost nothing)."""
    M, K = a.shape
    N = b.shape[1]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    a2, b2 = second if second is not None else (a, b)
    grid = (triton.cdiv(M, config.matmul_tile), triton.cdiv(N, config.matmul_tile))
    _launch(kernels.matmul_kernel)[grid](
        a_ptr=a, b_ptr=b, a2_ptr=a2, b2_ptr=b2, out_ptr=out, M=M, N=N, K=K, K2=a2.shape[1],
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_bk=b.stride(0), stride_bn=b.stride(1),
        stride_a2m=a2.stride(0), stride_a2k=a2.stride(1), stride_b2k=b2.stride(0), stride_b2n=b2.stride(1),
        stride_om=out.stride(0), stride_on=out.stride(1),
        HAS_SECOND=second is not None, INPUT_PRECISION=input_precision(), WIDE_K=out.dtype == torch.float32,
        BLOCK_M=config.matmul_tile, BLOCK_N=config.matmul_tile, BLOCK_K=config.matmul_block_k,
        num_warps=config.matmul_warps,
    )
    return out


def loss_epilogue(v: torch.Tensor, target: Optional[torch.Tensor], v_prev: Optional[torch.Tensor],
                  alignment_weight: float, mean: bool, center: bool, config: Optional[EpilogueConfig] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, alignment, g_v): CE(v, y) + λ·FA and its gradient g_v = dloss/dv (B, C), one pass."""
    B, C = v.shape
    acc = accumulation_dtype(v.dtype)
    device = v.device
    v = v.contiguous()
    config = config or epilogue_config(B, C, acc)
    compute_alignment = v_prev is not None
    grad_v = (torch.empty if target is not None else torch.zeros)((B, C), dtype=acc, device=device)

    ce_rows, xhat, norm = None, None, None
    if target is not None or compute_alignment:
        ce_rows, xhat, norm = _row_statistics(v, target.contiguous() if target is not None else None, config, acc,
                                              center, compute_alignment, grad_v)
    ce = ce_rows.sum() / B if ce_rows is not None else torch.zeros((), dtype=acc, device=device)
    if not compute_alignment:
        return ce.clone(), ce, torch.zeros((), dtype=acc, device=device), grad_v

    v_prev = v_prev.contiguous()
    C_prev = v_prev.shape[1]
    _, xhat_prev, _ = _row_statistics(v_prev, None, config, acc, center, True)
    compute_grad = alignment_weight != 0.0
    path = config.path or ("feature" if use_feature_space(B, C, C_prev) else "batch")
    grad_xhat = None
    if path == "feature":
        # The Grams and the gradient in float64 (exact products of float32 values): FA = ‖âᵀâ‖² − 2‖b̂ᵀâ‖² + ‖b̂ᵀb̂‖² cancels when
        # v and v_prev are aligned (FA ≪ ‖âᵀâ‖²), and float32 Grams would lose its leading digits there.
        wide, wide_prev = xhat.double(), xhat_prev.double()
        gram = _matmul(wide.t(), wide, config)  # âᵀâ (C, C)
        cross = _matmul(wide_prev.t(), wide, config)  # b̂ᵀâ (C', C)
        gram_prev = _matmul(wide_prev.t(), wide_prev, config)  # b̂ᵀb̂ (C', C')
        alignment = (gram.square().sum() - 2.0 * cross.square().sum() + gram_prev.square().sum()).to(acc)
        if compute_grad:  # â(âᵀâ) − b̂(b̂ᵀâ), which cancel likewise: in float64 too
            grad_xhat = _matmul(wide, gram, config, second=(wide_prev, cross)).to(acc)
    elif path == "batch":
        row_tiles = triton.cdiv(B, config.batch_tile)
        partials = torch.empty(row_tiles, dtype=acc, device=device)
        grad_xhat = torch.empty((B, C), dtype=acc, device=device) if compute_grad else partials
        chunks = triton.cdiv(C, config.grad_block_c) if compute_grad else 1
        _launch(kernels.batch_alignment_kernel)[(row_tiles, chunks)](
            a_ptr=xhat, b_ptr=xhat_prev, grad_ptr=grad_xhat, partial_ptr=partials, B=B, C=C, CP=C_prev,
            COMPUTE_GRAD=compute_grad, INPUT_PRECISION=input_precision(), WIDE_K=acc == torch.float32,
            BLOCK_B=config.batch_tile, BLOCK_K=config.batch_block_k, BLOCK_C=config.grad_block_c,
            num_warps=config.num_warps,
        )
        alignment = partials.sum()
        grad_xhat = grad_xhat if compute_grad else None
    else:
        raise ValueError(f"path must be 'feature', 'batch' or None, got {path!r}")
    if mean:
        alignment = alignment / (B * B)

    if compute_grad:  # g_v += λ · 4 (/B²) · ∂â/∂v applied to (â(âᵀâ) − b̂(b̂ᵀâ))
        coef = torch.full((), alignment_weight * 4.0 / (B * B if mean else 1), dtype=acc, device=device)
        _launch(kernels.normalization_backward_kernel)[(triton.cdiv(B, config.row_block_b),)](
            xhat_ptr=xhat, norm_ptr=norm, grad_xhat_ptr=grad_xhat, grad_v_ptr=grad_v, coef_ptr=coef, B=B, C=C,
            CENTER=center,
            BLOCK_B=config.row_block_b, BLOCK_C=config.row_block_c, num_warps=config.num_warps,
        )
    loss = ce + alignment_weight * alignment
    return loss, ce, alignment, grad_v


def cosine_gram(v: torch.Tensor, center: bool, config: Optional[EpilogueConfig] = None) -> torch.Tensor:
    """S (B, B) = â âᵀ in the accumulation dtype (inspection only)."""
    B, C = v.shape
    acc = accumulation_dtype(v.dtype)
    config = config or epilogue_config(B, C, acc)
    _, xhat, _ = _row_statistics(v.contiguous(), None, config, acc, center, True)
    return _matmul(xhat, xhat.t(), config)


# ----------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------

_define = torch.library.custom_op if INTERPRETED else torch.library.triton_op


@_define(f"{NAMESPACE}::{PREFIX}projection_forward", mutates_args=())
def projection_forward_op(h: torch.Tensor, weight: Optional[torch.Tensor], out_features: int, proj_seed: int,
                          proj_std: float, p: float, seed: torch.Tensor) -> torch.Tensor:
    return projection_forward(h, weight, out_features, proj_seed, proj_std, p, seed)


@_define(f"{NAMESPACE}::{PREFIX}projection_backward", mutates_args=())
def projection_backward_op(grad_v: torch.Tensor, weight: Optional[torch.Tensor], in_features: int, proj_seed: int,
                           proj_std: float, p: float, seed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return projection_backward(grad_v, weight, in_features, proj_seed, proj_std, p, seed, dtype)


@_define(f"{NAMESPACE}::{PREFIX}loss_epilogue", mutates_args=())
def loss_epilogue_op(v: torch.Tensor, target: Optional[torch.Tensor], v_prev: Optional[torch.Tensor],
                     alignment_weight: float, mean: bool, center: bool
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return loss_epilogue(v, target, v_prev, alignment_weight, mean, center)


@_define(f"{NAMESPACE}::{PREFIX}cosine_gram", mutates_args=())
def cosine_gram_op(v: torch.Tensor, center: bool) -> torch.Tensor:
    return cosine_gram(v, center)


_ops.register_fakes(f"{NAMESPACE}::{PREFIX}")
_ops.register_projection_autograd(f"{NAMESPACE}::{PREFIX}projection_forward",
                                  torch.ops.svp_kernels.triton_projection_backward)
_ops.register_epilogue_autograd(f"{NAMESPACE}::{PREFIX}loss_epilogue")
