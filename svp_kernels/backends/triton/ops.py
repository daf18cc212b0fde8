"""Launchers for the Triton kernels (block sizes, grids, scratch) and their torch.library ops.

The four ops ``svp_kernels::triton_projection_forward``, ``triton_projection_backward``,
``triton_loss_epilogue`` and ``triton_cosine_gram`` take the arguments of the compiled ops of
docs/backends.md (integers appear as ``SymInt`` in the inferred schemas; the dropout seed is a 0-dim
int64 tensor that the kernels load). On a GPU they are
``torch.library.triton_op`` with every launch wrapped in ``wrap_triton``, so torch.compile sees the
kernels (the eager autograd nodes and the gradient interface launch inside ``direct_launches()``, which
skips the wrapper: outside a ``triton_op`` it would dispatch every eager launch through a higher-order op);
under TRITON_INTERPRET=1 the kernels are interpreter functions, which neither fake tensors nor
the functional decomposition of ``triton_op`` can run, so the ops are plain ``torch.library.custom_op``
there. Fake and autograd rules come from svp_kernels/_ops.py, shared with the compiled backends.

The launchers below are also callable directly with a ``config`` (block sizes, D splits, the alignment
path), which the tests use to force multi-tile and split paths on tiny shapes.
"""

import math
import os
import struct
import threading
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from triton.runtime.jit import JITFunction

from ... import _ops
from ..._ops import accumulation_dtype
from . import epilogue_kernels, kernels

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


def float_bits(value: float, dtype: torch.dtype) -> int:
    """The bit pattern of float `value` rounded to `dtype` (float64, else float32) as a signed int: how the
    launchers hand a kernel a constant of the accumulation dtype exactly (kernels.scalar_from_bits), without a
    0-dim tensor to fill first. Rounds to nearest like ``torch.full``; beyond float32's range, ±inf."""
    if dtype == torch.float64:
        return struct.unpack("<q", struct.pack("<d", value))[0]
    try:
        return struct.unpack("<i", struct.pack("<f", value))[0]
    except OverflowError:  # rounds to ±inf in float32
        return struct.unpack("<i", struct.pack("<f", math.copysign(math.inf, value)))[0]


class _LaunchMode(threading.local):
    direct = False  # set by direct_launches(), per thread (autograd runs CUDA backwards on its own threads)


_LAUNCH_MODE = _LaunchMode()


class direct_launches:
    """Within it, launches call the Triton kernel itself, not the ``wrap_triton`` wrapper: for the eager
    autograd nodes (nodes.py), which torch.compile never traces. Outside a ``triton_op`` (which unwraps its
    own eager calls), the wrapper dispatches every launch through torch's triton_kernel_wrapper_mutation
    higher-order op even in eager mode: ~0.3-0.5 ms of Python per launch, and one entry per launch added to
    torch's kernel side table for good (bench/NOTES.md, "Host cost of the triton backend")."""

    def __enter__(self):
        self.previous = _LAUNCH_MODE.direct
        _LAUNCH_MODE.direct = True

    def __exit__(self, *exc):
        _LAUNCH_MODE.direct = self.previous


def _launch(kernel):
    """The kernel, wrapped for torch.compile when it is a compiled (not interpreted) Triton kernel launched
    outside direct_launches(). Every launch goes through here (tools/gpu_compile_check.py records them)."""
    if INTERPRETED or _LAUNCH_MODE.direct:
        return kernel
    return torch.library.wrap_triton(kernel)


def _cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for ints: triton.cdiv's value in plain Python (triton's is a constexpr function, whose call
    costs microseconds of argument unwrapping; a launch computes a dozen of these)."""
    return -(-a // b)


def _next_pow2(n: int, low: int = 16, high: Optional[int] = None) -> int:
    """The least power of two ≥ n (and ≥ low, ≤ high): triton.next_power_of_2's value in plain Python."""
    value = max(low, 1 << (max(int(n), 1) - 1).bit_length())
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
    num_stages: Optional[int] = None  # software pipelining of the loop's loads (None: Triton's default)

    def launch_options(self) -> dict:
        options = {"num_warps": self.num_warps}
        if self.num_stages is not None and not INTERPRETED:
            options["num_stages"] = self.num_stages
        return options


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
    # An implicit R is generated, not loaded: nothing to pipeline but h, and without it no variant spills.
    return ProjectionConfig(block_b=_next_pow2(B, high=high_b), block_c=_next_pow2(C, high=32), block_d=16,
                            num_stages=None if dense else 1)


