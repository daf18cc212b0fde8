"""Benchmark runner: forward+backward time, extra peak memory and bandwidth of fused_local_loss per backend.

    python bench/run.py                                   # CPU: the four target shapes of issue 2
    python bench/run.py --wait-idle 90 --breakdown        # CPU, on a shared machine (how bench/results was made)
    python bench/run.py --device cuda                     # GPU: the shape set of issue 3
    python bench/run.py --backends cpu,reference --shapes "256,4096,10;4096,1024,10" --repeats 30

For every shape × dtype × projection × backend it times ``fused_local_loss(...).loss.backward()``
(w.r.t. h; target and v_prev (B, C' = C) random, from tests/cases.py) and reports p20/p50/p80 over
the repeats after a warm-up: time.perf_counter on CPU, CUDA events with the L2 flushed before each
call on CUDA. Backends are the registered ones that run on the device plus ``compile`` =
torch.compile(dynamic=False) of the reference backend (mode "max-autotune-no-cudagraphs" on CUDA),
compiled afresh per shape.

Extra peak memory, measured, never a formula (metric extra_peak_memory; peak_memory_beyond_inputs is
the same peak without subtracting dh):
- CPU: in a FRESH SUBPROCESS per measurement (``--memory-repeats`` of them, default 3): build the
  inputs, run one forward+backward at the same shape as a warm-up (loads code, starts threads,
  compiles), free its result, record VmRSS, reset the peak (write "5" to /proc/self/clear_refs), run
  one forward+backward, read VmHWM. extra = VmHWM − VmRSS before − bytes of the returned dh. The
  subprocess runs with MALLOC_MMAP_THRESHOLD_=65536 so glibc returns every freed block ≥ 64 KiB to
  the OS at once: RSS then follows live memory, and a freed warm-up buffer cannot hide a peak.
  Resolution: one 4 KiB page, about ±70 KiB of RSS-counter lag.
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the allocation
  before the run (inputs) and the bytes of dh.

Bandwidth = (bytes of h read + dh written + R read twice when dense) / time, next to a measured
copy bandwidth (a large tensor copied on the device: bytes read + written / time). On CPU the run
also records the Philox throughput of each backend (projection at B = 1) and the time of the two
plain GEMMs of each shape (torch.mm), the inputs of the roofline in bench/NOTES.md; --breakdown adds
projection forward / epilogue / projection backward timed one by one, at p and at p = 0.

The CPU runs share their machine: each timing records how many CPUs other processes used meanwhile
("other load"), and --wait-idle waits for quiet and re-times busy measurements.

Rows are appended to bench/results/<device>.csv with the columns of CSV_COLUMNS (the projection is
part of `op`: fused_local_loss_dense / fused_local_loss_implicit); a markdown table is printed.
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
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import svp_kernels as sk  # noqa: E402
from svp_kernels import backends  # noqa: E402
from tests.cases import Case, make_inputs, run as run_case  # noqa: E402  (the one baseline)

CSV_COLUMNS = ["op", "backend", "B", "D", "C", "p", "dtype", "metric", "unit", "p20", "p50", "p80",
               "device", "torch", "triton", "commit", "timestamp"]
# (B, D, C): issue 2 (CPU targets) and issue 3 (H100 measurement).
CPU_SHAPES = [(256, 4096, 10), (128, 65536, 10), (4096, 1024, 10), (1024, 4096, 100)]
GPU_SHAPES = [(256, 4096, 10), (128, 65536, 10), (1024, 65536, 100), (4096, 1024, 10), (256, 768, 1000),
              (8192, 4096, 10)]
# Issue 2's CPU targets: minimum speed-up of the cpu backend over reference at each shape.
CPU_SPEEDUP_TARGETS = {(256, 4096, 10): 2.0, (128, 65536, 10): 2.0, (4096, 1024, 10): 20.0,
                       (1024, 4096, 100): 2.0}
CPU_MEMORY_TARGET = 0.10  # extra peak memory ≤ 10 % of the reference's
DROPOUT_SEED = 1234
PHILOX_SHAPE = (1, 65536, 16)  # (B, D, C) of the Philox throughput probe: C·D = 1 M evaluations per mask
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


# ----------------------------------------------------------------------------------------------------
# Environment: device slug, versions, commit
# ----------------------------------------------------------------------------------------------------

def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def device_slug(device: str, threads: int) -> str:
    """cpu-<model name>-<n>threads, or the GPU's name (e.g. NVIDIA-H100-80GB-HBM3)."""
    if device == "cuda":
        return slug(torch.cuda.get_device_name())
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu-{slug(model)}-{threads}threads"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return ""


