"""sk.predsim_loss and sk.similarity_loss: the fused path against the plain formulation in float64, float32
accuracy against a float64 ground truth next to plain float32 torch, the decoder head's dropout mask,
no gradient work under no_grad, dtypes, torch.compile, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import svp_kernels as sk
from svp_kernels.philox import keep_mask
from svp_kernels.similarity import fused as similarity_fused
from svp_kernels.similarity import reference as similarity_reference
from svp_kernels.testing import assert_close, seed_tensor


def make_predsim(B, D, sim_shape, C, dtype=torch.float64, seed=0, bias=True):
    generator = torch.Generator().manual_seed(seed)
    h_dec = torch.randn(B, D, dtype=dtype, generator=generator)
    h_sim = torch.randn(B, *sim_shape, dtype=dtype, generator=generator)
    weight = 0.3 * torch.randn(C, D, dtype=dtype, generator=generator)
    decoder_bias = torch.randn(C, dtype=dtype, generator=generator) if bias else None
    target = torch.randint(0, C, (B,), generator=generator)
    return h_dec, h_sim, target, weight, decoder_bias


def value_and_grads(fn, tensors):
    """(outputs of fn, gradients of outputs[0] w.r.t. every non-None tensor) on fresh leaves."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    outputs = fn(*leaves)
    loss = outputs[0] if isinstance(outputs, tuple) else outputs
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return outputs, grads


PREDSIM_CASES = [  # (B, D, sim shape, C, reduce, p, bias)
    (7, 5, (9,), 3, "std", 0.0, True),             # batch space, 2-D h_sim (reduce does not apply)
    (1, 4, (6,), 3, "std", 0.0, True),             # B = 1
    (5, 3, (4, 3, 3), 8, "std", 0.3, False),       # C > B, 4-D std, dropout, no bias
    (6, 7, (2, 3, 2), 4, "flatten", 0.5, True),    # 4-D flatten
    (40, 6, (6,), 3, "std", 0.2, True),            # feature space: 4·(6 + 3) < 40
    (45, 5, (3, 2, 2), 2, "std", 0.0, True),       # feature space after a std reduction
]


@pytest.mark.parametrize("B,D,sim_shape,C,reduce,p,bias", PREDSIM_CASES)
def test_predsim_matches_plain_float64(B, D, sim_shape, C, reduce, p, bias):
    h_dec, h_sim, target, weight, decoder_bias = make_predsim(B, D, sim_shape, C, bias=bias)
    tensors = [h_dec, weight, decoder_bias, h_sim]

    def fused(h_dec, weight, decoder_bias, h_sim):
        return tuple(sk.predsim_loss(h_dec, h_sim, target, weight, decoder_bias, beta=0.7, p=p, seed=11, reduce=reduce))

    def plain(h_dec, weight, decoder_bias, h_sim):
        return similarity_reference.predsim_loss(h_dec, weight, decoder_bias, h_sim, target, 0.7, p, 11, reduce)

    (out, grads), (expected, expected_grads) = value_and_grads(fused, tensors), value_and_grads(plain, tensors)
    for name, got, want in zip(("loss", "ce", "sim", "logits"), out, expected):
        assert_close(got, want, 1e-12, name)
    names = ["h_dec", "weight", "bias", "h_sim"] if bias else ["h_dec", "weight", "h_sim"]
    for name, got, want in zip(names, grads, expected_grads):
        assert_close(got, want, 1e-12, f"grad {name}")


def test_predsim_gradcheck():
    h_dec, h_sim, target, weight, decoder_bias = make_predsim(6, 4, (3, 2, 3), 3)

    def loss_of(h_dec, weight, decoder_bias, h_sim):
        return sk.predsim_loss(h_dec, h_sim, target, weight, decoder_bias, beta=0.6, p=0.25, seed=2).loss

    inputs = tuple(t.requires_grad_(True) for t in (h_dec, weight, decoder_bias, h_sim))
    assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-7)


