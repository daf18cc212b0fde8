"""Benchmark runner: fused_local_loss forward+backward against what a user writes, and against the roofline.

    python bench/local_loss.py                                   # CPU: six shapes, dense and implicit R
    python bench/local_loss.py --shapes "256,4096,10;1024,4096,100" --projection implicit --repeats 30
    python bench/local_loss.py --threads 1 --clock thread        # one thread's CPU time (a busy machine)
    python bench/local_loss.py --wait-idle 30 --allocator cached # wait for quiet; freed memory kept mapped
    python bench/local_loss.py --device cuda                     # GPU shape set, fused cuda/triton
    python bench/local_loss.py --alignment cosine_gram,bhattacharyya   # both alignment terms, same minutes

Variants, per shape × dtype × projection:
- the fused backends (``cpu`` on CPU; ``cuda``, ``triton`` on CUDA): ``fused_local_loss(...).loss.backward()``
  with projection_path="fused"; ``cpu-gemm``, ``cuda-gemm``: the same backend with projection_path="gemm"
  (R̃ written out, then the device's GEMM);
- ``eager``: the plain formulation of bench/baselines.py (F.dropout(R, p), h @ R̃ᵀ, F.normalize, the B×B
  Grams, F.cross_entropy); with implicit R it regenerates R from a seeded torch.randn on every call;
- ``compile``: torch.compile(dynamic=False) of that same function, compiled afresh per shape, in the mode of
  --compile-mode (recorded in the compile_mode column; "default" unless asked: max-autotune tries GEMM
  configurations for minutes per shape).
With ``--alignment bhattacharyya`` every variant computes the Bhattacharyya term instead (fused:
``alignment="bhattacharyya"``; eager and compile: F.log_softmax and logsumexp, bench/baselines.py); the
``alignment`` column tells the rows apart.

Before any timing, every fused variant is checked against the float64 oracle (svp_kernels.testing
``ground_truth``: the Philox-in-torch reference backend in float64) on the benchmark's own inputs, and
the eager function at p = 0 against the same oracle; a variant that disagrees is reported, not timed.

Timing: the variants of one shape, dense and implicit R alike, are interleaved in one process (each repeat
runs every variant once, in a rotating order), so load from other processes on a shared machine hits them
alike and ``implicit_over_dense`` (a variant's implicit-R time over its dense-R time) compares times
of the same minutes; p20/p50/p80 of
the repeats after a warm-up. time.perf_counter on CPU; CUDA events with the L2 flushed on CUDA. Each
row records how many CPUs other processes used meanwhile (``other_load_cpus``, from /proc/stat).

Roofline: the run measures the copy bandwidth (a 256 MiB tensor copy on CPU, 1 GiB on CUDA; read + write
bytes / time) and the FMA peak (a 4096² float32 torch.mm, 2·n³ flops / time). For each problem,
bytes = h read + dh written + R read twice when dense, flops = 4·B·C·D (v = h R̃ᵀ and dh = g_v R̃) plus the
epilogue's alignment (feature space 2·B·W² + 2·B·W·C, W = C + C', when W < B; else batch space
2·B²·W + 2·B²·C); roofline time = max(bytes / bandwidth, flops / peak), roofline_fraction = roofline
time / measured median.

Extra peak memory (measured, never a formula): CPU, in a fresh subprocess per measurement: one warm-up
forward+backward, VmRSS, peak reset (/proc/self/clear_refs), one forward+backward, VmHWM; extra = peak −
before − bytes of dh (MALLOC_MMAP_THRESHOLD_=65536 so that RSS follows live memory). CUDA:
max_memory_allocated beyond the inputs and dh.

Rows are appended to bench/results/<device>.csv (CSV_COLUMNS) after each shape and dtype, so a run stopped at a
time limit keeps what it measured; a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

import torch  # noqa: E402

import svp_kernels as sk  # noqa: E402
from svp_kernels import backends  # noqa: E402
from svp_kernels.testing import Case, ground_truth, make_inputs  # noqa: E402  (the one oracle)
from svp_kernels.testing import run as run_fused  # noqa: E402

import baselines  # noqa: E402

CSV_COLUMNS = ["op", "B", "D", "C", "p", "dtype", "projection", "variant", "median_ms", "p20_ms", "p80_ms",
               "roofline_ms", "roofline_fraction", "speedup_vs_eager", "speedup_vs_compile", "extra_peak_MiB",
               "other_load_cpus", "copy_GBps", "fma_peak_GFLOPs", "clock", "allocator", "threads", "device",
               "torch", "triton", "commit", "timestamp", "implicit_over_dense", "compile_mode", "alignment"]
# (B, D, C) with C' = C.
CPU_SHAPES = [(256, 4096, 10), (128, 65536, 10), (4096, 1024, 10), (1024, 4096, 100), (128, 3072, 10),
              (512, 1024, 100)]
GPU_SHAPES = [(256, 4096, 10), (128, 65536, 10), (1024, 65536, 100), (4096, 1024, 10), (256, 768, 1000),
              (8192, 4096, 10)]
BASELINES = ("eager", "compile")
GEMM_SUFFIX = "-gemm"  # "<backend>-gemm": the backend's GEMM projection path; "<backend>": its fused kernels
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DROPOUT_SEED = 1234
ALIGNMENT_WEIGHT = 0.7
ORACLE_TOLERANCE = 1e-4  # float32 fused vs float64 oracle: max |error| / max(1, max |oracle|), loss and dh
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


# ----------------------------------------------------------------------------------------------------
# Environment: device slug, versions, commit
# ----------------------------------------------------------------------------------------------------

def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def device_slug(device: str, threads: int) -> str:
    """cpu-<model name>-<n>threads, or the GPU's name (e.g. NVIDIA-H100-80GB-HBM3)."""
    if device == "cuda":
        return slug(torch.cuda.get_device_name())
    return f"cpu-{slug(cpu_model())}-{threads}threads"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return ""