def git_commit() -> str:
    """Short HEAD, with "-dirty" when the tree has changes; "uncommitted" before the first commit."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    # Changed or untracked sources make the measured code differ from HEAD.
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "csrc", "svp_kernels", "setup.py"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return head + ("-dirty" if dirty else "")


# ----------------------------------------------------------------------------------------------------
# One benchmark problem: inputs and the forward+backward step of a backend
# ----------------------------------------------------------------------------------------------------

def make_problem(shape, p, dtype, projection, device):
    """(case, h, target, v_prev, projection) with C' = C, h requiring grad, from the test helpers."""
    B, D, C = shape
    case = Case(B, D, C, C_prev=C, projection=projection, p=p)
    h, target, v_prev, proj = make_inputs(case, dtype=dtype, device=device)
    return case, h, target, v_prev, proj


def make_step(backend: str, case, h, target, v_prev, projection, device: str):
    """A callable running one forward+backward on `backend` and returning dh.

    "compile" is torch.compile of the reference backend's function (loss only; backward via AOTAutograd),
    compiled fresh for this shape (dynamo reset, dynamic=False: no shape-generic kernels, no recompile
    limit across shapes).
    """
    if backend != "compile":
        def step():
            return run_case(case, h, target, v_prev, projection, backend, seed=DROPOUT_SEED)[4]

        return step

    torch._dynamo.reset()
    implicit = isinstance(projection, sk.ImplicitProjection)

    def reference_loss(h_, target_, v_prev_, weight_):
        return sk.fused_local_loss(h_, target_, v_prev_, projection=projection if implicit else weight_,
                                   p=case.p, seed=DROPOUT_SEED, alignment_weight=case.alignment_weight,
                                   reduction=case.reduction, center=case.center, backend="reference").loss

    mode = "max-autotune-no-cudagraphs" if device == "cuda" else None
    compiled = torch.compile(reference_loss, dynamic=False, mode=mode)
    weight = None if implicit else projection

    def step():
        leaf = h.detach().requires_grad_(True)
        compiled(leaf, target, v_prev, weight).backward()
        return leaf.grad

    return step


def moved_bytes(shape, dtype, projection: str) -> int:
    """Roofline traffic: h read once, dh written once, R read twice when dense (DESIGN.md §2)."""
    B, D, C = shape
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * B * D * size + (2 * C * D * size if projection == "dense" else 0)


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------

def keep_freed_memory() -> None:
    """glibc: serve every allocation from the heap and never give freed memory back (--allocator cached).

    By default glibc mmaps blocks ≥ 32 MiB (and smaller ones until its dynamic threshold grows) and unmaps
    them on free, so every call's fresh dh is page-faulted in again; in a VM a first touch can cost
    several µs per 4 KiB page. With this the timing sees the kernels, as a caching allocator would.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt takes a C int: values must fit in 31 bits
    if not (libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(1 << 30))
            and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))):
        raise RuntimeError("mallopt refused the thresholds")


def percentiles(samples):
    """(p20, p50, p80) with linear interpolation; one sample gives it three times."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return deciles[1], statistics.median(samples), deciles[7]


