"""torch.compile and CUDA graphs over the nn modules: dropout seeds are tensors drawn from the modules' seed
streams, so a compiled (fullgraph, dynamic, reduce-overhead) or captured training step draws the same fresh
mask sequence as eager from the same module state, without graph breaks."""

import copy

import pytest
import torch

import svp_kernels as sk
from svp_kernels.projection import _stream_seed_tensor, stream_seed
from svp_kernels.testing import cpu_backends

BATCHES = (8, 8, 5)  # two equal batches (same inputs: fresh masks), then a smaller one (a new shape)
D, HIDDEN, C = 12, 10, 4


class TinyModel(torch.nn.Module):
    """Linear → ReLU → LocalLoss: the shape of one SVP block."""

    def __init__(self, backend: str):
        super().__init__()
        self.linear = torch.nn.Linear(D, HIDDEN)
        self.local_loss = sk.nn.LocalLoss(HIDDEN, C, p=0.3, alignment_weight=0.5, backend=backend, seed=3,
                                          dropout_seed=2**62 + 5)

    def forward(self, x, target, v_prev):
        return self.local_loss(torch.relu(self.linear(x)), target, v_prev)


def _batches():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, D, generator=generator)
    target = torch.randint(0, C, (8,), generator=generator)
    v_prev = torch.randn(8, 3, generator=generator)
    return [(x[:B], target[:B], v_prev[:B]) for B in BATCHES]  # the first two steps see identical inputs


def _train_steps(model, step):
    """(loss, v, weight grad) per batch; the grads are read after a backward outside the compiled step."""
    results = []
    for x, target, v_prev in _batches():
        model.zero_grad()
        out = step(x, target, v_prev)
        out.loss.backward()
        results.append((out.loss.detach(), out.v, model.linear.weight.grad.clone()))
    return results


def _compile_cases():
    """Every mode with the C++ kernels; dynamic shapes (the most general trace) with the other backends.
    Triton's interpreter kernels run as opaque custom ops, so they compile like the C++ ones."""
    modes = {"default": dict(), "dynamic": dict(dynamic=True), "reduce-overhead": dict(mode="reduce-overhead")}
    cases = [pytest.param(backend, modes[mode], id=f"{backend}-{mode}")
             for backend, mode in (("cpu", "default"), ("cpu", "dynamic"), ("cpu", "reduce-overhead"),
                                   ("triton", "dynamic"), ("reference", "dynamic"))]
    return [case for case in cases if case.values[0] in cpu_backends()]


@pytest.mark.parametrize("backend,options", _compile_cases())
def test_compiled_training_steps_match_eager(backend, options):
    """Zero graph breaks; the same masks (v), losses and gradients as eager, step by step, bit for bit
    (the reference backend's float reductions are Inductor's own there: equal to rounding); fresh masks."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(1)
    eager_model = TinyModel(backend)
    compiled_model = copy.deepcopy(eager_model)
    eager = _train_steps(eager_model, eager_model)
    compiled = _train_steps(compiled_model, torch.compile(compiled_model, fullgraph=True, **options))

    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    for step, (want, got) in enumerate(zip(eager, compiled)):
        for name, a, b in zip(("loss", "v", "grad"), want, got):
            if backend == "reference" and name != "v":
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"step {step}: compiled {name}")
            else:
                assert torch.equal(a, b), f"step {step}: compiled {name} differs from eager"
    assert not torch.equal(eager[0][1], eager[1][1]), "identical inputs, yet the same mask twice"
    assert torch.equal(compiled_model.local_loss.seed_state, eager_model.local_loss.seed_state)
    assert compiled_model.local_loss.seed_state.tolist() == [2**62 + 5, len(BATCHES)]


def test_dynamic_scalars_trace():
    """fused_local_loss with p, alignment_weight as compiled-function arguments (SymFloats under dynamic=True)."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(2)
    h, R = torch.randn(7, 9, generator=generator), torch.randn(5, 9, generator=generator)
    target, v_prev = torch.randint(0, 5, (7,), generator=generator), torch.randn(7, 3, generator=generator)

    def loss(h, p, weight, seed):
        return sk.fused_local_loss(h, target[:h.shape[0]], v_prev[:h.shape[0]], projection=R, p=p, seed=seed,
                                   alignment_weight=weight, backend="cpu").loss

    compiled = torch.compile(loss, dynamic=True, fullgraph=True)
    for rows, p, weight, seed in ((7, 0.1, 0.5, 3), (6, 0.2, 0.25, 4), (6, 0.2, 0.25, torch.tensor(4))):
        assert torch.equal(compiled(h[:rows], p, weight, seed), loss(h[:rows], p, weight, seed))
    # seed=None draws inside the graph (the compiled RNG): a fresh mask per call, no graph break
    assert not torch.equal(compiled(h, 0.5, 0.0, None), compiled(h, 0.5, 0.0, None))


