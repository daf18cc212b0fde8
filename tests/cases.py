"""The suite's own parameter tables: the fused local loss problems every backend runs, aligned inputs of the
feature-space path, pytest ids and the opcheck samples. The oracle, the assertions and the kernel tables live in
svp_kernels.testing (the tools and benchmarks import them from there).
"""

from __future__ import annotations

import torch

# tools/emulate_cuda/run_emulation.py imports these through this module (with tests/ on its path).
from svp_kernels.testing import (ACC_TOL, EPILOGUE_SHAPES, IMPLICIT_TOL, MASK_SHAPES, OUT_TOL,  # noqa: F401
                                 PROJECTION_SHAPES, SMALL_EPILOGUE_SHAPES, SMALL_PROJECTION_SHAPES, WIDE_ROWS,
                                 WIDE_ROWS_NARROW_C, Case, cosine_gram_ground_truth, epilogue_ground_truth,
                                 plain_epilogue, projection_ground_truth, wide_row_inputs)

import svp_kernels as sk

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
    Case(1, 5, 3, 3, alignment="bhattacharyya"),                        # the Bhattacharyya term: B = 1
    Case(9, 21, 7, 7, projection="implicit", p=0.3, reduction="sum", alignment="bhattacharyya"),  # C < B, sum
    Case(6, 0, 10, 10, projection="identity", alignment="bhattacharyya"),  # v = h, C > B
]

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


def param_id(value) -> str:
    """pytest id of a parameter: shapes as BxCxC'."""
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


OP_SAMPLE_COUNT = 17  # len(op_samples()), a constant so that collecting the tests needs no compiled ops


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
        (ops.loss_epilogue.default, (v, target, rand(B, C), 0.5, True, False, "bhattacharyya")),
        (ops.loss_epilogue.default, (v, None, rand(B, C), 1.0, False, False, "bhattacharyya")),
        (ops.cosine_gram.default, (v.detach(), True)),
        (ops.dropped_projection.default, (weight, C, D, 0, 0.0, 0.3, seed(11), dtype)),
        (ops.dropped_projection.default, (None, C, D, 17, 0.5, 0.2, seed(4), dtype)),
        (ops.projection_forward_gemm.default, (h, weight, C, 0, 0.0, 0.3, seed(11))),
        (ops.projection_forward_gemm.default, (h, weight, C, 0, 0.0, 0.0, seed(0))),
        (ops.projection_backward_gemm.default, (grad_v, None, D, 17, 0.5, 0.2, seed(4), dtype)),
        (ops.projection_backward_gemm.default, (grad_v, weight, D, 0, 0.0, 0.3, seed(11), dtype, rand())),
    ]
