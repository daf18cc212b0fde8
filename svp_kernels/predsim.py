"""Similarity-matching losses of local-learning code (predsim, sim) as single fused calls.

    out = sk.predsim_loss(h_dec, h_sim, target, decoder.weight, decoder.bias, beta=0.99)
    out.loss.backward()     # gradients for h_dec, h_sim, decoder.weight and decoder.bias

The math (docs/migration.md has each eager line and its replacement):

    S(x)_ij = clamp(û_i · û_j, −1, 1),  û_i = u_i / (1e-8 + ‖u_i‖),  u_i = x_i − mean(x_i)
    predsim = (1 − β)·CE(h_dec W̃ᵀ + b, y) + β·mean_ij (S(h_sim) − S(onehot(y)))²,  W̃ = W ⊙ M / (1 − p)

A 4-D input (B, Ch, H, W) is reduced first: reduce="std" (the default, as local-loss's default) takes each
channel's standard deviation over H·W (unbiased), reduce="flatten" uses all Ch·H·W values. Inputs of other
ranks above 2 need reduce="flatten": nothing is flattened silently.

The fused path (svp_kernels/similarity/fused.py) computes the value and, only when a gradient is
wanted, the input gradients in the same pass; the one-hot, S(onehot) and W̃ are never built.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import backends
from ._ops import accumulation_dtype
from .similarity import fused as similarity_fused
from .similarity import reference as similarity_reference
from .validation import (check_bool, check_choice, check_class_indices, check_features, check_p, check_reduction,
                         check_seed, check_target_range)

REDUCE_CHOICES = ("std", "flatten")


class PredSim(NamedTuple):
    """What predsim_loss returns.

    loss: scalar (1 − β)·ce + β·sim, differentiable w.r.t. h_dec, h_sim, decoder_weight and decoder_bias.
    ce: detached cross-entropy of the decoder head; sim: detached mean squared similarity difference.
    logits: (B, C) detached decoder outputs h_dec W̃ᵀ + b (for accuracy statistics).
    """

    loss: torch.Tensor
    ce: torch.Tensor
    sim: torch.Tensor
    logits: torch.Tensor


# ----------------------------------------------------------------------------------------------------
# Validation: every check names the argument and what was expected.
# ----------------------------------------------------------------------------------------------------

def _check_rows(x, name: str, reduce: str) -> torch.Tensor:
    """A float tensor (B, K) or (B, Ch, H, W) whose reduction is well defined."""
    if not (isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x.dim() >= 2 and x.numel() > 0):
        check_features(x, name)  # raises: a float tensor of rank ≥ 2 with rows and features is expected
    if x.dim() > 2 and reduce == "std":
        if x.dim() != 4:
            raise ValueError(f"reduce='std' reduces a 4-D {name} (B, Ch, H, W) over H·W, but {name} has shape "
                             f"{tuple(x.shape)}; pass reduce='flatten' to use all its values as one row")
        if x.shape[2] * x.shape[3] < 2:
            raise ValueError(f"reduce='std' needs H·W ≥ 2 values per channel of {name}, got shape "
                             f"{tuple(x.shape)}; pass reduce='flatten'")
    return x


def _check_reduce(reduce) -> str:
    return check_choice(reduce, "reduce", REDUCE_CHOICES)


def _check_batch(x: torch.Tensor, name: str, reference: torch.Tensor, reference_name: str) -> None:
    if x.shape[0] != reference.shape[0]:
        raise ValueError(f"{name} has {x.shape[0]} rows but {reference_name} has B = {reference.shape[0]}")
    if x.device != reference.device:
        raise ValueError(f"{name} is on {x.device} but {reference_name} is on {reference.device}; "
                         "move both to one device")


def _check_labels(target, reference: torch.Tensor, reference_name: str, num_classes: int) -> torch.Tensor:
    check_class_indices(target, reference.shape[0])
    _check_batch(target, "target", reference, reference_name)
    check_target_range(target, num_classes)
    return target.to(torch.int64).contiguous()


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float in [0, 1], got {type(beta).__name__}")
    if not 0.0 <= beta <= 1.0:  # also rejects NaN
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return float(beta)


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int ≥ 1 when target holds class indices, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
    return num_classes


def _uses_reference(backend, device: torch.device, allow_triton: bool = False):
    """True for the plain formulation, False for the fused one, or the Triton backend module (alignment_loss
    only: its epilogue kernel); ValueError for a backend that cannot run here. The name and its environment
    override are resolved by svp_kernels.backends, as for every op."""
    name, source = backends.requested(backend)
    if source != "backend" and name not in ("reference", "triton") or name == "auto":
        return False  # "auto": the fused path, which runs wherever torch does
    if name == "reference":
        return True
    if name in ("cpu", "cuda"):
        if device.type != name:
            raise ValueError(f"{source} {name!r} runs on {name} tensors, but the inputs are on {device}")
        return False
    if name == "triton" and allow_triton:
        return backends.resolve("triton", device, torch.float32)
    if source != "backend":
        return False  # SVP_KERNELS_BACKEND=triton: the similarity losses take their fused path
    raise ValueError(f"{source} must be 'auto', 'reference', 'cpu' or 'cuda' for the similarity losses "
                     f"(the fused path is built on the device's GEMM; there is no Triton kernel), got {name!r}")


def _needs_grad(x) -> bool:
    return x is not None and x.requires_grad and torch.is_grad_enabled()


# ----------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------

def predsim_loss(h_dec, h_sim, target, decoder_weight, decoder_bias=None, *, beta: float = 0.99, p: float = 0.0,
                 seed=None, reduce: str = "std", backend: str = "auto") -> PredSim:
    """local-loss's predsim block loss in one call, with a learnable decoder head.

    loss = (1 − β)·CE(h_dec W̃ᵀ + b, y) + β·mean_ij (S(h_sim)_ij − S(onehot(y))_ij)², S as in the module
    docstring, W̃ = W ⊙ M / (1 − p) with the dropout mask M of docs/design.md §3 (p = 0: W̃ = W).

    Args:
        h_dec: (B, D) decoder input (a (B, *) tensor is flattened: it is the decoder's nn.Linear input).
        h_sim: (B, K) or (B, Ch, H, W) features of the similarity term (4-D reduced per `reduce`).
        target: (B,) int64 class indices in [0, C).
        decoder_weight: (C, D), may require grad; decoder_bias: (C,) or None, may require grad.
        beta: weight of the similarity term, in [0, 1]. p: dropout on decoder_weight's elements, in [0, 1).
        seed: int in [0, 2**63) or a 0-dim int64 tensor for the mask; None draws one from torch's default generator.
        reduce: "std" | "flatten" for a 4-D h_sim. backend: "auto" | "reference" | "cpu" | "cuda".

    Returns:
        PredSim(loss, ce, sim, logits). Float32 throughout (float64 for float64 inputs); bf16/fp16 inputs are
        computed in float32 and their gradients returned in their own dtype. Under no_grad (or when nothing
        requires grad) no gradient is computed.
    """
    reduce = _check_reduce(reduce)
    h_sim = _check_rows(h_sim, "h_sim", reduce)
    h_dec = _check_rows(h_dec, "h_dec", "flatten")
    _check_batch(h_dec, "h_dec", h_sim, "h_sim")
    if not isinstance(decoder_weight, torch.Tensor) or not decoder_weight.dtype.is_floating_point:
        got = decoder_weight.dtype if isinstance(decoder_weight, torch.Tensor) else type(decoder_weight).__name__
        raise TypeError(f"decoder_weight must be a floating-point torch.Tensor of shape (C, D), got {got}")
    in_features = math.prod(h_dec.shape[1:])
    if decoder_weight.dim() != 2 or decoder_weight.shape[0] == 0 or decoder_weight.shape[1] != in_features:
        raise ValueError(f"decoder_weight must have shape (C, D) = (C, {in_features}) with C ≥ 1 (D = h_dec's "
                         f"features), got shape {tuple(decoder_weight.shape)}")
    if decoder_weight.device != h_dec.device:
        raise ValueError(f"decoder_weight is on {decoder_weight.device} but h_dec is on {h_dec.device}")
    classes = decoder_weight.shape[0]
    if decoder_bias is not None:
        if not isinstance(decoder_bias, torch.Tensor) or not decoder_bias.dtype.is_floating_point:
            raise TypeError(f"decoder_bias must be a floating-point torch.Tensor of shape (C,) or None, got "
                            f"{type(decoder_bias).__name__}")
        if tuple(decoder_bias.shape) != (classes,):
            raise ValueError(f"decoder_bias must have shape (C,) = ({classes},), got shape {tuple(decoder_bias.shape)}")
        if decoder_bias.device != h_dec.device:
            raise ValueError(f"decoder_bias is on {decoder_bias.device} but h_dec is on {h_dec.device}")
    labels = _check_labels(target, h_sim, "h_sim", classes)
    beta = _check_beta(beta)
    p = check_p(p)
    seed = check_seed(seed, p, h_dec.device) if p > 0 or seed is not None else None  # p = 0: no mask, no seed
    h_dec = h_dec if h_dec.dim() == 2 else h_dec.reshape(h_dec.shape[0], -1)

    if _uses_reference(backend, h_dec.device):
        def upcast(x):
            return None if x is None else x.to(accumulation_dtype(x.dtype))
        return PredSim(*similarity_reference.predsim_loss(upcast(h_dec), upcast(decoder_weight), upcast(decoder_bias),
                                                       upcast(h_sim), labels, beta, p, seed, reduce))
    needs = (_needs_grad(h_dec), _needs_grad(decoder_weight), _needs_grad(decoder_bias), _needs_grad(h_sim))
    if not any(needs):  # the value only, without autograd's bookkeeping
        return PredSim(*similarity_fused.predsim_forward(h_dec, decoder_weight, decoder_bias, h_sim, labels, beta, p,
                                                      seed, reduce, needs)[:4])
    return PredSim(*similarity_fused.PredSimLoss.apply(h_dec.contiguous(), decoder_weight.contiguous(), decoder_bias,
                                                    h_sim.contiguous(), labels, beta, p, seed, reduce, needs))


def similarity_loss(h, target, *, num_classes=None, reduce: str = "std", target_reduce=None,
                    backend: str = "auto") -> torch.Tensor:
    """local-loss's similarity-matching loss mean_ij (S(h)_ij − S(target)_ij)², differentiable w.r.t. h.

    h: (B, K) or (B, Ch, H, W). target: (B,) integer class indices (then num_classes = C is required and
    S(onehot) is used without building the one-hot), or a float (B, K′) / (B, Ch′, H′, W′) tensor, a constant
    (e.g. the block input for the unsupervised term). reduce applies to a 4-D h, target_reduce (default:
    reduce) to a 4-D float target. backend: "auto" | "reference" | "cpu" | "cuda".
    """
    reduce = _check_reduce(reduce)
    target_reduce = reduce if target_reduce is None else _check_reduce(target_reduce)
    h = _check_rows(h, "h", reduce)
    labels = target_rows = None
    classes = 0
    if isinstance(target, torch.Tensor) and target.dtype.is_floating_point:
        target_rows = _check_rows(target, "target", target_reduce)
        _check_batch(target_rows, "target", h, "h")
        target_rows = similarity_reference.reduced_rows(target_rows.detach(), target_reduce)
    else:
        classes = _check_num_classes(num_classes)
        labels = _check_labels(target, h, "h", classes)
    return _similarity(h, target_rows, labels, classes, reduce, center=True, additive=True, mean=True,
                       reference=_uses_reference(backend, h.device))


def alignment_loss(v, v_prev, reduction: str, center: bool, backend: str, reduce: str) -> torch.Tensor:
    """‖S(v) − S(v_prev)‖²_F (/ B² for "mean") with the SVP normalisation û = u / max(‖u‖, 1e-12)
    (docs/design.md §2), S clamped to [−1, 1]; the body of sk.alignment_loss. v_prev is cast to v's dtype."""
    reduce = _check_reduce(reduce)
    v = _check_rows(v, "v", reduce)
    if v_prev is None:
        raise TypeError("v_prev must be a torch.Tensor of shape (B, C'), got None")
    v_prev = _check_rows(v_prev, "v_prev", reduce)
    _check_batch(v_prev, "v_prev", v, "v")
    mean = check_reduction(reduction)
    center = check_bool(center, "center")
    path = _uses_reference(backend, v.device, allow_triton=True)
    target_rows = similarity_reference.reduced_rows(v_prev.detach(), reduce)
    if not isinstance(path, bool):
        from .backends.triton.ops import use_feature_space

        dtype = accumulation_dtype(v.dtype)
        rows = similarity_reference.reduced_rows(v, reduce).to(dtype).contiguous()
        if use_feature_space(rows.shape[0], rows.shape[1], target_rows.shape[1]):
            # The Triton epilogue's feature-space Grams: no S entry exists, |S| ≤ 1 holds exactly there.
            return path.epilogue(rows, None, target_rows.to(dtype).contiguous(), 1.0, mean, center)[0]
        # Its batch-space tiles of S are not clamped to [−1, 1]; the fused path on the device clamps them.
        path = False
    return _similarity(v, target_rows, None, 0, reduce, center=center, additive=False, mean=mean, reference=path)


def _similarity(h, target_rows, labels, classes, reduce, *, center, additive, mean, reference) -> torch.Tensor:
    """The similarity term on the plain formulation (reference=True) or the fused path."""
    if reference:
        dtype = accumulation_dtype(h.dtype)
        rows = None if target_rows is None else target_rows.to(dtype)
        return similarity_reference.similarity_loss(h.to(dtype), rows, labels, classes, reduce, center, additive, mean)
    scale = 1.0 / h.shape[0] ** 2 if mean else 1.0
    if not _needs_grad(h):  # the value only, without autograd's bookkeeping
        return similarity_fused.similarity_forward(h, target_rows, labels, classes, reduce, center, additive, scale,
                                                False)[0]
    return similarity_fused.SimilarityLoss.apply(h.contiguous(), target_rows, labels, classes, reduce, center, additive,
                                              scale, True)
