"""Fused similarity-matching and predsim losses built on the device's GEMM (docs/migration.md).

One pass computes the loss AND, when a gradient is wanted, the input gradients, so autograd keeps only
those gradients (the pattern of docs/design.md §2); under no_grad nothing but the value is computed.

Similarity of the rows of x (B, K), with u = x − rowmean(x) when centring:

    G = u uᵀ (one GEMM),  n_i = sqrt(G_ii),  r_i = 1 / (n_i + 1e-8)  ("add", local-loss)
                                             r_i = 1 / max(n_i, 1e-12) ("max", SVP)
    S_ij = clamp(r_i G_ij r_j, −1, 1)

n_i comes from torch's cascaded row reduction (as accurate as the eager formula's), or on the CPU from
the svp_kernels::similarity_loss kernel (csrc/cpu/predsim.cpp), which accumulates row means and norms in
double; â = r ⊙ u never exists. Loss = scale · Σ_ij (S_ij − T_ij)², T the target similarity (of target
rows, or from labels). On the CPU (float32/float64, B² ≤ BLOCK_ELEMENTS) that kernel computes the loss and
gradient below in one call (two GEMMs and row loops) and svp_kernels::softmax_cross_entropy the decoder's
CE: at B = 128 and small K a chain of ~20 tensor ops of a few µs each would cost more than the GEMM.

Gradient convention: the clamp is applied to the value and is transparent to the gradient
(straight-through). |r_i G_ij r_j| ≤ 1 holds in exact arithmetic, so the clamp only removes rounding
excess; torch's clamp would zero the gradient of exactly those entries. With E = 4·scale·(S − T):

    dL/du = F u,  F_ij = r_i E_ij r_j − δ_ij κ_i,  κ_i = r_i s_i Σ_j r_i E_ij r_j G_ij  (= (û_i·g_i) r_i s_i),
    s_i = 1/n_i where the norm has a gradient (n_i > 0 for "add", n_i > 1e-12 for "max"), else 0,

then the row mean is removed when centring. A zero row gets dL/du = r ⊙ (E r u) (finite), where
autograd of the eager formula returns NaN.

Feature-space path (4·(K + K′) < B): ‖âᵀâ‖² − 2 Σ S∘T + ‖T‖² with the Grams accumulated in float64, so the
cancellation costs nothing at float32; S never exists elementwise there, so no clamp is applied
(|S| ≤ 1 exactly). Batch-space rows are processed in blocks: at most BLOCK_ELEMENTS of S exist at once.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import _ops
from .._ops import accumulation_dtype
from ..philox import keep_mask

ADD_EPS = 1e-8    # local-loss: u / (1e-8 + ‖u‖)
MAX_EPS = 1e-12   # SVP (docs/design.md §2): u / max(‖u‖, 1e-12)
BLOCK_ELEMENTS = 1 << 22  # batch-space S is built in row blocks of at most this many entries
# The feature-space path (float64 K × K Grams) is taken when B > FEATURE_SPACE_RATIO · (K + K′): its
# B·(K + K′)² flops then undercut the batch-space B²·(K + K′) by that factor, which pays for float64.
FEATURE_SPACE_RATIO = 4


class Target(NamedTuple):
    """The target similarity T: of the rows of `features` (B, K′), or from `labels` (B,) int64 in
    [0, classes) with T_ij = `same` when y_i = y_j and `other` otherwise."""

    features: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    classes: int
    same: float
    other: float


def feature_target(features: torch.Tensor) -> Target:
    return Target(features, None, 0, 0.0, 0.0)


def label_target(labels: torch.Tensor, num_classes: int, additive: bool) -> Target:
    """T of the centred one-hot rows of `labels` (C classes), in closed form (float64 scalars).

    Centred one-hot rows have ‖u‖² = (C−1)/C and u_i·u_j = −1/C for different classes, so
    T_same = ‖u‖² r², T_other = −r²/C, clamped to [−1, 1]; the one-hot and T are never built.
    """
    norm = ((num_classes - 1) / num_classes) ** 0.5
    scale = 1.0 / (norm + ADD_EPS) if additive else 1.0 / max(norm, MAX_EPS)
    same = min(1.0, max(-1.0, norm * norm * scale * scale))
    other = min(1.0, max(-1.0, -scale * scale / num_classes))
    return Target(None, labels, num_classes, same, other)


def _row_scale(norms: torch.Tensor, additive: bool) -> torch.Tensor:
    return torch.reciprocal(norms + ADD_EPS if additive else norms.clamp_min(MAX_EPS))


def _norm_slope(norms: torch.Tensor, additive: bool) -> torch.Tensor:
    """1/n where the normalisation's norm carries a gradient, else 0."""
    active = norms > 0 if additive else norms > MAX_EPS
    return torch.where(active, torch.reciprocal(norms), 0.0)


