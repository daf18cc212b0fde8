"""Exercise every CUDA kernel of svp_kernels once, at small test shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck   --error-exitcode 1 python tools/sanitize_cuda.py
    compute-sanitizer --tool racecheck  --error-exitcode 1 python tools/sanitize_cuda.py --quick
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck python tools/sanitize_cuda.py

Covers: projection_forward (the 16/32/64-wide tiles; dense and implicit R; p = 0 and p > 0; resident
and regenerated panels; with and without split-K and its reduction; vector and scalar loads of h),
projection_backward (resident and per-chunk panels), loss_epilogue (feature and batch space, split Grams,
split column tiles, with/without target and v_prev, center, both reductions) and cosine_gram, in all four
dtypes. Plans are forced through SVP_CUDA_PLAN (csrc/cuda/common.cuh). Values are sanity-checked (finite)
but correctness is the test suite's job; the sanitizer reports the memory and shared-memory hazards.
Prints one line per group and exits non-zero on a CUDA error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import svp_kernels as sk  # noqa: E402

DEVICE = torch.device("cuda")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ops = torch.ops.svp_kernels


def set_plan(value: str) -> None:
    if value:
        os.environ["SVP_CUDA_PLAN"] = value
    else:
        os.environ.pop("SVP_CUDA_PLAN", None)


def randn(*shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(dtype).to(DEVICE)


def check_finite(name, *tensors):
    torch.cuda.synchronize()
    for tensor in tensors:
        if not torch.isfinite(tensor.float()).all():
            raise SystemExit(f"sanitize_cuda: {name} produced non-finite values")


def projection_kernels():
    # (B, D, C): C picks the forward tile (16/32/64); D % 8 == 0 gives vector loads for every dtype.
    shapes = [(5, 9, 11), (33, 300, 17), (130, 257, 70), (3, 520, 130), (129, 64, 16), (1, 1, 1)]
    plans = ["", "forward_panels_per_split=1,backward_btiles_per_block=1",
             "forward_panels_per_split=2,forward_btiles_per_block=1", "forward_panels_per_split=1000,forward_btiles_per_block=2"]
    seed = torch.tensor(11, dtype=torch.int64, device=DEVICE)  # the ops read the dropout seed on the device
    count = 0
    for plan in plans:
        set_plan(plan)
        for B, D, C in shapes:
            for dtype in DTYPES:
                if plan and dtype in (torch.bfloat16, torch.float16):
                    continue  # the plans do not depend on the dtype beyond the loads, covered by plan ""
                acc = torch.float64 if dtype == torch.float64 else torch.float32
                h = randn(B, D, dtype=dtype)
                grad_v = randn(B, C, dtype=acc, seed=1)
                for weight in (randn(C, D, dtype=dtype, seed=2) / D**0.5, None):
                    for p in (0.0, 0.3):
                        v = ops.projection_forward(h, weight, C, 7, D**-0.5, p, seed)
                        dh = ops.projection_backward(grad_v, weight, D, 7, D**-0.5, p, seed, dtype)
                        check_finite(f"projection B={B} D={D} C={C} {dtype} plan={plan!r}", v, dh)
                        count += 2
    # Unaligned h (storage offset of one element): the scalar-load path.
    base = randn(9 * 64 + 1)
    v = ops.projection_forward(base[1:].view(9, 64), None, 7, 3, 0.125, 0.2, seed)
    check_finite("projection unaligned", v)
    set_plan("")
    return count + 1


def epilogue_kernels():
    shapes = [(1, 3, 2), (7, 5, 3), (33, 4, 4), (300, 10, 12), (70, 70, 50), (64, 130, None)]
    plans = ["", "epilogue_feature=1", "epilogue_feature=0", "epilogue_feature=1,gram_splits=3",
             "epilogue_feature=0,batch_splits=2"]
    seed = torch.tensor(11, dtype=torch.int64, device=DEVICE)  # the ops read the dropout seed on the device
    count = 0
    for plan in plans:
        set_plan(plan)
        for B, C, Cp in shapes:
            if plan and Cp is None:
                continue
            for dtype in DTYPES:
                if plan and dtype in (torch.bfloat16, torch.float16):
                    continue
                v = randn(B, C, dtype=dtype)
                target = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(B)).to(DEVICE)
                v_prev = None if Cp is None else randn(B, Cp, dtype=dtype, seed=3)
                for with_target in (True, False):
                    for mean, center in ((True, False), (False, True)):
                        outputs = ops.loss_epilogue(v, target if with_target else None, v_prev, 0.7, mean, center)
                        check_finite(f"epilogue B={B} C={C} C'={Cp} {dtype} plan={plan!r}", *outputs)
                        count += 1
                if not plan:
                    for center in (False, True):
                        check_finite("cosine_gram", ops.cosine_gram(v, center))
                        count += 1
    set_plan("")
    return count


def main() -> int:
    global DTYPES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="float32 and float64 only (the shared-memory layouts differ by element size only)")
    args = parser.parse_args()
    if args.quick:
        DTYPES = [torch.float32, torch.float64]
    if not torch.cuda.is_available() or not sk._ops.extension_has_cuda():
        print("sanitize_cuda: needs a GPU and svp_kernels._C built with CUDA", file=sys.stderr)
        return 2
    start = time.time()
    calls = projection_kernels()
    print(f"sanitize_cuda: projection_forward/backward: {calls} calls ok ({time.time() - start:.1f}s)", flush=True)
    start = time.time()
    calls = epilogue_kernels()
    print(f"sanitize_cuda: loss_epilogue/cosine_gram: {calls} calls ok ({time.time() - start:.1f}s)", flush=True)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