class ForeignLoad:
    """CPUs used by OTHER processes while a measurement ran (from /proc/stat minus this process's CPU time).

    The CPU runs share their machine; a timing taken while others compute is flagged, not trusted.
    """

    TICKS = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _busy_seconds() -> float:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
        user, nice, system, idle, iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / ForeignLoad.TICKS

    def __enter__(self):
        self.wall, self.busy, self.own = time.monotonic(), self._busy_seconds(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc):
        wall = time.monotonic() - self.wall
        own = sum(os.times()[:2]) - self.own
        self.cpus = max(0.0, (self._busy_seconds() - self.busy - own) / max(wall, 1e-9))
        return False


def wait_for_idle(limit_s: float, threshold: float = 0.15) -> float:
    """Waits (up to limit_s) until other processes use < threshold CPUs over a 1 s sample; returns that load."""
    deadline = time.monotonic() + limit_s
    while True:
        with ForeignLoad() as load:
            time.sleep(1.0)
        if load.cpus < threshold or time.monotonic() > deadline:
            return load.cpus
        time.sleep(4.0)


def timed_quietly(step, timer, args):
    """(samples, foreign load): with --wait-idle on CPU, waits for quiet, and re-times (up to --attempts
    times) while other processes used more than --max-foreign CPUs; keeps the quietest attempt."""
    best = None
    for _ in range(max(1, args.attempts) if args.wait_idle else 1):
        if args.device == "cpu" and args.wait_idle:
            wait_for_idle(args.wait_idle, args.max_foreign)
        with ForeignLoad() as load:
            samples = timer(step, args.warmup, args.repeats)
        if best is None or load.cpus < best[1]:
            best = (samples, load.cpus)
        if load.cpus <= args.max_foreign:
            break
    return best


def time_cpu(step, warmup: int, repeats: int):
    """Milliseconds per call (time.perf_counter), after `warmup` calls."""
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


_L2_FLUSH = None


def time_cuda(step, warmup: int, repeats: int):
    """Milliseconds per call from CUDA events, the L2 flushed before each call (triton do_bench style)."""
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        _L2_FLUSH.zero_()
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def copy_bandwidth(device: str, threads: int, repeats: int):
    """STREAM-like copy bandwidth in GB/s (read + write bytes / time): 256 MiB on CPU, 1 GiB on CUDA."""
    nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    destination = torch.empty_like(source)
    if device == "cuda":
        samples = time_cuda(lambda: destination.copy_(source), 3, repeats)
    else:
        samples = time_cpu(lambda: destination.copy_(source), 2, repeats)
    rates = sorted(2 * nbytes / (ms * 1e-3) / 1e9 for ms in samples)
    return nbytes, percentiles(rates)


def gemm_pair_time(h, weight, device: str, warmup: int, repeats: int):
    """(p20, p50, p80) ms of the two GEMMs of a dense p = 0 projection, v = h Rᵀ and dh = g_v R, by torch.mm.

    The floor for the compute part of forward+backward (4·B·C·D flops) at this shape and thread count.
    """
    h = h.detach()
    grad_v = torch.randn(h.shape[0], weight.shape[0], dtype=h.dtype, device=device)

    def gemms():
        return h @ weight.t(), grad_v @ weight

    return percentiles((time_cuda if device == "cuda" else time_cpu)(gemms, warmup, repeats))


def stage_times(backend: str, h, target, v_prev, projection, p: float, device: str, warmup: int, repeats: int):
    """{stage: (p20, p50, p80) ms} for the three stages of `backend` run one by one through its module:
    projection forward (no autograd), loss epilogue (CE, FA and g_v), projection backward (dh = g_v R̃).
    """
    from svp_kernels.api import _check_projection

    module = backends.load(backend)
    args = _check_projection(projection, h, p)
    timer = time_cuda if device == "cuda" else time_cpu
    h_leaf = h.detach().requires_grad_(True)

    def forward():
        with torch.no_grad():
            return module.projection(h_leaf, args.weight, args.out_features, args.proj_seed, args.proj_std, p,
                                     DROPOUT_SEED)

    v = forward()

    def epilogue():
        with torch.no_grad():
            return module.epilogue(v, target, v_prev, 0.7, True, False)

    v_graph = module.projection(h_leaf, args.weight, args.out_features, args.proj_seed, args.proj_std, p,
                                DROPOUT_SEED)
    grad_v = torch.randn_like(v_graph)

    def backward():
        return torch.autograd.grad(v_graph, h_leaf, grad_v, retain_graph=True)[0]

    return {name: percentiles(timer(fn, warmup, repeats))
            for name, fn in (("projection_forward", forward), ("loss_epilogue", epilogue),
                             ("projection_backward", backward))}


