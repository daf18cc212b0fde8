"""Host cost of one triton-backend fused_local_loss call (forward + backward) with every kernel launch stubbed.

Runs on CPU without a GPU and without the interpreter: the kernels stay Triton JIT functions (as on a GPU),
``JITFunction.run`` is replaced by a recorder that launches nothing (svp_kernels/testing/host_cost.py), and
the launchers see an H100's 132 SMs. What is left is the Python and torch work around the launches (our
launchers, torch.library and autograd glue, allocations), which on a GPU runs before each kernel is queued.
Triton's own launcher (argument binding, specialization key, driver calls) is not in it: on a GPU,
tools/gpu_check.py's host-cost stage measures the whole.

    env -u TRITON_INTERPRET PYTHONPATH=. python bench/host_cost.py [--calls 300] [--profile]

CPU timings are indicative only on a shared machine; the Python call count per step is exact.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import sys
import time

import torch

H100_SMS = 132
SHAPES = ((256, 4096, 10), (8192, 4096, 10))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def measure(calls: int, profile: bool) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1: the kernels must be JIT functions, as on a GPU", file=sys.stderr)
        return 2
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    from svp_kernels.backends.triton import ops
    from svp_kernels.testing.host_cost import inputs, python_calls, step, stubbed_launches

    ops._sm_count = lambda device: H100_SMS
    with stubbed_launches() as launched:
        for B, D, C in SHAPES:
            for with_prev in (False, True):
                args = inputs(B, D, C, with_prev)
                for _ in range(5):
                    step(*args)
                launched.clear()
                tables = len(kernel_side_table.constant_args)
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    for _ in range(calls // 5):
                        step(*args)
                    times.append((time.perf_counter() - start) / (calls // 5) * 1e6)
                grown = len(kernel_side_table.constant_args) - tables
                n = 5 * (calls // 5)
                print(f"({B},{D},{C}) v_prev={'yes' if with_prev else 'no '}: min {min(times):7.1f} "
                      f"median {sorted(times)[2]:7.1f} us/call host, {python_calls(lambda: step(*args))} Python "
                      f"calls/step, {len(launched) / n:.0f} launches/call, side-table entries added {grown / n:.0f}"
                      "/call", flush=True)
                if profile:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    for _ in range(calls):
                        step(*args)
                    profiler.disable()
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--profile", action="store_true", help="cProfile the calls, top 15 by own time")
    args = parser.parse_args(argv)
    print(f"{cpu_model()}, torch {torch.__version__}", flush=True)
    return measure(args.calls, args.profile)


if __name__ == "__main__":
    sys.exit(main())
