"""The host side of a triton-backend call with its kernels compiled but never launched, on any machine.

On a GPU each fused_local_loss call spends host time in our launchers, torch.library/autograd glue and
Triton's launcher before its kernels are queued; at small shapes that time, not the kernels, sets the speed
(bench/NOTES.md, "Host cost of the triton backend"). ``stubbed_launches`` replaces ``JITFunction.run`` by a
recorder, so that all but Triton's own launcher runs on CPU tensors without a device (the kernels must be JIT
functions: TRITON_INTERPRET unset). Used by bench/host_cost.py and tests/test_triton_host_cost.py.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, List

import torch


@contextlib.contextmanager
def stubbed_launches() -> Iterator[List[str]]:
    """Within it, a Triton JIT kernel launch records the kernel's name (in the list yielded) and runs nothing."""
    from triton.runtime.jit import JITFunction

    launched: List[str] = []
    original = JITFunction.__dict__["run"]

    def run(kernel, *args, grid, warmup=False, **kwargs):
        if not warmup:
            launched.append(kernel.__name__)

    JITFunction.run = run
    try:
        yield launched
    finally:
        JITFunction.run = original


def inputs(B: int, D: int, C: int, with_prev: bool, generator_seed: int = 0):
    """(h, R, target, v_prev, seed tensor) on CPU: h (B, D) requiring grad, a dense R (C, D)."""
    generator = torch.Generator().manual_seed(generator_seed)
    h = torch.randn(B, D, generator=generator).requires_grad_(True)
    weight = torch.randn(C, D, generator=generator) / D ** 0.5
    target = torch.randint(0, C, (B,), generator=generator)
    v_prev = torch.randn(B, C, generator=generator) if with_prev else None
    return h, weight, target, v_prev, torch.tensor(7, dtype=torch.int64)


def step(h, weight, target, v_prev, seed, p: float = 0.1) -> None:
    """One forward + backward through the triton backend's eager node, as fused_local_loss runs it
    (h.grad reset first: the gradient is handed over, not added, so no B×D add runs on the host)."""
    from svp_kernels.backends import triton as triton_backend

    loss, _, _, _ = triton_backend.fused_local_loss(h, weight, weight.shape[0], 0, 1.0, p, seed, target, v_prev, 1.0,
                                                    True, False, False)
    h.grad = None
    loss.backward()


def python_calls(run) -> int:
    """How many Python functions `run()` calls (sys.setprofile's "call" events): a count that, unlike a
    timing, does not depend on the machine's load."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(previous)
    return calls - 1  # run itself
