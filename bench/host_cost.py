"""Host cost of one triton-backend fused_local_loss call (forward + backward) with every kernel launch stubbed.

Runs on CPU without a GPU and without the interpreter: the kernels stay Triton JIT functions (as on a GPU),
``JITFunction.run`` is replaced by a recorder that launches nothing (svp_kernels/testing/host_cost.py), and
the launchers see an H100's 132 SMs. What is left is the Python and torch work around the launches (our
launchers, torch.library and autograd glue, allocations), which on a GPU runs before each kernel is queued.
Triton's own launcher (argument binding, specialization key, driver calls) is not in it: on a GPU,
tools/gpu_check.py's host-cost stage measures the whole.

    env -u TRITON_INTERPRET PYTHONPATH=. python bench/host_cost.py [--calls 300] [--profile]
    PYTHONPATH=. python bench/host_cost.py --device cuda [--calls 100]   (on a GPU: host vs device per call)

CPU timings are indicative only on a shared machine; the Python call count per step is exact.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import sys
import time

import torch

from local_loss import cpu_model

H100_SMS = 132
SHAPES = ((256, 4096, 10), (8192, 4096, 10))


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
                per_call = len(launched) / n
                print(f"({B},{D},{C}) v_prev={'yes' if with_prev else 'no '}: min {min(times):7.1f} "
                      f"median {sorted(times)[2]:7.1f} us/call host, {python_calls(lambda: step(*args))} Python "
                      f"calls/step, {per_call:.0f} launches/call, side-table entries added {grown / n:.0f}"
                      "/call", flush=True)
                if profile:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    for _ in range(calls):
                        step(*args)
                    profiler.disable()
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    return 0


def median_host_us(run, calls: int) -> float:
    """Median host time of `run()` in µs, the GPU idle before each call (no launch waits on the queue)."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def op_host_times(backend: str, h, weight, target, seed, calls: int) -> str:
    """Host µs of each op of the call, called directly (no autograd node): tells the ops' own host cost from
    the autograd machinery's (the node, the engine's device thread)."""
    h = h.detach()
    C, D = weight.shape
    if backend == "cuda":
        forward = torch.ops.svp_kernels.projection_forward
        epilogue = torch.ops.svp_kernels.loss_epilogue
        backward = torch.ops.svp_kernels.projection_backward
        scope = contextlib.nullcontext
    else:
        from svp_kernels.backends.triton import ops
        forward, epilogue, scope = ops.projection_forward, ops.loss_epilogue, ops.direct_launches
        backward = ops.projection_backward
    with scope():
        v = forward(h, weight, C, 0, 1.0, 0.1, seed)
        grad_v = epilogue(v, target, None, 1.0, True, False)[3]
        times = (median_host_us(lambda: forward(h, weight, C, 0, 1.0, 0.1, seed), calls),
                 median_host_us(lambda: epilogue(v, target, None, 1.0, True, False), calls),
                 median_host_us(lambda: backward(grad_v, weight, D, 0, 1.0, 0.1, seed, h.dtype), calls))
    return "ops alone: projection_forward {:.0f}, loss_epilogue {:.0f}, projection_backward {:.0f} us".format(*times)


def measure_device(calls: int, backends=("cuda", "triton")) -> int:
    """On a GPU: per call of fused_local_loss forward + backward (dense R, p = 0.1, float32), the wall time
    of back-to-back calls, the host time of the forward and of the backward each with the GPU idle before
    it (so no launch waits on a full queue; no profiler), and, under torch.profiler, the kernels' device
    time and the top host self times. Host ≈ wall and kernels ≪ wall: the call is host-bound."""
    import svp_kernels as sk
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, host {cpu_model()}", flush=True)
    print("shape backend: wall ms/call | host fwd us, bwd us (median) | kernels us/call, launches/call | top host",
          flush=True)
    for B, D, C in SHAPES:
        h = torch.randn(B, D, device="cuda", requires_grad=True)
        target = torch.randint(0, C, (B,), device="cuda")
        weight = torch.randn(C, D, device="cuda") / D ** 0.5
        seed = torch.tensor(7, dtype=torch.int64, device="cuda")
        for backend in backends:
            if backend not in sk.available_backends():
                print(f"({B},{D},{C}) {backend}: unavailable", flush=True)
                continue

            def forward():
                return sk.fused_local_loss(h, target, projection=weight, p=0.1, seed=seed, backend=backend)

            def step():
                h.grad = None
                forward().loss.backward()

            for _ in range(5):
                step()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / calls * 1e3
            fwd, bwd = [], []
            for _ in range(calls):
                h.grad = None
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = forward()
                t1 = time.perf_counter()
                out.loss.backward()
                fwd.append((t1 - t0) * 1e6)
                bwd.append((time.perf_counter() - t1) * 1e6)
            torch.cuda.synchronize()
            ops_alone = op_host_times(backend, h, weight, target, seed, calls)
            n = 10
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(n):
                    step()
                torch.cuda.synchronize()
            events = prof.key_averages()
            kernels = [e for e in events if e.device_type == DeviceType.CUDA]
            kernel_us = sum(e.self_device_time_total for e in kernels) / n
            launches = sum(e.count for e in kernels) / n
            top = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: -e.self_cpu_time_total)
            host = "; ".join(f"{e.key[:36]} {e.self_cpu_time_total / n:.0f}" for e in top[:5])
            print(f"({B},{D},{C}) {backend}: wall {wall:.3f} | host fwd {sorted(fwd)[len(fwd) // 2]:.0f}, "
                  f"bwd {sorted(bwd)[len(bwd) // 2]:.0f} | kernels {kernel_us:.0f}, {launches:.0f} | {host}\n"
                  f"    {ops_alone}", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--profile", action="store_true", help="cProfile the calls, top 15 by own time")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: the triton node with launches stubbed; cuda: host vs device time per call")
    return parser


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.device == "cuda":
        return measure_device(args.calls)
    print(f"{cpu_model()}, torch {torch.__version__}", flush=True)
    return measure(args.calls, args.profile)


if __name__ == "__main__":
    sys.exit(main())