def git_commit() -> str:
    """Short HEAD, with "-dirty" when sources differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "csrc", "svp_kernels", "setup.py", "bench"],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()
    return head + ("-dirty" if dirty else "")


# ----------------------------------------------------------------------------------------------------
# One problem: inputs, the forward+backward step of each variant, the oracle check
# ----------------------------------------------------------------------------------------------------

def make_problem(shape, p, dtype, projection, device, alignment="cosine_gram"):
    """(case, h, target, v_prev, projection) with C' = C, from the test helpers."""
    B, D, C = shape
    case = Case(B, D, C, C_prev=C, projection=projection, p=p, alignment_weight=ALIGNMENT_WEIGHT, alignment=alignment)
    h, target, v_prev, proj = make_inputs(case, dtype=dtype, device=device)
    return case, h, target, v_prev, proj


def baseline_loss(case, target, v_prev, projection):
    """The user's loss as a function of h: bench/baselines.py with this problem's other inputs."""
    if isinstance(projection, sk.ImplicitProjection):
        return lambda h: baselines.implicit_local_loss(h, target, v_prev, case.C, projection.seed, case.p,
                                                       case.alignment_weight, case.alignment)
    return lambda h: baselines.local_loss(h, target, v_prev, projection, case.p, case.alignment_weight,
                                          case.alignment)


def fused_variant(variant: str) -> tuple[str, str]:
    """(backend, projection_path) of a fused variant: "cuda" -> ("cuda", "fused"), "cuda-gemm" -> ("cuda", "gemm")."""
    if variant.endswith(GEMM_SUFFIX):
        return variant[:-len(GEMM_SUFFIX)], "gemm"
    return variant, "fused"


def make_step(variant: str, case, h, target, v_prev, projection, device: str, compile_mode: str = "default"):
    """A callable running one forward+backward of `variant` and returning dh."""
    if variant not in BASELINES:
        backend, path = fused_variant(variant)

        def fused():
            return run_fused(case, h, target, v_prev, projection, backend, seed=DROPOUT_SEED, projection_path=path)[4]

        return fused
    loss = baseline_loss(case, target, v_prev, projection)
    if variant == "compile":
        loss = torch.compile(loss, dynamic=False, mode=None if compile_mode == "default" else compile_mode)

    def baseline():
        leaf = h.detach().requires_grad_(True)
        loss(leaf).backward()
        return leaf.grad

    return baseline


