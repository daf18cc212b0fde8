"""The shared shape tables, test inputs and the one float64 ground truth of the suite.

bench/ and tools/ import this module too: every accuracy check in the repository compares against the
reference backend run in float64 on the same (rounded) inputs, through the functions below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import svp_kernels as sk
from svp_kernels import backends
from svp_kernels.backends import reference


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


def run(case: Case, h, target, v_prev, projection, backend: str, seed: int = 42, projection_path: str = "auto"):
    """(loss, ce, alignment, v, dh) of fused_local_loss forward + backward on `backend`."""
    h = h.detach().requires_grad_(True)
    out = sk.fused_local_loss(h, target, v_prev, projection=projection, p=case.p, seed=seed,
                              alignment_weight=case.alignment_weight, reduction=case.reduction,
                              center=case.center, backend=backend, projection_path=projection_path)
    out.loss.backward()
    return out.loss.detach(), out.ce, out.alignment, out.v, h.grad


def project(backend: str, h, weight, C: int, implicit: bool, p: float, seed: int, grad_v, projection_path="auto"):
    """(v, dh) of dropout_projection forward and backward (an implicit R: ImplicitProjection(C, seed=77))."""
    h = h.detach().requires_grad_(True)
    projection = sk.ImplicitProjection(C, seed=77) if implicit else weight
    v = sk.dropout_projection(h, projection, p=p, seed=seed, backend=backend, projection_path=projection_path)
    v.backward(grad_v.to(v.dtype))
    return v.detach(), h.grad


def projection_inputs(B: int, D: int, C: int, dtype, device):
    """(h (B, D), R (C, D) / √D, grad_v (B, C)) of `dtype` on `device`, seeded by the shape."""
    generator = torch.Generator().manual_seed(B * D + C)
    h, weight, grad_v = (torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in
                         ((B, D), (C, D), (B, C)))
    return h.to(dtype).to(device), (weight / D**0.5).to(dtype).to(device), grad_v.to(dtype).to(device)


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


def plain_epilogue(v, target, v_prev, alignment_weight: float, mean: bool, center: bool):
    """(loss, ce, alignment, g_v) of the reference epilogue on CPU in v's dtype (plain PyTorch: F.normalize,
    the B×B Grams, F.cross_entropy), g_v = dloss/dv by autograd."""
    v = v.detach().cpu().requires_grad_(True)
    target = None if target is None else target.cpu()
    v_prev = None if v_prev is None else v_prev.detach().cpu()
    loss, ce, alignment = reference.epilogue(v, target, v_prev, alignment_weight, mean, center)
    (g_v,) = torch.autograd.grad(loss, v) if loss.requires_grad else (torch.zeros_like(v),)
    return loss.detach(), ce, alignment, g_v


def epilogue_ground_truth(v, target, v_prev, alignment_weight: float, mean: bool, center: bool):
    """(loss, ce, alignment, g_v) in float64 on CPU: the reference epilogue, g_v = dloss/dv by autograd."""
    return plain_epilogue(_cpu_float64(v), target, _cpu_float64(v_prev), alignment_weight, mean, center)


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


# The fused local loss problems every backend runs (odd shapes, every projection, p, reduction, center).
LOCAL_LOSS_CASES = [
    Case(1, 5, 3, 4),                                                   # B = 1
    Case(7, 13, 5, 3, p=0.3),                                           # C ≠ C'
    Case(5, 9, 11, 6, projection="implicit", p=0.25),                   # C > B
    Case(33, 17, 4, 4, p=0.1, center=True),                             # C + C' < B: feature-space path
    Case(33, 17, 4, 4, reduction="sum"),
    Case(40, 11, 6, 5, projection="implicit", center=True, reduction="sum"),
    Case(6, 0, 10, 7, projection="identity"),                           # v = h, batch-space path
    Case(24, 0, 5, 3, projection="identity", center=True),              # identity, feature-space path
    Case(9, 21, 7, None, p=0.5),                                        # no v_prev: CE only
    Case(3, 70, 13, 20, projection="implicit", p=0.1, center=True),     # batch-space, C' > C > B
]

# Wide rows (B, C, C'), for the float32 accuracy of the epilogue's row statistics (means, norms, the backward's
# dot products) against plain float32 torch: C ≠ C', rows up to 8192 wide. The Triton interpreter and the
# CUDA emulator run the narrower-C set (their cost grows with C·(C + C')).
WIDE_ROWS = [(16, 1024, 300), (17, 4096, 3000), (24, 2048, 4096), (33, 3000, 7)]
WIDE_ROWS_NARROW_C = [(16, 32, 4096), (20, 100, 2048), (17, 16, 8192)]


def wide_row_inputs(B: int, C: int, C_prev: int, device="cpu"):
    """(v, target, v_prev) in float32: v post-ReLU (relu of N(0, 1): positive row means, where centring
    cancels most), v_prev U[0, 1), target uniform in [0, C)."""
    generator = torch.Generator().manual_seed(B + C + C_prev)
    v = torch.randn(B, C, generator=generator, dtype=torch.float64).relu().float().to(device)
    v_prev = torch.rand(B, C_prev, generator=generator, dtype=torch.float64).float().to(device)
    target = torch.randint(0, C, (B,), generator=generator).to(device)
    return v, target, v_prev


# Aligned v and v_prev (B, C = C') with C + C' < B: the feature-space identity, where FA ≪ ‖âᵀâ‖² cancels.
ALIGNED_FEATURE_SPACE = [(40, 6), (64, 10), (33, 3)]


def aligned_inputs(B: int, C: int, device="cpu"):
    """(v, target, v_prev) in float32: v post-ReLU (B, C), v_prev = v + 0.01·N(0, 1), target in [0, C)."""
    generator = torch.Generator().manual_seed(B * C)
    v = torch.randn(B, C, generator=generator, dtype=torch.float64).relu()
    v_prev = v + 0.01 * torch.randn(B, C, generator=generator, dtype=torch.float64)
    target = torch.randint(0, C, (B,), generator=generator)
    return v.float().to(device), target.to(device), v_prev.float().to(device)


def wide_row_params(pairs):
    """(device, backend, (B, C, C')) for each (device, backend) pair: WIDE_ROWS, or WIDE_ROWS_NARROW_C for the
    Triton interpreter."""
    return [(device, backend, shape) for device, backend in pairs
            for shape in (WIDE_ROWS_NARROW_C if (device, backend) == ("cpu", "triton") else WIDE_ROWS)]


def param_id(value) -> str:
    """pytest id of a parameter: shapes as BxCxC'."""
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


# Kernel-level tables of the CUDA tests, the CUDA emulator and the sanitizer script (tools/).
MASK_SHAPES = [  # (C, D, p, seed): C spans the three forward tiles (16/32/64), D one and several panels
    (3, 5, 0.5, 7), (13, 17, 0.1, 2**40 + 3), (20, 64, 0.3, 1), (40, 300, 0.7, 2**63 - 1),
    (70, 129, 0.25, 12345), (130, 33, 0.5, 99), (1, 1, 0.9, 0), (4, 6, 0.0, 5),
]
PROJECTION_SHAPES = [  # (B, D, C)
    (1, 5, 3), (7, 13, 5), (5, 9, 11),        # B = 1, odd, C > B
    (33, 300, 17),                            # 32-wide tile, two 256-column panels
    (130, 257, 70),                           # 64-wide tile, three 128-column panels, two batch tiles
    (3, 1000, 130),                           # C > 128: backward regenerates its panel per class chunk
    (129, 64, 16),                            # 16-byte vector loads of h (D % 8 == 0), two batch tiles
]
EPILOGUE_SHAPES = [  # (B, C, C'): C' None = no v_prev
    (1, 3, 2), (7, 5, 3), (5, 11, 6),         # B = 1, odd, C > B (batch space)
    (33, 4, 4), (40, 6, 5),                   # feature space
    (300, 10, 12),                            # feature space, Gram split over B
    (70, 70, 50),                             # batch space, several 32-row tiles, C > 64 classes per step
    (64, 130, None),                          # CE only, C > 128
]
# Two to four small shapes per op that still reach every path of the kernels (tools/sanitize_cuda.py --small,
# the sanitizer run of tools/gpu_check.py): the 16-, 32- and 64-wide forward tiles (C > 32), split-K and
# regenerated panels at D = 300 (under the forced plans), the backward regenerating its panel per class chunk
# (C > 128), 16-byte grad_v loads (C % 4 == 0) and scalar ones; the epilogue in batch space (with a K loop over
# C + C' > 32) and in feature space. tests/test_sanitizer_shapes.py checks that they do.
SMALL_PROJECTION_SHAPES = [(5, 9, 11), (33, 300, 17), (9, 200, 40), (3, 130, 132)]
SMALL_EPILOGUE_SHAPES = [(7, 5, 3), (33, 4, 4), (9, 20, 17)]
# Launch plans ("key=value,...": fields of svp_cuda::LaunchPlan, csrc/cuda/svp_cuda.h) forced through
# svp_kernels.backends.cuda.launch_plan, which parses them (parse_launch_plan, also used by the emulator).
PROJECTION_PLANS = [
    "",                                                        # the heuristic
    "forward_panels_per_split=1,backward_btiles_per_block=1",  # max split-K (resident panels), 1 tile/block
    "forward_panels_per_split=2,forward_btiles_per_block=1",   # panels regenerated per batch tile
    "forward_panels_per_split=1000,forward_btiles_per_block=2,backward_btiles_per_block=2",  # no split-K
]
EPILOGUE_PLANS = ["", "epilogue_feature=1", "epilogue_feature=0", "epilogue_feature=1,gram_splits=3",
                  "epilogue_feature=0,batch_splits=2"]
# Scaled-error tolerances of the CUDA kernels against the float64 ground truth of the same (rounded) inputs:
# results in the accumulation dtype, outputs rounded to h's dtype (dh), and an implicit R (float32 log/cos).
ACC_TOL = {torch.float64: 1e-11, torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4}
OUT_TOL = {torch.float64: 1e-11, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
IMPLICIT_TOL = 1e-5


OP_SAMPLE_COUNT = 15  # len(op_samples()), a constant so that collecting the tests needs no compiled ops


def op_samples(dtype=torch.float64, device="cpu"):
    """(op, args) for torch.library.opcheck: every svp_kernels op, dense and implicit, each optional input."""
    generator = torch.Generator().manual_seed(0)
    B, D, C = 5, 7, 3

    def seed(value):  # the ops' dropout seed: a 0-dim int64 tensor on the op's device
        return torch.tensor(value, dtype=torch.int64, device=device)

    def rand(*shape, grad=False):
        return torch.randn(shape, dtype=dtype, generator=generator).to(device).requires_grad_(grad)

    h, weight = rand(B, D, grad=True), rand(C, D)
    target = torch.randint(0, C, (B,), generator=generator).to(device)
    v, v_prev, grad_v = rand(B, C, grad=True), rand(B, 4), rand(B, C)
    ops = torch.ops.svp_kernels
    return [
        (ops.projection_forward.default, (h, weight, C, 0, 0.0, 0.3, seed(11))),
        (ops.projection_forward.default, (h, None, C, 17, 0.5, 0.0, seed(0))),
        (ops.projection_backward.default, (grad_v, weight, D, 0, 0.0, 0.3, seed(11), dtype)),
        (ops.projection_backward.default, (grad_v, None, D, 17, 0.5, 0.2, seed(4), dtype)),
        (ops.projection_backward.default, (grad_v, weight, D, 0, 0.0, 0.3, seed(11), dtype, rand())),
        (ops.loss_epilogue.default, (v, target, v_prev, 0.5, True, False)),
        (ops.loss_epilogue.default, (v, None, v_prev, 1.0, False, True)),
        (ops.loss_epilogue.default, (v, target, None, 1.0, True, False)),
        (ops.cosine_gram.default, (v.detach(), True)),
        (ops.dropped_projection.default, (weight, C, D, 0, 0.0, 0.3, seed(11), dtype)),
        (ops.dropped_projection.default, (None, C, D, 17, 0.5, 0.2, seed(4), dtype)),
        (ops.projection_forward_gemm.default, (h, weight, C, 0, 0.0, 0.3, seed(11))),
        (ops.projection_forward_gemm.default, (h, weight, C, 0, 0.0, 0.0, seed(0))),
        (ops.projection_backward_gemm.default, (grad_v, None, D, 17, 0.5, 0.2, seed(4), dtype)),
        (ops.projection_backward_gemm.default, (grad_v, weight, D, 0, 0.0, 0.3, seed(11), dtype, rand())),
    ]
