"""Compile the Triton kernels for an NVIDIA GPU on a machine without one (CI has none).

The launchers of svp_kernels/backends/triton/ops.py run on meta tensors with their kernel launches
recorded instead of executed; every distinct (kernel, argument types, constexprs, num_warps) is then
compiled ahead of time for ``GPUTarget("cuda", arch, 32)`` with the ptxas that ships in the Triton wheel,
and the register and stack use is read off the cubin. That catches what the interpreter cannot: code that does not lower
(dtypes, libdevice, constexpr branches), and block sizes that spill.

Run it in a process where TRITON_INTERPRET is unset (the kernels must be JIT functions):

    python tools/gpu_compile_check.py [--arch 90] [--quick]
"""

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Tuple

import torch

from svp_kernels.backends.triton import ops  # noqa: E402  (the kernels must be JIT functions: no TRITON_INTERPRET)

_TRITON_DTYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
                  torch.int64: "i64", torch.int32: "i32"}


def record_launches(run: Callable[[], object]) -> List[Tuple[object, dict]]:
    """(kernel, kwargs) of every kernel launch that `run` makes through ops._launch, none executed."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                assert not args, "launchers pass kernel arguments by name"
                launches.append((self.kernel, kwargs))
            return launch

    saved, ops._launch = ops._launch, Recorder
    try:
        run()
    finally:
        ops._launch = saved
    return launches


def _signature(kernel, kwargs: dict) -> Tuple[Dict[str, str], Dict[str, object], int]:
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    constexpr_names = {kernel.arg_names[i] for i in kernel.constexprs}
    signature, constexprs = {}, {}
    for name in kernel.arg_names:
        value = kwargs[name]
        if name in constexpr_names:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={value!r}")
    return signature, constexprs, num_warps


def _resource_usage(cubin: bytes) -> Tuple[int, int]:
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([cuobjdump, "-res-usage", handle.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+).*?STACK:(\d+)", report)
    return (int(match.group(1)), int(match.group(2))) if match else (-1, -1)


def compile_launches(launches, arch: int = 90):
    """Compile each distinct launch for sm_<arch>; yields (kernel name, constexprs, num_warps, regs, stack)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    seen = set()
    for kernel, kwargs in launches:
        signature, constexprs, num_warps = _signature(kernel, kwargs)
        key = (kernel.__name__, tuple(sorted(signature.items())), tuple(sorted(map(str, constexprs.items()))),
               num_warps)
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=target,
                                  options={"num_warps": num_warps})
        regs, stack = _resource_usage(compiled.asm["cubin"])
        pointer_types = sorted({t for t in signature.values() if t.startswith("*")})
        yield kernel.__name__, pointer_types, constexprs, num_warps, regs, stack


def problems(quick: bool = False):
    """Launcher calls on meta tensors covering dtypes, dense/implicit R, dropout and both alignment paths."""
    meta = torch.device("meta")
    dtypes = [torch.float32, torch.bfloat16] if quick else [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    shapes = [(256, 1024, 10)] if quick else [(256, 1024, 10), (1024, 512, 256), (40, 4096, 100)]
    seed = torch.empty((), dtype=torch.int64, device=meta)
    calls = []
    for dtype in dtypes:
        for B, D, C in shapes:
            h = torch.empty(B, D, dtype=dtype, device=meta)
            accumulation = ops.accumulation_dtype(dtype)
            for weight in (torch.empty(C, D, dtype=dtype, device=meta), None):
                for p in ((0.1,) if quick else (0.0, 0.1)):
                    calls.append(lambda h=h, w=weight, C=C, p=p: ops.projection_forward(h, w, C, 3, 0.1, p, seed))
                    calls.append(lambda B=B, C=C, D=D, w=weight, p=p, dtype=dtype, acc=accumulation:
                                 ops.projection_backward(torch.empty(B, C, dtype=acc, device=meta), w, D, 3, 0.1, p,
                                                         seed, dtype))
        epilogue_shapes = [(512, 10, 10)] if quick else [(512, 10, 10), (64, 300, 100), (4096, 1000, 64)]
        for B, C, C_prev in epilogue_shapes:
            v = torch.empty(B, C, dtype=dtype, device=meta)
            v_prev = torch.empty(B, C_prev, dtype=dtype, device=meta)
            target = torch.empty(B, dtype=torch.int64, device=meta)
            for center in ((True,) if quick else (False, True)):
                calls.append(lambda v=v, t=target, vp=v_prev, c=center: ops.loss_epilogue(v, t, vp, 0.5, True, c))
                calls.append(lambda v=v, t=target, c=center: ops.loss_epilogue(v, t, None, 0.5, True, c))
            batch_path = dataclasses.replace(ops.epilogue_config(B, C, ops.accumulation_dtype(dtype)), path="batch")
            calls.append(lambda v=v, vp=v_prev, config=batch_path: ops.loss_epilogue(v, None, vp, 1.0, True, False,
                                                                                    config=config))
            calls.append(lambda v=v: ops.cosine_gram(v, False))
    return calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 (default 90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="fewer dtypes and shapes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled", file=sys.stderr)
        return 2
    launches = []
    for call in problems(args.quick):
        launches += record_launches(call)
    worst_stack = 0
    for name, pointers, constexprs, num_warps, regs, stack in compile_launches(launches, args.arch):
        blocks = {k: v for k, v in constexprs.items() if k.startswith("BLOCK") or k.startswith("HAS")}
        print(f"{name:32s} {','.join(pointers):28s} warps={num_warps} regs={regs:3d} stack={stack:4d} {blocks}",
              flush=True)
        worst_stack = max(worst_stack, stack)
    print(f"all kernels compiled for sm_{args.arch}; largest stack frame {worst_stack} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