def scaled_error(actual, expected) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return (actual - expected).abs().max().item() / max(1.0, expected.abs().max().item())


def oracle_check(variant: str, case, h, target, v_prev, projection):
    """None when `variant` agrees with the float64 oracle on these inputs, else what disagrees.

    Fused variants: loss and dh at the benchmark's p and seed. Baselines (their dropout is torch's RNG, not
    Philox): the eager function at p = 0 with the dense R, which is what both baselines compute.
    """
    if variant in BASELINES:
        if not isinstance(projection, torch.Tensor):
            return None  # the dense problem of the same shape checks the same function
        exact = Case(case.B, case.D, case.C, C_prev=case.C_prev, projection="dense", p=0.0,
                     alignment_weight=case.alignment_weight, alignment=case.alignment)
        leaf = h.detach().requires_grad_(True)
        loss = baselines.local_loss(leaf, target, v_prev, projection, 0.0, case.alignment_weight, case.alignment)
        loss.backward()
        got = (loss, leaf.grad)
        expected = ground_truth(exact, h, target, v_prev, projection)
    else:
        backend, path = fused_variant(variant)
        result = run_fused(case, h, target, v_prev, projection, backend, seed=DROPOUT_SEED, projection_path=path)
        got = (result[0], result[4])
        expected = ground_truth(case, h, target, v_prev, projection, seed=DROPOUT_SEED)
    errors = {"loss": scaled_error(got[0], expected[0]), "dh": scaled_error(got[1], expected[4])}
    bad = {name: error for name, error in errors.items() if not error <= ORACLE_TOLERANCE}
    return None if not bad else "disagrees with the float64 oracle: " + ", ".join(
        f"{name} scaled error {error:.2e}" for name, error in bad.items())


def moved_bytes(shape, dtype, projection: str) -> int:
    """Minimal traffic: h read once, dh written once, R read twice when dense (docs/design.md §2)."""
    B, D, C = shape
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * B * D * size + (2 * C * D * size if projection == "dense" else 0)


def minimal_flops(shape, alignment: str = "cosine_gram") -> int:
    """4·B·C·D for the two projections plus the cosine-Gram alignment on the cheaper side (C' = C, W = 2C); the
    Bhattacharyya term's O(B·C) row pass is left out (no multiply-add bound)."""
    B, D, C = shape
    if alignment == "bhattacharyya":
        return 4 * B * C * D
    W = 2 * C
    alignment = 2 * B * W * W + 2 * B * W * C if W < B else 2 * B * B * W + 2 * B * B * C
    return 4 * B * C * D + alignment


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------

def percentiles(samples):
    """(p20, p50, p80) with linear interpolation; one sample gives it three times."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return deciles[1], statistics.median(samples), deciles[7]


class ForeignLoad:
    """CPUs used by OTHER processes while a measurement ran (from /proc/stat minus this process's CPU time, and
    with children=True minus that of the child processes it waited for meanwhile, theirs included)."""

    TICKS = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _busy_seconds() -> float:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
        user, nice, system, idle, iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / ForeignLoad.TICKS

    def __init__(self, children: bool = False):
        self.fields = 4 if children else 2  # os.times(): user, system, children's user, children's system

    def __enter__(self):
        self.wall, self.busy, self.own = time.monotonic(), self._busy_seconds(), sum(os.times()[:self.fields])
        return self

    def __exit__(self, *exc):
        wall = time.monotonic() - self.wall
        own = sum(os.times()[:self.fields]) - self.own
        self.cpus = max(0.0, (self._busy_seconds() - self.busy - own) / max(wall, 1e-9))
        return False


def wait_for_idle(limit_s: float, threshold: float) -> float:
    """Waits (up to limit_s) until other processes use < threshold CPUs over a 1 s sample; returns that load."""
    deadline = time.monotonic() + limit_s
    while True:
        with ForeignLoad() as load:
            time.sleep(1.0)
        if load.cpus < threshold or time.monotonic() > deadline:
            return load.cpus
        time.sleep(2.0)


def keep_freed_memory() -> None:
    """glibc: serve every allocation from the heap and keep freed memory (--allocator cached).

    By default glibc mmaps large blocks and unmaps them on free, so every call's fresh dh is page-faulted in
    again (in this VM a 4 KiB first touch can cost several µs); with this the timing sees the kernels, as a
    caching allocator would.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt takes a C int
    if not (libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(1 << 30))
            and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))):
        raise RuntimeError("mallopt refused the thresholds")


