"""The launch budget of one fused_local_loss forward + backward on the cuda backend, counted on CPU.

Two halves, each counted where it runs without a GPU:
- the torch ops of the call: the public API and the C++ autograd node (csrc/autograd.cpp) are the same code
  on the cpu and cuda backends, so one forward + backward on CPU tensors under a TorchDispatchMode records
  every op the cuda call would dispatch (the dropout seed's fill, autograd's ones_like, the gradient scaling,
  the svp_kernels ops themselves);
- the kernels inside each svp_kernels op: replayed with the same arguments through the CUDA launchers under
  the CPU emulator (tools/emulate_cuda), which counts the kernel launches, with the SM count of an H100 (132),
  so the launch plans are those a GPU would take.

Every other op counts as one launch unless it only allocates or views memory (NO_LAUNCH). The GEMM path's ops
count their parts: the R̃ kernel (emulated), one cuBLAS GEMM (cuBLAS may split K into a second kernel: the
real device count is tools/gpu_check.py's job) and the dtype conversion of grad_v where there is one.
"""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import svp_kernels as sk

from emulated_cuda import emulator

pytestmark = pytest.mark.skipif(not sk.backends.is_available("cpu"), reason="the cpu backend did not load")

# Issue 21 asks for <= 4 on cuda. Measured on the step below: 15 before issue 21's changes (the seed's fill, 2
# forward kernels (split-K), 6 epilogue kernels, autograd's ones_like, 3 zero-filled gradients of ce, alignment and
# v, the gradient scaling, the backward kernel); 7 now (fill, 1 + 3 + 1 kernels, ones_like). LAUNCH_BUDGET is
# today's count, so any added launch fails here.
LAUNCH_BUDGET = {"fused": 7, "gemm": 10}
H100_SMS = "132"
# aten ops that allocate, view or alias memory and launch no kernel.
NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "view", "_unsafe_view",
             "t", "alias", "as_strided", "expand", "transpose", "permute", "unsqueeze", "squeeze", "lift_fresh",
             "_reshape_alias", "select", "slice", "set_", "resize_"}


