"""Compile every Triton launch variant for an NVIDIA GPU on a machine without one, and record what each uses.

The launchers of svp_kernels/backends/triton/ops.py run on meta tensors (the projection split as on a GPU
with --sms SMs) with their kernel launches recorded instead of executed. Each distinct variant (kernel,
argument types, constexprs, the JIT's specialisations of integers equal to 1 or divisible by 16, num_warps,
num_stages)
is then compiled by Triton's own JIT path, as a launch would compile it, with a driver that answers for an
sm_<arch> device and launches nothing; ptxas's report (Triton's own run of the ptxas in its wheel) gives
the registers and spills, the kernel's metadata its shared memory, and from these the theoretical
occupancy on an H100 (sm_90). That catches what the interpreter cannot: code that does not lower (dtypes,
libdevice, constexpr branches, a Triton version's missing features) and block sizes that spill.

    python tools/gpu_compile_check.py [--arch 90] [--quick] [--csv bench/results/sm90-static.csv] [--compare]

--csv writes this Triton's rows (source = triton-<version>) into the CSV, keeping every other source's rows;
--compare fails instead when the CSV's rows for this source differ from what compiles now (when it has
any). Exit status 1 when a variant does not compile or spills (or --compare finds a difference); with
--spills-as-recorded a spill passes if the CSV records exactly that row (the reviewed few-byte spills
ptxas makes for occupancy with a pinned older Triton, bench/NOTES.md).
Run it where TRITON_INTERPRET is unset (the kernels must be JIT functions); tools/triton_versions.sh runs
it for every Triton version the backend supports.
"""

import argparse
import contextlib
import csv
import dataclasses
import io
import math
import os
import re
import sys
import tempfile
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from svp_kernels.backends.triton import ops  # noqa: E402  (the kernels must be JIT functions: no TRITON_INTERPRET)

CSV_COLUMNS = ("source", "kernel", "variant", "registers", "spill_stores", "spill_loads", "shared_bytes",
               "occupancy_warps_per_sm")
H100_SMS = 132
_TRITON_DTYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
                  torch.int64: "i64", torch.int32: "i32"}


# ----------------------------------------------------------------------------------------------------
# Launches and their variants
# ----------------------------------------------------------------------------------------------------


