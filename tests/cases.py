"""Shared test inputs and the float64 ground truth (also imported by bench/ as its baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import svp_kernels as sk
from svp_kernels import backends


@dataclass(frozen=True)
class Case:
    """One local-loss problem: h (B, D), target (B,) in [0, C), v_prev (B, C') or None."""

    B: int
    D: int
    C: int
    C_prev: Optional[int] = None
    projection: str = "dense"  # "dense" | "implicit" | "identity"
    p: float = 0.0
    reduction: str = "mean"
    center: bool = False
    alignment_weight: float = 0.7

    def __str__(self):
        return (f"B{self.B}-D{self.D}-C{self.C}-Cp{self.C_prev}-{self.projection}-p{self.p}-{self.reduction}"
                f"{'-center' if self.center else ''}")


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed: int = 0):
    """(h, target, v_prev, projection) for `case`; h requires grad."""
    generator = torch.Generator().manual_seed(seed)
    D = case.C if case.projection == "identity" else case.D
    h = torch.randn(case.B, D, generator=generator, dtype=torch.float64)
    target = torch.randint(0, case.C, (case.B,), generator=generator)
    v_prev = None
    if case.C_prev is not None:
        v_prev = torch.randn(case.B, case.C_prev, generator=generator, dtype=torch.float64).to(dtype).to(device)
    if case.projection == "dense":
        projection = (torch.randn(case.C, D, generator=generator, dtype=torch.float64) / D**0.5).to(dtype).to(device)
    elif case.projection == "implicit":
        projection = sk.ImplicitProjection(case.C, seed=1000 + seed)
    else:
        projection = None
    h = h.to(dtype).to(device).requires_grad_(True)
    return h, target.to(device), v_prev, projection


def as_float64(value):
    return value.detach().double().requires_grad_(value.requires_grad) if isinstance(value, torch.Tensor) else value


def run(case: Case, h, target, v_prev, projection, backend: str, seed: int = 42):
    """(loss, ce, alignment, v, dh) of fused_local_loss forward + backward on `backend`."""
    h = h.detach().requires_grad_(True)
    out = sk.fused_local_loss(h, target, v_prev, projection=projection, p=case.p, seed=seed,
                              alignment_weight=case.alignment_weight, reduction=case.reduction,
                              center=case.center, backend=backend)
    out.loss.backward()
    return out.loss.detach(), out.ce, out.alignment, out.v, h.grad


def ground_truth(case: Case, h, target, v_prev, projection, seed: int = 42):
    """The float64 reference result for the same inputs (the oracle)."""
    return run(case, as_float64(h), target, as_float64(v_prev), as_float64(projection), "reference", seed)


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors in this process (triton only under TRITON_INTERPRET=1)."""
    cpu = torch.device("cpu")
    return [name for name in backends.available_backends() if backends.load(name).supports(cpu, torch.float32)]


def op_samples(dtype=torch.float64, device="cpu"):
    """(op, args) for torch.library.opcheck: every svp_kernels op, dense and implicit, each optional input."""
    generator = torch.Generator().manual_seed(0)
    B, D, C = 5, 7, 3

    def seed(value):  # the ops' dropout seed: a 0-dim int64 tensor on the op's device
        return torch.tensor(value, dtype=torch.int64, device=device)

    def rand(*shape, grad=False):
        return torch.randn(*shape, dtype=dtype, generator=generator).to(device).requires_grad_(grad)

    h, weight = rand(B, D, grad=True), rand(C, D)
    target = torch.randint(0, C, (B,), generator=generator).to(device)
    v, v_prev, grad_v = rand(B, C, grad=True), rand(B, 4), rand(B, C)
    ops = torch.ops.svp_kernels
    return [
        (ops.projection_forward.default, (h, weight, C, 0, 0.0, 0.3, seed(11))),
        (ops.projection_forward.default, (h, None, C, 17, 0.5, 0.0, seed(0))),
        (ops.projection_backward.default, (grad_v, weight, D, 0, 0.0, 0.3, seed(11), dtype)),
        (ops.projection_backward.default, (grad_v, None, D, 17, 0.5, 0.2, seed(4), dtype)),
        (ops.loss_epilogue.default, (v, target, v_prev, 0.5, True, False)),
        (ops.loss_epilogue.default, (v, None, v_prev, 1.0, False, True)),
        (ops.loss_epilogue.default, (v, target, None, 1.0, True, False)),
        (ops.cosine_gram.default, (v.detach(), True)),
    ]
