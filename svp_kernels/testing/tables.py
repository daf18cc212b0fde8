"""Kernel-level shape tables, launch plans and tolerances shared by the CUDA tests, the CUDA emulator
(tools/emulate_cuda) and the sanitizer script (tools/sanitize_cuda.py), and the wide-row inputs of the
float32 accuracy checks."""

from __future__ import annotations

import torch

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


def bhattacharyya_inputs(B: int, C: int, dtype=torch.float32, device="cpu", seed: int = 0):
    """(v, target, v_prev) for the Bhattacharyya term, v_prev (B, C) like v, in `dtype`: logits N(0, 3²), and in
    v_prev a confident row (1: logits × 40, most of its softmax underflows), the log of a one-hot distribution
    (2: 0 at the target, −inf elsewhere) and a copy of v's row (3: BD = 0, the term's cancellation), where B allows."""
    generator = torch.Generator().manual_seed(seed + 100 * B + C)
    v = 3 * torch.randn(B, C, generator=generator, dtype=torch.float64)
    v_prev = 3 * torch.randn(B, C, generator=generator, dtype=torch.float64)
    target = torch.randint(0, C, (B,), generator=generator)
    if B > 1:
        v_prev[1] *= 40
    if B > 2:
        v_prev[2] = float("-inf")
        v_prev[2, target[2]] = 0.0
    if B > 3:
        v_prev[3] = v[3]
    return v.to(dtype).to(device), target.to(device), v_prev.to(dtype).to(device)


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
# svp_kernels.testing.launch_plan, which parses them (parse_launch_plan, also used by the emulator).
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