def record_launches(run: Callable[[], object], sms: int = H100_SMS) -> List[Tuple[object, dict]]:
    """(kernel, kwargs) of every kernel launch that `run` makes through ops._launch, none executed; the
    launchers see `sms` SMs (the projection's split over D depends on it)."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                assert not args, "launchers pass kernel arguments by name"
                launches.append((self.kernel, kwargs))
            return launch

    saved = ops._launch, ops._sm_count
    ops._launch, ops._sm_count = Recorder, (lambda device: sms)
    try:
        run()
    finally:
        ops._launch, ops._sm_count = saved
    return launches


def variant(kernel, kwargs: dict) -> str:
    """The compiled variant of a launch, as Triton's JIT specialises it: pointer dtypes, constexprs (declared,
    and integers equal to 1), 64-bit integers, integers divisible by 16, and num_warps."""
    constexpr_names = {kernel.arg_names[i] for i in kernel.constexprs}
    unspecialised = {param.name for param in getattr(kernel, "params", ()) if param.do_not_specialize}
    pointers, constants, wide, div16 = set(), [], [], []
    for name in kernel.arg_names:
        value = kwargs[name]
        if name in constexpr_names:
            constants.append(f"{name}={value}")
        elif isinstance(value, torch.Tensor):
            pointers.add(_TRITON_DTYPES[value.dtype])
        elif isinstance(value, (bool, float)) or name in unspecialised:
            continue
        elif isinstance(value, int):
            if value == 1:
                constants.append(f"{name}=1")
            else:
                if not -2**31 <= value < 2**31:
                    wide.append(name)
                if value % 16 == 0:
                    div16.append(name)
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={value!r}")
    parts = [",".join(sorted(pointers))] + constants + [f"warps={kwargs.get('num_warps', 4)}"]
    parts += [f"stages={kwargs['num_stages']}"] if "num_stages" in kwargs else []
    parts += [f"i64={','.join(wide)}"] if wide else []
    parts += [f"div16={','.join(div16)}"] if div16 else []
    return " ".join(parts)


def distinct_launches(launches) -> Dict[Tuple[str, str], Tuple[object, dict]]:
    """{(kernel name, variant): (kernel, kwargs)} of the first launch of each variant, in launch order."""
    variants = {}
    for kernel, kwargs in launches:
        variants.setdefault((kernel.__name__, variant(kernel, kwargs)), (kernel, kwargs))
    return variants


def problems(quick: bool = False) -> List[Callable[[], object]]:
    """Launcher calls on meta tensors that reach every launch variant: each dtype; dense and implicit R; with
    and without dropout; the largest and the smallest block sizes the launchers pick (B = 1 and C = 1 are
    the JIT's constexprs), widths divisible by 16 and not, 32- and 64-bit offsets; TF32 dots; the epilogue
    with and without target, v_prev, λ, centering and the forward's split, on both alignment paths; the
    backward with and without the incoming gradient's scale; the inspection Gram and the test helpers."""
    meta = torch.device("meta")
    dtypes = [torch.float32, torch.bfloat16] if quick else [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    seed = torch.empty((), dtype=torch.int64, device=meta)
    calls = []

    def empty(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device=meta)

    projection_shapes = [(256, 4096, 100)] if quick else [(256, 4096, 100), (40, 1000, 10), (1, 33, 1)]
    epilogue_shapes = [(512, 10, 10), (64, 300, 100)]
    if not quick:
        epilogue_shapes += [(4096, 1000, 64), (1, 3, 2)]
    for dtype in dtypes:
        acc = ops.accumulation_dtype(dtype)
        shapes = projection_shapes + ([] if quick else [(4, 2**28 + 16, 8)])  # C·D ≥ 2³¹: 64-bit offsets
        for B, D, C in shapes:
            for dense in (True, False):
                for p in ((0.1,) if quick else (0.0, 0.1)):
                    weight = empty(C, D, dtype=dtype) if dense else None
                    h, grad_v = empty(B, D, dtype=dtype), empty(B, C, dtype=acc)
                    calls.append(lambda h=h, w=weight, C=C, p=p: ops.projection_forward(h, w, C, 3, 0.1, p, seed))
                    scales = (None, empty((), dtype=acc)) if (B, D, C) == shapes[0] and not quick else (None,)
                    for scale in scales:  # the incoming gradient's scale: one more multiply, at the largest blocks
                        calls.append(lambda g=grad_v, w=weight, D=D, p=p, dtype=dtype, scale=scale:
                                     ops.projection_backward(g, w, D, 3, 0.1, p, seed, dtype, grad_scale=scale))
        for B, C, C_prev in epilogue_shapes:
            v, v_prev, target = empty(B, C, dtype=dtype), empty(B, C_prev, dtype=dtype), empty(B, dtype=torch.int64)
            for center in ((True,) if quick else (False, True)):
                for path in ("feature", "batch"):
                    config = dataclasses.replace(ops.epilogue_config(B, C, acc), path=path)
                    for t, weight in ((target, 0.5), (None, 1.0), (target, 0.0)):
                        calls.append(lambda v=v, t=t, vp=v_prev, w=weight, c=center, config=config:
                                     ops.loss_epilogue(v, t, vp, w, True, c, config=config))
                calls.append(lambda v=v, t=target, c=center: ops.loss_epilogue(v, t, None, 0.5, False, c))
            if dtype in (torch.float32, torch.float64):  # the forward's partial sums, reduced by the epilogue
                partials = empty(3, B, C, dtype=dtype)
                calls.append(lambda x=partials, t=target, vp=v_prev: ops.epilogue(x, t, vp, 0.5, True, True))
            calls.append(lambda v=v: ops.cosine_gram(v, False))
    if not quick:
        calls.append(lambda: _with_tf32(lambda: ops.projection_forward(empty(256, 4096), empty(100, 4096), 100, 3,
                                                                       0.1, 0.1, seed)))
        calls.append(lambda: _with_tf32(lambda: ops.loss_epilogue(empty(512, 10), empty(512, dtype=torch.int64),
                                                                  empty(512, 10), 0.5, True, True)))
        calls.append(lambda: ops.weight_window(None, 13, 70, 5, 0.1, 0.3, 9, device=meta))
        calls.append(lambda: ops.weight_window(empty(37, 70), 37, 70, 0, 1.0, 0.3, 9))
        calls.append(lambda: ops.philox_words(5, empty(6, dtype=torch.int64)))
    return calls


def _with_tf32(run):
    saved = os.environ.get("SVP_KERNELS_ALLOW_TF32")
    os.environ["SVP_KERNELS_ALLOW_TF32"] = "1"
    try:
        return run()
    finally:
        if saved is None:
            del os.environ["SVP_KERNELS_ALLOW_TF32"]
        else:
            os.environ["SVP_KERNELS_ALLOW_TF32"] = saved


# ----------------------------------------------------------------------------------------------------
# Compiling offline, and what ptxas reports
# ----------------------------------------------------------------------------------------------------


class OfflineDriver:
    """What Triton's JIT asks of its driver before a launch, answered for an sm_<arch> device. With it a
    launch with warmup=True compiles the kernel as a real launch would, and runs nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


@contextlib.contextmanager
def offline_driver(arch: int):
    from triton.runtime import driver

    driver.set_active(OfflineDriver(arch))
    try:
        yield
    finally:
        try:
            driver.reset_active()
        except RuntimeError:  # no GPU driver to go back to: the offline one stays (it launches nothing)
            pass


@dataclasses.dataclass
class Usage:
    kernel: str
    variant: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    occupancy_warps_per_sm: int

    def row(self, source: str) -> Dict[str, str]:
        return {"source": source, **{k: str(v) for k, v in dataclasses.asdict(self).items()}}


def ptxas_usage(report: str) -> Tuple[int, int, int]:
    """(registers of the entry function, spill store bytes, spill load bytes over all functions) from
    ptxas -v's report."""
    registers = re.findall(r"Used (\d+) registers", report)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if not registers:
        raise RuntimeError(f"no register count in ptxas's report:\n{report}")
    return int(registers[-1]), sum(int(stores) for stores, _ in spills), sum(int(loads) for _, loads in spills)


# sm_90 (H100/H200) per SM: 64 warps, 32 blocks, 64 Ki registers allocated per warp in units of 256, warps
# in units of 4, 228 KiB of shared memory of which a block can take 227 KiB, plus 1 KiB the system keeps.
SM90 = dict(max_warps=64, max_blocks=32, registers=65536, register_unit=256, warp_unit=4,
            shared=228 * 1024, shared_per_block=227 * 1024, shared_reserved=1024)


def occupancy_warps_per_sm(registers: int, num_warps: int, shared_bytes: int, limits: dict = SM90) -> int:
    """Theoretical resident warps per SM (the CUDA occupancy calculator's rules) for a kernel of `num_warps`
    warps using `registers` per thread and `shared_bytes` of shared memory per block."""
    registers_per_warp = math.ceil(registers * 32 / limits["register_unit"]) * limits["register_unit"]
    warps_by_registers = limits["registers"] // registers_per_warp // limits["warp_unit"] * limits["warp_unit"]
    blocks = min(limits["max_blocks"], limits["max_warps"] // num_warps, warps_by_registers // num_warps)
    if shared_bytes > limits["shared_per_block"]:
        return 0
    if shared_bytes:
        blocks = min(blocks, limits["shared"] // (shared_bytes + limits["shared_reserved"]))
    return blocks * num_warps


def compile_variant(kernel, kwargs: dict, name: str, label: str) -> Usage:
    """Compile one launch through Triton's JIT (an offline_driver must be active); its resource use."""
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        compiled = kernel.run(grid=(1,), warmup=True, **kwargs)
    _check_label(kernel, compiled, label)
    registers, spill_stores, spill_loads = ptxas_usage(report.getvalue())
    shared = int(compiled.metadata.shared)
    num_warps = int(compiled.metadata.num_warps)
    return Usage(name, label, registers, spill_stores, spill_loads, shared,
                 occupancy_warps_per_sm(registers, num_warps, shared))


def _check_label(kernel, compiled, label: str) -> None:
    """The variant's constexprs are the ones the JIT specialised on (so its label names what was compiled)."""
    constants = getattr(getattr(compiled, "src", None), "constants", None)
    if not isinstance(constants, dict):
        return  # a Triton that does not keep them: nothing to check
    jit = {kernel.arg_names[key[0]] if isinstance(key, tuple) else str(key) for key in constants}
    labelled = {part.split("=")[0] for part in label.split() if "=" in part} - {"warps", "stages", "i64", "div16"}
    if jit != labelled:
        raise RuntimeError(f"the JIT specialised {sorted(jit)}, the variant names {sorted(labelled)}")


_VARIANTS: list = []  # what the compiling processes inherit


def _compile_one(index: int):
    (name, label), (kernel, kwargs) = _VARIANTS[index]
    try:
        return compile_variant(kernel, kwargs, name, label), None
    except Exception as error:  # a variant that does not compile: report it, compile the others
        return None, f"{name} [{label}]: {type(error).__name__}: {str(error).strip().splitlines()[-1:]}"


def _start_worker(arch: int) -> None:
    from triton.runtime import driver

    driver.set_active(OfflineDriver(arch))


def compile_all(variants, arch: int = 90, jobs: int = 1):
    """Compile each variant for sm_<arch>, in `jobs` forked processes; yields (Usage, None) or (None, the
    error's message), in the variants' order."""
    _VARIANTS[:] = list(variants.items())
    if jobs <= 1:
        with offline_driver(arch):
            for index in range(len(_VARIANTS)):
                yield _compile_one(index)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs, initializer=_start_worker, initargs=(arch,)) as pool:
        yield from pool.imap(_compile_one, range(len(_VARIANTS)))


# ----------------------------------------------------------------------------------------------------
# The CSV shared with other sources (source = cuda, triton-<version>, ...)
# ----------------------------------------------------------------------------------------------------


def read_rows(path: str) -> List[Dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: str, source: str, rows: Iterable[Dict[str, str]]) -> None:
    """Replace `source`'s rows in the CSV at `path` by `rows`, keeping every other source's rows (and any
    columns they add), sorted by source, kernel and variant."""
    kept = [row for row in read_rows(path) if row.get("source") != source]
    columns = list(CSV_COLUMNS) + sorted({key for row in kept for key in row} - set(CSV_COLUMNS))
    merged = sorted(kept + list(rows), key=lambda row: (row["source"], row["kernel"], row["variant"]))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(merged)


def source_name() -> str:
    import triton

    return f"triton-{triton.__version__.split('+')[0]}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 (default 90: H100/H200)")
    parser.add_argument("--sms", type=int, default=H100_SMS, help="SMs the launchers plan for (default 132)")
    parser.add_argument("--quick", action="store_true", help="fewer dtypes, shapes and flags")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    parser.add_argument("--csv", help="write this Triton's rows into this CSV (other sources' rows are kept)")
    parser.add_argument("--compare", action="store_true", help="with --csv: fail if its rows for this Triton "
                                                               "differ, instead of writing them")
    parser.add_argument("--spills-as-recorded", action="store_true",
                        help="with --csv --compare: a variant may spill if the CSV records exactly that row "
                             "(reviewed spills of a pinned older Triton); any other spill still fails")
    parser.add_argument("--only", help="compile only the variants whose 'kernel variant' matches this regex "
                                           "(no CSV then)")
    parser.add_argument("--list", action="store_true", help="print the variants (kernel, tab, variant); compile "
                                                            "nothing")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1" or ops.INTERPRETED:
        print("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled", file=sys.stderr)
        return 2
    launches = []
    for call in problems(args.quick):
        launches += record_launches(call, args.sms)
    variants = distinct_launches(launches)
    if args.only:
        variants = {key: value for key, value in variants.items() if re.search(args.only, " ".join(key))}
        args.csv = None
    if args.list:
        for name, label in variants:
            print(f"{name}\t{label}")
        return 0
    # A fresh cache, so that every variant really compiles and ptxas reports on it; ptxas's report printed.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="svp-triton-cache-")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    source = source_name()
    usages, failures = [], []
    for usage, failure in compile_all(variants, args.arch, args.jobs):
        if failure is not None:
            failures.append(failure)
            print(f"FAILED {failure}", flush=True)
            continue
        usages.append(usage)
        print(f"{usage.kernel:30s} regs={usage.registers:3d} spills={usage.spill_stores}/{usage.spill_loads} "
              f"shared={usage.shared_bytes:6d} warps/SM={usage.occupancy_warps_per_sm:2d}  {usage.variant}", flush=True)
    spilling = [u for u in usages if u.spill_stores or u.spill_loads]
    rows = [usage.row(source) for usage in usages]
    committed = [row for row in read_rows(args.csv) if row.get("source") == source] if args.csv else []
    old = {(r["kernel"], r["variant"]): tuple(r.get(c, "") for c in CSV_COLUMNS) for r in committed}
    if args.spills_as_recorded and args.compare:
        spilling = [u for u in spilling
                    if old.get((u.kernel, u.variant)) != tuple(u.row(source)[c] for c in CSV_COLUMNS)]
    status = 1 if failures or spilling else 0
    if args.csv and args.compare:
        fresh = {(r["kernel"], r["variant"]): tuple(r[c] for c in CSV_COLUMNS) for r in rows}
        if committed and fresh != old:
            changed = sorted(set(fresh.items()) ^ set(old.items()))
            print(f"{args.csv}: {len(changed)} rows of {source} differ from this compilation (regenerate with "
                  f"--csv {args.csv}), e.g. {changed[:4]}", file=sys.stderr)
            status = 1
        elif not committed:
            print(f"{args.csv} has no rows for {source}: nothing to compare")
    elif args.csv:
        write_rows(args.csv, source, rows)
    recorded = " beyond the recorded ones" if args.spills_as_recorded else ""
    print(f"{source}: {len(usages)} of {len(variants)} variants compiled for sm_{args.arch}; "
          f"{len(failures)} failed; {len(spilling)} spill{recorded}; "
          f"fewest warps/SM {min((u.occupancy_warps_per_sm for u in usages), default=0)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
