"""The one float64 ground truth of the project, and the inputs it is run on.

Every accuracy check in the repository (tests/, bench/, tools/) compares a backend with the reference backend
run in float64 on CPU on the same (rounded) inputs, through the functions below (docs/design.md §6).

    case = Case(B=33, D=17, C=4, C_prev=4, p=0.1)
    h, target, v_prev, projection = make_inputs(case)
    loss, ce, alignment, v, dh = run(case, h, target, v_prev, projection, backend="cpu")
    truth = ground_truth(case, h, target, v_prev, projection)          # the same five, float64 reference
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import backends
from ..api import fused_local_loss
from ..backends import reference
from ..projection import ImplicitProjection


@dataclass(frozen=True)
class Case:
    """One local-loss problem: h (B, D), target (B,) in [0, C), v_prev (B, C') or None; alignment: the term
    ("cosine_gram" or "bhattacharyya", which needs C' = C)."""

    B: int
    D: int
    C: int
    C_prev: Optional[int] = None
    projection: str = "dense"  # "dense" | "implicit" | "identity"
    p: float = 0.0
    reduction: str = "mean"
    center: bool = False
    alignment_weight: float = 0.7
    alignment: str = "cosine_gram"

    def __str__(self):
        return (f"B{self.B}-D{self.D}-C{self.C}-Cp{self.C_prev}-{self.projection}-p{self.p}-{self.reduction}"
                f"{'-center' if self.center else ''}{'-' + self.alignment if self.alignment != 'cosine_gram' else ''}")


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
        projection = ImplicitProjection(case.C, seed=1000 + seed)
    else:
        projection = None
    h = h.to(dtype).to(device).requires_grad_(True)
    return h, target.to(device), v_prev, projection


def as_float64(value):
    return value.detach().double().requires_grad_(value.requires_grad) if isinstance(value, torch.Tensor) else value


def run(case: Case, h, target, v_prev, projection, backend: str, seed: int = 42, projection_path: str = "auto"):
    """(loss, ce, alignment, v, dh) of fused_local_loss forward + backward on `backend`."""
    h = h.detach().requires_grad_(True)
    out = fused_local_loss(h, target, v_prev, projection=projection, p=case.p, seed=seed,
                           alignment_weight=case.alignment_weight, reduction=case.reduction,
                           center=case.center, backend=backend, projection_path=projection_path,
                           alignment=case.alignment)
    out.loss.backward()
    return out.loss.detach(), out.ce, out.alignment, out.v, h.grad


def _cpu_float64(value):
    return None if value is None else value.detach().to("cpu", torch.float64)


def ground_truth(case: Case, h, target, v_prev, projection, seed: int = 42):
    """(loss, ce, alignment, v, dh) of the float64 reference on CPU for the same inputs (the oracle)."""
    projection = _cpu_float64(projection) if isinstance(projection, torch.Tensor) else projection
    return run(case, _cpu_float64(h), target.cpu(), _cpu_float64(v_prev), projection, "reference", seed)


def projection_ground_truth(h, weight, grad_v, out_features: int, proj_seed: int, proj_std: float, p: float,
                            seed: int):
    """(v, dh) = (h R̃ᵀ, grad_v R̃) in float64 on CPU; R̃ from the reference (an implicit R when weight is None)."""
    dropped = reference.dropped_weight(_cpu_float64(weight), h.shape[1], out_features, proj_seed, proj_std, p, seed,
                                       torch.float64, "cpu")
    return _cpu_float64(h) @ dropped.t(), _cpu_float64(grad_v) @ dropped


def plain_epilogue(v, target, v_prev, alignment_weight: float, mean: bool, center: bool,
                   alignment: str = "cosine_gram"):
    """(loss, ce, alignment, g_v) of the reference epilogue on CPU in v's dtype (plain PyTorch: F.normalize,
    the B×B Grams, F.cross_entropy; or F.log_softmax and logsumexp for the Bhattacharyya term), g_v = dloss/dv by
    autograd."""
    v = v.detach().cpu().requires_grad_(True)
    target = None if target is None else target.cpu()
    v_prev = None if v_prev is None else v_prev.detach().cpu()
    loss, ce, term = reference.epilogue(v, target, v_prev, alignment_weight, mean, center, alignment)
    (g_v,) = torch.autograd.grad(loss, v) if loss.requires_grad else (torch.zeros_like(v),)
    return loss.detach(), ce, term, g_v


def epilogue_ground_truth(v, target, v_prev, alignment_weight: float, mean: bool, center: bool,
                          alignment: str = "cosine_gram"):
    """(loss, ce, alignment, g_v) in float64 on CPU: the reference epilogue, g_v = dloss/dv by autograd."""
    return plain_epilogue(_cpu_float64(v), target, _cpu_float64(v_prev), alignment_weight, mean, center, alignment)


def cosine_gram_ground_truth(v, center: bool):
    """S (B, B) = â âᵀ in float64 on CPU."""
    return reference.cosine_gram(_cpu_float64(v), center)


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors in this process (triton only under TRITON_INTERPRET=1)."""
    cpu = torch.device("cpu")
    return [name for name in backends.available_backends() if backends.load(name).supports(cpu, torch.float32)]


def device_backends(include_reference: bool = True) -> list[tuple[str, str]]:
    """(device, backend) pairs that run here: CPU ones, then CUDA ones when a GPU is present.

    include_reference=False leaves out the reference backend, for tests whose expected value is the
    reference itself (comparing it with itself could not fail).
    """
    pairs = [("cpu", name) for name in cpu_backends()]
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        pairs += [("cuda", name) for name in backends.available_backends()
                  if backends.load(name).supports(cuda, torch.float32)]
    return [pair for pair in pairs if include_reference or pair[1] != "reference"]