def philox_throughput(backend: str, repeats: int):
    """Philox evaluations per second of `backend`'s projection at B = 1 (the GEMM is negligible there).

    Dense R with p > 0 needs one evaluation per element of R (the mask); the implicit R with p > 0 needs
    two (the mask and R). Returns {"dense": (p20, p50, p80), "implicit": ...} in G evaluations / s.
    """
    C, D = PHILOX_SHAPE[2], PHILOX_SHAPE[1]
    h = torch.randn(1, D)
    result = {}
    for name, projection, evaluations in (("dense", torch.randn(C, D) / D**0.5, C * D),
                                          ("implicit", sk.ImplicitProjection(C, seed=7), 2 * C * D)):
        def forward():
            return sk.dropout_projection(h, projection, p=0.1, seed=DROPOUT_SEED, backend=backend)

        samples = time_cpu(forward, 2, repeats)
        rates = sorted(evaluations / (ms * 1e-3) / 1e9 for ms in samples)
        result[name] = percentiles(rates)
    return result


# ----------------------------------------------------------------------------------------------------
# Extra peak memory
# ----------------------------------------------------------------------------------------------------

def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS


def memory_probe(spec: dict) -> dict:
    """Runs in a fresh subprocess: extra peak RSS of one forward+backward (see the module docstring)."""
    torch.set_num_threads(spec["threads"])
    dtype = DTYPES[spec["dtype"]]
    case, h, target, v_prev, projection = make_problem(tuple(spec["shape"]), spec["p"], dtype,
                                                       spec["projection"], "cpu")
    step = make_step(spec["backend"], case, h, target, v_prev, projection, "cpu")
    warm = step()  # code paged in, thread pool up, graph compiled
    del warm
    gc.collect()
    before = _proc_status_bytes("VmRSS")
    _reset_peak_rss()
    dh = step()
    peak = _proc_status_bytes("VmHWM")
    return {"extra": peak - before - dh.numel() * dh.element_size(), "beyond_inputs": peak - before,
            "before": before, "peak": peak}