_L2_FLUSH = None


CPU_CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
_CPU_CLOCK = CPU_CLOCKS["wall"]


def timed_call(step, device: str) -> float:
    """Milliseconds of one call: the CPU clock (--clock), or CUDA events after an L2 flush on CUDA."""
    global _L2_FLUSH
    if device != "cuda":
        start = _CPU_CLOCK()
        step()
        return (_CPU_CLOCK() - start) * 1e3
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    _L2_FLUSH.zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def interleaved_times(steps: dict, device: str, warmup: int, repeats: int):
    """{variant: [ms, ...]}: each repeat runs every variant once, the order rotating by one per repeat."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    if device == "cuda":
        torch.cuda.synchronize()
    names = list(steps)
    samples = {name: [] for name in names}
    for repeat in range(repeats):
        for k in range(len(names)):
            name = names[(repeat + k) % len(names)]
            samples[name].append(timed_call(steps[name], device))
    return samples


def copy_bandwidth(device: str, repeats: int):
    """(MiB, (p20, p50, p80) GB/s): a large tensor copy, read + write bytes / time."""
    nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    destination = torch.empty_like(source)
    samples = interleaved_times({"copy": lambda: destination.copy_(source)}, device, 2, repeats)["copy"]
    return nbytes >> 20, percentiles(sorted(2 * nbytes / (ms * 1e-3) / 1e9 for ms in samples))


def fma_peak(device: str, repeats: int, n: int = 4096):
    """(n, (p20, p50, p80) GFLOP/s) of an n × n float32 torch.mm (2·n³ flops), TF32 off."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        samples = interleaved_times({"mm": lambda: torch.mm(a, b)}, device, 1, repeats)["mm"]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return n, percentiles(sorted(2 * n**3 / (ms * 1e-3) / 1e9 for ms in samples))


# ----------------------------------------------------------------------------------------------------
# Extra peak memory
# ----------------------------------------------------------------------------------------------------

def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def memory_probe(spec: dict) -> dict:
    """Runs in a fresh subprocess: extra peak RSS of one forward+backward (see the module docstring)."""
    torch.set_num_threads(spec["threads"])
    case, h, target, v_prev, projection = make_problem(tuple(spec["shape"]), spec["p"], DTYPES[spec["dtype"]],
                                                       spec["projection"], "cpu", spec["alignment"])
    step = make_step(spec["variant"], case, h, target, v_prev, projection, "cpu")
    warm = step()  # code paged in, threads up, graph compiled
    del warm
    gc.collect()
    before = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    dh = step()
    peak = _proc_status_bytes("VmHWM")
    return {"extra": peak - before - dh.numel() * dh.element_size()}