def row_norms(u: torch.Tensor) -> torch.Tensor:
    """‖u_i‖ from torch's cascaded (blocked pairwise) sum of squares, never a GEMM diagonal or
    vector_norm: those sum each row in long FMA chains, whose error (~√(chain)·ε) would enter every
    gradient through r."""
    return u.square().sum(dim=1).sqrt()


def _centre(x: torch.Tensor, center: bool) -> torch.Tensor:
    return x - x.mean(dim=1, keepdim=True) if center else x


def _scaled_gram(u: torch.Tensor, rows: slice, r: torch.Tensor):
    """(G rows (block × B), r_i G_ij r_j clamped to [−1, 1])."""
    whole = rows.start == 0 and rows.stop == u.shape[0]
    gram = (u if whole else u[rows]) @ u.t()
    return gram, gram.mul(torch.outer(r if whole else r[rows], r)).clamp_(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# Similarity loss of 2-D rows
# ----------------------------------------------------------------------------------------------------

def _batch_space(u, target: Target, additive, grad_scale, need_grad):
    """(Σ (S − T)², dL/du of grad_scale·Σ or None), S and T in row blocks of at most BLOCK_ELEMENTS."""
    batch = u.shape[0]
    block = max(1, min(batch, BLOCK_ELEMENTS // batch))
    norms = row_norms(u)
    r = _row_scale(norms, additive)
    if target.features is not None:
        target_r = _row_scale(row_norms(target.features), additive)
    else:  # T_ij = class_similarity[y_i, y_j]: two small gathers instead of a B×B comparison and select
        class_similarity = torch.full((target.classes, target.classes), target.other, dtype=u.dtype, device=u.device)
        class_similarity.fill_diagonal_(target.same)
    slope = _norm_slope(norms, additive) if need_grad else None
    total = 0
    grad = torch.empty_like(u) if need_grad else None
    for start in range(0, batch, block):
        rows = slice(start, min(batch, start + block))
        gram, similarity = _scaled_gram(u, rows, r)
        if target.labels is not None:
            rows_similarity = class_similarity.index_select(0, target.labels[rows])
            difference = similarity.sub_(rows_similarity.index_select(1, target.labels))
        else:
            difference = similarity.sub_(_scaled_gram(target.features, rows, target_r)[1])
        block_total = difference.square().sum(dtype=torch.float64)
        total = block_total if start == 0 else total + block_total
        if need_grad:
            mixing = difference.mul_(torch.outer(r[rows], r).mul_(4.0 * grad_scale))   # r_i E_ij r_j
            kappa = (mixing * gram).sum(dim=1) * slope[rows] * r[rows]       # (â_i·g_i) r_i / n_i
            mixing.diagonal(offset=start).sub_(kappa)
            torch.mm(mixing, u, out=grad[rows])
    return total, grad


def _feature_space(u, target: Target, additive, grad_scale, need_grad):
    """The same from K × K Grams in float64 (no B×B, no clamp)."""
    wide = torch.float64
    norms = torch.linalg.vector_norm(u, dim=1, dtype=wide)
    r = _row_scale(norms, additive)
    a = u.to(wide) * r[:, None]
    gram_aa = a.t() @ a
    total = gram_aa.square().sum()
    if target.labels is not None:
        class_sums = a.new_zeros((target.classes, a.shape[1])).index_add_(0, target.labels, a)
        column_sum = a.sum(dim=0)
        same_pairs = torch.bincount(target.labels, minlength=target.classes).to(wide).square().sum()
        delta = target.same - target.other
        cross = target.other * column_sum.square().sum() + delta * class_sums.square().sum()
        total = (total - 2 * cross + target.same ** 2 * same_pairs
                 + target.other ** 2 * (u.shape[0] ** 2 - same_pairs))
        target_times_a = (target.other * column_sum)[None, :] + delta * class_sums[target.labels]
    else:
        target_norms = torch.linalg.vector_norm(target.features, dim=1, dtype=wide)
        b = target.features.to(wide) * _row_scale(target_norms, additive)[:, None]
        gram_ba = b.t() @ a
        total = total - 2 * gram_ba.square().sum() + (b.t() @ b).square().sum()
        target_times_a = b @ gram_ba                                   # T â = b̂ (b̂ᵀ â)
    grad = None
    if need_grad:
        grad_a = (a @ gram_aa - target_times_a) * (4.0 * grad_scale)
        along = (a * grad_a).sum(dim=1) * _norm_slope(norms, additive)
        grad = (r[:, None] * grad_a - along[:, None] * a).to(u.dtype)
    return total, grad


def similarity_loss_and_grad(x: torch.Tensor, target: Target, *, center: bool, additive: bool,
                             value_scale: float, grad_scale: float, need_grad: bool):
    """(value_scale · Σ_ij (S(x)_ij − T_ij)² as a 0-dim tensor of x's dtype, Σ accumulated in float64;
    d(grad_scale · Σ)/dx or None).

    x (B, K) contiguous in the accumulation dtype; target features (B, K′) in the same dtype.
    """
    target_width = target.features.shape[1] if target.features is not None else target.classes
    feature_space = FEATURE_SPACE_RATIO * (x.shape[1] + target_width) < x.shape[0]
    if not feature_space and x.shape[0] ** 2 <= BLOCK_ELEMENTS and _cpu_kernels(x):
        value, grad = torch.ops.svp_kernels.similarity_loss(x, target.features, target.labels, target.same,
                                                            target.other, center, additive, value_scale, grad_scale,
                                                            need_grad)
        return value, grad if need_grad else None
    u = _centre(x, center)
    if target.features is not None:
        target = target._replace(features=_centre(target.features, center))
    total, grad = (_feature_space if feature_space else _batch_space)(u, target, additive, grad_scale, need_grad)
    if grad is not None and center:
        grad = grad - grad.mean(dim=1, keepdim=True)
    return (total * value_scale).to(x.dtype), grad


# ----------------------------------------------------------------------------------------------------
# 4-D rows: the per-channel standard deviation over H·W, or a flatten
# ----------------------------------------------------------------------------------------------------

def reduce_rows(x: torch.Tensor, reduce: str, dtype: torch.dtype):
    """(rows (B, K) contiguous in dtype, state for reduce_rows_backward). 4-D x (B, Ch, H, W) with
    reduce="std" gives K = Ch, rows = std over H·W (unbiased, as torch.std); anything else is flattened."""
    if x.dim() == 4 and reduce == "std":
        spatial = x.reshape(x.shape[0], x.shape[1], -1)
        spatial = spatial if spatial.dtype == dtype else spatial.to(dtype)
        if _cpu_kernels(spatial):  # one read of x, sums in double (csrc/cpu/predsim.cpp)
            mean, std = torch.ops.svp_kernels.channel_std(spatial)
        else:
            # Two passes over contiguous rows (mean, then the cascaded sum of squared deviations): 1.5× faster
            # than torch.std_mean's Welford loop at (128, 128, 256) and as exact to a rounding or two.
            mean = spatial.mean(dim=2)
            std = (spatial - mean[:, :, None]).square_().sum(dim=2).div_(spatial.shape[2] - 1).sqrt_()
        return std, (spatial, mean, std)
    rows = x.reshape(x.shape[0], -1)
    return (rows if rows.dtype == dtype else rows.to(dtype)).contiguous(), None


def reduce_rows_backward(grad_rows: torch.Tensor, state, shape) -> torch.Tensor:
    """dL/dx from dL/drows: (x − μ) / ((L − 1) σ) per channel for the std (0 where σ = 0)."""
    if state is None:
        return grad_rows.reshape(shape)
    spatial, mean, std = state
    if _cpu_kernels(spatial):  # one pass (csrc/cpu/predsim.cpp)
        return torch.ops.svp_kernels.channel_std_backward(grad_rows, spatial, mean, std).reshape(shape)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    factor = torch.where(std > 0, grad_rows / (safe * (spatial.shape[2] - 1)), torch.zeros_like(std))
    return ((spatial - mean[:, :, None]) * factor[:, :, None]).reshape(shape)


# ----------------------------------------------------------------------------------------------------
# The learnable decoder head: logits = h W̃ᵀ + b, W̃ = W ⊙ M / (1 − p)
# ----------------------------------------------------------------------------------------------------

def _register_cpu_kernel_fakes() -> bool:
    """Shape rules of the ops of csrc/cpu/predsim.cpp for torch.compile; False when they are not built."""
    if not (_ops.extension_loaded() and hasattr(torch.ops.svp_kernels, "similarity_loss")):
        return False

    @torch.library.register_fake("svp_kernels::dropout_mask_apply")
    def _dropout_mask_apply(x, p, seed):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("svp_kernels::similarity_loss")
    def _similarity_loss(x, target, labels, same, other, center, additive, value_scale, grad_scale, need_grad):
        return x.new_empty(()), x.new_empty(x.shape if need_grad else (0,))

    @torch.library.register_fake("svp_kernels::channel_std")
    def _channel_std(x):
        return x.new_empty(x.shape[:2]), x.new_empty(x.shape[:2])

    @torch.library.register_fake("svp_kernels::channel_std_backward")
    def _channel_std_backward(grad_std, x, mean, std):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("svp_kernels::softmax_cross_entropy")
    def _softmax_cross_entropy(logits, labels, grad_scale, need_grad):
        return logits.new_empty(()), logits.new_empty(logits.shape if need_grad else (0,))

    return True


CPU_KERNELS = _register_cpu_kernel_fakes()


def _cpu_kernels(x: torch.Tensor) -> bool:
    """Whether the compiled CPU kernels (csrc/cpu/predsim.cpp) take x: float32/float64 on the CPU."""
    return CPU_KERNELS and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def dropped_weight(weight, p, seed):
    """W̃ (C, D) = W ⊙ M / (1 − p) in W's dtype, M the mask of docs/design.md §3 (materialised)."""
    scale = torch.tensor(1.0 / (1.0 - p), dtype=weight.dtype, device=weight.device)
    return weight * keep_mask(seed, weight.shape[0], weight.shape[1], p, weight.device) * scale


def decoder_logits(h, weight, bias, p, seed):
    """(B, C) logits; with p > 0 the mask of docs/design.md §3 is regenerated, W̃ never stored (CPU)."""
    if p == 0:
        return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
    if _cpu_kernels(h):
        logits = torch.ops.svp_kernels.projection_forward(h, weight, weight.shape[0], 0, 0.0, p, seed)
    else:
        logits = h @ dropped_weight(weight, p, seed).t()
    return logits if bias is None else logits + bias


def decoder_grads(grad_logits, h, weight, p, seed, need_h, need_weight):
    """(dL/dh = g W̃, dL/dW = (gᵀ h) ⊙ M / (1 − p)), each None when not needed."""
    grad_h = grad_weight = None
    if p == 0:
        if need_h:
            grad_h = grad_logits @ weight
        if need_weight:
            grad_weight = grad_logits.t() @ h
        return grad_h, grad_weight
    compiled = _cpu_kernels(h)
    if need_h:
        if compiled:
            grad_h = torch.ops.svp_kernels.projection_backward(grad_logits, weight, h.shape[1], 0, 0.0, p, seed,
                                                               h.dtype)
        else:
            grad_h = grad_logits @ dropped_weight(weight, p, seed)
    if need_weight:
        outer = grad_logits.t() @ h
        grad_weight = (torch.ops.svp_kernels.dropout_mask_apply(outer, p, seed) if compiled
                       else dropped_weight(outer, p, seed))
    return grad_h, grad_weight


def cross_entropy_and_grad(logits, labels, grad_scale, need_grad):
    """(mean_b CE as a 0-dim tensor, grad_scale · (softmax − onehot) or None)."""
    if _cpu_kernels(logits):  # one row loop; torch's log_softmax is ~20 µs at (128, 10) on one thread
        ce, grad = torch.ops.svp_kernels.softmax_cross_entropy(logits, labels, grad_scale, need_grad)
        return ce, grad if need_grad else None
    if not need_grad:
        return F.cross_entropy(logits, labels), None
    log_probabilities = torch.log_softmax(logits, dim=1)
    ce = F.nll_loss(log_probabilities, labels)
    grad = log_probabilities.exp_()
    grad[torch.arange(labels.shape[0], device=labels.device), labels] -= 1.0
    return ce, grad.mul_(grad_scale)


# ----------------------------------------------------------------------------------------------------
# Autograd: the forward computes the gradients it will return; backward only scales them
# ----------------------------------------------------------------------------------------------------

def _scaled(grad_output, saved, dtype):
    """grad_output · saved in dtype; `saved` itself when grad_output is exactly 1 (checked on CPU only,
    where reading the scalar costs no device sync), which is what loss.backward() passes."""
    if saved is None:
        return None
    unit = (not torch.compiler.is_compiling() and grad_output.device.type == "cpu"
            and grad_output.dim() == 0 and grad_output.item() == 1.0)
    return (saved if unit else grad_output * saved).to(dtype)


def _save_rows_grad(ctx, grad_rows, state):
    """Saves dL/drows and what the reduction's backward needs; the full-size gradient is formed in
    backward, with the incoming scale folded into the small (B, Ch) factor of a std reduction."""
    ctx.reduce_state = state is not None
    ctx.save_for_backward(grad_rows, *(state if state is not None else ()))


def _saved_rows_grad(ctx, grad_output, dtype, shape):
    grad_rows, *state = ctx.saved_tensors
    if grad_rows is None:
        return None
    if not ctx.reduce_state:
        return _scaled(grad_output, grad_rows, dtype).reshape(shape)
    return reduce_rows_backward(_scaled(grad_output, grad_rows, grad_rows.dtype), tuple(state), shape).to(dtype)


def similarity_forward(x, target_rows, labels, classes, reduce, center, additive, scale, need_grad):
    """(scale · Σ (S(x) − T)² in the accumulation dtype, dL/drows or None, reduction state)."""
    dtype = accumulation_dtype(x.dtype)
    rows, state = reduce_rows(x, reduce, dtype)
    target = (label_target(labels, classes, additive) if labels is not None
              else feature_target(_as(target_rows, dtype).contiguous()))
    value, grad_rows = similarity_loss_and_grad(rows, target, center=center, additive=additive, value_scale=scale,
                                                grad_scale=scale, need_grad=need_grad)
    return value, grad_rows, state


class SimilarityLoss(torch.autograd.Function):
    """scale · Σ (S(x) − T)² (x 2-D or 4-D), differentiable w.r.t. x only."""

    @staticmethod
    def forward(ctx, x, target_rows, labels, classes, reduce, center, additive, scale, need_grad):
        loss, grad_rows, state = similarity_forward(x, target_rows, labels, classes, reduce, center, additive, scale,
                                                    need_grad)
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        _save_rows_grad(ctx, grad_rows, state)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad = _saved_rows_grad(ctx, grad_loss, ctx.x_dtype, ctx.x_shape)
        return grad, None, None, None, None, None, None, None, None


def _as(x, dtype):
    return x if x is None or x.dtype == dtype else x.to(dtype)


def predsim_forward(h_dec, weight, bias, h_sim, labels, beta, p, seed, reduce, needs):
    """(loss, ce, sim, logits, (dh_dec, dW, db) or Nones, dL/drows or None, reduction state)."""
    need_h_dec, need_weight, need_bias, need_h_sim = needs
    classes, batch = weight.shape[0], h_dec.shape[0]
    dec_dtype = accumulation_dtype(h_dec.dtype)
    h, w, b = _as(h_dec, dec_dtype), _as(weight, dec_dtype), _as(bias, dec_dtype)
    logits = decoder_logits(h, w, b, p, seed)
    need_ce_grad = (need_h_dec or need_weight or need_bias) and beta < 1
    ce, grad_logits = cross_entropy_and_grad(logits, labels, (1.0 - beta) / batch, need_ce_grad)
    grad_h_dec = grad_weight = grad_bias = None
    if need_ce_grad:
        grad_h_dec, grad_weight = decoder_grads(grad_logits, h, w, p, seed, need_h_dec, need_weight)
        grad_bias = grad_logits.sum(dim=0) if need_bias else None

    sim_dtype = accumulation_dtype(h_sim.dtype)
    rows, state = reduce_rows(h_sim, reduce, sim_dtype)
    sim, grad_rows = similarity_loss_and_grad(rows, label_target(labels, classes, additive=True), center=True,
                                              additive=True, value_scale=1.0 / batch ** 2,
                                              grad_scale=beta / batch ** 2, need_grad=need_h_sim and beta > 0)
    loss_dtype = dec_dtype if dec_dtype == sim_dtype else torch.promote_types(dec_dtype, sim_dtype)
    loss = torch.lerp(_as(ce, loss_dtype), _as(sim, loss_dtype), beta)
    return loss, ce, sim, logits, (grad_h_dec, grad_weight, grad_bias), grad_rows, state


class PredSimLoss(torch.autograd.Function):
    """(1 − β)·CE(h_dec W̃ᵀ + b, y) + β·mean((S(h_sim) − S(onehot y))²); outputs (loss, ce, sim, logits)."""

    @staticmethod
    def forward(ctx, h_dec, weight, bias, h_sim, labels, beta, p, seed, reduce, needs):
        loss, ce, sim, logits, decoder, grad_rows, state = predsim_forward(h_dec, weight, bias, h_sim, labels, beta,
                                                                          p, seed, reduce, needs)
        ctx.dtypes = (h_dec.dtype, weight.dtype, None if bias is None else bias.dtype, h_sim.dtype)
        ctx.h_sim_shape = h_sim.shape
        ctx.decoder_grads = decoder  # (dh_dec, dW, db): neither inputs nor outputs, so plain references
        _save_rows_grad(ctx, grad_rows, state)
        ctx.mark_non_differentiable(ce, sim, logits)
        return loss, ce, sim, logits

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_sim, grad_logits):
        decoder = [_scaled(grad_loss, saved, dtype) for saved, dtype in zip(ctx.decoder_grads, ctx.dtypes)]
        grad_h_sim = _saved_rows_grad(ctx, grad_loss, ctx.dtypes[3], ctx.h_sim_shape)
        return (*decoder, grad_h_sim, None, None, None, None, None, None)
