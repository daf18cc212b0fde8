"""Triton kernels of the fused loss epilogue and the inspection Gram (docs/design.md §2; the launchers are in
``ops.py``, the randomness, the projection and the shared helpers in ``kernels.py``).

Loss epilogue, alignment "bhattacharyya": v (B, C), target, v_prev (B, C) ──► loss, ce, alignment, g_v in two
launches: ``rows_kernel`` adds, per row, BD_b = ½(log Σ e^a + log Σ e^b) − d − log Σ e^(t − d) (a = v − max v,
b = v_prev − max v_prev, t = ½(a + b), d = max t: −logsumexp of ½(log_softmax(v) + log_softmax(v_prev)), exact)
and its gradient coef·(softmax(v) − r), r = softmax(t), to the CE terms (``bhattacharyya_statistics``,
``bhattacharyya_gradient``); ``gradient_kernel``'s last program sums the rows' distances (one program only).

Loss epilogue, alignment "cosine_gram": v (B, C), target, v_prev (B, C') ──► loss, ce, alignment, g_v in three
launches:
    1. ``rows_kernel`` (grid: B tiles) — per row: v from the split partial sums (SPLIT); online logsumexp,
       CE, the CE gradient (softmax − onehot)/B into g_v; the row mean (center), the norm and
       â = v/max(‖v‖, ε); the same normalisation of v_prev's row into b̂.
    2. FA and what its gradient needs, by the cheaper path:
       feature space (C + C' < B): ``feature_grams_kernel`` (grid: tiles × tiles × 3) builds the Grams
       âᵀâ (C×C) and b̂ᵀâ (C'×C) and the squared sums of those and b̂ᵀb̂ (C'×C'), weighted 1, −2, 1;
       batch space: ``batch_alignment_kernel`` (grid: row tiles × C chunks) computes tiles of
       S(â) − S(b̂) (BLOCK_B × BLOCK_B) in registers, accumulates their squares and (S(â) − S(b̂)) â_j;
       no B×B tensor exists.
    3. ``gradient_kernel`` (grid: B tiles + 1) — per row tile: in feature space ∂FA/∂â ∝ â(âᵀâ) − b̂(b̂ᵀâ)
       from the Grams, then λ·∂FA/∂â pulled through the row normalisation, (g − â(â·g))/‖v‖ (g/ε when
       ‖v‖ ≤ ε), minus its row mean when centering, added to g_v; the last program adds the CE terms and
       the squared sums (in float64, fixed order) into loss, ce and alignment.
    Scalar constants (1/(1 − p), 1/B, λ, 4λ/B²) arrive as the bit patterns of their accumulation-dtype
    values (``scalar_from_bits``), so no 0-dim tensor is filled for them.
    Scratch: â, b̂, ∂FA/∂â (B×C, B×C'), the norms and CE terms (B), the Grams (C×C, C'×C) and the squared
    sums: O(B·C + C²).
Cosine Gram: v ──► S = â âᵀ (B × B), inspection only: rows_kernel + matmul_kernel.
"""

import triton
import triton.language as tl

from .kernels import NORM_EPS, WIDE_SUM, _exp, _log, _sqrt, scalar_from_bits, sum_splits

# ----------------------------------------------------------------------------------------------------
# Loss epilogue: rows_kernel, then feature_grams_kernel or batch_alignment_kernel, then gradient_kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def normalize_rows(x_rows, out_rows, row_ok, C, CENTER: tl.constexpr, PRECISE_MATH: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """out_b = x_c / max(‖x_c‖, ε) with x_c = x_b − mean(x_b) (CENTER) or x_b, for a tile of rows given by
    their (BLOCK_B, 1) row pointers; returns ‖x_c‖. The mean, the square sum and x_c itself in float64
    (WIDE_SUM), rounded to out's dtype once at the end."""
    mean = tl.zeros((x_rows.shape[0],), WIDE_SUM)
    if CENTER:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < C), other=0.0)
            mean += tl.sum(x.to(WIDE_SUM), axis=1)
        mean = mean / C
    squares = tl.zeros((x_rows.shape[0],), WIDE_SUM)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        valid = row_ok[:, None] & (cols[None, :] < C)
        x = tl.load(x_rows + cols[None, :], mask=valid, other=0.0).to(WIDE_SUM)
        x = tl.where(valid, x - mean[:, None], 0.0)
        squares += tl.sum(x * x, axis=1)
    norm = _sqrt(squares, PRECISE_MATH)
    denominator = tl.maximum(norm, NORM_EPS)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        valid = row_ok[:, None] & (cols[None, :] < C)
        x = tl.load(x_rows + cols[None, :], mask=valid, other=0.0).to(WIDE_SUM)
        tl.store(out_rows + cols[None, :], ((x - mean[:, None]) / denominator[:, None]).to(out_rows.dtype.element_ty),
                 mask=valid)
    return norm


