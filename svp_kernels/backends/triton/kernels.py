"""Triton kernels of the fused SVP local loss (the math of docs/design.md §2, the randomness of §3).

Data flow (the launchers and block-size choices live in ``ops.py``):

    projection forward   h (B, D) ──► v (B, C)
        grid (D splits, B tiles, C tiles). A program walks its slice of D in BLOCK_D chunks: it loads an
        h tile (BLOCK_B × BLOCK_D), generates the matching tile of R ⊙ M (BLOCK_C × BLOCK_D) in registers
        (dense R is loaded; implicit R and the keep mask come from Philox) and accumulates
        h · (R ⊙ M)ᵀ with tl.dot. The dropout scale 1/(1−p) multiplies the accumulator once at the end.
        Each split writes its partial sums to a (splits, B, C) workspace, added in split order by
        ``sum_splits`` (deterministic; no atomics): in ``reduce_splits_kernel``, or inside the epilogue's first
        launch when fused_local_loss runs (nodes.py). With one split the kernel writes v.
    projection backward  grad_v (B, C) ──► dh (B, D) = (g · grad_v) · R̃
        grid (D tiles, B tiles); each program loops over C in BLOCK_C chunks, regenerating the same
        R ⊙ M tiles bit for bit, and writes dh in h's dtype; g, the loss's incoming gradient, scales grad_v
        as it is loaded (HAS_GRAD_SCALE).
    loss epilogue and cosine Gram: epilogue_kernels.py.

Randomness. ``philox4x32_10`` is written out here with tl.umulhi (not tl.randint4x, whose handling of
64-bit offsets has changed between Triton releases) so the words are the same in every Triton version:
counter (lo32(n), hi32(n), 0, 0), key (lo32(seed), hi32(seed)), 10 rounds. For 32-bit offsets the words
equal tl.randint4x's (tested). Words become numbers only through our conversions: keep iff
(w0 >> 8) >= ceil(float32(p)·2²⁴), which is exactly u24(w0) >= float32(p); implicit R is
std·sqrt(−2 ln u1)·cos(2π u2) in float32 with u1 = ((w0 >> 8) + 1)·2⁻²⁴, u2 = u24(w1).
Offsets are int32 unless the tile's offsets can reach 2³¹ (OFFSET_64), then int64 split into two words;
for n < 2³² both paths give the same counter, so the choice never changes a value.

Precision. Accumulation is float32 (float64 for float64 inputs). float32 tl.dot runs with
input_precision="ieee" (no TF32) unless SVP_KERNELS_ALLOW_TF32=1. bf16/fp16 h with a dense R of the same
dtype is multiplied in that dtype on tensor cores (products are exact in float32, sums are float32). An
implicit R is float32 values, so half-precision h is widened to float32 for that dot. On the GPU
(PRECISE_MATH) exp/log/cos/sqrt come from libdevice (Triton's tl.exp/log/cos/sqrt lower to approximate
PTX there), so implicit-R values agree with the C++ backends to float32 rounding; the interpreter cannot
call libdevice and uses numpy's (equally accurate) functions through tl.*.

Block sizes (ops.py picks them; every tl.dot dimension is ≥ 16).
- Interpreter: fixed 16/32-wide blocks; its cost is per program, so few programs run fastest.
- GPU, tensor-core dots (half-precision h and a dense R of its dtype): forward BLOCK_B 128 (8 warps)
  or ≤ 64 for small batches, BLOCK_C = C padded to a power of two in [16, 64], BLOCK_D 64 (32 when
  BLOCK_B ≤ 64).
- GPU, float32/float64 dots (ieee, and every implicit R): these run on the FMA units, which keep both
  operands of a dot in registers, so the reduction width stays at 16: forward BLOCK_B ≤ 64 (32 for
  float64), BLOCK_C ≤ 32, BLOCK_D 16; backward (grad_v is float32/float64) BLOCK_B ≤ 64, BLOCK_C 16,
  BLOCK_D 64, 8 warps for BLOCK_B 64, no pipelining (num_stages 1, also for the forward of an implicit R);
  epilogue Grams 64×64 tiles over K = 16 (8 warps), S tiles 32×32, row tiles of ≤ 1024 elements (≤ 128
  wide), gradient tiles of 16 rows × ≤ 64 columns.
- Every launch variant compiles for sm_90 with Triton 3.5 (the oldest supported: the first whose tl.dot
  takes float64), 3.6 and the suite's Triton, without spills with the suite's (tools/gpu_compile_check.py;
  registers, spills, shared memory and occupancy per variant in bench/results/sm90-static.csv; the older
  ptxas keeps a few bytes of spills in some variants for occupancy, bench/NOTES.md). Their speed has not
  been tuned on a GPU yet.
- The forward's D splits: enough that splits × B tiles × C tiles ≈ 2 × the SM count, with the
  workspace capped at 2²⁴ elements. Each program regenerates its R tile, so Philox runs
  ceil(B / BLOCK_B) times per element of R: BLOCK_B as large as registers allow.
"""