def test_stream_seed_golden_and_forms():
    """stream_seed(0, 0) = SplitMix64's first output from state 0, 0xE220A8397B1DCDAF, top bit cleared; ints
    and tensors agree; every step of a stream differs."""
    assert stream_seed(0, 0).item() == 0xE220A8397B1DCDAF & (2**63 - 1)
    assert stream_seed(0, 1).item() == 0x6E789E6AA1B965F4 & (2**63 - 1)
    for base, step in ((0, 0), (5, 1), (2**63 - 1, 2**40 + 7), (2**31 + 1, 2**32)):
        want = stream_seed(base, step)
        assert want.dtype == torch.int64 and want.dim() == 0 and 0 <= want.item() < 2**63
        assert torch.equal(stream_seed(torch.tensor(base), torch.tensor(step)), want)
        assert torch.equal(stream_seed(base, torch.tensor(step)), want)
        # the tensor-op form (device tensors, compiled graphs) equals the host form eager CPU calls use
        assert torch.equal(_stream_seed_tensor(torch.tensor(base), torch.tensor(step)), want)
    seeds = {stream_seed(7, step).item() for step in range(64)}
    assert len(seeds) == 64
    with pytest.raises(TypeError, match="step"):
        stream_seed(1, torch.tensor(1.0))
    with pytest.raises(ValueError, match="base_seed"):
        stream_seed(-1, 0)


@pytest.mark.cuda
def test_cuda_graph_replays_draw_fresh_masks():
    """A captured forward + backward of LocalLoss: each replay advances the seed stream on the device and
    gives what eager gives from the same module state."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    layer = sk.nn.LocalLoss(64, 10, p=0.25, alignment_weight=0.5, dropout_seed=11, device=device)
    eager_layer = copy.deepcopy(layer)
    h = torch.randn(32, 64, device=device, requires_grad=True)
    target = torch.randint(0, 10, (32,), device=device)
    v_prev = torch.randn(32, 6, device=device)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph (allocator, kernels), then restore the state
        for _ in range(2):
            h.grad = None
            layer(h, target, v_prev).loss.backward()
    torch.cuda.current_stream().wait_stream(stream)
    layer.seed_state.copy_(eager_layer.seed_state)

    graph = torch.cuda.CUDAGraph()
    h.grad = None
    with torch.cuda.graph(graph):
        out = layer(h, target, v_prev)
        out.loss.backward()
    assert torch.equal(layer.seed_state, eager_layer.seed_state), "capture records the step increment, runs none"

    replays = []
    for _ in range(3):
        graph.replay()
        replays.append((out.loss.detach().clone(), out.v.clone(), h.grad.clone()))
    torch.cuda.synchronize()
    assert layer.seed_state.tolist() == [11, 3]
    for step, (loss, v, grad) in enumerate(replays):
        h.grad = None
        want = eager_layer(h, target, v_prev)
        want.loss.backward()
        assert torch.equal(loss, want.loss.detach()) and torch.equal(v, want.v), f"replay {step} forward"
        assert torch.equal(grad, h.grad), f"replay {step} backward"
    assert not torch.equal(replays[0][1], replays[1][1]), "each replay must draw a fresh mask"