@triton.jit
def shifted_tile(rows_ptr, cols, row_ok, C, shift, acc_dtype: tl.constexpr):
    """x − shift (acc_dtype) for the columns `cols` of a tile of rows given by their (BLOCK_B, 1) pointers; −inf
    outside the rows (shift is finite there: no −inf − (−inf))."""
    valid = row_ok[:, None] & (cols[None, :] < C)
    x = tl.load(rows_ptr + cols[None, :], mask=valid, other=float("-inf")).to(acc_dtype)
    return x - shift[:, None]


@triton.jit
def bhattacharyya_statistics(x_rows, prev_rows, row_ok, C, acc_dtype: tl.constexpr, PRECISE_MATH: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """The Bhattacharyya distance of each row of a tile of v and v_prev (B, C), given by their (BLOCK_B, 1) row
    pointers: with a = v − max v and b = v_prev − max v_prev (acc_dtype), t = ½(a + b) and d = max t (float64),
        BD = ½(log Σ e^a + log Σ e^b) − d − log Σ e^(t − d)  = −logsumexp(½(log_softmax(v) + log_softmax(v_prev))),
    the exponentials in acc_dtype, t, d, the sums and the logs in float64 (WIDE_SUM). v_prev may hold −inf.
    Returns (max v, max v_prev, d, Σ e^a, Σ e^(t − d), BD), the maxima and d taken as 0 outside the batch."""
    max_v = tl.full((BLOCK_B,), float("-inf"), acc_dtype)
    max_p = tl.full((BLOCK_B,), float("-inf"), acc_dtype)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        valid = row_ok[:, None] & (cols[None, :] < C)
        max_v = tl.maximum(max_v, tl.max(tl.load(x_rows + cols[None, :], mask=valid, other=float("-inf"))
                                          .to(acc_dtype), axis=1))
        max_p = tl.maximum(max_p, tl.max(tl.load(prev_rows + cols[None, :], mask=valid, other=float("-inf"))
                                          .to(acc_dtype), axis=1))
    max_v = tl.where(row_ok, max_v, 0.0).to(acc_dtype)
    max_p = tl.where(row_ok, max_p, 0.0).to(acc_dtype)
    d = tl.full((BLOCK_B,), float("-inf"), WIDE_SUM)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        t = 0.5 * (shifted_tile(x_rows, cols, row_ok, C, max_v, acc_dtype).to(WIDE_SUM)
                   + shifted_tile(prev_rows, cols, row_ok, C, max_p, acc_dtype).to(WIDE_SUM))
        d = tl.maximum(d, tl.max(t, axis=1))
    d = tl.where(row_ok, d, 0.0)
    sum_a = tl.zeros((BLOCK_B,), WIDE_SUM)
    sum_b = tl.zeros((BLOCK_B,), WIDE_SUM)
    sum_x = tl.zeros((BLOCK_B,), WIDE_SUM)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        a = shifted_tile(x_rows, cols, row_ok, C, max_v, acc_dtype)
        b = shifted_tile(prev_rows, cols, row_ok, C, max_p, acc_dtype)
        t = 0.5 * (a.to(WIDE_SUM) + b.to(WIDE_SUM))
        sum_a += tl.sum(_exp(a, PRECISE_MATH).to(WIDE_SUM), axis=1)
        sum_b += tl.sum(_exp(b, PRECISE_MATH).to(WIDE_SUM), axis=1)
        sum_x += tl.sum(_exp((t - d[:, None]).to(acc_dtype), PRECISE_MATH).to(WIDE_SUM), axis=1)
    distance = 0.5 * (_log(sum_a, PRECISE_MATH) + _log(sum_b, PRECISE_MATH)) - d - _log(sum_x, PRECISE_MATH)
    return max_v, max_p, d, sum_a, sum_x, distance


@triton.jit
def bhattacharyya_gradient(x_rows, prev_rows, cols, row_ok, C, max_v, max_p, d, sum_a, sum_x, coef,
                           acc_dtype: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """coef · (softmax(v) − r) (float64) for the columns `cols` of the tile of bhattacharyya_statistics, r =
    e^(t − d) / Σ e^(t − d) = softmax(½(log_softmax(v) + log_softmax(v_prev))): ∂BD/∂v = ½(softmax(v) − r)."""
    a = shifted_tile(x_rows, cols, row_ok, C, max_v, acc_dtype)
    b = shifted_tile(prev_rows, cols, row_ok, C, max_p, acc_dtype)
    t = 0.5 * (a.to(WIDE_SUM) + b.to(WIDE_SUM))
    softmax = _exp(a, PRECISE_MATH).to(WIDE_SUM) / sum_a[:, None]
    r = _exp((t - d[:, None]).to(acc_dtype), PRECISE_MATH).to(WIDE_SUM) / sum_x[:, None]
    return coef * (softmax - r)


@triton.jit(do_not_specialize=["inv_batch_bits", "splits", "coef_bits"])
def rows_kernel(x_ptr, v_ptr, prev_ptr, target_ptr, ce_ptr, grad_ptr, xhat_ptr, norm_ptr, xhat_prev_ptr,
                distance_ptr, B, C, CP, splits, stride_xb, stride_pb, inv_batch_bits, coef_bits,
                SPLIT: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_GRAD: tl.constexpr, NORMALIZE: tl.constexpr,
                HAS_PREV: tl.constexpr, CENTER: tl.constexpr, BHATTACHARYYA: tl.constexpr,
                PRECISE_MATH: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per row b of a tile of v (B, C) and of v_prev (B, C'):
    SPLIT:      v = Σ_s x[s] over the forward's D splits (x: (splits, B, C), sum_splits), written to v first;
                otherwise x is v itself (row stride stride_xb, any float dtype);
    HAS_TARGET: ce[b] = logsumexp(v_b) − v_b[y_b], grad[b] = (softmax(v_b) − onehot(y_b)) / B; a target outside
                [0, C) is not loaded through, and ce[b] and grad[b] are NaN; HAS_GRAD without a target: grad[b] = 0;
    NORMALIZE:  norm[b] = ‖v_c‖, xhat[b] = v_c / max(‖v_c‖, ε) (normalize_rows);
    HAS_PREV:   xhat_prev[b] likewise for v_prev (row stride stride_pb);
    BHATTACHARYYA (v_prev (B, C), row stride stride_pb; not with NORMALIZE or HAS_PREV): distance[b] =
                BD(v_b, v_prev_b) (float64, bhattacharyya_statistics), and grad[b] += coef·(softmax(v_b) − r_b)
                with coef (float64 bits in coef_bits) = λ/2, over B for the batch mean.
    The accumulation dtype is grad's (a placeholder of it when not HAS_GRAD); inv_batch_bits holds 1/B in it
    (scalar_from_bits). Outputs are contiguous."""
    acc_dtype = grad_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    out_offsets = rows.to(tl.int64) * C
    if SPLIT:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            valid = row_ok[:, None] & (cols[None, :] < C)
            offsets = out_offsets[:, None] + cols[None, :]
            tl.store(v_ptr + offsets, sum_splits(x_ptr, offsets, valid, splits, B * C), mask=valid)
        tl.debug_barrier()  # the passes below read, from other threads of this program, what it just wrote
        x_row_ptrs = v_ptr + out_offsets
    else:
        x_row_ptrs = x_ptr + rows.to(tl.int64) * stride_xb
    x_rows = x_row_ptrs[:, None]

    if BHATTACHARYYA:  # the row statistics first: the gradient stores below add the term
        prev_rows = (prev_ptr + rows.to(tl.int64) * stride_pb)[:, None]
        max_v, max_p, d, sum_a, sum_x, distance = bhattacharyya_statistics(x_rows, prev_rows, row_ok, C, acc_dtype,
                                                                           PRECISE_MATH, BLOCK_B, BLOCK_C)
        tl.store(distance_ptr + rows, distance, mask=row_ok)
        coef = scalar_from_bits(coef_bits, WIDE_SUM)

    if HAS_TARGET:
        # online logsumexp over C chunks
        running_max = tl.full((BLOCK_B,), float("-inf"), acc_dtype)
        running_sum = tl.zeros((BLOCK_B,), acc_dtype)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < C), other=0.0)
            x = tl.where(cols[None, :] < C, x.to(acc_dtype), float("-inf"))
            new_max = tl.maximum(running_max, tl.max(x, axis=1))
            running_sum = (running_sum * _exp(running_max - new_max, PRECISE_MATH)
                           + tl.sum(_exp(x - new_max[:, None], PRECISE_MATH), axis=1))
            running_max = new_max
        logsumexp = running_max + _log(running_sum, PRECISE_MATH)
        target = tl.load(target_ptr + rows, mask=row_ok, other=0)
        target_ok = (target >= 0) & (target < C)
        target_logit = tl.load(x_row_ptrs + target, mask=row_ok & target_ok, other=0.0)
        ce = tl.where(target_ok, logsumexp - target_logit.to(acc_dtype), float("nan"))
        tl.store(ce_ptr + rows, ce, mask=row_ok)
        # CE gradient, written to g_v
        inv_batch = tl.where(target_ok, scalar_from_bits(inv_batch_bits, acc_dtype), float("nan")).to(acc_dtype)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            valid = row_ok[:, None] & (cols[None, :] < C)
            x = tl.load(x_rows + cols[None, :], mask=valid, other=0.0).to(acc_dtype)
            softmax = _exp(x - logsumexp[:, None], PRECISE_MATH)
            onehot = tl.where(cols[None, :] == target[:, None], 1.0, 0.0).to(acc_dtype)
            grad = (softmax - onehot) * inv_batch[:, None]
            if BHATTACHARYYA:
                grad = (grad.to(WIDE_SUM) + bhattacharyya_gradient(x_rows, prev_rows, cols, row_ok, C, max_v, max_p, d,
                                                                   sum_a, sum_x, coef, acc_dtype, PRECISE_MATH)
                        ).to(acc_dtype)
            tl.store(grad_ptr + out_offsets[:, None] + cols[None, :], grad, mask=valid)
    elif HAS_GRAD:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            grad = tl.zeros((BLOCK_B, BLOCK_C), acc_dtype)
            if BHATTACHARYYA:
                grad = bhattacharyya_gradient(x_rows, prev_rows, cols, row_ok, C, max_v, max_p, d, sum_a, sum_x, coef,
                                              acc_dtype, PRECISE_MATH).to(acc_dtype)
            tl.store(grad_ptr + out_offsets[:, None] + cols[None, :], grad,
                     mask=row_ok[:, None] & (cols[None, :] < C))

    if NORMALIZE:
        norm = normalize_rows(x_rows, (xhat_ptr + out_offsets)[:, None], row_ok, C, CENTER, PRECISE_MATH, BLOCK_C)
        tl.store(norm_ptr + rows, norm.to(acc_dtype), mask=row_ok)
    if HAS_PREV:
        prev_rows = (prev_ptr + rows.to(tl.int64) * stride_pb)[:, None]
        normalize_rows(prev_rows, (xhat_prev_ptr + rows.to(tl.int64) * CP)[:, None], row_ok, CP, CENTER,
                       PRECISE_MATH, BLOCK_C)


@triton.jit
def dot_over_k(a_ptr, b_ptr, rows, cols, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, acc_dtype: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, WIDE_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A[rows, :K] · B[:K, cols] in acc_dtype (zero outside (M, N)); operands of another dtype are converted to
    acc_dtype (float32 â into a float64 Gram: exact); with WIDE_K the BLOCK_K-step products are summed in float64
    (WIDE_SUM) and rounded once."""
    if WIDE_K:
        acc = tl.zeros((BLOCK_M, BLOCK_N), WIDE_SUM)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0).to(acc_dtype)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0).to(acc_dtype)
        if WIDE_K:
            acc += tl.dot(a, b, input_precision=INPUT_PRECISION, out_dtype=acc_dtype).to(WIDE_SUM)
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)
    return acc.to(acc_dtype)


@triton.jit
def matmul_kernel(a_ptr, b_ptr, out_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
                  INPUT_PRECISION: tl.constexpr, WIDE_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, N) = A (M, K) · B (K, N), any strides (so Aᵀ is free): the inspection Gram â âᵀ. Operands and out
    share one dtype. WIDE_K (float32): each BLOCK_K step's product is added in float64, so a long K is not one
    float32 chain."""
    acc_dtype = out_ptr.dtype.element_ty
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = dot_over_k(a_ptr, b_ptr, rows, cols, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                     acc_dtype, INPUT_PRECISION, WIDE_K, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, acc,
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def feature_grams_kernel(xhat_ptr, xhat_prev_ptr, gram_ptr, cross_ptr, partial_ptr, B, C, CP,
                         INPUT_PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """The feature-space Grams, sums over the batch in gram's dtype (float64 for float32 data too: FA cancels
    when v and v_prev are aligned, and float32 Grams would lose its leading digits). Program (i, j, which)
    forms tile (i, j) of âᵀâ (C, C) into gram (which = 0), b̂ᵀâ (C', C) into cross (1) or b̂ᵀb̂ (C', C') (2,
    not stored), and partial[which, i, j] = w · Σ tile² with w = 1, −2, 1: FA = ‖âᵀâ‖² − 2‖b̂ᵀâ‖² + ‖b̂ᵀb̂‖²
    = Σ partial (gradient_kernel adds them). â (B, C) and b̂ (B, C') are contiguous."""
    acc_dtype = gram_ptr.dtype.element_ty
    which = tl.program_id(2)
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    tile = tl.zeros((BLOCK, BLOCK), acc_dtype)
    # Aᵀ B of row-major (B, M) and (B, N) operands: A is read transposed (strides 1, M)
    if which == 0:
        tile = dot_over_k(xhat_ptr, xhat_ptr, rows, cols, C, C, B, 1, C, C, 1, acc_dtype, INPUT_PRECISION, False,
                          BLOCK, BLOCK, BLOCK_K)
        tl.store(gram_ptr + rows[:, None] * C + cols[None, :], tile, mask=(rows[:, None] < C) & (cols[None, :] < C))
    elif which == 1:
        if tl.program_id(0) * BLOCK < CP:
            tile = dot_over_k(xhat_prev_ptr, xhat_ptr, rows, cols, CP, C, B, 1, CP, C, 1, acc_dtype, INPUT_PRECISION,
                              False, BLOCK, BLOCK, BLOCK_K)
        tl.store(cross_ptr + rows[:, None] * C + cols[None, :], tile, mask=(rows[:, None] < CP) & (cols[None, :] < C))
    else:
        if (tl.program_id(0) * BLOCK < CP) & (tl.program_id(1) * BLOCK < CP):
            tile = dot_over_k(xhat_prev_ptr, xhat_prev_ptr, rows, cols, CP, CP, B, 1, CP, CP, 1, acc_dtype,
                              INPUT_PRECISION, False, BLOCK, BLOCK, BLOCK_K)
    slot = (which * tl.num_programs(0) + tl.program_id(0)) * tl.num_programs(1) + tl.program_id(1)
    weight = tl.where(which == 1, -2.0, 1.0).to(acc_dtype)
    tl.store(partial_ptr + slot, weight * tl.sum(tl.sum(tile * tile, axis=1), axis=0))


@triton.jit
def batch_alignment_kernel(a_ptr, b_ptr, grad_ptr, partial_ptr, B, C, CP,
                           COMPUTE_GRAD: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDE_K: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Batch-space FA for row tile i and gradient columns [c-chunk]: for every column tile j,
    Δ = â_i â_jᵀ − b̂_i b̂_jᵀ (BLOCK_B × BLOCK_B, registers only); partial[i] = Σ Δ² (written by the
    chunk-0 program), grad[i, chunk] = Σ_j Δ â_j[:, chunk]. â: (B, C), b̂: (B, CP), contiguous."""
    acc_dtype = partial_ptr.dtype.element_ty
    rows_i = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    chunk = tl.program_id(1)
    grad_cols = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    squares = tl.zeros((BLOCK_B, BLOCK_B), acc_dtype)
    grad = tl.zeros((BLOCK_B, BLOCK_C), acc_dtype)
    for j0 in range(0, B, BLOCK_B):
        rows_j = j0 + tl.arange(0, BLOCK_B)
        # â_i â_jᵀ and b̂_i b̂_jᵀ: row-major (B, C) operands, the second one read transposed
        gram_a = dot_over_k(a_ptr, a_ptr, rows_i, rows_j, B, B, C, C, 1, 1, C, acc_dtype, INPUT_PRECISION, WIDE_K,
                            BLOCK_B, BLOCK_B, BLOCK_K)
        gram_b = dot_over_k(b_ptr, b_ptr, rows_i, rows_j, B, B, CP, CP, 1, 1, CP, acc_dtype, INPUT_PRECISION, WIDE_K,
                            BLOCK_B, BLOCK_B, BLOCK_K)
        difference = gram_a - gram_b
        squares += difference * difference
        if COMPUTE_GRAD:
            a_j = tl.load(a_ptr + rows_j[:, None] * C + grad_cols[None, :],
                          mask=(rows_j[:, None] < B) & (grad_cols[None, :] < C), other=0.0)
            grad = tl.dot(difference, a_j, grad, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)
    if chunk == 0:
        tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.sum(squares, axis=1), axis=0))
    if COMPUTE_GRAD:
        tl.store(grad_ptr + rows_i[:, None] * C + grad_cols[None, :], grad,
                 mask=(rows_i[:, None] < B) & (grad_cols[None, :] < C))


@triton.jit
def normalization_backward_tile(xhat_ptr, grad_xhat_ptr, offsets, cols, valid, coef, projection, above_eps,
                                safe_norm):
    """(g − x̂ (x̂·g)) / ‖v‖ (g / ε where ‖v‖ ≤ ε) for one BLOCK_B × BLOCK_C tile, in float64 (WIDE_SUM);
    g = coef · grad_xhat."""
    xhat = tl.load(xhat_ptr + offsets + cols[None, :], mask=valid, other=0.0).to(WIDE_SUM)
    g = (tl.load(grad_xhat_ptr + offsets + cols[None, :], mask=valid, other=0.0) * coef).to(WIDE_SUM)
    return tl.where(above_eps[:, None], (g - xhat * projection[:, None]) / safe_norm[:, None], g / NORM_EPS)


@triton.jit
def sum_wide(x_ptr, N, BLOCK: tl.constexpr):
    """Σ x[:N] in float64 (WIDE_SUM), in an order fixed by N and BLOCK."""
    total = tl.zeros((BLOCK,), WIDE_SUM)
    for n0 in range(0, N, BLOCK):
        index = n0 + tl.arange(0, BLOCK)
        total += tl.load(x_ptr + index, mask=index < N, other=0.0).to(WIDE_SUM)
    return tl.sum(total, axis=0)


@triton.jit(do_not_specialize=["coef_bits", "weight_bits", "row_tiles", "n_partials"])
def gradient_kernel(xhat_ptr, xhat_prev_ptr, gram_ptr, cross_ptr, grad_xhat_ptr, norm_ptr, grad_v_ptr,
                    ce_ptr, partial_ptr, loss_ptr, ce_out_ptr, alignment_ptr,
                    B, C, CP, row_tiles, n_partials, coef_bits, weight_bits,
                    FEATURE: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_ALIGNMENT: tl.constexpr, MEAN: tl.constexpr,
                    CENTER: tl.constexpr, ROW_DISTANCES: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """The epilogue's last launch. The accumulation dtype is grad_v's; all (B, ·) tensors are contiguous.

    Programs 0 … row_tiles − 1, rows [BLOCK_B·p, BLOCK_B·(p + 1)): g_v += λ·∂FA/∂v. With FEATURE, grad_xhat =
    â(âᵀâ) − b̂(b̂ᵀâ) from feature_grams_kernel's Grams, in their dtype (the two products cancel as FA does),
    rounded and stored first; otherwise grad_xhat is batch_alignment_kernel's. Then
    g_v[b] += P((g − x̂_b (x̂_b·g)) / ‖v_b‖) with g = coef · grad_xhat[b] (g / ε when ‖v_b‖ ≤ ε), P subtracting
    the row mean when CENTER; coef = 4λ (/ B² when MEAN) (coef_bits, scalar_from_bits).
    Program row_tiles: ce = Σ_b ce[b] / B (0 without a target), alignment = FA (/ B² when MEAN) with
    FA = Σ partial[:n_partials] (0 without v_prev), loss = ce + λ·alignment (weight_bits holds λ); each sum in
    float64 (WIDE_SUM), in a fixed order, rounded once. ROW_DISTANCES (the Bhattacharyya term, row_tiles = 0):
    partial holds the B rows' distances (float64), alignment = their sum (/ B when MEAN, in float64)."""
    acc_dtype = grad_v_ptr.dtype.element_ty
    if tl.program_id(0) == row_tiles:
        batch = tl.full((), B, acc_dtype)
        ce = tl.zeros((), acc_dtype)
        if HAS_TARGET:
            ce = sum_wide(ce_ptr, B, BLOCK_R).to(acc_dtype) / batch
        loss = ce
        alignment = tl.zeros((), acc_dtype)
        if ROW_DISTANCES:
            total = sum_wide(partial_ptr, n_partials, BLOCK_R)
            if MEAN:
                total = total / B
            alignment = total.to(acc_dtype)
            loss = ce + scalar_from_bits(weight_bits, acc_dtype) * alignment
        elif HAS_ALIGNMENT:
            alignment = sum_wide(partial_ptr, n_partials, BLOCK_R).to(acc_dtype)
            if MEAN:
                alignment = alignment / (tl.full((), B, tl.int64) * B).to(acc_dtype)
            loss = ce + scalar_from_bits(weight_bits, acc_dtype) * alignment
        tl.store(loss_ptr, loss)
        tl.store(ce_out_ptr, ce)
        tl.store(alignment_ptr, alignment)
    else:
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        offsets = rows.to(tl.int64)[:, None] * C
        if FEATURE:
            gram_dtype = gram_ptr.dtype.element_ty
            wide_rows = rows.to(tl.int64)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                wide_cols = cols.to(tl.int64)
                grad_xhat = dot_over_k(xhat_ptr, gram_ptr, wide_rows, wide_cols, B, C, C, C, 1, C, 1, gram_dtype,
                                       INPUT_PRECISION, False, BLOCK_B, BLOCK_C, BLOCK_K)
                grad_xhat -= dot_over_k(xhat_prev_ptr, cross_ptr, wide_rows, wide_cols, B, C, CP, CP, 1, C, 1,
                                        gram_dtype, INPUT_PRECISION, False, BLOCK_B, BLOCK_C, BLOCK_K)
                tl.store(grad_xhat_ptr + offsets + cols[None, :], grad_xhat.to(acc_dtype),
                         mask=row_ok[:, None] & (cols[None, :] < C))
            tl.debug_barrier()  # the passes below read, from other threads of this program, what it just wrote
        coef = scalar_from_bits(coef_bits, acc_dtype)
        norm = tl.load(norm_ptr + rows, mask=row_ok, other=1.0).to(WIDE_SUM)
        # x̂·g per row, in float64 (WIDE_SUM) like every row sum here
        projection = tl.zeros((BLOCK_B,), WIDE_SUM)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            valid = row_ok[:, None] & (cols[None, :] < C)
            xhat = tl.load(xhat_ptr + offsets + cols[None, :], mask=valid, other=0.0)
            g = tl.load(grad_xhat_ptr + offsets + cols[None, :], mask=valid, other=0.0) * coef
            projection += tl.sum(xhat.to(WIDE_SUM) * g.to(WIDE_SUM), axis=1)
        above_eps = norm > NORM_EPS
        safe_norm = tl.where(above_eps, norm, 1.0)  # no 0/0 in the branch tl.where discards
        mean = tl.zeros((BLOCK_B,), WIDE_SUM)
        if CENTER:
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                valid = row_ok[:, None] & (cols[None, :] < C)
                through = normalization_backward_tile(xhat_ptr, grad_xhat_ptr, offsets, cols, valid, coef, projection,
                                                      above_eps, safe_norm)
                mean += tl.sum(tl.where(valid, through, 0.0), axis=1)
            mean = mean / C
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            valid = row_ok[:, None] & (cols[None, :] < C)
            through = normalization_backward_tile(xhat_ptr, grad_xhat_ptr, offsets, cols, valid, coef, projection,
                                                  above_eps, safe_norm)
            grad_v = tl.load(grad_v_ptr + offsets + cols[None, :], mask=valid, other=0.0)
            tl.store(grad_v_ptr + offsets + cols[None, :], (grad_v + through - mean[:, None]).to(acc_dtype),
                     mask=valid)