def test_batch_space_blocks_match_one_block(monkeypatch):
    """Row blocks of S (large B) give the same loss and gradient as one block."""
    generator = torch.Generator().manual_seed(3)
    h = torch.randn(23, 30, dtype=torch.float64, generator=generator)
    target = torch.randint(0, 4, (23,), generator=generator)
    features = torch.randn(23, 19, dtype=torch.float64, generator=generator)
    for target_args in ((target, {"num_classes": 4}), (features, {})):
        one = value_and_grads(lambda h: sk.similarity_loss(h, target_args[0], **target_args[1]), [h])
        monkeypatch.setattr(similarity_fused, "BLOCK_ELEMENTS", 23 * 5)
        blocked = value_and_grads(lambda h: sk.similarity_loss(h, target_args[0], **target_args[1]), [h])
        monkeypatch.undo()
        plain = value_and_grads(lambda h: sk.similarity_loss(h, target_args[0], backend="reference", **target_args[1]),
                                [h])
        assert_close(blocked[0], one[0], 1e-13, "blocked loss")
        assert_close(blocked[1][0], one[1][0], 1e-13, "blocked grad")
        assert_close(blocked[0], plain[0], 1e-12, "loss vs plain")
        assert_close(blocked[1][0], plain[1][0], 1e-12, "grad vs plain")


@pytest.mark.parametrize("B,K,target_width", [(40, 5, 3), (9, 12, 7), (64, 3, 2)])
def test_similarity_loss_feature_target(B, K, target_width):
    generator = torch.Generator().manual_seed(B)
    h = torch.randn(B, K, dtype=torch.float64, generator=generator)
    target = torch.randn(B, target_width, dtype=torch.float64, generator=generator)
    fused = value_and_grads(lambda h: sk.similarity_loss(h, target), [h])
    plain = value_and_grads(lambda h: sk.similarity_loss(h, target, backend="reference"), [h])
    assert_close(fused[0], plain[0], 1e-12, "loss")
    assert_close(fused[1][0], plain[1][0], 1e-12, "grad")


def test_label_target_equals_onehot_target():
    """Labels in closed form give the loss of the explicit one-hot rows (the port of S(onehot))."""
    generator = torch.Generator().manual_seed(5)
    h = torch.randn(13, 8, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 5, (13,), generator=generator)
    onehot = F.one_hot(labels, 5).to(torch.float64)
    assert_close(sk.similarity_loss(h, labels, num_classes=5), sk.similarity_loss(h, onehot), 1e-14, "labels")


def test_zero_rows_have_finite_gradients():
    """A constant row (u = 0) gets the directional derivative g / 1e-8 where the eager autograd gives NaN."""
    h = torch.randn(6, 5, dtype=torch.float64)
    h[2] = 3.0
    target = torch.tensor([0, 1, 0, 2, 1, 0])
    (loss, (grad,)) = value_and_grads(lambda h: sk.similarity_loss(h, target, num_classes=3), [h])
    plain = sk.similarity_loss(h, target, num_classes=3, backend="reference")
    assert_close(loss, plain, 1e-12, "loss with a zero row")
    assert torch.isfinite(grad).all()
    (_, (plain_grad,)) = value_and_grads(lambda h: sk.similarity_loss(h, target, num_classes=3, backend="reference"),
                                         [h])
    assert torch.isnan(plain_grad[2]).all()
    rows = [0, 1, 3, 4, 5]
    assert_close(grad[rows], plain_grad[rows], 1e-12, "the other rows")


# ----------------------------------------------------------------------------------------------------
# float32 accuracy: against a float64 ground truth, next to plain float32 torch
# ----------------------------------------------------------------------------------------------------

FLOAT32_SHAPES = [((128, 64), 10, "flatten"), ((128, 1024), 100, "flatten"), ((128, 32768), 10, "flatten"),
                  ((128, 64, 8, 8), 100, "std"), ((128, 32, 8, 8), 10, "flatten")]


