"""pytest-benchmark microbenchmarks of fused_local_loss forward+backward on CPU.

    pytest bench/ --benchmark-only                      # all available CPU backends, ~1 minute
    pytest bench/ --benchmark-only -k cpu --benchmark-compare

Small-to-moderate shapes (the full shape set, torch.compile and the memory measurement are bench/local_loss.py's
job). Inputs and the fused forward+backward call come from svp_kernels.testing, the same helpers the tests use;
the baseline ``eager`` is the plain PyTorch formulation of bench/baselines.py. These live under bench/,
outside `testpaths`, so `pytest tests/` never collects them; without pytest-benchmark the module is
skipped.
"""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from svp_kernels.testing import Case, cpu_backends, make_inputs, run  # noqa: E402

import baselines  # noqa: E402

THREADS = 2
# (B, D, C): the small end of the CPU benchmark shapes, plus a B > D case (batch-space vs feature-space epilogue).
SHAPES = [(64, 1024, 10), (256, 4096, 10), (1024, 1024, 10), (256, 1024, 100)]
# Triton runs on CPU only in its interpreter (a correctness tool, far too slow to time); the reference
# backend is the oracle, not a baseline.
BACKENDS = [name for name in cpu_backends() if name not in ("triton", "reference")]


def eager_step(case, h, target, v_prev, projection):
    """One forward+backward of the plain formulation; returns (loss, dh)."""
    leaf = h.detach().requires_grad_(True)
    if isinstance(projection, torch.Tensor):
        loss = baselines.local_loss(leaf, target, v_prev, projection, case.p, case.alignment_weight)
    else:
        loss = baselines.implicit_local_loss(leaf, target, v_prev, case.C, projection.seed, case.p,
                                             case.alignment_weight)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.fixture(autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("projection", ["dense", "implicit"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-D{}-C{}".format(*s))
@pytest.mark.parametrize("backend", [*BACKENDS, "eager"])
def test_fused_local_loss_forward_backward(benchmark, backend, shape, projection):
    B, D, C = shape
    case = Case(B, D, C, C_prev=C, projection=projection, p=0.1)
    h, target, v_prev, proj = make_inputs(case)
    benchmark.group = f"fused_local_loss B={B} D={D} C={C} {projection}"
    benchmark.extra_info.update(B=B, D=D, C=C, p=case.p, projection=projection, threads=THREADS)
    if backend == "eager":
        loss, dh = benchmark.pedantic(eager_step, args=(case, h, target, v_prev, proj), rounds=15, warmup_rounds=2,
                                      iterations=1)
    else:
        loss, _, _, _, dh = benchmark.pedantic(run, args=(case, h, target, v_prev, proj, backend), rounds=15,
                                               warmup_rounds=2, iterations=1)
    assert torch.isfinite(loss) and dh.shape == h.shape


@pytest.mark.parametrize("shape", [(1, 65536, 10)], ids=lambda s: "B{}-D{}-C{}".format(*s))
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_generation(benchmark, backend, shape):
    """Projection at B = 1: the cost is the Philox mask (C·D evaluations), not the GEMM."""
    import svp_kernels as sk

    B, D, C = shape
    h = torch.randn(B, D)
    weight = torch.randn(C, D) / D**0.5
    benchmark.group = f"dropout_projection B={B} D={D} C={C} (Philox-bound)"
    v = benchmark.pedantic(sk.dropout_projection, args=(h, weight), kwargs=dict(p=0.1, seed=7, backend=backend),
                           rounds=15, warmup_rounds=2, iterations=1)
    assert v.shape == (B, C)