def cpu_extra_memory(spec: dict, processes: int):
    """Median extra peak bytes over `processes` fresh subprocesses, or an error string."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(spec["threads"]))
    extras = []
    for _ in range(processes):
        done = subprocess.run([sys.executable, __file__, "--_memory-probe", json.dumps(spec)], env=env,
                              capture_output=True, text=True, cwd=REPO)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            return f"memory probe failed (rc {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
        extras.append(json.loads(lines[-1])["extra"])
    return statistics.median(extras)


def cuda_extra_memory(step, h):
    """max_memory_allocated beyond the inputs and dh, for one forward+backward after a warm-up."""
    step()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    dh = step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before - dh.numel() * dh.element_size()


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------

def parse_shapes(text: str):
    return [tuple(int(x) for x in part.split(",")) for part in text.replace(" ", "").split(";") if part]


def default_variants(device: str) -> list[str]:
    """The fused backends that run on `device` (not the reference, the oracle; triton on CPU is only its
    interpreter), each with its GEMM projection path where it has one, then the two baselines."""
    fused = [name for name in backends.available_backends()
             if name != "reference" and not (device == "cpu" and name == "triton")
             and backends.load(name).supports(torch.device(device), torch.float32)]
    gemm = [name + GEMM_SUFFIX for name in fused if "gemm" in getattr(backends.load(name), "PROJECTION_PATHS", ())]
    return [*fused, *gemm, *BASELINES]


def variant_supports(variant: str, device: str, dtype) -> bool:
    if variant in BASELINES:
        return True
    backend, path = fused_variant(variant)
    if not backends.is_available(backend):
        return False
    module = backends.load(backend)
    return module.supports(torch.device(device), dtype) and (path == "fused" or
                                                              path in getattr(module, "PROJECTION_PATHS", ()))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--variants", help="comma list of fused backends and eager/compile (default: all)")
    parser.add_argument("--shapes", help='"B,D,C;B,D,C" (default: the set for the device)')
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--dtype", help="comma list (default: float32 on CPU, float32,bfloat16 on CUDA)")
    parser.add_argument("--projection", default="dense,implicit", help="dense,implicit")
    parser.add_argument("--alignment", default="cosine_gram", help="comma list: cosine_gram,bhattacharyya")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 20 CPU, 50 CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--memory-repeats", type=int, default=1, help="fresh processes per CPU memory probe")
    parser.add_argument("--no-memory", action="store_true", help="skip the extra-peak-memory measurements")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="CPU: before each problem wait up to SECONDS for other processes to go idle, and "
                             "re-time (--attempts) a problem timed while they used more than --max-foreign CPUs")
    parser.add_argument("--max-foreign", type=float, default=0.3, help="with --wait-idle (default 0.3 CPUs)")
    parser.add_argument("--attempts", type=int, default=3, help="with --wait-idle: timings per problem at most")
    parser.add_argument("--clock", choices=sorted(CPU_CLOCKS), default="wall",
                        help="CPU: wall time (perf_counter), or this thread's CPU time (thread_time; needs "
                             "--threads 1, and then ignores time lost to other processes on a shared machine)")
    parser.add_argument("--memory-variants", help="comma list: measure extra peak memory of these only")
    parser.add_argument("--allocator", choices=["system", "cached"], default="system",
                        help="CPU timing: glibc as configured (fresh dh pages faulted in on every call) or "
                             "'cached' (freed memory kept, like a caching allocator); memory probes use their own")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile mode of the compile baseline (default: default)")
    parser.add_argument("--csv", help="output CSV (default bench/results/<device>.csv); 'none' to not write")
    parser.add_argument("--_memory-probe", dest="memory_probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 50 if args.device == "cuda" else 20
    if args.clock == "thread" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock thread measures one thread: it needs --device cpu --threads 1")
    return args


def append_csv(path: Path, rows: list[dict], columns: list[str], extrasaction: str = "raise") -> None:
    """Appends rows to the results CSV at path, writing the header first when the file is new or empty. A
    file whose header is a prefix of `columns` (written before columns were added) is rewritten with the
    new header first, its rows' new fields empty; any other header is refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists() or path.stat().st_size == 0
    if not new_file:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            header, old_rows = reader.fieldnames or [], list(reader)
        if header != columns[:len(header)]:
            raise ValueError(f"{path}: its columns {header} are not a prefix of {columns}")
        if len(header) < len(columns):
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(old_rows)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction=extrasaction)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(json.loads(args.memory_probe))), flush=True)
        return 0
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if device == "cpu":
        global _CPU_CLOCK
        _CPU_CLOCK = CPU_CLOCKS[args.clock]
        torch.set_num_threads(args.threads)
        if args.allocator == "cached":
            keep_freed_memory()
    shapes = parse_shapes(args.shapes) if args.shapes else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    dtype_names = (args.dtype or ("float32,bfloat16" if device == "cuda" else "float32")).split(",")
    projections = args.projection.split(",")
    variants = args.variants.split(",") if args.variants else default_variants(device)

    device_name = device_slug(device, args.threads)
    meta = {"clock": args.clock if device == "cpu" else "cuda-events",
            "allocator": args.allocator if device == "cpu" else "", "threads": args.threads if device == "cpu" else "",
            "device": device_name, "torch": torch.__version__,
            "triton": triton_version(), "commit": git_commit(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "compile_mode": args.compile_mode if "compile" in variants else ""}
    print(f"# svp_kernels benchmark on {device_name}: torch {meta['torch']}, triton {meta['triton'] or '-'}, "
          f"commit {meta['commit']}, variants {variants}, p = {args.p}, repeats {args.repeats}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    if device == "cpu" and args.wait_idle:
        wait_for_idle(args.wait_idle, args.max_foreign)
    copy_mib, copy_rates = copy_bandwidth(device, max(args.repeats, 5))
    gemm_n, peak_rates = fma_peak(device, 5)
    bandwidth, peak = copy_rates[1], peak_rates[1]
    meta.update(copy_GBps=f"{bandwidth:.4g}", fma_peak_GFLOPs=f"{peak:.4g}")
    print(f"copy bandwidth ({copy_mib} MiB, read + write): {bandwidth:.1f} GB/s [p20 {copy_rates[0]:.1f}, "
          f"p80 {copy_rates[2]:.1f}]; FMA peak ({gemm_n}² float32 torch.mm): {peak:.1f} GFLOP/s "
          f"[p20 {peak_rates[0]:.1f}, p80 {peak_rates[2]:.1f}]", flush=True)

    path = None if args.csv == "none" else Path(args.csv) if args.csv else RESULTS / f"{device_name}.csv"
    rows = []
    for shape in shapes:
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            for alignment in args.alignment.split(","):
                new = bench_shape(shape, dtype_name, dtype, projections, variants, bandwidth, peak, meta, args,
                                  alignment)
                if path is not None:  # shape by shape: a run stopped at a time limit keeps what it measured
                    append_csv(path, new, CSV_COLUMNS, extrasaction="ignore")
                rows += new
                gc.collect()

    if path is not None:
        print(f"\nappended {len(rows)} rows to {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    print()
    print(markdown_table(rows))
    return 0


def bench_shape(shape, dtype_name, dtype, projections, variants, bandwidth, peak, meta, args,
                alignment="cosine_gram"):
    """CSV rows (dicts) of every (projection, variant) on one shape and dtype: oracle check, then all of them
    timed interleaved in one loop, so that every ratio (vs eager, vs compile, implicit vs dense) compares
    times taken in the same minutes; then memory."""
    device = args.device
    B, D, C = shape
    if "compile" in variants:
        torch._dynamo.reset()  # compiled afresh per shape (both projections' functions stay cached)
    rows, steps, problems = {}, {}, {}
    for projection in projections:
        case, h, target, v_prev, proj = problems[projection] = make_problem(shape, args.p, dtype, projection, device,
                                                                             alignment)
        roofline_ms = max(moved_bytes(shape, dtype, projection) / (bandwidth * 1e9),
                          minimal_flops(shape, alignment) / (peak * 1e9)) * 1e3
        base = {"op": "fused_local_loss", "alignment": alignment, "B": B, "D": D, "C": C, "p": args.p,
                "dtype": dtype_name,
                "projection": projection, "roofline_ms": f"{roofline_ms:.4g}", **meta}
        for variant in variants:
            key = (projection, variant)
            rows[key] = row = {**base, "variant": variant}
            if not variant_supports(variant, device, dtype):
                row["error"] = "not supported"
                continue
            try:
                problem = oracle_check(variant, case, h, target, v_prev, proj)
                if problem is None:
                    steps[key] = make_step(variant, case, h, target, v_prev, proj, device, args.compile_mode)
                    steps[key]()  # compile / first touch before the timed warm-up
            except Exception as error:  # a failing variant (e.g. torch.compile) is reported, not fatal
                traceback.print_exc()
                problem = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            if problem is not None:
                row["error"] = problem
                print(f"  {shape} {projection} {variant}: {problem}", flush=True)
    best = None
    for _ in range(max(1, args.attempts) if args.wait_idle else 1):
        if device == "cpu" and args.wait_idle:
            wait_for_idle(args.wait_idle, args.max_foreign)
        with ForeignLoad() as load:
            samples = interleaved_times(steps, device, args.warmup, args.repeats)
        if best is None or load.cpus < best[1].cpus:
            best = (samples, load)
        if load.cpus <= args.max_foreign:
            break
    samples, load = best
    medians = {}
    for key, times in samples.items():
        p20, p50, p80 = percentiles(times)
        medians[key] = p50
        rows[key].update(median_ms=f"{p50:.4g}", p20_ms=f"{p20:.4g}", p80_ms=f"{p80:.4g}",
                         roofline_fraction=f"{float(rows[key]['roofline_ms']) / p50:.3f}",
                         other_load_cpus=f"{load.cpus:.2f}")
    for (projection, variant), median in medians.items():
        row = rows[(projection, variant)]
        for baseline in BASELINES:
            if (projection, baseline) in medians:
                row[f"speedup_vs_{baseline}"] = f"{medians[(projection, baseline)] / median:.3f}"
        if projection == "implicit" and ("dense", variant) in medians:
            row["implicit_over_dense"] = f"{median / medians[('dense', variant)]:.3f}"
        measure_memory = not args.no_memory and (not args.memory_variants
                                                 or variant in args.memory_variants.split(","))
        if measure_memory:
            if device == "cuda":
                extra = cuda_extra_memory(steps[(projection, variant)], problems[projection][1])
            else:
                spec = {"shape": list(shape), "p": args.p, "dtype": dtype_name, "projection": projection,
                        "variant": variant, "threads": args.threads, "alignment": alignment}
                extra = cpu_extra_memory(spec, args.memory_repeats)
            if isinstance(extra, str):
                row["memory_error"] = extra
            else:
                row["extra_peak_MiB"] = f"{extra / 2**20:.3f}"
        roofline_ms = float(row["roofline_ms"])
        print(f"  {shape} {dtype_name} {alignment} {projection} {variant}: {row['median_ms']} ms [{row['p20_ms']}, "
              f"{row['p80_ms']}], {100 * roofline_ms / median:.0f} % of the roofline "
              f"({roofline_ms:.3f} ms), other processes used {load.cpus:.2f} CPUs", flush=True)
    return list(rows.values())


def markdown_table(rows) -> str:
    """shape | R | variant | median ms [p20, p80] | % of roofline | vs eager | vs compile | extra MiB."""
    lines = ["| shape (B, D, C) | dtype | alignment | R | variant | median ms [p20, p80] | roofline ms | % of roofline "
             "| speed-up vs eager | vs compile | implicit / dense | extra peak MiB | other load (CPUs) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| ({r['B']}, {r['D']}, {r['C']}) | {r['dtype']} | {r.get('alignment', 'cosine_gram')} | "
                f"{r['projection']} | {r['variant']} |")
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | | | |")
            continue
        fraction = f"{100 * float(r['roofline_fraction']):.0f} %"
        speedups = [f"{float(r[key]):.2f}×" if key in r else "" for key in ("speedup_vs_eager", "speedup_vs_compile")]
        implicit = f"{float(r['implicit_over_dense']):.2f}" if "implicit_over_dense" in r else ""
        extra = r.get("extra_peak_MiB", r.get("memory_error", ""))
        lines.append(f"{head} {r['median_ms']} [{r['p20_ms']}, {r['p80_ms']}] | {r['roofline_ms']} | {fraction} | "
                     f"{speedups[0]} | {speedups[1]} | {implicit} | {extra} | {r['other_load_cpus']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
