"""Exercise every CUDA kernel of svp_kernels once, at small test shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck   --error-exitcode 1 python tools/sanitize_cuda.py
    compute-sanitizer --tool racecheck  --error-exitcode 1 python tools/sanitize_cuda.py --quick
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck python tools/sanitize_cuda.py
    compute-sanitizer --tool memcheck   --error-exitcode 1 python tools/sanitize_cuda.py --small  # 2 shapes per op
    compute-sanitizer --tool racecheck  --error-exitcode 1 python tools/sanitize_cuda.py --small --race --ops projection

Covers: dropped_projection (the GEMM path's R̃ kernel), projection_forward (the 16/32/64-wide tiles; dense and
implicit R; p = 0 and p > 0; resident and regenerated panels; with and without split-K and its reduction;
vector and scalar loads of h),
projection_backward (resident and per-chunk panels), loss_epilogue (feature and batch space, split Grams,
split column tiles, with/without target and v_prev, center, both reductions) and cosine_gram, in all four
dtypes, and an epilogue whose targets are out of range (never read through: NaN rows). Shapes and plans are
the kernel tables of svp_kernels.testing; plans are forced through svp_kernels.testing.launch_plan.
Values are checked against the suite's float64 ground truth, but correctness is the test suite's job; the
sanitizer reports the memory and shared-memory hazards. Prints one line per group and exits non-zero on a
CUDA error or a wrong value.

--race is the racecheck list (racecheck runs a launch some hundred times slower than memcheck): every
shape under every launch plan in float32 with p = 0.3 and both kinds of R, float64 (the other shared-memory
element size) under the heuristic plan only, bfloat16/float16 not at all (their tiles are float32 in shared
memory, loaded by the same code); p = 0 and the dropped_projection kernel (no shared memory) are left to
memcheck. --ops runs one op family, so that a driver can give each its own time limit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import svp_kernels as sk  # noqa: E402
from svp_kernels.backends import reference  # noqa: E402
from svp_kernels.testing import (ACC_TOL, EPILOGUE_PLANS, EPILOGUE_SHAPES, IMPLICIT_TOL, OUT_TOL,  # noqa: E402
                                 PROJECTION_PLANS, PROJECTION_SHAPES, SMALL_EPILOGUE_SHAPES, SMALL_PROJECTION_SHAPES,
                                 assert_close, cosine_gram_ground_truth, epilogue_ground_truth, launch_plan,
                                 projection_ground_truth)

DEVICE = torch.device("cuda")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
RACE = False  # --race: the racecheck list (module docstring)
RACE_PROBABILITIES = (0.3,)
# --small: cases.SMALL_PROJECTION_SHAPES / SMALL_EPILOGUE_SHAPES, every plan still runs.
ops = torch.ops.svp_kernels


def randn(*shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(dtype).to(DEVICE)


def check_values(name, actual, expected, tolerances):
    torch.cuda.synchronize()
    try:
        for a, e, tol in zip(actual, expected, tolerances):
            assert_close(a, e, tol, name)
    except AssertionError as error:
        raise SystemExit(f"sanitize_cuda: {error}") from None


def skip_dtype(plan: str, dtype) -> bool:
    """Whether `dtype` is left out under a forced `plan`: the plans do not depend on the dtype beyond the loads,
    which the heuristic plan "" covers in every dtype; under --race float64 runs under "" only."""
    if plan and dtype in (torch.bfloat16, torch.float16):
        return True
    return RACE and bool(plan) and dtype == torch.float64


def projection_kernels(shapes):
    seed = torch.tensor(11, dtype=torch.int64, device=DEVICE)  # the ops read the dropout seed on the device
    count = 0
    for plan in PROJECTION_PLANS:
        with launch_plan(plan):
            for B, D, C in shapes:
                for dtype in DTYPES:
                    if skip_dtype(plan, dtype):
                        continue
                    acc = torch.float64 if dtype == torch.float64 else torch.float32
                    h = randn(B, D, dtype=dtype)
                    grad_v = randn(B, C, dtype=acc, seed=1)
                    for weight in (randn(C, D, dtype=dtype, seed=2) / D**0.5, None):
                        extra = IMPLICIT_TOL if weight is None else 0.0
                        for p in RACE_PROBABILITIES if RACE else (0.0, 0.3):
                            v = ops.projection_forward(h, weight, C, 7, D**-0.5, p, seed)
                            dh = ops.projection_backward(grad_v, weight, D, 7, D**-0.5, p, seed, dtype)
                            check_values(f"projection B={B} D={D} C={C} {dtype} plan={plan!r}", (v, dh),
                                         projection_ground_truth(h, weight, grad_v, C, 7, D**-0.5, p, 11),
                                         (max(ACC_TOL[dtype], extra), max(OUT_TOL[dtype], extra)))
                            count += 2
                            if not plan and not RACE:  # the GEMM path's R̃ kernel (the GEMMs are cuBLAS's)
                                r_tilde = ops.dropped_projection(weight, C, D, 7, D**-0.5, p, seed, dtype)
                                expected = reference.dropped_weight(None if weight is None else weight.cpu(), D,
                                                                    C, 7, D**-0.5, p, 11, torch.float64, "cpu")
                                check_values(f"dropped_projection C={C} D={D} {dtype}", (r_tilde,), (expected,),
                                             (max(OUT_TOL[dtype], extra),))
                                count += 1
    # Unaligned h (storage offset of one element): the scalar-load path.
    h = randn(9 * 64 + 1)[1:].view(9, 64)
    v = ops.projection_forward(h, None, 7, 3, 0.125, 0.2, seed)
    check_values("projection unaligned", (v,),
                 projection_ground_truth(h, None, torch.zeros(9, 7), 7, 3, 0.125, 0.2, 11),
                 (IMPLICIT_TOL,))
    return count + 1


def epilogue_kernels(shapes):
    count = 0
    for plan in EPILOGUE_PLANS:
        with launch_plan(plan):
            for B, C, Cp in shapes:
                if plan and Cp is None:
                    continue
                for dtype in DTYPES:
                    if skip_dtype(plan, dtype):
                        continue
                    v = randn(B, C, dtype=dtype)
                    target = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(B)).to(DEVICE)
                    v_prev = None if Cp is None else randn(B, Cp, dtype=dtype, seed=3)
                    for with_target in (True, False):
                        for mean, center in ((True, False), (False, True)):
                            t = target if with_target else None
                            outputs = ops.loss_epilogue(v, t, v_prev, 0.7, mean, center)
                            check_values(f"epilogue B={B} C={C} C'={Cp} {dtype} plan={plan!r}", outputs,
                                         epilogue_ground_truth(v, t, v_prev, 0.7, mean, center),
                                         (ACC_TOL[dtype],) * 4)
                            count += 1
                    if not plan:
                        for center in (False, True):
                            check_values("cosine_gram", (ops.cosine_gram(v, center),),
                                         (cosine_gram_ground_truth(v, center),), (ACC_TOL[dtype],))
                            count += 1
    # Targets outside [0, C): never read through (memcheck would report it); those rows are NaN.
    v = randn(70, 70)
    target = torch.randint(0, 70, (70,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    target[[3, 40, 69]] = torch.tensor([70, -1, 10**9], device=DEVICE)
    loss, ce, _, g_v = ops.loss_epilogue(v, target, randn(70, 50, seed=3), 0.7, True, False)
    torch.cuda.synchronize()
    if not (torch.isnan(loss) and torch.isnan(ce) and torch.isnan(g_v[[3, 40, 69]]).all()):
        raise SystemExit("sanitize_cuda: out-of-range targets should give NaN loss, ce and g_v rows")
    return count + 1


OPS = ("projection", "epilogue")


def main() -> int:
    global DTYPES, RACE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="float32 and float64 only (the shared-memory layouts differ by element size only)")
    parser.add_argument("--small", action="store_true",
                        help="two small shapes per op (every plan and dtype still runs)")
    parser.add_argument("--race", action="store_true",
                        help="the racecheck list: float32 under every plan, float64 under the heuristic one, p = 0.3 "
                             "(implies --quick)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS} (default: both)")
    args = parser.parse_args()
    ops_run = args.ops.split(",")
    if not ops_run or set(ops_run) - set(OPS):
        parser.error(f"--ops: a comma list of {OPS}, got {args.ops!r}")
    RACE = args.race
    if args.quick or args.race:
        DTYPES = [torch.float32, torch.float64]
    if not torch.cuda.is_available() or not sk._ops.extension_has_cuda():
        print("sanitize_cuda: needs a GPU and svp_kernels._C built with CUDA", file=sys.stderr)
        return 2
    if "projection" in ops_run:
        start = time.time()
        calls = projection_kernels(SMALL_PROJECTION_SHAPES if args.small else PROJECTION_SHAPES)
        print(f"sanitize_cuda: projection_forward/backward: {calls} calls ok ({time.time() - start:.1f}s)",
              flush=True)
    if "epilogue" in ops_run:
        start = time.time()
        calls = epilogue_kernels(SMALL_EPILOGUE_SHAPES if args.small else EPILOGUE_SHAPES)
        print(f"sanitize_cuda: loss_epilogue/cosine_gram: {calls} calls ok ({time.time() - start:.1f}s)",
              flush=True)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