import triton
import triton.language as tl

try:  # libdevice (accurate log/cos) exists from Triton 3.0; only the compiled GPU path uses it
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old Triton
    libdevice = None

# Philox4x32-10 constants (docs/design.md §3, csrc/include/svp/philox.h).
PHILOX_M0 = tl.constexpr(0xD2511F53)  # multiplies counter word 0
PHILOX_M1 = tl.constexpr(0xCD9E8D57)  # multiplies counter word 2
PHILOX_W0 = tl.constexpr(0x9E3779B9)  # key increment, word 0
PHILOX_W1 = tl.constexpr(0xBB67AE85)  # key increment, word 1
TWO_POW_MINUS_24 = tl.constexpr(5.9604644775390625e-08)
TWO_PI = tl.constexpr(6.28318530717958647692)  # rounded to float32 where used, like the C++ `kTwoPi` literal
NORM_EPS = tl.constexpr(1e-12)
# The accumulator of the epilogue's row sums (mean, square sum, x̂·g, the gradient's row mean) and of the
# values they combine: float64 for float32 and float64 data alike (an element-by-element float32 sum of a
# long row is far less accurate than torch's cascaded sums). The row kernels are memory-bound, and float64
# runs at half the float32 rate on H100/H200, so the wider arithmetic costs little there.
WIDE_SUM = tl.constexpr(tl.float64)


# ----------------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------------