class Recorder(TorchDispatchMode):
    """Records (op, args) of every op dispatched while active (ops inside an op's kernel are not seen)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def _seed(tensor) -> int:
    return int(tensor)


def svp_launches(emu, name: str, args) -> int:
    """Kernel launches of svp_kernels op `name` with these (CPU) arguments on the emulated CUDA launchers."""
    emu.take_launches_run()
    if name == "projection_forward":
        h, weight, C, proj_seed, std, p, seed = args
        emu.projection_forward(h, weight, C, proj_seed, std, p, _seed(seed))
    elif name == "projection_backward":
        grad_v, weight, D, proj_seed, std, p, seed, dtype, *grad_scale = args
        emu.projection_backward(grad_v.contiguous(), weight, D, proj_seed, std, p, _seed(seed), dtype, *grad_scale)
    elif name == "loss_epilogue":
        v, target, v_prev, weight, mean, center, *alignment = args  # the alignment string unless the default
        emu.loss_epilogue(v, target, v_prev, weight, mean, center, *alignment)
    elif name == "dropped_projection":
        weight, C, D, proj_seed, std, p, seed, dtype = args
        emu.dropped_projection(weight, C, D, proj_seed, std, p, _seed(seed), dtype)
    elif name in ("projection_forward_gemm", "projection_backward_gemm"):
        forward = name == "projection_forward_gemm"
        operand, weight = args[0], args[1]
        C, D = (args[2], operand.shape[1]) if forward else (operand.shape[1], args[2])
        dtype = operand.dtype if forward else args[7]
        writes_r = weight is None or args[5] > 0  # a dense R with p = 0 is R̃ itself
        r = svp_launches(emu, "dropped_projection", (weight, C, D, *args[3:7], dtype)) if writes_r else 0
        scales = not forward and len(args) > 8 and args[8] is not None
        converts = not forward and operand.dtype != dtype
        return r + 1 + int(scales) + int(converts)  # + the cuBLAS GEMM (+ grad_scale · grad_v, + to h's dtype)
    else:
        raise AssertionError(f"no launch count for svp_kernels::{name}")
    return emu.take_launches_run()


def count_launches(step) -> tuple[int, list]:
    """(launches, [(op, launches)]) of `step()` as the cuda backend would run it (module docstring)."""
    emu = emulator()
    recorder = Recorder()
    with recorder:
        step()
    previous = os.environ.get("SVP_EMU_SMS")
    os.environ["SVP_EMU_SMS"] = H100_SMS
    try:
        breakdown = []
        for func, args in recorder.calls:
            namespace, name = func.namespace, func._schema.name.split("::")[-1]
            if namespace == "svp_kernels":
                breakdown.append((name, svp_launches(emu, name, args)))
            elif name not in NO_LAUNCH:
                breakdown.append((name, 1))
    finally:
        if previous is None:
            del os.environ["SVP_EMU_SMS"]
        else:
            os.environ["SVP_EMU_SMS"] = previous
    return sum(count for _, count in breakdown), breakdown


def local_loss_step(path: str, extra_op: bool = False, alignment: str = "cosine_gram", with_v_prev: bool = True):
    """One SVP block's local loss, forward + backward: (B, D, C, C') = (64, 1024, 10, 10), a dense R with dropout
    p = 0.1 and an int seed, the alignment term in feature space (C + C' < B)."""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(64, 1024, generator=generator).requires_grad_(True)
    target = torch.randint(0, 10, (64,), generator=generator)
    v_prev = torch.randn(64, 10, generator=generator)
    weight = torch.randn(10, 1024, generator=generator) / 32

    def step():
        out = sk.fused_local_loss(h, target, v_prev if with_v_prev else None, projection=weight, p=0.1, seed=7,
                                  backend="cpu", projection_path=path, alignment=alignment)
        loss = out.loss * 1.0 if extra_op else out.loss
        loss.backward()

    return step


@pytest.mark.parametrize("path", ["fused", "gemm"])
def test_launch_budget(path):
    launches, breakdown = count_launches(local_loss_step(path))
    print(f"{path}: {launches} launches: {breakdown}")
    names = [name for name, _ in breakdown]
    # Not vacuous: the three svp_kernels ops of the call were seen and replayed, each launching kernels.
    svp_ops = {"fused": ("projection_forward", "loss_epilogue", "projection_backward"),
               "gemm": ("projection_forward_gemm", "loss_epilogue", "projection_backward_gemm")}[path]
    for op in svp_ops:
        assert op in names and all(count >= 1 for name, count in breakdown if name == op), breakdown
    assert launches <= LAUNCH_BUDGET[path], f"{launches} launches > budget {LAUNCH_BUDGET[path]}: {breakdown}"


def test_launch_count_sees_an_extra_op():
    """One more torch op in the step (a multiplication of the loss) is one more launch."""
    launches, _ = count_launches(local_loss_step("fused"))
    with_extra, breakdown = count_launches(local_loss_step("fused", extra_op=True))
    assert with_extra == launches + 2, breakdown  # the mul forward, and its backward's mul


def test_bhattacharyya_adds_no_launch():
    """alignment="bhattacharyya" runs in the epilogue's row kernel and its scalars' kernel: the launches of the
    same call without v_prev, fewer than the cosine-Gram term's (docs/backends.md)."""
    launches, breakdown = count_launches(local_loss_step("fused", alignment="bhattacharyya"))
    without, _ = count_launches(local_loss_step("fused", alignment="bhattacharyya", with_v_prev=False))
    cosine, _ = count_launches(local_loss_step("fused"))
    assert dict(breakdown)["loss_epilogue"] == 2, breakdown
    assert launches == without < cosine, (launches, without, cosine, breakdown)
