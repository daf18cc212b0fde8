"""Argument checks shared by every public op (api.py, predsim.py) and the trainer's lean path.

Every check names the argument and what was expected (docs/design.md §4), raises ValueError/TypeError, and
returns the argument in the form the backends take (a (B, D) view, a 0-dim seed tensor, int64 targets...).
Under torch.compile the checks that would read a tensor's values on the host are skipped or recorded as
guards (``check_in_range``), so they never break a graph.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch

from ._ops import index_bounds
from .projection import MAX_SEED, ImplicitProjection, draw_seed

# Set to 1 to check target's range on the host for device tensors too (one synchronisation per call).
CHECK_TARGETS_ENV = "SVP_KERNELS_CHECK_TARGETS"


def is_compiling() -> bool:
    return torch.compiler.is_compiling()


def check_features(h, name: str = "h") -> torch.Tensor:
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


def check_same_place(tensor: torch.Tensor, name: str, h: torch.Tensor, check_dtype: bool = True) -> None:
    if tensor.device != h.device:
        raise ValueError(f"{name} is on {tensor.device} but h is on {h.device}; move both to one device")
    if check_dtype and tensor.dtype != h.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but h has dtype {h.dtype}; use one dtype")


def check_v_prev(v_prev, h: torch.Tensor, name: str = "v_prev") -> Optional[torch.Tensor]:
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
    check_same_place(v_prev, name, h)
    return v_prev.detach().contiguous()


# ----------------------------------------------------------------------------------------------------
# Targets: one rule for the range, one message, on every path (the ops and the trainer)
# ----------------------------------------------------------------------------------------------------

def checks_target_range(target: torch.Tensor) -> bool:
    """Whether the host checks target's range: in eager mode for CPU tensors, and for device tensors only when
    SVP_KERNELS_CHECK_TARGETS=1 (reading a device tensor synchronises). Unchecked, an out-of-range row gives a
    NaN loss and gradient in fused_local_loss on every backend (docs/design.md §4)."""
    if is_compiling():
        return False
    return target.device.type == "cpu" or os.environ.get(CHECK_TARGETS_ENV) == "1"


def check_target_range(target: torch.Tensor, num_classes: int) -> None:
    """ValueError unless every value of the integer tensor `target` lies in [0, num_classes), where
    checks_target_range says the host checks it."""
    if target.numel() == 0 or not checks_target_range(target):
        return
    low, high = index_bounds(target)
    if low < 0 or high >= num_classes:
        raise ValueError(f"target values must be in [0, {num_classes}) (C = {num_classes} classes), "
                         f"got values in [{low}, {high}]")


def check_class_indices(target, batch: int) -> None:
    """target is a 1-D tensor of integer class indices (not its length, device or range); batch: the B the
    message names."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, shape (B,), got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices (int64), got dtype {target.dtype}")
    if target.dim() != 1:
        raise ValueError(f"target must have shape (B,) = ({batch},), got shape {tuple(target.shape)}")


def check_target(target, h: torch.Tensor, num_classes: int) -> torch.Tensor:
    """target (B,) as a contiguous int64 tensor on h's device with values in [0, num_classes) (range checked
    per check_target_range)."""
    check_class_indices(target, h.shape[0])
    if target.shape[0] != h.shape[0]:
        raise ValueError(f"target must have shape (B,) = ({h.shape[0]},), got shape {tuple(target.shape)}")
    check_same_place(target, "target", h, check_dtype=False)
    check_target_range(target, num_classes)
    if target.dtype != torch.int64:
        target = target.to(torch.int64)
    return target if target.is_contiguous() else target.contiguous()


# ----------------------------------------------------------------------------------------------------
# Scalars
# ----------------------------------------------------------------------------------------------------

def check_in_range(ok, requirement: str, value) -> None:
    """ValueError "{requirement}, got {value}" unless `ok`. Under torch.compile `ok` and `value` may be
    symbolic (dynamic=True turns float arguments and attributes into SymFloats): torch._check records `ok`
    as a guard or a runtime assertion, with a message that formats no symbol (a failed trace falls back to
    eager, which raises the ValueError); math.* on a symbol would not trace."""
    if ok is True:  # a plain bool that holds: nothing to record, eager or compiled
        return
    if is_compiling():
        torch._check(ok, lambda requirement=requirement: requirement)  # no closure: torch 2.11 refuses one
    elif not ok:
        raise ValueError(f"{requirement}, got {value}")


def check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p must be a float in [0, 1), got {type(p).__name__}")
    check_in_range(0.0 <= p < 1.0, "p must be in [0, 1)", p)  # also rejects NaN
    return float(p)