@triton.jit
def philox4x32_10(seed_lo, seed_hi, counter_lo, counter_hi):
    """The four raw Philox4x32-10 words for counters (counter_lo, counter_hi, 0, 0) under the key
    (seed_lo, seed_hi) = (lo32(seed), hi32(seed)). counter_lo/hi: uint32 blocks; seed_lo/hi: integer
    scalars in [0, 2³²) (the launchers split the 64-bit seed: no 64-bit shifts of a scalar argument,
    which the interpreter mishandles for values in [2³¹, 2³²))."""
    k0 = tl.full((), seed_lo, tl.uint32)  # a scalar argument, a constexpr (the JIT's 1) or a uint32 scalar
    k1 = tl.full((), seed_hi, tl.uint32)
    c0 = counter_lo
    c1 = counter_hi
    c2 = counter_lo * 0
    c3 = c2
    m0 = tl.full(counter_lo.shape, PHILOX_M0, tl.uint32)
    m1 = tl.full(counter_lo.shape, PHILOX_M1, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0  # wraps: the low 32 bits of the product
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def load_seed(seed_ptr):
    """(lo32(seed), hi32(seed)) as uint32 scalars of the dropout seed, an int64 read from device memory (so a
    captured CUDA graph draws the mask of the seed's value at replay time, not at capture time)."""
    seed = tl.load(seed_ptr)
    return (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def scalar_from_bits(bits, dtype: tl.constexpr):
    """The float32/float64 scalar whose bit pattern is the integer argument `bits` (ops.float_bits): how the
    launchers pass a constant of the accumulation dtype exactly (Triton passes a Python float as float32)."""
    if dtype == tl.float64:
        value = tl.full((), bits, tl.int64).to(tl.float64, bitcast=True)
    else:
        value = tl.full((), bits, tl.int32).to(tl.float32, bitcast=True)
    return value


@triton.jit
def element_counters(rows, cols, D, OFFSET_64: tl.constexpr):
    """(lo32(n), hi32(n)) of the element offsets n = row·D + col, as uint32 blocks."""
    if OFFSET_64:
        offsets = rows.to(tl.int64) * D + cols.to(tl.int64)
        counter_lo = (offsets & 0xFFFFFFFF).to(tl.uint32)
        counter_hi = ((offsets >> 32) & 0xFFFFFFFF).to(tl.uint32)
    else:
        counter_lo = (rows * D + cols).to(tl.uint32)
        counter_hi = counter_lo * 0
    return counter_lo, counter_hi


# Kernels take seeds, thresholds, counts and the bit patterns of scalar constants with do_not_specialize:
# Triton would otherwise compile one more variant for every such value that is 1 or a multiple of 16.

# Elementwise math. PRECISE_MATH (compiled GPU code): libdevice, accurate for float32 (Triton's own
# tl.exp/tl.log/tl.cos/tl.sqrt lower to approximate PTX instructions there) and defined for float64.
# Otherwise (the interpreter) tl.*, which numpy evaluates accurately; libdevice does not run there.


@triton.jit
def _exp(x, PRECISE_MATH: tl.constexpr):
    if PRECISE_MATH:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _log(x, PRECISE_MATH: tl.constexpr):
    if PRECISE_MATH:
        y = libdevice.log(x)
    else:
        y = tl.log(x)
    return y


@triton.jit
def _cos(x, PRECISE_MATH: tl.constexpr):
    if PRECISE_MATH:
        y = libdevice.cos(x)
    else:
        y = tl.cos(x)
    return y


@triton.jit
def _sqrt(x, PRECISE_MATH: tl.constexpr):
    if PRECISE_MATH:
        y = libdevice.sqrt_rn(x)  # correctly rounded (__nv_fsqrt_rn / __nv_dsqrt_rn)
    else:
        y = tl.sqrt(x)
    return y


@triton.jit
def implicit_normal(word0, word1, proj_std, PRECISE_MATH: tl.constexpr):
    """std · sqrt(−2 ln u1) · cos(2π u2), u1 = ((w0 >> 8) + 1)·2⁻²⁴, u2 = (w1 >> 8)·2⁻²⁴, in float32."""
    u1 = ((word0 >> 8) + 1).to(tl.float32) * TWO_POW_MINUS_24
    u2 = (word1 >> 8).to(tl.float32) * TWO_POW_MINUS_24
    radius = _sqrt(-2.0 * _log(u1, PRECISE_MATH), PRECISE_MATH)
    angle = _cos(u2 * TWO_PI, PRECISE_MATH)
    return radius * angle * proj_std


@triton.jit
def masked_weight_tile(weight_ptr, stride_wc, rows, cols, C, D, proj_seed_lo, proj_seed_hi, proj_std,
                       seed_lo, seed_hi, keep_threshold,
                       HAS_WEIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr, OFFSET_64: tl.constexpr,
                       PRECISE_MATH: tl.constexpr):
    """R ⊙ M at (rows (R, 1), cols (1, K)), unscaled, zero outside (C, D).

    R is the dense `weight` (its dtype) or the implicit R of (proj_seed, proj_std) (float32); M keeps an
    element iff (word0(seed, n) >> 8) >= keep_threshold. Seeds arrive as (lo32, hi32) pairs.
    """
    in_bounds = (rows < C) & (cols < D)
    if HAS_WEIGHT:
        if OFFSET_64:
            weight = tl.load(weight_ptr + rows.to(tl.int64) * stride_wc + cols, mask=in_bounds, other=0.0)
        else:
            weight = tl.load(weight_ptr + rows * stride_wc + cols, mask=in_bounds, other=0.0)
    if HAS_DROPOUT or not HAS_WEIGHT:
        counter_lo, counter_hi = element_counters(rows, cols, D, OFFSET_64)
    if not HAS_WEIGHT:
        word0, word1, _, _ = philox4x32_10(proj_seed_lo, proj_seed_hi, counter_lo, counter_hi)
        weight = tl.where(in_bounds, implicit_normal(word0, word1, proj_std, PRECISE_MATH), 0.0)
    if HAS_DROPOUT:
        keep_word, _, _, _ = philox4x32_10(seed_lo, seed_hi, counter_lo, counter_hi)
        keep = (keep_word >> 8).to(tl.int32) >= keep_threshold
        weight = tl.where(keep, weight, tl.zeros_like(weight))
    return weight


@triton.jit
def philox_words_kernel(offsets_ptr, words_ptr, N, seed_lo, seed_hi, BLOCK: tl.constexpr):
    """words (4, N) int64 = the Philox words of (seed, offsets[i]) for int64 offsets (tests, any n < 2⁶³)."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = index < N
    offsets = tl.load(offsets_ptr + index, mask=valid, other=0)
    counter_lo = (offsets & 0xFFFFFFFF).to(tl.uint32)
    counter_hi = ((offsets >> 32) & 0xFFFFFFFF).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(seed_lo, seed_hi, counter_lo, counter_hi)
    tl.store(words_ptr + index, w0.to(tl.int64), mask=valid)
    tl.store(words_ptr + N + index, w1.to(tl.int64), mask=valid)
    tl.store(words_ptr + 2 * N + index, w2.to(tl.int64), mask=valid)
    tl.store(words_ptr + 3 * N + index, w3.to(tl.int64), mask=valid)


@triton.jit
def weight_window_kernel(weight_ptr, out_ptr, row_start, col_start, n_rows, n_cols, C, D, stride_wc,
                         proj_seed_lo, proj_seed_hi, proj_std, seed_ptr, keep_threshold,
                         HAS_WEIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr, OFFSET_64: tl.constexpr,
                         PRECISE_MATH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (n_rows, n_cols) = (R ⊙ M)[row_start:, col_start:] exactly as the projection kernels see it
    (tests and materialisation; a window far into a huge R needs no memory for the rest of it)."""
    seed_lo, seed_hi = load_seed(seed_ptr)
    local_rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    local_cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    tile = masked_weight_tile(weight_ptr, stride_wc, row_start + local_rows, col_start + local_cols, C, D,
                              proj_seed_lo, proj_seed_hi, proj_std, seed_lo, seed_hi, keep_threshold,
                              HAS_WEIGHT, HAS_DROPOUT, OFFSET_64, PRECISE_MATH)
    valid = (local_rows < n_rows) & (local_cols < n_cols)
    tl.store(out_ptr + local_rows * n_cols + local_cols, tile.to(out_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------------
# Projection
# ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["scale_bits", "proj_seed_lo", "proj_seed_hi", "keep_threshold"])
def projection_forward_kernel(h_ptr, weight_ptr, out_ptr, scale_bits,
                              B, C, D, stride_hb, stride_wc, stride_os, stride_ob, d_per_split,
                              proj_seed_lo, proj_seed_hi, proj_std, seed_ptr, keep_threshold,
                              HAS_WEIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr, OFFSET_64: tl.constexpr,
                              PRECISE_MATH: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[split] (B, C) = h[:, split's D range] · (R ⊙ M)[:, same range]ᵀ · scale.

    d_per_split is a multiple of BLOCK_D. The accumulation dtype is out's; the dot runs in the dense R's
    dtype (h's) or, for an implicit (float32) R, in the accumulation dtype. scale_bits: 1/(1 − p) in the
    accumulation dtype (scalar_from_bits)."""
    seed_lo, seed_hi = load_seed(seed_ptr)
    acc_dtype = out_ptr.dtype.element_ty
    if HAS_WEIGHT:
        dot_dtype = weight_ptr.dtype.element_ty
    else:
        dot_dtype = acc_dtype
    split = tl.program_id(0)
    rows_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    d_start = split * d_per_split
    d_stop = tl.minimum(d_start + d_per_split, D)
    h_rows = h_ptr + rows_b.to(tl.int64)[:, None] * stride_hb

    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=acc_dtype)
    for d0 in range(d_start, d_stop, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        # h tile (BLOCK_B, BLOCK_D) and the matching R ⊙ M tile (BLOCK_C, BLOCK_D), generated in registers
        h_tile = tl.load(h_rows + cols[None, :], mask=(rows_b[:, None] < B) & (cols[None, :] < d_stop), other=0.0)
        weight_tile = masked_weight_tile(weight_ptr, stride_wc, rows_c[:, None], cols[None, :], C, D,
                                         proj_seed_lo, proj_seed_hi, proj_std, seed_lo, seed_hi, keep_threshold,
                                         HAS_WEIGHT, HAS_DROPOUT, OFFSET_64, PRECISE_MATH)
        acc = tl.dot(h_tile.to(dot_dtype), tl.trans(weight_tile.to(dot_dtype)), acc,
                     input_precision=INPUT_PRECISION, out_dtype=acc_dtype)
    if HAS_DROPOUT:
        acc = acc * scalar_from_bits(scale_bits, acc_dtype)
    out = out_ptr + split.to(tl.int64) * stride_os + rows_b.to(tl.int64)[:, None] * stride_ob + rows_c[None, :]
    tl.store(out, acc, mask=(rows_b[:, None] < B) & (rows_c[None, :] < C))


@triton.jit(do_not_specialize=["scale_bits", "proj_seed_lo", "proj_seed_hi", "keep_threshold"])
def projection_backward_kernel(grad_ptr, weight_ptr, dh_ptr, grad_scale_ptr, scale_bits,
                               B, C, D, stride_gb, stride_wc, stride_dhb,
                               proj_seed_lo, proj_seed_hi, proj_std, seed_ptr, keep_threshold,
                               HAS_WEIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr, OFFSET_64: tl.constexpr,
                               HAS_GRAD_SCALE: tl.constexpr, PRECISE_MATH: tl.constexpr,
                               INPUT_PRECISION: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """dh (B, D) = (g · grad_v) (B, C) · (R ⊙ M) · scale, accumulated in grad_v's dtype, written in dh's.

    g: the 0-dim grad_scale (the incoming gradient of the loss) when HAS_GRAD_SCALE, each g · grad_v element
    rounded as the torch product would be; scale_bits: 1/(1 − p) (scalar_from_bits)."""
    seed_lo, seed_hi = load_seed(seed_ptr)
    acc_dtype = grad_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    grad_rows = grad_ptr + rows_b.to(tl.int64)[:, None] * stride_gb

    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr)
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=acc_dtype)
    for c0 in range(0, C, BLOCK_C):
        rows_c = c0 + tl.arange(0, BLOCK_C)
        grad_mask = (rows_b[:, None] < B) & (rows_c[None, :] < C)
        grad_tile = tl.load(grad_rows + rows_c[None, :], mask=grad_mask, other=0.0)
        if HAS_GRAD_SCALE:  # zero outside: an infinite g must not turn the padding into NaN
            grad_tile = tl.where(grad_mask, grad_tile * grad_scale, 0.0)
        weight_tile = masked_weight_tile(weight_ptr, stride_wc, rows_c[:, None], cols[None, :], C, D,
                                         proj_seed_lo, proj_seed_hi, proj_std, seed_lo, seed_hi, keep_threshold,
                                         HAS_WEIGHT, HAS_DROPOUT, OFFSET_64, PRECISE_MATH)
        acc = tl.dot(grad_tile, weight_tile.to(acc_dtype), acc, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)
    if HAS_DROPOUT:
        acc = acc * scalar_from_bits(scale_bits, acc_dtype)
    out = dh_ptr + rows_b.to(tl.int64)[:, None] * stride_dhb + cols[None, :]
    tl.store(out, acc.to(dh_ptr.dtype.element_ty), mask=(rows_b[:, None] < B) & (cols[None, :] < D))


@triton.jit
def sum_splits(partial_ptr, offsets, mask, splits, stride_split):
    """Σ_s partial[s · stride_split + offsets] for s = 0, 1, …, splits − 1, added in that order: the forward's
    fixed-order reduction over its D splits, the same bits in reduce_splits_kernel and rows_kernel. Offsets
    stay int32-safe: the workspace holds fewer than 2²⁴ elements (ops.MAX_WORKSPACE_ELEMENTS)."""
    total = tl.load(partial_ptr + offsets, mask=mask, other=0.0)
    for split in range(1, splits):
        total += tl.load(partial_ptr + split * stride_split + offsets, mask=mask, other=0.0)
    return total


@triton.jit(do_not_specialize=["splits"])
def reduce_splits_kernel(partial_ptr, out_ptr, N, splits, BLOCK: tl.constexpr):
    """out (N,) = Σ_s partial[s] over the (splits, N) partial sums, in split order (sum_splits)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < N
    tl.store(out_ptr + offsets, sum_splits(partial_ptr, offsets, mask, splits, N), mask=mask)
