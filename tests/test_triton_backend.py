"""The Triton backend's own kernels: Philox words, masks (32- and 64-bit offsets), every kernel and path.

The per-op files (test_projection.py, test_alignment.py, ...) already run "triton" through the public API;
this file drives the launchers of svp_kernels/backends/triton/ops.py directly, with block sizes forced small
so that multi-tile, D-split and both alignment paths run on tiny shapes. Without CUDA it runs in Triton's
CPU interpreter (TRITON_INTERPRET=1, set before Triton is imported); @pytest.mark.cuda tests (half
precision, larger shapes) run only on a GPU.
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # conftest.py does the same; this module may be run on its own
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from svp_kernels import philox  # noqa: E402
from svp_kernels.backends import triton as triton_backend  # noqa: E402
from svp_kernels.testing import (assert_close, assert_equal_masks, cosine_gram_ground_truth,  # noqa: E402
                                 epilogue_ground_truth, projection_ground_truth, seed_tensor)

from test_philox import GOLDEN_MASK, GOLDEN_WORDS  # noqa: E402

if not triton_backend.is_available():
    pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

ops = triton_backend.load_ops()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not ops.INTERPRETED:
    pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

# Small blocks: several B/C/D tiles and D splits even on tiny shapes.
SMALL_PROJECTION = ops.ProjectionConfig(block_b=16, block_c=16, block_d=16, splits=3)


def small_epilogue(path=None):
    return ops.EpilogueConfig(row_block_b=4, row_block_c=16, matmul_tile=16, matmul_block_k=16, batch_tile=16,
                              batch_block_k=16, grad_block_c=16, path=path)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float64).to(dtype).to(DEVICE)


# ----------------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _randint4x_kernel(offsets_ptr, words_ptr, N, seed, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offsets = tl.load(offsets_ptr + index, mask=index < N, other=0)
    w0, w1, w2, w3 = tl.randint4x(seed, offsets)
    # One store per word: compiled Triton (unlike its interpreter) has no enumerate() over a tuple.
    tl.store(words_ptr + index, w0.to(tl.uint32, bitcast=True).to(tl.int64), mask=index < N)
    tl.store(words_ptr + N + index, w1.to(tl.uint32, bitcast=True).to(tl.int64), mask=index < N)
    tl.store(words_ptr + 2 * N + index, w2.to(tl.uint32, bitcast=True).to(tl.int64), mask=index < N)
    tl.store(words_ptr + 3 * N + index, w3.to(tl.uint32, bitcast=True).to(tl.int64), mask=index < N)


@pytest.mark.parametrize("seed,offset,words", GOLDEN_WORDS)
def test_philox_words_golden(seed, offset, words):
    got = ops.philox_words(seed, torch.tensor([offset], device=DEVICE))
    assert tuple(int(w) for w in got) == words


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 3, 2**63 - 1])
def test_philox_words_match_reference_and_randint4x(seed):
    """Our rounds equal the PyTorch reference for any offset, and tl.randint4x for 32-bit offsets."""
    small = torch.tensor([0, 1, 2, 255, 65537, 2**31 - 1], device=DEVICE)
    large = torch.tensor([2**31, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**40 + 11, 2**62 + 7], device=DEVICE)
    for offsets in (small, large):
        expected = philox.philox4x32_10(seed, offsets.cpu())
        for got, want in zip(ops.philox_words(seed, offsets), expected):
            assert torch.equal(got.cpu(), want)
    words = torch.empty((4, small.numel()), dtype=torch.int64, device=DEVICE)
    _randint4x_kernel[(1,)](small.to(torch.int32), words, small.numel(), seed, BLOCK=8)
    for got, want in zip(words, ops.philox_words(seed, small)):
        assert torch.equal(got, want)


def test_keep_threshold_is_the_float32_comparison():
    """(w >> 8) >= keep_threshold(p) ⟺ u24(w) >= float32(p), also for p that float32 rounds."""
    k = 2**23 + 1
    for p in (0.0, 0.1, 0.3, 0.5, k * 2.0**-24, k * 2.0**-24 + 1e-12, k * 2.0**-24 - 1e-12, 1 - 2.0**-24):
        threshold = ops.keep_threshold(p)
        for word in (threshold - 1, threshold, threshold + 1):
            if 0 <= word < 2**24:
                u = torch.tensor([word << 8])
                assert bool(philox.u24(u)[0] >= p) == (word >= threshold), (p, word)


def test_keep_mask_golden_and_bit_exact():
    ones = torch.ones(4, 9, device=DEVICE)
    window = ops.weight_window(ones, 4, 9, 0, 1.0, 0.3, 2024)
    assert (window != 0).int().cpu().tolist() == GOLDEN_MASK
    C, D = 37, 70
    for seed, p in ((5, 0.25), (2**40 + 1, 0.9), (123, 0.0), (2**31 + 3, 0.5), (2**63 - 1, 0.3)):
        window = ops.weight_window(torch.ones(C, D, device=DEVICE), C, D, 0, 1.0, p, seed)
        assert_equal_masks(window != 0, philox.keep_mask(seed, C, D, p), f"mask seed={seed} p={p}")


def test_implicit_weight_matches_reference():
    C, D = 13, 70
    for p in (0.0, 0.4):
        window = ops.weight_window(None, C, D, 2024, 0.125, p, 9, device=DEVICE)
        expected = philox.implicit_weight(2024, C, D, 0.125)
        if p > 0:
            expected = expected * philox.keep_mask(9, C, D, p)
        assert window.dtype == torch.float32
        assert_close(window, expected, 4e-7, f"implicit R (p={p})")  # float32 log/cos rounding


def test_64_bit_offsets():
    """A window of a C·D ≥ 2³¹ implicit R (never allocated): offsets c·D + j past 2³¹ and 2³² split into
    (lo32, hi32) exactly like the reference, for the mask and for the implicit values."""
    C, D, rows, cols = 2**22, 1500, 4, 40  # C·D ≈ 6.3e9 > 2³²
    for row_start in (2**31 // D - 1, 2**32 // D - 1, C - rows):
        offsets = torch.arange(row_start, row_start + rows)[:, None] * D + torch.arange(D - cols, D)[None, :]
        assert offsets.max() >= 2**31
        keep = philox.u24(philox.philox4x32_10(31, offsets)[0]) >= 0.5
        word0, word1, _, _ = philox.philox4x32_10(77, offsets)
        u1 = ((word0 >> 8) + 1).to(torch.float32) * 2.0**-24
        implicit = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(torch.tensor(philox.TWO_PI_F32) * philox.u24(word1))
        window = ops.weight_window(None, C, D, 77, 1.0, 0.5, 31, row_start=row_start, col_start=D - cols,
                                   n_rows=rows, n_cols=cols, device=DEVICE)
        assert_equal_masks(window != 0, keep, f"64-bit mask at row {row_start}")
        assert_close(window, implicit * keep, 1e-6, f"64-bit implicit R at row {row_start}")


# ----------------------------------------------------------------------------------------------------
# Projection
# ----------------------------------------------------------------------------------------------------

PROJECTION_CASES = [
    # B, D, C, dense, p, config
    (1, 5, 3, True, 0.0, None),
    (7, 70, 13, True, 0.3, SMALL_PROJECTION),
    (40, 33, 20, False, 0.5, SMALL_PROJECTION),
    (17, 64, 9, False, 0.0, None),
    (33, 48, 17, True, 0.1, ops.ProjectionConfig(block_b=16, block_c=16, block_d=32, splits=1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,D,C,dense,p,config", PROJECTION_CASES)
def test_projection_forward_and_backward(B, D, C, dense, p, config, dtype):
    h = randn(B, D, dtype=dtype, seed=1)
    weight = randn(C, D, dtype=dtype, seed=2) / D**0.5 if dense else None
    proj_seed, proj_std, seed = 2024, 1.0 / D**0.5, 2**35 + 9
    grad_v = randn(B, C, dtype=ops.accumulation_dtype(dtype), seed=3)
    expected_v, expected_dh = projection_ground_truth(h, weight, grad_v, C, proj_seed, proj_std, p, seed)
    v = ops.projection_forward(h, weight, C, proj_seed, proj_std, p, seed_tensor(seed, DEVICE), config=config)
    assert v.dtype == ops.accumulation_dtype(dtype) and v.shape == (B, C)
    # float32 accumulation; an implicit R agrees to the float32 rounding of log/cos
    tol = 2e-6 if dtype == torch.float32 or not dense else 1e-13
    assert_close(v, expected_v, tol, "v")

    dh = ops.projection_backward(grad_v, weight, D, proj_seed, proj_std, p, seed_tensor(seed, DEVICE), dtype,
                                 config=config)
    assert dh.dtype == dtype and dh.shape == (B, D)
    assert_close(dh, expected_dh, tol, "dh")


def test_projection_split_reduction_is_deterministic():
    h, weight = randn(20, 70, seed=4, dtype=torch.float32), randn(9, 70, seed=5, dtype=torch.float32)
    first = ops.projection_forward(h, weight, 9, 0, 0.0, 0.2, seed_tensor(3, DEVICE), config=SMALL_PROJECTION)
    again = ops.projection_forward(h, weight, 9, 0, 0.0, 0.2, seed_tensor(3, DEVICE), config=SMALL_PROJECTION)
    assert torch.equal(first, again)


def test_projection_op_autograd_regenerates_the_mask():
    """Through the op: dh from autograd equals grad_v · R̃ with the same mask as the forward."""
    h = randn(6, 40, seed=6).requires_grad_(True)
    v = triton_backend.projection(h, None, 11, 5, 0.2, 0.35, seed_tensor(77, DEVICE))
    grad_v = randn(6, 11, seed=7)
    v.backward(grad_v)
    expected_v, expected_dh = projection_ground_truth(h, None, grad_v, 11, 5, 0.2, 0.35, 77)
    assert_close(v, expected_v, 1e-5, "v")
    assert_close(h.grad, expected_dh, 1e-5, "dh")


# ----------------------------------------------------------------------------------------------------
# Loss epilogue and cosine Gram
# ----------------------------------------------------------------------------------------------------

EPILOGUE_CASES = [
    # B, C, C', target, λ, mean, center, path
    (1, 3, 2, True, 1.0, True, True, None),
    (7, 13, 5, True, 0.7, True, False, None),  # C > B: batch space
    (7, 13, 5, True, 0.7, False, True, "feature"),
    (40, 5, 3, True, 0.7, True, True, None),  # C + C' < B: feature space
    (40, 5, 3, False, 0.7, False, False, "batch"),
    (37, 20, 17, True, 2.0, True, True, "batch"),  # several row tiles and gradient chunks
    (37, 20, 17, True, 2.0, True, False, "feature"),
    (9, 13, None, True, 0.7, True, False, None),  # CE only
    (9, 4, 6, True, 0.0, True, False, None),  # λ = 0: alignment reported, no gradient from it
    (5, 6, 6, False, 1.0, True, False, None),  # alignment only
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,C,C_prev,has_target,weight,mean,center,path", EPILOGUE_CASES)
def test_loss_epilogue(B, C, C_prev, has_target, weight, mean, center, path, dtype):
    v = randn(B, C, dtype=dtype, seed=10) * 2
    target = torch.randint(0, C, (B,), generator=generator(11)).to(DEVICE) if has_target else None
    v_prev = randn(B, C_prev, dtype=dtype, seed=12) if C_prev is not None else None
    got = ops.loss_epilogue(v, target, v_prev, weight, mean, center, config=small_epilogue(path))
    expected = epilogue_ground_truth(v, target, v_prev, weight, mean, center)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, actual, want in zip(("loss", "ce", "alignment", "g_v"), got, expected):
        assert actual.dtype == ops.accumulation_dtype(dtype), name
        assert_close(actual, want, tol, f"{name} ({path or 'auto'} path)")


def test_alignment_paths_agree():
    v, v_prev = randn(24, 7, seed=13), randn(24, 9, seed=14)
    feature = ops.loss_epilogue(v, None, v_prev, 1.0, True, True, config=small_epilogue("feature"))
    batch = ops.loss_epilogue(v, None, v_prev, 1.0, True, True, config=small_epilogue("batch"))
    for a, b in zip(feature, batch):
        assert_close(a, b, 1e-12, "feature vs batch")
    assert ops.use_feature_space(24, 7, 9) and not ops.use_feature_space(16, 7, 9)


def test_epilogue_zero_rows_take_the_epsilon_branch():
    """‖v_b‖ ≤ ε: â_b = v_b/ε and the gradient is g/ε, as autograd gives for v / clamp_min(‖v‖, ε)."""
    v = randn(6, 4, seed=15)
    v[2] = 0.0
    v[4] = 0.5  # constant row: exactly zero once centred (the mean of 0.5s is 0.5)
    v_prev = randn(6, 3, seed=16)
    target = torch.tensor([0, 1, 2, 3, 0, 1], device=DEVICE)
    for center in (False, True):
        got = ops.loss_epilogue(v, target, v_prev, 0.5, True, center, config=small_epilogue())
        expected = epilogue_ground_truth(v, target, v_prev, 0.5, True, center)
        for name, actual, want in zip(("loss", "ce", "alignment", "g_v"), got, expected):
            assert_close(actual, want, 1e-12, f"{name} (center={center})")


def test_epilogue_op_autograd_and_half_inputs_widen():
    v = randn(8, 5, seed=17, dtype=torch.float32).requires_grad_(True)
    target = torch.randint(0, 5, (8,), generator=generator(18)).to(DEVICE)
    v_prev = randn(8, 4, seed=19, dtype=torch.float32)
    loss, ce, alignment = triton_backend.epilogue(v, target, v_prev, 0.3, True, True)
    (2.0 * loss).backward()
    expected = epilogue_ground_truth(v, target, v_prev, 0.3, True, True)
    assert_close(loss, expected[0], 1e-5, "loss")
    assert_close(v.grad, 2.0 * expected[3], 1e-5, "dloss/dv")
    assert not ce.requires_grad and not alignment.requires_grad


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("B,C", [(1, 3), (7, 13), (20, 6)])
def test_cosine_gram(B, C, center):
    v = randn(B, C, seed=20)
    S = ops.cosine_gram(v, center, config=small_epilogue())
    assert S.shape == (B, B)
    assert_close(S, cosine_gram_ground_truth(v, center), 1e-12, "S")


# ----------------------------------------------------------------------------------------------------
# The backend module and its torch.library ops
# ----------------------------------------------------------------------------------------------------


def test_backend_interface():
    assert triton_backend.NAME == "triton"
    assert triton_backend.supports(torch.device(DEVICE), torch.float32)
    assert triton_backend.supports(torch.device(DEVICE), torch.float64)
    assert triton_backend.supports(torch.device("cuda"), torch.bfloat16) == triton_backend.is_available()
    assert not triton_backend.supports(torch.device("meta"), torch.float32)
    if DEVICE == "cpu":
        assert not triton_backend.supports(torch.device("cpu"), torch.bfloat16)  # no bf16 in the interpreter


def test_import_without_triton_is_unavailable_not_an_error():
    code = ("import sys; sys.modules['triton'] = None\n"
            "from svp_kernels.backends import triton as backend\n"
            "import torch\n"
            "assert not backend.is_available()\n"
            "assert not backend.supports(torch.device('cpu'), torch.float32)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_triton_older_than_supported_is_refused_in_one_line():
    """MIN_TRITON: the first release whose tl.dot takes float64. An older Triton makes the backend unavailable
    with one line naming both versions (SVP_KERNELS_REQUIRE=triton then fails the session with it)."""
    assert triton_backend.version_tuple("3.5.0+git1a2b") == (3, 5, 0)
    assert triton_backend.version_tuple("3.10.1") == (3, 10, 1) and triton_backend.version_tuple("4") == (4, 0, 0)
    assert triton_backend.version_error(triton.__version__) is None  # the suite's own Triton is supported
    oldest = ".".join(map(str, triton_backend.MIN_TRITON))
    assert triton_backend.version_error(oldest) is None
    code = ("import triton; triton.__version__ = '3.4.1'\n"
            "from svp_kernels import backends\n"
            "print(backends.is_available('triton')); print(backends.unavailable_reason('triton'))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    available, reason = result.stdout.strip().split("\n")
    assert available == "False"
    assert reason.startswith(f"triton 3.4.1 is older than {oldest}, the oldest this backend supports"), reason


def test_tf32_only_when_allowed(monkeypatch):
    monkeypatch.delenv("SVP_KERNELS_ALLOW_TF32", raising=False)
    assert ops.input_precision() == "ieee"
    monkeypatch.setenv("SVP_KERNELS_ALLOW_TF32", "1")
    assert ops.input_precision() == "tf32"


def _op_samples():
    h = randn(5, 20, seed=21).requires_grad_(True)
    weight = randn(3, 20, seed=22)
    v = randn(6, 9, seed=23).requires_grad_(True)
    target = torch.randint(0, 9, (6,), generator=generator(24)).to(DEVICE)
    namespace = torch.ops.svp_kernels
    return [
        (namespace.triton_projection_forward.default, (h, weight, 3, 0, 0.0, 0.3, seed_tensor(11, DEVICE))),
        (namespace.triton_projection_forward.default, (h, None, 7, 17, 0.5, 0.0, seed_tensor(0, DEVICE))),
        (namespace.triton_projection_backward.default,
         (randn(5, 7, seed=25), None, 20, 17, 0.5, 0.2, seed_tensor(4, DEVICE), torch.float32)),
        (namespace.triton_loss_epilogue.default, (v, target, randn(6, 4, seed=26), 0.5, True, False)),
        (namespace.triton_loss_epilogue.default, (v, None, randn(6, 2, seed=27), 1.0, False, True)),
        (namespace.triton_loss_epilogue.default,
         (v, target, randn(6, 9, seed=28), 0.5, True, False, "bhattacharyya")),
        (namespace.triton_cosine_gram.default, (v.detach(), True)),
    ]


@pytest.mark.parametrize("index", range(7))
def test_opcheck(index):
    op, args = _op_samples()[index]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    """No graph break through the triton ops (aot_eager: the graph is checked, nothing is compiled)."""
    import svp_kernels as sk

    torch._dynamo.reset()
    h = randn(9, 14, seed=28, dtype=torch.float32).requires_grad_(True)
    target = torch.randint(0, 5, (9,), generator=generator(29)).to(DEVICE)
    v_prev = randn(9, 4, seed=30, dtype=torch.float32)

    def step(h):
        return sk.fused_local_loss(h, target, v_prev, projection=sk.ImplicitProjection(5, seed=3), p=0.2, seed=7,
                                   center=True, backend="triton").loss

    eager = step(h)
    (eager_grad,) = torch.autograd.grad(eager, h)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(h)
    (compiled_grad,) = torch.autograd.grad(compiled, h)
    assert_close(compiled, eager, 1e-6, "compiled loss")
    assert_close(compiled_grad, eager_grad, 1e-6, "compiled dh")


# ----------------------------------------------------------------------------------------------------
# GPU only: half precision and shapes the interpreter is too slow for
# ----------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dense", [True, False])
def test_half_precision_projection_on_gpu(dtype, dense):
    B, D, C = 300, 1000, 70
    h = randn(B, D, dtype=dtype, seed=31)
    weight = (randn(C, D, seed=32) / D**0.5).to(dtype) if dense else None
    grad_v = randn(B, C, seed=33, dtype=torch.float32)
    expected_v, expected_dh = projection_ground_truth(h, weight, grad_v, C, 5, 1.0 / D**0.5, 0.2, 9)
    v = ops.projection_forward(h, weight, C, 5, 1.0 / D**0.5, 0.2, seed_tensor(9, DEVICE))
    assert v.dtype == torch.float32
    assert_close(v, expected_v, 1e-5, "v")  # products exact, float32 sums
    dh = ops.projection_backward(grad_v, weight, D, 5, 1.0 / D**0.5, 0.2, seed_tensor(9, DEVICE), dtype)
    assert dh.dtype == dtype
    assert_close(dh, expected_dh, 1e-2, "dh")  # rounded to half precision


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,C,C_prev", [(512, 10, 10), (64, 300, 100)])
def test_half_precision_epilogue_on_gpu(dtype, B, C, C_prev):
    v = randn(B, C, dtype=dtype, seed=34)
    v_prev = randn(B, C_prev, dtype=dtype, seed=35)
    target = torch.randint(0, C, (B,), generator=generator(36)).to(DEVICE)
    got = ops.loss_epilogue(v, target, v_prev, 0.7, True, True)
    expected = epilogue_ground_truth(v, target, v_prev, 0.7, True, True)
    for name, actual, want in zip(("loss", "ce", "alignment", "g_v"), got, expected):
        assert actual.dtype == torch.float32
        assert_close(actual, want, 1e-5, name)


@pytest.mark.cuda
def test_large_shapes_on_gpu():
    B, D, C = 1024, 4096, 256
    h = randn(B, D, dtype=torch.float32, seed=37)
    v = ops.projection_forward(h, None, C, 5, 1.0 / D**0.5, 0.1, seed_tensor(9, DEVICE))
    expected_v, _ = projection_ground_truth(h, None, torch.zeros(B, C), C, 5, 1.0 / D**0.5, 0.1, 9)
    assert_close(v, expected_v, 1e-5, "v")
    v_prev = randn(B, 64, dtype=torch.float32, seed=38)
    for path in ("feature", "batch"):
        config = dataclasses.replace(ops.epilogue_config(B, C, torch.float32), path=path)
        got = ops.loss_epilogue(v, None, v_prev, 1.0, True, False, config=config)
        expected = epilogue_ground_truth(v, None, v_prev, 1.0, True, False)
        for name, actual, want in zip(("loss", "ce", "alignment", "g_v"), got, expected):
            assert_close(actual, want, 1e-5, f"{name} ({path})")
