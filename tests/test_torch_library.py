"""The compiled ops under torch.library: opcheck on every op, torch.compile(fullgraph=True) without breaks."""

import os

import pytest
import torch

import svp_kernels as sk
from svp_kernels.testing import Case, assert_close, make_inputs, run

from cases import OP_SAMPLE_COUNT, op_samples

needs_extension = pytest.mark.skipif(not sk._ops.extension_loaded(), reason="compiled extension not built")


def test_extension_is_built():
    """CI builds svp_kernels._C; an install without it must be deliberate (SVP_KERNELS_SKIP_EXT=1)."""
    assert sk._ops.extension_loaded() or os.environ.get("SVP_KERNELS_SKIP_EXT") == "1", sk._ops.EXTENSION_ERROR


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index", range(OP_SAMPLE_COUNT))
def test_opcheck(index, dtype):
    op, args = op_samples(dtype)[index]
    torch.library.opcheck(op, args)


@needs_extension
@pytest.mark.parametrize("backward_inside", [False, True])
def test_torch_compile_fullgraph_matches_eager(backward_inside):
    """Forward (and, with trace_autograd_ops, backward too) in one graph: no breaks, eager's numbers."""
    torch._dynamo.reset()
    case = Case(9, 14, 5, 4, p=0.2, center=True)
    h, target, v_prev, projection = make_inputs(case)

    def step(h, target, v_prev, projection):
        out = sk.fused_local_loss(h, target, v_prev, projection=projection, p=0.2, seed=7, center=True,
                                  alignment_weight=case.alignment_weight, backend="cpu")
        if backward_inside:
            out.loss.backward()
            return out.loss.detach(), out.v
        return out.loss, out.v

    eager_loss, eager_v = step(h, target, v_prev, projection)
    if not backward_inside:
        eager_loss.backward()
    eager_grad, h.grad = h.grad.clone(), None
    with torch._dynamo.config.patch(trace_autograd_ops=backward_inside):
        compiled_loss, compiled_v = torch.compile(step, fullgraph=True)(h, target, v_prev, projection)
    if not backward_inside:
        compiled_loss.backward()
    assert_close(compiled_loss, eager_loss, 1e-6, "compiled loss")
    assert_close(compiled_v, eager_v, 1e-6, "compiled v")
    assert_close(h.grad, eager_grad, 1e-6, "compiled dh")


@needs_extension
def test_torch_compile_implicit_projection():
    torch._dynamo.reset()
    case = Case(6, 10, 4, 3, projection="implicit", p=0.1)
    h, target, v_prev, projection = make_inputs(case)
    expected = run(case, h, target, v_prev, projection, "cpu")

    @torch.compile(fullgraph=True)
    def loss_of(h):
        return sk.fused_local_loss(h, target, v_prev, projection=projection, p=0.1, seed=42,
                                   alignment_weight=case.alignment_weight, backend="cpu").loss

    h = h.detach().requires_grad_(True)
    loss = loss_of(h)
    loss.backward()
    assert_close(loss, expected[0], 1e-6, "compiled implicit loss")
    assert_close(h.grad, expected[4], 1e-6, "compiled implicit dh")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_seed_tensor_equals_int_seed(backend):
    """A 0-dim int64 seed tensor gives the int's mask bit for bit; bad seed tensors name the argument."""
    case = Case(6, 11, 5, 3, p=0.4)
    h, target, v_prev, projection = make_inputs(case)
    for seed in (0, 2**31 + 7, 2**63 - 1):
        want = run(case, h, target, v_prev, projection, backend, seed=seed)
        got = run(case, h, target, v_prev, projection, backend, seed=torch.tensor(seed))
        for a, b in zip(want, got):
            assert torch.equal(a, b)
    for bad in (torch.tensor(3, dtype=torch.int32), torch.tensor([3]), torch.tensor(3.0)):
        with pytest.raises(TypeError, match="seed must be .* 0-dim int64 tensor"):
            sk.dropout_projection(h, projection, p=0.4, seed=bad, backend=backend)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        sk.dropout_projection(h, projection, p=0.4, seed=torch.tensor(-1), backend=backend)