def cpu_extra_memory(spec: dict, processes: int):
    """{"extra": (p20, p50, p80), "beyond_inputs": (...)} in bytes from `processes` fresh subprocesses,
    or an error string."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(spec["threads"]))
    probes = []
    for _ in range(processes):
        done = subprocess.run([sys.executable, __file__, "--_memory-probe", json.dumps(spec)], env=env,
                              capture_output=True, text=True, cwd=REPO)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            return f"memory probe failed (rc {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
        probes.append(json.loads(lines[-1]))
    return {key: percentiles(sorted(probe[key] for probe in probes)) for key in ("extra", "beyond_inputs")}


def cuda_extra_memory(step, h):
    """max_memory_allocated beyond the inputs and dh, for one forward+backward after a warm-up."""
    step()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    dh = step()
    torch.cuda.synchronize()
    beyond_inputs = torch.cuda.max_memory_allocated() - before
    extra = beyond_inputs - dh.numel() * dh.element_size()
    return {"extra": (extra,) * 3, "beyond_inputs": (beyond_inputs,) * 3}


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------

def parse_shapes(text: str):
    shapes = []
    for part in text.replace(" ", "").split(";"):
        if part:
            B, D, C = (int(x) for x in part.split(","))
            shapes.append((B, D, C))
    return shapes


def default_backends(device: str) -> list[str]:
    """Registered backends that run on `device` (triton on CPU only when asked for), then "compile"."""
    names = []
    for name in backends.available_backends():
        if device == "cpu" and name == "triton":
            continue
        if backends.load(name).supports(torch.device(device), torch.float32):
            names.append(name)
    names.remove("reference")
    return ["reference", *names, "compile"]


def backend_supports(backend: str, device: str, dtype) -> bool:
    if backend == "compile":
        return True
    return backends.is_available(backend) and backends.load(backend).supports(torch.device(device), dtype)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backends", help="comma list, e.g. cpu,reference,compile (default: all available)")
    parser.add_argument("--shapes", help='"B,D,C;B,D,C" (default: the issue\'s set for the device)')
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--dtype", help="comma list (default: float32 on CPU, float32,bfloat16 on CUDA)")
    parser.add_argument("--projection", help="dense,implicit (default: dense on CPU, both on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 20 CPU, 50 CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per CPU memory probe")
    parser.add_argument("--no-memory", action="store_true", help="skip extra-peak-memory measurements")
    parser.add_argument("--no-philox", action="store_true", help="skip the CPU Philox throughput probe")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="CPU: before each timing wait up to SECONDS for other processes to go idle")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time projection forward / epilogue / projection backward separately "
                             "(at p and at p = 0), rows op=<op>:<stage>")
    parser.add_argument("--max-foreign", type=float, default=0.15,
                        help="with --wait-idle: CPUs other processes may use during a timing (default 0.15)")
    parser.add_argument("--attempts", type=int, default=3, help="with --wait-idle: re-timings of a busy measurement")
    parser.add_argument("--allocator", choices=["system", "cached"], default="system",
                        help="CPU timing: glibc as configured (default: fresh dh pages faulted in every call) "
                             "or 'cached' (mallopt: freed memory kept and reused, like a caching allocator); "
                             "memory probes always use their own setting")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 repeats, 1 warm-up, 1 memory probe")
    parser.add_argument("--csv", help="output CSV (default bench/results/<device>.csv); 'none' to not write")
    parser.add_argument("--_memory-probe", dest="memory_probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.memory_repeats = 3, 1, 1
    if args.repeats is None:
        args.repeats = 50 if args.device == "cuda" else 20
    return args


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
        torch.set_num_threads(args.threads)
        if args.allocator == "cached":
            keep_freed_memory()
    shapes = parse_shapes(args.shapes) if args.shapes else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    dtype_names = (args.dtype or ("float32,bfloat16" if device == "cuda" else "float32")).split(",")
    projections = (args.projection or ("dense,implicit" if device == "cuda" else "dense")).split(",")
    backend_names = args.backends.split(",") if args.backends else default_backends(device)
    if "reference" not in backend_names:
        print("note: 'reference' not in --backends: no speed-up / memory ratio column", file=sys.stderr)

    device_name = device_slug(device, args.threads)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = {"device": device_name, "torch": torch.__version__, "triton": triton_version(), "commit": git_commit(),
            "timestamp": now}
    print(f"# svp_kernels benchmark on {device_name}: torch {meta['torch']}, triton {meta['triton'] or '-'}, "
          f"commit {meta['commit']}, backends {backend_names}, p = {args.p}, repeats {args.repeats}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []

    def add_row(op, backend, shape, dtype_name, metric, unit, values, p=args.p):
        B, D, C = shape if shape else ("", "", "")
        formatted = [f"{round(v)}" if unit == "bytes" else f"{v:.6g}" for v in values]
        rows.append({"op": op, "backend": backend, "B": B, "D": D, "C": C, "p": p, "dtype": dtype_name,
                     "metric": metric, "unit": unit, **dict(zip(("p20", "p50", "p80"), formatted)), **meta})

    if device == "cpu" and args.wait_idle:
        wait_for_idle(args.wait_idle, args.max_foreign)
    nbytes, copy_rates = copy_bandwidth(device, args.threads, max(args.repeats, 5))
    add_row(f"copy_{nbytes >> 20}MiB", "torch", None, "float32", "bandwidth", "GB/s", copy_rates, p="")
    print(f"copy bandwidth ({nbytes >> 20} MiB, read + write): {copy_rates[1]:.1f} GB/s "
          f"[p20 {copy_rates[0]:.1f}, p80 {copy_rates[2]:.1f}]", flush=True)
    if device == "cpu" and not args.no_philox:
        for backend in backend_names:
            if backend == "compile" or not backend_supports(backend, device, torch.float32):
                continue
            if args.wait_idle:
                wait_for_idle(args.wait_idle, args.max_foreign)
            rates = philox_throughput(backend, max(args.repeats // 2, 3))
            for name, values in rates.items():
                add_row(f"philox_{name}", backend, PHILOX_SHAPE, "float32", "throughput", "Geval/s", values)
            print(f"philox ({backend}, projection at (B, D, C) = {PHILOX_SHAPE}, p = 0.1): dense mask "
                  f"{rates['dense'][1]:.3f} Geval/s, implicit R + mask {rates['implicit'][1]:.3f} Geval/s",
                  flush=True)

    results = []  # one dict per (shape, dtype, projection, backend) for the table
    for shape in shapes:
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            for projection in projections:
                op = f"fused_local_loss_{projection}" + ("@cached-malloc" if args.allocator == "cached" else "")
                case, h, target, v_prev, proj = make_problem(shape, args.p, dtype, projection, device)
                traffic = moved_bytes(shape, dtype, projection)
                if projection == "dense":
                    if device == "cpu" and args.wait_idle:
                        wait_for_idle(args.wait_idle, args.max_foreign)
                    gemm = gemm_pair_time(h, proj, device, args.warmup, args.repeats)
                    add_row("gemm_pair", "torch.mm", shape, dtype_name, "time_fwd_bwd", "ms", gemm, p=0.0)
                    flops = 4 * shape[0] * shape[1] * shape[2]
                    print(f"  {shape} {dtype_name}: h @ R.T + g_v @ R with torch.mm (no mask) {gemm[1]:.3f} ms "
                          f"= {flops / (gemm[1] * 1e-3) / 1e9:.1f} GFLOP/s", flush=True)
                for backend in backend_names:
                    result = {"shape": shape, "dtype": dtype_name, "projection": projection, "backend": backend}
                    results.append(result)
                    if not backend_supports(backend, device, dtype):
                        result["error"] = "not supported"
                        continue
                    try:
                        step = make_step(backend, case, h, target, v_prev, proj, device)
                        timer = time_cuda if device == "cuda" else time_cpu
                        if device == "cpu" and args.wait_idle:
                            step()  # compile / first-touch outside the idle wait
                        samples, result["foreign"] = timed_quietly(step, timer, args)
                    except Exception as error:  # a failing backend (e.g. torch.compile) is reported, not fatal
                        result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                        traceback.print_exc()
                        continue
                    times = percentiles(samples)
                    result["ms"] = times
                    add_row(op, backend, shape, dtype_name, "time_fwd_bwd", "ms", times)
                    rates = (traffic / (times[2] * 1e-3) / 1e9, traffic / (times[1] * 1e-3) / 1e9,
                             traffic / (times[0] * 1e-3) / 1e9)
                    result["GB/s"] = rates[1]
                    add_row(op, backend, shape, dtype_name, "bandwidth", "GB/s", rates)
                    if not args.no_memory:
                        if device == "cuda":
                            extra = cuda_extra_memory(step, h)
                        else:
                            spec = {"shape": list(shape), "p": args.p, "dtype": dtype_name, "projection": projection,
                                    "backend": backend, "threads": args.threads}
                            extra = cpu_extra_memory(spec, args.memory_repeats)
                        if isinstance(extra, str):
                            result["memory_error"] = extra
                        else:
                            result["extra"] = extra["extra"][1]
                            add_row(op, backend, shape, dtype_name, "extra_peak_memory", "bytes", extra["extra"])
                            add_row(op, backend, shape, dtype_name, "peak_memory_beyond_inputs", "bytes",
                                    extra["beyond_inputs"])
                    if args.breakdown and backend != "compile":
                        for stage_p in sorted({args.p, 0.0}, reverse=True):
                            if device == "cpu" and args.wait_idle:
                                wait_for_idle(args.wait_idle, args.max_foreign)
                            stages = stage_times(backend, h, target, v_prev, proj, stage_p, device, args.warmup,
                                                 args.repeats)
                            for stage, values in stages.items():
                                add_row(f"{op}:{stage}", backend, shape, dtype_name, "time", "ms", values, p=stage_p)
                            print(f"  {shape} {dtype_name} {projection} {backend} stages at p = {stage_p}: "
                                  + ", ".join(f"{stage} {values[1]:.3f} ms" for stage, values in stages.items()),
                                  flush=True)
                    print(f"  {shape} {dtype_name} {projection} {backend}: {times[1]:.3f} ms "
                          f"[{times[0]:.3f}, {times[2]:.3f}], {rates[1]:.1f} GB/s, other processes used "
                          f"{result['foreign']:.2f} CPUs while timing"
                          + (f", extra peak {result['extra'] / 2**20:.2f} MiB" if "extra" in result else ""),
                          flush=True)
                del case, h, target, v_prev, proj
                gc.collect()

    if args.csv != "none":
        path = Path(args.csv) if args.csv else RESULTS / f"{device_name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerows(rows)
        print(f"\nappended {len(rows)} rows to {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    print()
    print(markdown_table(results, copy_rates[1], device))
    return 0


def markdown_table(results, copy_gbs: float, device: str) -> str:
    """shape | dtype | R | backend | median ms [p20, p80] | speed-up | GB/s | extra peak MiB | % of reference."""
    reference = {(r["shape"], r["dtype"], r["projection"]): r for r in results if r["backend"] == "reference"}
    lines = [f"copy bandwidth: {copy_gbs:.1f} GB/s", "",
             "| shape (B, D, C) | dtype | R | backend | median ms [p20, p80] | speed-up vs reference "
             "| GB/s (% of copy) | extra peak MiB | % of reference memory | other load (CPUs) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = reference.get((r["shape"], r["dtype"], r["projection"]), {})
        shape = "({}, {}, {})".format(*r["shape"])
        head = f"| {shape} | {r['dtype']} | {r['projection']} | {r['backend']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | |")
            continue
        p20, p50, p80 = r["ms"]
        speedup = f"{base['ms'][1] / p50:.2f}×" if "ms" in base else ""
        targeted = (device == "cpu" and r["backend"] == "cpu" and r["projection"] == "dense"
                    and r["dtype"] == "float32" and r["shape"] in CPU_SPEEDUP_TARGETS)
        target = CPU_SPEEDUP_TARGETS.get(r["shape"]) if targeted else None
        if target and speedup:
            speedup += f" (target ≥ {target:g}×: {'met' if base['ms'][1] / p50 >= target else 'MISSED'})"
        rate = f"{r['GB/s']:.1f} ({100 * r['GB/s'] / copy_gbs:.0f} %)"
        if "extra" in r:
            extra = f"{r['extra'] / 2**20:.3f}"
            ratio = ""
            if "extra" in base and base["extra"] > 0:
                fraction = r["extra"] / base["extra"]
                ratio = f"{100 * fraction:.1f} %"
                if targeted:
                    ratio += f" ({'met' if fraction <= CPU_MEMORY_TARGET else 'MISSED'})"
        else:
            extra, ratio = r.get("memory_error", ""), ""
        foreign = f"{r['foreign']:.2f}" if "foreign" in r else ""
        lines.append(f"{head} {p50:.3f} [{p20:.3f}, {p80:.3f}] | {speedup} | {rate} | {extra} | {ratio} | {foreign} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