def check_seed(seed, p: float, device: torch.device) -> torch.Tensor:
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
        if seed.device.type == "cpu" and not is_compiling():
            value = int(seed)
            if not 0 <= value < MAX_SEED:
                raise ValueError(f"seed must be in [0, 2**63), got {value}")
        return seed if seed.device == device else seed.to(device)
    if seed is None:
        if is_compiling():  # a draw inside the graph (a host .item() would break it); compiled RNG, not eager's
            return torch.randint(0, MAX_SEED - 1, (), dtype=torch.int64, device=device)
        if p > 0 and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError("seed=None inside CUDA-graph capture would bake one draw into the graph, the same mask "
                             "at every replay; pass seed= a 0-dim int64 tensor on the device (e.g. from "
                             "svp_kernels.projection.stream_seed) or use the svp_kernels.nn modules")
        seed = draw_seed() if p > 0 else 0  # p = 0: no mask to draw
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int in [0, 2**63), a 0-dim int64 tensor or None, got {type(seed).__name__}")
    else:
        check_in_range(0 <= seed < MAX_SEED, "seed must be in [0, 2**63)", seed)
    return torch.full((), seed, dtype=torch.int64, device=device)


def check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    """value, one of the strings `choices`: a keyword argument such as reduction= or reduce= (every op's
    string keywords are checked here, with one wording)."""
    if value not in choices:
        listed = " or ".join([", ".join(repr(choice) for choice in choices[:-1]), repr(choices[-1])])
        raise ValueError(f"{name} must be {listed}, got {value!r}")
    return value


def check_reduction(reduction) -> bool:
    """True for "mean", False for "sum"."""
    return check_choice(reduction, "reduction", ("mean", "sum")) == "mean"


# The alignment terms of fused_local_loss (docs/design.md §2): the cosine-Gram term of SVP (the default) and the
# Bhattacharyya distance between the rows' softmax distributions.
ALIGNMENTS = ("cosine_gram", "bhattacharyya")


def check_alignment(alignment, v_prev: Optional[torch.Tensor], num_classes: int, center: bool) -> str:
    """alignment, one of ALIGNMENTS, and what "bhattacharyya" asks of the other arguments: v_prev (when given)
    with C' = C = num_classes columns, and center=False (softmax does not change when a row's mean is subtracted,
    so centring would be a silent no-op)."""
    alignment = check_choice(alignment, "alignment", ALIGNMENTS)
    if alignment == "bhattacharyya":
        if center:
            raise ValueError("center=True has no meaning with alignment='bhattacharyya': the softmax of a row does "
                             "not change when its mean is subtracted; pass center=False")
        if v_prev is not None and v_prev.shape[1] != num_classes:
            raise ValueError(f"v_prev has C' = {v_prev.shape[1]} columns but v has C = {num_classes}; "
                             "alignment='bhattacharyya' compares the softmax distributions of v_prev and v over the "
                             "same C classes, so v_prev must be (B, C)")
    return alignment


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_alignment_weight(alignment_weight) -> float:
    if isinstance(alignment_weight, bool) or not isinstance(alignment_weight, (int, float)):
        raise TypeError(f"alignment_weight must be a float, got {type(alignment_weight).__name__}")
    # 0 <= λ < inf rejects NaN as well
    check_in_range(0.0 <= alignment_weight < math.inf, "alignment_weight must be finite and ≥ 0", alignment_weight)
    return float(alignment_weight)


# ----------------------------------------------------------------------------------------------------
# The projection R of the local loss
# ----------------------------------------------------------------------------------------------------

class ProjectionArgs(NamedTuple):
    """A validated projection, as the backends take it: weight (C, D) contiguous, or None for the implicit R of
    (proj_seed, proj_std) or for the identity (`identity`: v = h, out_features = D)."""

    identity: bool
    weight: Optional[torch.Tensor]
    out_features: int
    proj_seed: int
    proj_std: float


def check_projection(projection, h: torch.Tensor, p: float) -> ProjectionArgs:
    in_features = h.shape[1]
    if projection is None:
        if p > 0:
            raise ValueError(f"p = {p} needs a projection: dropout applies to R's elements, and "
                             "projection=None is the identity (pass a (C, D) tensor or ImplicitProjection)")
        return ProjectionArgs(True, None, in_features, 0, 0.0)
    if isinstance(projection, ImplicitProjection):
        return ProjectionArgs(False, None, projection.out_features, projection.seed, projection.std_for(in_features))
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
    check_same_place(projection, "projection", h)
    return ProjectionArgs(False, projection.contiguous(), projection.shape[0], 0, 0.0)


PROJECTION_PATHS = ("auto", "fused", "gemm")


def check_projection_path(projection_path) -> str:
    """One of PROJECTION_PATHS: "auto", "fused" (the fused kernels) or "gemm" (R̃ written out, then the device's
    GEMM; docs/backends.md "projection paths"); backends.gemm_projection decides which one a call runs."""
    if projection_path not in PROJECTION_PATHS:
        raise ValueError(f"projection_path must be one of {PROJECTION_PATHS}, got {projection_path!r}")
    return projection_path
