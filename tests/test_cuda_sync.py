"""fused_local_loss forward + backward on CUDA makes no host synchronisation (cuda and triton backends).

A host sync (``.item()``, ``int(tensor)``, a blocking copy) inside the loss stalls the CPU until the GPU
drains and keeps the SVP step out of a CUDA graph. Each case runs once as a warm-up (JIT compilation,
lazy module loading, the caching allocator's first blocks), then again under
``torch.cuda.set_sync_debug_mode("error")``, which turns every synchronising CUDA call torch makes into
a RuntimeError. Both alignment paths (feature space: C + C' < B; batch space otherwise), dense and implicit
R, float32 and bfloat16, an explicit seed and seed=None (drawn from torch's CPU generator: no device sync);
and the step traced by torch.compile(fullgraph=True).
"""

import pytest
import torch

import svp_kernels as sk
from svp_kernels.testing import Case, assert_close, make_inputs

pytestmark = pytest.mark.cuda

CASES = [
    Case(64, 96, 10, 10, p=0.1),                                    # feature-space alignment
    Case(8, 40, 20, 12, projection="implicit", p=0.2, center=True),  # batch-space alignment
    Case(64, 96, 10, 10, projection="implicit", reduction="sum"),
    Case(8, 40, 20, 12, p=0.3),
]


def forward_backward(case, h, target, v_prev, projection, backend, seed):
    h.grad = None
    out = sk.fused_local_loss(h, target, v_prev, projection=projection, p=case.p, seed=seed,
                              alignment_weight=case.alignment_weight, reduction=case.reduction,
                              center=case.center, backend=backend)
    out.loss.backward()
    return out


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_local_loss_has_no_host_sync(case, dtype, backend):
    if not sk.backends.is_available(backend):
        pytest.skip(f"backend {backend!r} is not available here")
    h, target, v_prev, projection = make_inputs(case, dtype=dtype, device="cuda")
    for seed in (7, None):
        forward_backward(case, h, target, v_prev, projection, backend, seed)  # warm-up
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [(forward_backward(case, h, target, v_prev, projection, backend, seed), h.grad)
                   for seed in (7, None)]
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    for out, grad in results:  # the synchronised steps computed something
        assert torch.isfinite(out.loss).item() and grad is not None and torch.isfinite(grad.float()).all().item()


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compiled_step_matches_eager_without_host_sync(backend):
    """torch.compile(fullgraph=True) traces the ops with their fake and autograd rules (aot_eager: the graph
    is checked, not compiled); the traced step runs without a host sync and gives eager's numbers."""
    if not sk.backends.is_available(backend):
        pytest.skip(f"backend {backend!r} is not available here")
    torch._dynamo.reset()
    case = CASES[1]
    h, target, v_prev, projection = make_inputs(case, device="cuda")

    def step(h):
        return sk.fused_local_loss(h, target, v_prev, projection=projection, p=case.p, seed=5,
                                   alignment_weight=case.alignment_weight, reduction=case.reduction,
                                   center=case.center, backend=backend).loss

    eager = step(h)
    (eager_grad,) = torch.autograd.grad(eager, h)
    compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.autograd.grad(compiled_step(h), h)  # warm-up: tracing
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        compiled = compiled_step(h)
        (compiled_grad,) = torch.autograd.grad(compiled, h)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert_close(compiled, eager, 1e-6, "compiled loss")
    assert_close(compiled_grad, eager_grad, 1e-6, "compiled dh")