@pytest.mark.parametrize("shape,C,reduce", FLOAT32_SHAPES, ids=str)
def test_float32_accuracy_no_worse_than_torch(shape, C, reduce):
    generator = torch.Generator().manual_seed(shape[1])
    h = torch.relu(torch.randn(*shape, generator=generator)) + 0.1  # post-ReLU features: positive row means
    target = torch.randint(0, C, (shape[0],), generator=generator)
    target[:16] = target[16:32]  # many identical one-hot rows

    def plain(h):
        return similarity_reference.similarity_loss(h, None, target, C, reduce, True, True, True)

    truth, (truth_grad,) = value_and_grads(plain, [h.double()])
    torch32, (torch32_grad,) = value_and_grads(plain, [h])
    fused, (fused_grad,) = value_and_grads(lambda h: sk.similarity_loss(h, target, num_classes=C, reduce=reduce), [h])
    assert fused.dtype == torch.float32 and fused_grad.dtype == torch.float32
    loss_error, torch_loss_error = abs(fused.double() - truth).item(), abs(torch32.double() - truth).item()
    grad_error = (fused_grad.double() - truth_grad).abs().max().item()
    torch_grad_error = (torch32_grad.double() - truth_grad).abs().max().item()
    ulp = torch.finfo(torch.float32).eps
    assert loss_error <= max(torch_loss_error, ulp * truth.item()), (loss_error, torch_loss_error)
    # Both are rounding-limited (≈ 1e-6 of the largest entry); the fused maximum stays within 1.5× torch's.
    assert grad_error <= 1.5 * torch_grad_error, (grad_error, torch_grad_error)


def test_identical_rows_give_zero_alignment_at_large_width():
    """S(v) and S(v_prev) of the same rows agree exactly: no systematic bias from the diagonal."""
    v = torch.relu(torch.randn(64, 32768, generator=torch.Generator().manual_seed(0)))
    assert sk.alignment_loss(v, v.clone(), center=True).item() == 0.0
    assert sk.similarity_loss(v, v.clone()).item() == 0.0


def test_label_target_values_are_exact():
    t = similarity_fused.label_target(torch.zeros(1, dtype=torch.int64), 10, additive=True)
    onehot = F.one_hot(torch.arange(10), 10).to(torch.float64)
    gram = similarity_reference.similarity_matrix(onehot, "flatten")
    assert abs(t.same - gram[0, 0].item()) < 1e-15 and abs(t.other - gram[0, 1].item()) < 1e-15


# ----------------------------------------------------------------------------------------------------
# The decoder head's dropout mask, no_grad, dtypes, compile
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("C,D,p,seed", [(3, 70, 0.3, 7), (10, 257, 0.9, 2**40 + 5)])
def test_dropout_mask_apply_is_exact(C, D, p, seed):
    x = torch.randn(C, D)
    expected = x * keep_mask(seed, C, D, p) * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert torch.equal(torch.ops.svp_kernels.dropout_mask_apply(x, p, seed_tensor(seed)), expected)


def test_dropout_mask_apply_opcheck():
    torch.library.opcheck(torch.ops.svp_kernels.dropout_mask_apply,
                          (torch.randn(4, 9, dtype=torch.float64), 0.25, seed_tensor(3)))


def test_weight_gradient_carries_the_mask():
    h_dec, h_sim, target, weight, decoder_bias = make_predsim(8, 33, (5,), 4)
    (_, (grad_weight,)) = value_and_grads(
        lambda w: sk.predsim_loss(h_dec, h_sim, target, w, decoder_bias, p=0.4, seed=9), [weight])
    dropped = ~keep_mask(9, 4, 33, 0.4)
    assert torch.equal(grad_weight[dropped], torch.zeros_like(grad_weight[dropped]))
    assert (grad_weight[~dropped] != 0).all()


