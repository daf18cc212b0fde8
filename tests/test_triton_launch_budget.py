"""The launch budget of one fused_local_loss forward + backward on the triton backend (docs/backends.md).

At the small shapes of the benchmark a call's fixed cost, one launch of a few microseconds per kernel and per
torch op, outweighs the kernels' own work, so the number of launches is held to a budget: Triton launches
plus torch ops on the device (svp_kernels/testing/launches.py), counted here on CPU under the interpreter.
The projection is split over D as on an H100 (132 SMs), so the split's reduction is counted too.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # conftest.py does the same; this module may be run on its own
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import svp_kernels as sk  # noqa: E402
from svp_kernels.backends import triton as triton_backend  # noqa: E402

from svp_kernels.testing.launches import LaunchCounter  # noqa: E402

if not triton_backend.is_available():
    pytest.skip(f"the triton backend is unavailable: {triton_backend.unavailable_reason()}", allow_module_level=True)

ops = triton_backend.load_ops()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BUDGET = 8  # launches + torch ops of one forward + backward
H100_SMS = 132

CASES = {
    # name: B, D, C, C', projection, p  (feature space: C + C' < B; batch space otherwise)
    "dense-dropout-feature": (40, 100, 5, 3, "dense", 0.1),
    "implicit-dropout-batch": (8, 70, 10, 6, "implicit", 0.2),
    "identity": (12, 6, 6, 4, "identity", 0.0),
    "dense-no-v_prev": (9, 50, 7, None, "dense", 0.0),
}
# Today's counts (bench/NOTES.md; 39, 24, 34 and 17 before the epilogue's three launches and the triton nodes):
# a change in either direction is a decision to record there.
EXPECTED = {"dense-dropout-feature": 7, "implicit-dropout-batch": 7, "identity": 6, "dense-no-v_prev": 6}


def _inputs(B, D, C, C_prev, projection):
    generator = torch.Generator().manual_seed(B * 1000 + D)
    h = torch.randn(B, D, generator=generator).to(DEVICE).requires_grad_(True)
    target = torch.randint(0, C, (B,), generator=generator).to(DEVICE)
    v_prev = torch.randn(B, C_prev, generator=generator).to(DEVICE) if C_prev else None
    if projection == "dense":
        projection = (torch.randn(C, D, generator=generator) / D**0.5).to(DEVICE)
    elif projection == "implicit":
        projection = sk.ImplicitProjection(C, seed=7)
    else:
        projection = None
    return h, target, v_prev, projection


def count_forward_backward(monkeypatch, B, D, C, C_prev, projection, p, alignment="cosine_gram"):
    """The LaunchCounter of one fused_local_loss forward + backward (an int seed, as users pass it); center=True
    with the cosine-Gram term."""
    monkeypatch.setattr(ops, "_sm_count", lambda device: H100_SMS)
    # Outside the eager nodes (ops.direct_launches) the launchers wrap each kernel for torch.compile
    # (wrap_triton), whose higher-order op may not dispatch under a user TorchDispatchMode: count them bare.
    monkeypatch.setattr(ops, "_launch", lambda kernel: kernel)
    h, target, v_prev, projection = _inputs(B, D, C, C_prev, projection)
    with LaunchCounter() as counter:
        out = sk.fused_local_loss(h, target, v_prev, projection=projection, p=p, seed=3,
                                  center=alignment == "cosine_gram", backend="triton", alignment=alignment)
        out.loss.backward()
    return counter


@pytest.mark.parametrize("case", CASES)
def test_fused_local_loss_forward_backward_launch_budget(monkeypatch, case):
    B, D, C, C_prev, projection, p = CASES[case]
    counter = count_forward_backward(monkeypatch, B, D, C, C_prev, projection, p)
    if projection != "identity":  # the counter sees the call's kernels: it cannot pass by seeing nothing
        assert {"projection_forward_kernel", "projection_backward_kernel"} <= set(counter.launches), counter.report()
    assert counter.count <= BUDGET, counter.report()
    assert counter.count == EXPECTED[case], counter.report()


def test_the_split_reduction_is_counted(monkeypatch):
    """With an H100's SM count the forward splits D, and its fixed-order reduction is part of the count."""
    monkeypatch.setattr(ops, "_sm_count", lambda device: H100_SMS)
    monkeypatch.setattr(ops, "_launch", lambda kernel: kernel)
    h, seed = torch.randn(40, 100).to(DEVICE), torch.zeros((), dtype=torch.int64, device=DEVICE)
    with LaunchCounter() as counter:
        ops.projection_forward(h, None, 5, 3, 0.1, 0.0, seed)
    assert counter.launches == ["projection_forward_kernel", "reduce_splits_kernel"], counter.report()
    assert counter.count == 2, counter.report()


def test_counter_counts_launches_and_ops_but_not_allocations_or_views(monkeypatch):
    monkeypatch.setattr(ops, "_launch", lambda kernel: kernel)
    x = torch.arange(8, dtype=torch.int64, device=DEVICE)
    with LaunchCounter() as counter:
        torch.empty(3, device=DEVICE)
        x.view(2, 4).t()
        y = x * 2  # one op
        ops.philox_words(5, y)  # one launch; the interpreter's copies inside it are the launch's
    assert counter.launches == ["philox_words_kernel"], counter.report()
    assert counter.glue == ["aten::mul"], counter.report()
    assert counter.count == 2
    assert "aten::empty" in counter.free and "aten::t" in counter.free
    with LaunchCounter() as counter:  # nothing leaks from one counter to the next
        pass
    assert counter.count == 0 and not counter.events


@pytest.mark.parametrize("case", ["dense-dropout-feature", "identity"])
def test_bhattacharyya_adds_no_launch(monkeypatch, case):
    """alignment="bhattacharyya" runs in the row kernel and the scalars' kernel: the launches of the same call
    without v_prev (docs/design.md §2), no more than the cosine-Gram term's."""
    B, D, C, _, projection, p = CASES[case]
    counter = count_forward_backward(monkeypatch, B, D, C, C, projection, p, alignment="bhattacharyya")
    without = count_forward_backward(monkeypatch, B, D, C, None, projection, p, alignment="bhattacharyya")
    assert {"rows_kernel", "gradient_kernel"} <= set(counter.launches), counter.report()
    assert counter.launches == without.launches and counter.count == without.count, counter.report()
    assert counter.count <= EXPECTED[case], counter.report()