def _weight_arguments(weight, h, C: int, D: int, proj_seed: int, proj_std: float, p: float, seed: torch.Tensor,
                      block_c: int, acc: torch.dtype = torch.float32):
    """Kernel arguments shared by forward and backward: (weight_ptr, stride, seeds, threshold, the dropout
    scale 1/(1 − p) in `acc` (computed in double, rounded once), flags).

    The dropout seed is a 0-dim int64 tensor on the kernels' device; they load it themselves."""
    has_weight = weight is not None
    offset_64 = (C + block_c + 1) * D >= MAX_INT32_OFFSET  # a padded tile's offsets could pass int32
    return dict(
        weight_ptr=weight if has_weight else h,
        stride_wc=weight.stride(0) if has_weight else 0,
        proj_seed_lo=proj_seed % 2**32, proj_seed_hi=proj_seed // 2**32, proj_std=float(proj_std),
        seed_ptr=seed, keep_threshold=keep_threshold(p), scale_bits=float_bits(1.0 / (1.0 - p), acc) if p > 0 else 0,
        HAS_WEIGHT=has_weight, HAS_DROPOUT=p > 0, OFFSET_64=offset_64, PRECISE_MATH=PRECISE_MATH,
        INPUT_PRECISION=input_precision(),
    )


def projection_partials(h: torch.Tensor, weight: Optional[torch.Tensor], out_features: int, proj_seed: int,
                        proj_std: float, p: float, seed: torch.Tensor,
                        config: Optional[ProjectionConfig] = None) -> torch.Tensor:
    """The forward's partial sums of v = h (B, D) · R̃ᵀ, one per split of D: (splits, B, C) in the accumulation
    dtype, or v itself (B, C) when one split covers D. R̃ = R ⊙ M / (1 − p) is never stored."""
    B, D = h.shape
    C = int(out_features)
    acc = accumulation_dtype(h.dtype)
    h = h.contiguous()
    weight = weight.contiguous() if weight is not None else None
    config = config or projection_config(B, C, D, h.dtype, h.device, dense=weight is not None)
    b_tiles, c_tiles = _cdiv(B, config.block_b), _cdiv(C, config.block_c)
    chunks = _cdiv(D, config.block_d)
    splits = config.splits
    if splits is None:  # enough programs to fill the GPU, a bounded workspace
        splits = _cdiv(2 * _sm_count(h.device), b_tiles * c_tiles)
        splits = min(splits, max(1, MAX_WORKSPACE_ELEMENTS // max(1, B * C)))
    splits = max(1, min(int(splits), chunks))
    d_per_split = _cdiv(chunks, splits) * config.block_d
    splits = _cdiv(D, d_per_split)

    out = torch.empty((splits, B, C) if splits > 1 else (B, C), dtype=acc, device=h.device)
    stride_os = out.stride(0) if splits > 1 else 0
    _launch(kernels.projection_forward_kernel)[(splits, b_tiles, c_tiles)](
        h_ptr=h, out_ptr=out, B=B, C=C, D=D, stride_hb=h.stride(0), stride_os=stride_os,
        stride_ob=C, d_per_split=d_per_split,
        BLOCK_B=config.block_b, BLOCK_C=config.block_c, BLOCK_D=config.block_d, **config.launch_options(),
        **_weight_arguments(weight, h, C, D, proj_seed, proj_std, p, seed, config.block_c, acc),
    )
    return out


def reduce_splits(partials: torch.Tensor) -> torch.Tensor:
    """v (B, C) from projection_partials: the partial sums added in split order (kernels.sum_splits), the same
    bits as the loss epilogue's own reduction of them."""
    if partials.dim() == 2:
        return partials
    splits, B, C = partials.shape
    v = torch.empty((B, C), dtype=partials.dtype, device=partials.device)
    block = 256 if INTERPRETED else 1024
    _launch(kernels.reduce_splits_kernel)[(_cdiv(B * C, block),)](
        partial_ptr=partials, out_ptr=v, N=B * C, splits=splits, BLOCK=block)
    return v


def projection_forward(h: torch.Tensor, weight: Optional[torch.Tensor], out_features: int, proj_seed: int,
                       proj_std: float, p: float, seed: torch.Tensor,
                       config: Optional[ProjectionConfig] = None) -> torch.Tensor:
    """v (B, C) = h (B, D) · R̃ᵀ in the accumulation dtype; R̃ = R ⊙ M / (1 − p) is never stored."""
    return reduce_splits(projection_partials(h, weight, out_features, proj_seed, proj_std, p, seed, config))


def projection_backward_config(B: int, C: int, D: int, dtype: torch.dtype, device: torch.device) -> ProjectionConfig:
    """dh tiles BLOCK_B × BLOCK_D (64) over a reduction of BLOCK_C = 16 (grad_v is float32/float64: FMA dots)."""
    if INTERPRETED:
        return ProjectionConfig(block_b=_next_pow2(B, high=32), block_c=_next_pow2(C, high=32), block_d=32)
    # The loop over C is short (R's tile is generated, grad_v's is small): no pipelining. With it, or with
    # BLOCK_D 128, ptxas traded a few bytes of spills for occupancy in some variants.
    if dtype == torch.float64:
        return ProjectionConfig(block_b=_next_pow2(B, high=32), block_c=16, block_d=64, num_stages=1)
    block_b = _next_pow2(B, high=64)
    return ProjectionConfig(block_b=block_b, block_c=16, block_d=64, num_warps=8 if block_b == 64 else 4,
                            num_stages=1)


def projection_backward(grad_v: torch.Tensor, weight: Optional[torch.Tensor], in_features: int, proj_seed: int,
                        proj_std: float, p: float, seed: torch.Tensor, dtype: torch.dtype,
                        config: Optional[ProjectionConfig] = None,
                        grad_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dh (B, D) = (grad_scale · grad_v) (B, C) · R̃ in `dtype` (h's); the mask and an implicit R are
    regenerated. grad_scale: None or a 0-dim tensor of the accumulation dtype on grad_v's device (the loss's
    incoming gradient), multiplied in by the kernel as the torch product would round it."""
    B, C = grad_v.shape
    D = int(in_features)
    acc = accumulation_dtype(dtype)
    grad_v = grad_v.to(acc).contiguous()
    weight = weight.contiguous() if weight is not None else None
    config = config or projection_backward_config(B, C, D, acc, grad_v.device)
    dh = torch.empty((B, D), dtype=dtype, device=grad_v.device)
    grid = (_cdiv(D, config.block_d), _cdiv(B, config.block_b))
    _launch(kernels.projection_backward_kernel)[grid](
        grad_ptr=grad_v, dh_ptr=dh, grad_scale_ptr=grad_scale if grad_scale is not None else grad_v,
        B=B, C=C, D=D, stride_gb=grad_v.stride(0), stride_dhb=dh.stride(0), HAS_GRAD_SCALE=grad_scale is not None,
        BLOCK_B=config.block_b, BLOCK_C=config.block_c, BLOCK_D=config.block_d, **config.launch_options(),
        **_weight_arguments(weight, grad_v, C, D, proj_seed, proj_std, p, seed, config.block_c, acc),
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
    args.pop("scale_bits")
    args["OFFSET_64"] = args["OFFSET_64"] or (row_start + n_rows + block_r) * D + col_start >= MAX_INT32_OFFSET
    grid = (_cdiv(n_rows, block_r), _cdiv(n_cols, block_k))
    _launch(kernels.weight_window_kernel)[grid](out_ptr=out, row_start=row_start, col_start=col_start,
                                                n_rows=n_rows, n_cols=n_cols, C=C, D=D, BLOCK_R=block_r,
                                                BLOCK_K=block_k, **args)
    return out


def philox_words(seed: int, offsets: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The four Philox words (int64 tensors in [0, 2³²)) of int64 `offsets` as the kernels compute them."""
    flat = offsets.to(torch.int64).contiguous().view(-1)
    words = torch.empty((4, flat.numel()), dtype=torch.int64, device=flat.device)
    block = 64
    _launch(kernels.philox_words_kernel)[(_cdiv(flat.numel(), block),)](
        offsets_ptr=flat, words_ptr=words, N=flat.numel(), seed_lo=seed % 2**32, seed_hi=seed // 2**32, BLOCK=block)
    return tuple(w.view(offsets.shape) for w in words)


# ----------------------------------------------------------------------------------------------------
# Loss epilogue and cosine Gram
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpilogueConfig:
    """Blocks of the epilogue kernels. path: "feature" | "batch" | None (by cost, docs/backends.md)."""

    row_block_b: int  # rows_kernel: BLOCK_B × BLOCK_C row tiles
    row_block_c: int
    matmul_tile: int  # feature_grams_kernel and matmul_kernel: BLOCK_M = BLOCK_N
    matmul_block_k: int  # the reduction step of every dot
    batch_tile: int  # batch_alignment_kernel: BLOCK_B (S tiles are batch_tile × batch_tile)
    batch_block_k: int
    grad_block_c: int  # gradient columns per batch_alignment_kernel program
    gradient_block_b: int = 16  # gradient_kernel: rows per program (≥ 16: its dots' M; ≤ 1024 elements a tile)
    gradient_block_c: int = 16  # gradient_kernel: columns per step (≥ 16: its dots' N)
    num_warps: int = 4
    matmul_warps: int = 4
    path: Optional[str] = None


def epilogue_config(B: int, C: int, dtype: torch.dtype) -> EpilogueConfig:
    """Row tiles of ≤ 1024 elements at most 128 wide (256-wide ones spilled), gradient tiles of ≤ 1024; the
    dots are float32/float64 (FMA) with K = 16.
    Compiles for sm_90 without spills (bench/results/sm90-static.csv); to be tuned on a GPU."""
    if INTERPRETED:
        return EpilogueConfig(row_block_b=_next_pow2(B, low=1, high=32), row_block_c=_next_pow2(C, high=32),
                              matmul_tile=32, matmul_block_k=32, batch_tile=32, batch_block_k=32,
                              grad_block_c=_next_pow2(C, high=32), gradient_block_b=_next_pow2(B, high=32),
                              gradient_block_c=_next_pow2(C, high=32))
    row_block_c = _next_pow2(C, high=128)
    row_block_b = max(2, min(_next_pow2(B, low=2), 1024 // row_block_c))
    return EpilogueConfig(row_block_b=row_block_b, row_block_c=row_block_c, matmul_tile=64, matmul_block_k=16,
                          batch_tile=32, batch_block_k=16, grad_block_c=_next_pow2(C, high=64),
                          gradient_block_b=16, gradient_block_c=_next_pow2(C, high=64),
                          num_warps=4, matmul_warps=8)


def use_feature_space(B: int, C: int, C_prev: int) -> bool:
    """B·(C + C')² < B²·(C + C'): the Grams over features cost less than the B×B ones."""
    return C + C_prev < B


def _rows(x, config: EpilogueConfig, acc: torch.dtype, center: bool, *, target=None, grad_v=None, v_prev=None,
          normalize: bool = True, bhattacharyya_coef: Optional[float] = None):
    """Launch rows_kernel on v, or on the forward's partial sums x (splits, B, C), and on v_prev.

    Returns (v, ce_rows, xhat, norm, xhat_prev, distances), None where not computed. grad_v (B, C) receives the CE
    gradient (zeros without a target) when given. bhattacharyya_coef: the Bhattacharyya term instead of b̂ — v_prev
    is (B, C), distances (B,) float64 holds BD_b and grad_v gets coef · (softmax(v) − r) added."""
    bhattacharyya = bhattacharyya_coef is not None
    B, C = x.shape[-2:]
    device = x.device
    split = x.dim() == 3
    v = torch.empty((B, C), dtype=acc, device=device) if split else x
    placeholder = grad_v if grad_v is not None else torch.empty(0, dtype=acc, device=device)
    ce_rows = torch.empty(B, dtype=acc, device=device) if target is not None else None
    xhat = torch.empty((B, C), dtype=acc, device=device) if normalize else None
    norm = torch.empty(B, dtype=acc, device=device) if normalize else None
    C_prev = v_prev.shape[1] if v_prev is not None else 0
    normalize_prev = v_prev is not None and not bhattacharyya
    xhat_prev = torch.empty((B, C_prev), dtype=acc, device=device) if normalize_prev else None
    distances = torch.empty(B, dtype=torch.float64, device=device) if bhattacharyya else None
    _launch(epilogue_kernels.rows_kernel)[(_cdiv(B, config.row_block_b),)](
        x_ptr=x, v_ptr=v, prev_ptr=v_prev if v_prev is not None else x, target_ptr=target if target is not None else x,
        ce_ptr=_or(ce_rows, placeholder), grad_ptr=placeholder, xhat_ptr=_or(xhat, placeholder),
        norm_ptr=_or(norm, placeholder), xhat_prev_ptr=_or(xhat_prev, placeholder),
        distance_ptr=distances if bhattacharyya else placeholder,
        B=B, C=C, CP=C_prev, splits=x.shape[0] if split else 1, stride_xb=x.stride(-2),
        stride_pb=v_prev.stride(0) if v_prev is not None else 0, inv_batch_bits=float_bits(1.0 / B, acc),
        coef_bits=float_bits(bhattacharyya_coef if bhattacharyya else 0.0, torch.float64),
        SPLIT=split, HAS_TARGET=target is not None, HAS_GRAD=grad_v is not None, NORMALIZE=normalize,
        HAS_PREV=normalize_prev, CENTER=center, BHATTACHARYYA=bhattacharyya, PRECISE_MATH=PRECISE_MATH,
        BLOCK_B=config.row_block_b, BLOCK_C=config.row_block_c, num_warps=config.num_warps,
    )
    return v, ce_rows, xhat, norm, xhat_prev, distances


def _or(tensor: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    """A kernel's pointer argument: the tensor, or a placeholder of the same dtype the kernel never reads."""
    return tensor if tensor is not None else placeholder


def epilogue(x: torch.Tensor, target: Optional[torch.Tensor], v_prev: Optional[torch.Tensor],
             alignment_weight: float, mean: bool, center: bool, config: Optional[EpilogueConfig] = None, *,
             alignment: str = "cosine_gram"
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, alignment, g_v, v) from v (B, C), or from the forward's partial sums x (splits, B, C), whose
    reduction then happens in the first launch. Three launches at most (docs/backends.md):

        rows_kernel            v (from the partials), CE and its gradient into g_v, â, ‖v‖, b̂
        feature_grams_kernel   âᵀâ, b̂ᵀâ and the squared sums of the three Grams    (C + C' < B), or
        batch_alignment_kernel S(â) − S(b̂) tile by tile, its squared sums and Δ â      (otherwise)
        gradient_kernel        g_v += λ·∂FA/∂v through the row normalisation; loss, ce, alignment

    Without v_prev only the first and the scalars of the last run; with λ = 0 no gradient rows. alignment
    "bhattacharyya" (v_prev (B, C), center False): two launches, rows_kernel computing the rows' distances and
    adding their gradient to g_v, then gradient_kernel's scalars."""
    B, C = x.shape[-2:]
    acc = accumulation_dtype(x.dtype)
    device = x.device
    x = x.contiguous()
    config = config or epilogue_config(B, C, acc)
    if alignment not in ("cosine_gram", "bhattacharyya"):
        raise ValueError(f"alignment must be 'cosine_gram' or 'bhattacharyya', got {alignment!r}")
    bhattacharyya = alignment == "bhattacharyya" and v_prev is not None
    if bhattacharyya and (center or tuple(v_prev.shape) != (B, C)):
        raise ValueError("alignment='bhattacharyya' needs v_prev (B, C) like v and center=False, got "
                         f"v_prev {tuple(v_prev.shape)}, v {(B, C)}, center={center}")
    has_alignment = v_prev is not None and not bhattacharyya
    path = None
    if bhattacharyya:
        v_prev = v_prev.contiguous()
    if has_alignment:
        v_prev = v_prev.contiguous()
        C_prev = v_prev.shape[1]
        path = config.path or ("feature" if use_feature_space(B, C, C_prev) else "batch")
        if path not in ("feature", "batch"):
            raise ValueError(f"path must be 'feature', 'batch' or None, got {path!r}")
    grad_v = torch.empty((B, C), dtype=acc, device=device)
    target = target.contiguous() if target is not None else None
    bhattacharyya_coef = alignment_weight * 0.5 / (B if mean else 1) if bhattacharyya else None  # λ ∂BD/∂v / (s − r)
    v, ce_rows, xhat, norm, xhat_prev, distances = _rows(x, config, acc, center, target=target, grad_v=grad_v,
                                                          v_prev=v_prev, normalize=has_alignment,
                                                          bhattacharyya_coef=bhattacharyya_coef)

    compute_grad = has_alignment and alignment_weight != 0.0
    gram = cross = grad_xhat = None
    partials = distances  # the rows' Bhattacharyya distances, or the alignment's partial sums below
    if path == "feature":
        # The Grams and the gradient in float64 (exact products of float32 values): FA = ‖âᵀâ‖² − 2‖b̂ᵀâ‖² + ‖b̂ᵀb̂‖²
        # cancels when v and v_prev are aligned (FA ≪ ‖âᵀâ‖²), and float32 Grams would lose its leading digits there.
        tiles = _cdiv(max(C, C_prev), config.matmul_tile)
        gram = torch.empty((C, C), dtype=torch.float64, device=device)
        cross = torch.empty((C_prev, C), dtype=torch.float64, device=device)
        partials = torch.empty((3, tiles, tiles), dtype=torch.float64, device=device)
        _launch(epilogue_kernels.feature_grams_kernel)[(tiles, tiles, 3)](
            xhat_ptr=xhat, xhat_prev_ptr=xhat_prev, gram_ptr=gram, cross_ptr=cross, partial_ptr=partials, B=B, C=C,
            CP=C_prev, INPUT_PRECISION=input_precision(), BLOCK=config.matmul_tile, BLOCK_K=config.matmul_block_k,
            num_warps=config.matmul_warps,
        )
        grad_xhat = torch.empty((B, C), dtype=acc, device=device) if compute_grad else None
    elif path == "batch":
        batch_tiles = _cdiv(B, config.batch_tile)
        partials = torch.empty(batch_tiles, dtype=acc, device=device)
        grad_xhat = torch.empty((B, C), dtype=acc, device=device) if compute_grad else None
        chunks = _cdiv(C, config.grad_block_c) if compute_grad else 1
        _launch(epilogue_kernels.batch_alignment_kernel)[(batch_tiles, chunks)](
            a_ptr=xhat, b_ptr=xhat_prev, grad_ptr=_or(grad_xhat, partials), partial_ptr=partials, B=B, C=C, CP=C_prev,
            COMPUTE_GRAD=compute_grad, INPUT_PRECISION=input_precision(), WIDE_K=acc == torch.float32,
            BLOCK_B=config.batch_tile, BLOCK_K=config.batch_block_k, BLOCK_C=config.grad_block_c,
            num_warps=config.num_warps,
        )

    loss, ce, alignment_out = (torch.empty((), dtype=acc, device=device) for _ in range(3))
    row_tiles = _cdiv(B, config.gradient_block_b) if compute_grad else 0
    coef = alignment_weight * 4.0 / (B * B if mean else 1)  # g_v += λ · 4 (/B²) · ∂â/∂v (â(âᵀâ) − b̂(b̂ᵀâ))
    _launch(epilogue_kernels.gradient_kernel)[(row_tiles + 1,)](
        xhat_ptr=_or(xhat, grad_v), xhat_prev_ptr=_or(xhat_prev, grad_v), gram_ptr=_or(gram, grad_v),
        cross_ptr=_or(cross, grad_v), grad_xhat_ptr=_or(grad_xhat, grad_v), norm_ptr=_or(norm, grad_v),
        grad_v_ptr=grad_v, ce_ptr=_or(ce_rows, grad_v), partial_ptr=_or(partials, grad_v), loss_ptr=loss,
        ce_out_ptr=ce, alignment_ptr=alignment_out, B=B, C=C, CP=C_prev if has_alignment else 0,
        row_tiles=row_tiles, n_partials=partials.numel() if partials is not None else 0,
        coef_bits=float_bits(coef, acc), weight_bits=float_bits(alignment_weight, acc), FEATURE=path == "feature",
        HAS_TARGET=target is not None, HAS_ALIGNMENT=has_alignment, MEAN=mean, CENTER=center,
        ROW_DISTANCES=bhattacharyya, INPUT_PRECISION=input_precision(),
        BLOCK_B=config.gradient_block_b, BLOCK_C=config.gradient_block_c, BLOCK_K=config.matmul_block_k,
        BLOCK_R=256 if INTERPRETED else 1024, num_warps=config.num_warps,
    )
    return loss, ce, alignment_out, grad_v, v


def loss_epilogue(v: torch.Tensor, target: Optional[torch.Tensor], v_prev: Optional[torch.Tensor],
                  alignment_weight: float, mean: bool, center: bool, config: Optional[EpilogueConfig] = None, *,
                  alignment: str = "cosine_gram") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, alignment, g_v): CE(v, y) + λ·A and its gradient g_v = dloss/dv (B, C), one pass (epilogue)."""
    return epilogue(v, target, v_prev, alignment_weight, mean, center, config, alignment=alignment)[:4]


def cosine_gram(v: torch.Tensor, center: bool, config: Optional[EpilogueConfig] = None) -> torch.Tensor:
    """S (B, B) = â âᵀ in the accumulation dtype (inspection only)."""
    B, C = v.shape
    acc = accumulation_dtype(v.dtype)
    config = config or epilogue_config(B, C, acc)
    xhat = _rows(v.contiguous(), config, acc, center)[2]
    S = torch.empty((B, B), dtype=acc, device=v.device)
    grid = (_cdiv(B, config.matmul_tile), _cdiv(B, config.matmul_tile))
    _launch(epilogue_kernels.matmul_kernel)[grid](
        a_ptr=xhat, b_ptr=xhat, out_ptr=S, M=B, N=B, K=C, stride_am=C, stride_ak=1, stride_bk=1, stride_bn=C,
        stride_om=B, stride_on=1, INPUT_PRECISION=input_precision(), WIDE_K=acc == torch.float32,
        BLOCK_M=config.matmul_tile, BLOCK_N=config.matmul_tile, BLOCK_K=config.matmul_block_k,
        num_warps=config.matmul_warps,
    )
    return S


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
                     alignment_weight: float, mean: bool, center: bool, alignment: str = "cosine_gram"
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return loss_epilogue(v, target, v_prev, alignment_weight, mean, center, alignment=alignment)


@_define(f"{NAMESPACE}::{PREFIX}cosine_gram", mutates_args=())
def cosine_gram_op(v: torch.Tensor, center: bool) -> torch.Tensor:
    return cosine_gram(v, center)


_ops.register_fakes(f"{NAMESPACE}::{PREFIX}")
_ops.register_projection_autograd(f"{NAMESPACE}::{PREFIX}projection_forward",
                                  torch.ops.svp_kernels.triton_projection_backward)
_ops.register_epilogue_autograd(f"{NAMESPACE}::{PREFIX}loss_epilogue")