cpu_kernels = pytest.mark.skipif(not similarity_fused.CPU_KERNELS, reason="the compiled extension is not built")


@cpu_kernels
@pytest.mark.parametrize("center,additive", [(True, True), (False, False), (True, False)])
def test_cpu_similarity_kernel_matches_the_torch_path(monkeypatch, center, additive):
    """svp_kernels::similarity_loss (value and gradient) against the torch ops it replaces, in float64."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(13, 9, dtype=torch.float64, generator=generator)
    x[4] = x[2]  # duplicated rows: S entries at 1
    targets = [similarity_fused.feature_target(torch.randn(13, 5, dtype=torch.float64, generator=generator)),
               similarity_fused.label_target(torch.randint(0, 4, (13,), generator=generator), 4, additive)]
    for target in targets:
        def run():
            return similarity_fused.similarity_loss_and_grad(x, target, center=center, additive=additive,
                                                          value_scale=0.25, grad_scale=0.5, need_grad=True)
        kernel = run()
        monkeypatch.setattr(similarity_fused, "CPU_KERNELS", False)
        plain = run()
        monkeypatch.undo()
        assert_close(kernel[0], plain[0], 1e-14, "value")
        assert_close(kernel[1], plain[1], 1e-13, "gradient")


@cpu_kernels
def test_cpu_similarity_kernel_clamps_s():
    """Positive multiples of one row: S_ij = 1 exactly, r_i G_ij r_j rounds above 1 for about half the pairs
    (G in float32). Against T = 1 the clamped loss keeps only the pairs below 1."""
    row = torch.relu(torch.randn(1, 4096, generator=torch.Generator().manual_seed(0))) + 5.0
    x = row * torch.linspace(1.0, 3.0, 32)[:, None]
    raw = (x @ x.t()).double() / torch.outer(*(2 * (torch.linalg.vector_norm(x.double(), dim=1),)))
    clamped, unclamped = (raw.clamp(max=1.0) - 1).square().sum(), (raw - 1).square().sum()
    assert unclamped > 1.5 * clamped > 0  # the rounding excess matters here
    labels = torch.zeros(32, dtype=torch.int64)
    value, _ = torch.ops.svp_kernels.similarity_loss(x, None, labels, 1.0, 1.0, False, False, 1.0, 1.0, False)
    assert_close(value / clamped, torch.ones(()), 1e-3, "clamped loss")


@cpu_kernels
def test_cpu_kernels_opcheck():
    x = torch.randn(5, 7, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 0, 2])
    torch.library.opcheck(torch.ops.svp_kernels.similarity_loss,
                          (x, torch.randn(5, 3, dtype=torch.float64), None, 0.0, 0.0, True, False, 0.04, 0.04, True))
    torch.library.opcheck(torch.ops.svp_kernels.similarity_loss, (x.float(), None, labels, 0.9, -0.4, True, True, 1.0,
                                                                  0.5, False))
    for need_grad in (True, False):
        torch.library.opcheck(torch.ops.svp_kernels.softmax_cross_entropy, (torch.randn(5, 3), labels, 0.2, need_grad))
    torch.library.opcheck(torch.ops.svp_kernels.channel_std, (torch.randn(3, 4, 5),))
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.svp_kernels.channel_std_backward,
                          (torch.randn(3, 4, dtype=torch.float64), x, x.mean(dim=2), x.std(dim=2)))


@cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_channel_std_kernel(dtype):
    x = 3.0 + torch.randn(4, 5, 37, dtype=torch.float64)  # 37 values: the vector lanes and the tail
    mean, std = torch.ops.svp_kernels.channel_std(x.to(dtype))
    tol = 1e-15 if dtype == torch.float64 else 1e-7
    assert_close(mean, x.mean(dim=2), tol, "mean")
    assert_close(std, x.std(dim=2), tol, "std")
    x[1, 2] = 4.0  # a constant channel: std = 0, gradient 0 (as torch's)
    leaf = x.clone().requires_grad_(True)
    grad_std = torch.randn(4, 5, dtype=torch.float64)
    (expected,) = torch.autograd.grad(leaf.std(dim=2), leaf, grad_std)
    mean, std = torch.ops.svp_kernels.channel_std(x.to(dtype))
    grad = torch.ops.svp_kernels.channel_std_backward(grad_std.to(dtype), x.to(dtype), mean, std)
    assert_close(grad, expected, 1e-13 if dtype == torch.float64 else 1e-6, "grad")
    assert torch.equal(grad[1, 2], torch.zeros(37, dtype=dtype))


@cpu_kernels
def test_cpu_cross_entropy_kernel():
    logits = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    ce, grad = torch.ops.svp_kernels.softmax_cross_entropy(logits, labels, 0.5, True)
    assert_close(ce, F.cross_entropy(logits, labels), 1e-15, "ce")
    assert_close(grad, 0.5 * (torch.softmax(logits, dim=1) - F.one_hot(labels, 4)), 1e-15, "grad")
    ce, grad = torch.ops.svp_kernels.softmax_cross_entropy(logits, torch.tensor([0, 4, 1, -1, 2, 0]), 1.0, True)
    assert torch.isnan(ce) and torch.isnan(grad[[1, 3]]).all() and torch.isfinite(grad[[0, 2, 4, 5]]).all()


def test_no_gradient_work_without_grad(monkeypatch):
    calls = []
    for name in ("similarity_loss_and_grad", "cross_entropy_and_grad"):
        original = getattr(similarity_fused, name)

        def spy(*args, _original=original, **kwargs):
            calls.append(kwargs.get("need_grad", args[-1] if args else None))
            return _original(*args, **kwargs)

        monkeypatch.setattr(similarity_fused, name, spy)
    h_dec, h_sim, target, weight, decoder_bias = make_predsim(9, 6, (4, 3, 3), 3, dtype=torch.float32)
    for t in (h_dec, h_sim, weight, decoder_bias):
        t.requires_grad_(True)
    with torch.no_grad():
        out = sk.predsim_loss(h_dec, h_sim, target, weight, decoder_bias)
        sk.similarity_loss(h_sim, target, num_classes=3)
    assert calls == [False, False, False] and not out.loss.requires_grad
    calls.clear()
    sk.predsim_loss(h_dec.detach(), h_sim.detach(), target, weight.detach(), decoder_bias.detach())
    assert calls == [False, False]
    calls.clear()
    sk.predsim_loss(h_dec, h_sim, target, weight, decoder_bias).loss.backward()
    assert calls == [True, True]


def test_half_precision_inputs_compute_in_float32():
    h_dec, h_sim, target, weight, decoder_bias = make_predsim(10, 6, (5,), 3, dtype=torch.float32)
    half = [t.to(torch.bfloat16) for t in (h_dec, weight, decoder_bias, h_sim)]

    def loss(h_dec, weight, decoder_bias, h_sim):
        return tuple(sk.predsim_loss(h_dec, h_sim, target, weight, decoder_bias))

    out, grads = value_and_grads(loss, half)
    expected, expected_grads = value_and_grads(loss, [t.float() for t in half])
    assert out[0].dtype == torch.float32
    assert_close(out[0], expected[0], 1e-6, "bf16 loss computed in float32")
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.bfloat16
        assert_close(got, want.to(torch.bfloat16), 0.0, "bf16 gradient = float32 gradient rounded")


def test_torch_compile_matches_eager():
    h_dec, h_sim, target, weight, decoder_bias = make_predsim(6, 5, (3, 2, 2), 3, dtype=torch.float32)

    def step(h_dec, weight, decoder_bias, h_sim):
        return sk.predsim_loss(h_dec, h_sim, target, weight, decoder_bias, p=0.2, seed=4).loss

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    tensors = [h_dec, weight, decoder_bias, h_sim]
    eager_loss, eager_grads = value_and_grads(step, tensors)
    compiled_loss, compiled_grads = value_and_grads(compiled, tensors)
    assert_close(compiled_loss, eager_loss, 1e-6, "compiled loss")
    for got, want in zip(compiled_grads, eager_grads):
        assert_close(got, want, 1e-6, "compiled grad")


# ----------------------------------------------------------------------------------------------------
# Bad input: the error names the argument
# ----------------------------------------------------------------------------------------------------

def good_args():
    h_dec, h_sim, target, weight, decoder_bias = make_predsim(4, 3, (2, 2, 2), 5, dtype=torch.float32)
    return dict(h_dec=h_dec, h_sim=h_sim, target=target, decoder_weight=weight, decoder_bias=decoder_bias)


@pytest.mark.parametrize("change,error,match", [
    (dict(h_sim=torch.randn(4, 2, 3)), ValueError, "reduce='std' reduces a 4-D h_sim"),
    (dict(h_sim=torch.randn(4, 2, 1, 1)), ValueError, "H·W ≥ 2 values per channel of h_sim"),
    (dict(reduce="mean"), ValueError, "reduce must be 'std' or 'flatten'"),
    (dict(h_sim=torch.randn(3, 2, 2, 2)), ValueError, "h_dec has 4 rows but h_sim has B = 3"),
    (dict(target=torch.tensor([0, 1, 5, 2])), ValueError, r"target values must be in \[0, 5\)"),
    (dict(target=torch.zeros(4)), TypeError, "target must hold integer class indices"),
    (dict(target=torch.zeros(3, dtype=torch.int64)), ValueError, "target has 3 rows"),
    (dict(decoder_weight=torch.randn(5, 4)), ValueError, r"decoder_weight must have shape \(C, D\) = \(C, 3\)"),
    (dict(decoder_weight=torch.ones(5, 3, dtype=torch.int64)), TypeError, "decoder_weight must be a floating-point"),
    (dict(decoder_bias=torch.randn(4)), ValueError, r"decoder_bias must have shape \(C,\) = \(5,\)"),
    (dict(h_dec=torch.ones(4, 3, dtype=torch.int32)), TypeError, "h_dec must be a floating-point tensor"),
    (dict(beta=1.5), ValueError, r"beta must be in \[0, 1\]"),
    (dict(p=1.0), ValueError, r"p must be in \[0, 1\)"),
    (dict(p=0.1, seed=-1), ValueError, "seed must be in"),
    (dict(backend="triton"), ValueError, "there is no Triton kernel"),
], ids=lambda value: str(value)[:40])
def test_predsim_bad_input(change, error, match):
    args = {**good_args(), **change}
    with pytest.raises(error, match=match):
        sk.predsim_loss(args.pop("h_dec"), args.pop("h_sim"), args.pop("target"), args.pop("decoder_weight"),
                        args.pop("decoder_bias"), **args)


def test_predsim_bad_input_under_compile():
    args = good_args()

    def step(h_sim):
        return sk.predsim_loss(args["h_dec"], h_sim, args["target"], args["decoder_weight"], reduce="std").loss

    with pytest.raises(ValueError, match="reduce='std' reduces a 4-D h_sim"):
        torch.compile(step, backend="eager")(torch.randn(4, 2, 3))


def test_similarity_loss_bad_input():
    with pytest.raises(TypeError, match="num_classes must be an int"):
        sk.similarity_loss(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="target has 3 rows but h has B = 4"):
        sk.similarity_loss(torch.randn(4, 3), torch.randn(3, 5))
    with pytest.raises(ValueError, match="reduce='std' reduces a 4-D target"):
        sk.similarity_loss(torch.randn(4, 3), torch.randn(4, 5, 2))
