#!/usr/bin/env python3
"""The one prepared GPU check: env, build, tests, sanitize, bench, train step, memory vs depth, in one call.

    python3 tools/gpu_check.py --out "$OUT" --budget 480         # on a CUDA machine (docs/gpu.md)
    python3 tools/gpu_check.py --dry-run --out /tmp/gpu_check     # the same control flow on CPU, tiny stand-ins
    python3 tools/gpu_check.py --unpack DIR                       # file a returned DIR into bench/results

Stages, most valuable first (STAGE_SHARES gives each one's share of the default 480 s budget):
    env           device, driver, CUDA / torch / Triton / Python versions, SM count, architecture
    build         svp_kernels._C for the device's own architecture only (TORCH_CUDA_ARCH_LIST from
                  torch.cuda.get_device_capability), MAX_JOBS = cores, no debug flags; then an import check
    tests         pytest (stopping after 30 failures) in three runs selected by keyword, not by file: the cuda backend, the triton
                  backend (each with its opcheck and torch.compile tests), and the host-synchronisation tests
    sanitize      compute-sanitizer memcheck and racecheck over tools/sanitize_cuda.py --small
    bench         bench/local_loss.py, one run per benchmark shape for cuda, triton and the eager baseline, then
                  one per shape for the torch.compile baseline (float32 and bfloat16, dense and implicit R)
    train_step    bench/train_step.py --device cuda ("missing" when the file does not exist)
    memory_depth  svp-train memory-depth --device cuda (width 1024, depths 2..32, batch 128)

Time. A stage's limit is its share of what is left, remaining × share / (shares of the stages still to run),
so time one stage leaves unused goes to the later ones; but at least its minimum (earlier stages are worth
more) and at most all that is left. A stage is skipped when less than its minimum is left.
Inside a stage the steps run in order, each with what is left of the stage's limit minus what the later
steps reserve. Every step is a subprocess in its own process group (same session, so whatever ends the
call's session still ends it); at its limit the group gets SIGINT (pytest then prints its summary), and
SIGKILL --grace seconds later. A failing step is recorded, never fatal: the later stages still run. A stage
or step is skipped when what it requires did not end ok ("gpu": the env probe found a CUDA device).

Output: at most 8 files, what a device call brings back. OUT/summary.json is rewritten atomically whenever
a stage or step starts or ends, and when the driver itself is interrupted (SIGINT, SIGTERM, SIGHUP);
OUT/<stage>.log holds each stage's output. The bench CSV and the memory-depth JSON travel inside
summary.json ("artifacts"); --unpack writes them to bench/results. Exit status 0 when every stage ended ok,
partial (some steps skipped for time) or missing (its program does not exist yet); 1 when any failed,
timed out or was skipped; 128 + the signal number when the driver itself was interrupted.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 1
DEFAULT_BUDGET_S = 480.0
DEFAULT_GRACE_S = 5.0
# Seconds of the default budget per stage (scaled to the budget given); the minimum a stage needs to start.
STAGE_SHARES = {"env": 15, "build": 130, "tests": 140, "sanitize": 60, "bench": 90, "train_step": 25,
                "memory_depth": 20}
STAGE_MINIMUMS = {"env": 10, "build": 30, "tests": 20, "sanitize": 15, "bench": 15, "train_step": 10,
                  "memory_depth": 10}
STAGE_NAMES = tuple(STAGE_SHARES)
# pytest -k expressions (keywords match test, parameter-id, file and marker names, so they survive tests
# moving between files): the backend-parametrised ids carry "cuda-cuda" / "cuda-triton", the kernels'
# own files and @pytest.mark.cuda the rest; the GPU's opcheck and torch.compile tests are among them.
CUDA_TESTS = "cuda and not triton and not host_sync"
TRITON_TESTS = "triton and not host_sync"
SYNC_TESTS = "host_sync"
PER_TEST_TIMEOUT_S = 120  # pytest-timeout, where installed: a hung test fails alone, with its traceback
LOG_LIMIT_BYTES = 15 << 20  # a device call brings back files up to 16 MiB
ARTIFACT_LIMIT_BYTES = 4 << 20
TAIL_LINES = 40
FINAL_STATES = ("ok", "partial", "failed", "timeout", "skipped", "missing", "interrupted")


# ----------------------------------------------------------------------------------------------------
# The plan: stages made of steps
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Artifact:
    """A file a step writes (under the work directory) that travels inside summary.json.

    dest: where --unpack writes it, relative to the repository, "{device}" replaced by the device slug;
    append_csv: append the rows to an existing CSV of the same header instead of replacing it.
    """

    name: str
    path: Path
    dest: str
    append_csv: bool = False


@dataclass
class Step:
    """One subprocess: argv run from the repository root with `env` added to the environment.

    reserve: fraction of the stage's limit the steps before this one leave for it. min_s: the least time
    worth starting it with. missing: why it cannot run at all (recorded as state "missing"). requires:
    earlier stages that must have ended ok or partial (else the step is skipped).
    """

    name: str
    argv: Optional[list] = None
    env: dict = field(default_factory=dict)
    reserve: float = 0.0
    min_s: float = 1.0
    missing: Optional[str] = None
    requires: tuple = ()
    artifacts: tuple = ()
    pytest: bool = False


@dataclass
class Stage:
    """A named group of steps with its share of the budget; `steps` may be a function of the Context
    (called when the stage starts, so it can use what the env stage found)."""

    name: str
    share: float
    min_s: float
    steps: Union[list, Callable]
    requires: tuple = ()  # names of earlier stages that must end ok or partial; "gpu": a CUDA device found
    settings: dict = field(default_factory=dict)


@dataclass
class Context:
    """What the stages' step builders see."""

    dry_run: bool
    python: str
    work: Path
    env: dict = field(default_factory=dict)


class Interrupted(BaseException):
    """The driver got SIGINT, SIGTERM or SIGHUP."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def stage_plan(dry_run: bool, shares: Optional[dict] = None, only: Optional[list] = None) -> list:
    """The seven stages (or those in `only`, in canonical order) with their shares in seconds."""
    shares = {**STAGE_SHARES, **(shares or {})}
    builders = {"env": env_steps, "build": build_steps, "tests": test_steps, "sanitize": sanitize_steps,
                "bench": bench_steps, "train_step": train_step_steps, "memory_depth": memory_depth_steps}
    needs_env = () if dry_run else ("gpu",)  # "gpu": the env probe found a CUDA device
    requires = {"sanitize": needs_env + ("build",)}
    stages = []
    for name in STAGE_NAMES:
        if only and name not in only:
            continue
        stages.append(Stage(name, float(shares[name]), float(STAGE_MINIMUMS[name]), builders[name],
                            requires=requires.get(name, needs_env if name != "env" else ())))
    return stages


def driver(ctx: Context, *args: str) -> list:
    return [ctx.python, str(Path(__file__).resolve()), *args]


def env_steps(ctx: Context, stage: Stage) -> list:
    flags = [] if ctx.dry_run else ["--require-gpu"]
    return [Step("probe", driver(ctx, "--probe-env", str(ctx.work / "env.json"), *flags))]


def build_steps(ctx: Context, stage: Stage) -> list:
    arch = ctx.env.get("arch")
    jobs = str(ctx.env.get("cpu_count") or os.cpu_count() or 1)
    check = Step("check", driver(ctx, "--check-build", "cpu" if ctx.dry_run else "cuda"), reserve=0.1, min_s=3)
    if ctx.dry_run:
        # No nvcc: byte-compile the Python sources; the check shows the nvcc targets a 9.0 device would get.
        check.env = {"TORCH_CUDA_ARCH_LIST": "9.0"}
        stage.settings = {"TORCH_CUDA_ARCH_LIST": "9.0 (what the check reports)", "MAX_JOBS": jobs}
        return [Step("compile", [ctx.python, "-m", "compileall", "-q", "svp_kernels", "bench", "tools"]), check]
    env = {"MAX_JOBS": jobs, "SVP_KERNELS_FORCE_CUDA": "1"}
    if arch:
        env["TORCH_CUDA_ARCH_LIST"] = arch
    check.env = dict(env)
    stage.settings = {"TORCH_CUDA_ARCH_LIST": arch or "unset (device arch unknown: setup.py defaults)",
                      "MAX_JOBS": jobs}
    return [Step("compile", [ctx.python, "setup.py", "build_ext", "--inplace"], env=env, min_s=30), check]


def test_steps(ctx: Context, stage: Stage) -> list:
    if ctx.dry_run:  # the same three runs, each of one pure test of this driver (no torch: quick)
        base = [ctx.python, "-m", "pytest", "tools/tests/test_gpu_check.py", "--noconftest", "--maxfail=30", "-q",
                "-p", "no:cacheprovider"]
        selections = ["stage_state_words"] * 3
        env = {}
    else:
        base = [ctx.python, "-m", "pytest", "tests", "--maxfail=30", "-q", "-rfE", "--durations=10", "-p", "no:cacheprovider",
                "-m", "not slow"]
        if ctx.env.get("modules", {}).get("pytest_timeout"):
            base += ["--timeout", str(PER_TEST_TIMEOUT_S)]
        selections = [CUDA_TESTS, TRITON_TESTS, SYNC_TESTS]
        env = {"SVP_KERNELS_REQUIRE": "cpu,triton,cuda"}  # a backend that fails to load fails, never skips
    names, reserves = ("cuda", "triton", "host_sync"), (0.0, 0.4, 0.1)
    steps = [Step(name, base + ["-k", selection], env=env, reserve=reserve, min_s=5, pytest=True)
             for name, selection, reserve in zip(names, selections, reserves)]
    steps[0].requires = ("build",)  # without the CUDA build its tests would only skip
    return steps


def find_sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH, under CUDA_HOME or /usr/local/cuda, or beside nvcc."""
    candidates = [shutil.which("compute-sanitizer")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates += [os.path.join(home, "bin", "compute-sanitizer"),
                           os.path.join(home, "compute-sanitizer", "compute-sanitizer")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "compute-sanitizer"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def sanitize_steps(ctx: Context, stage: Stage) -> list:
    script = [ctx.python, "tools/sanitize_cuda.py", "--small"]
    if ctx.dry_run:  # no sanitizer: the script's imports and flags only
        return [Step("memcheck", script + ["--help"]), Step("racecheck", script + ["--quick", "--help"], reserve=0.5)]
    sanitizer = find_sanitizer()
    missing = None if sanitizer else "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda, beside nvcc)"
    common = ["--error-exitcode", "1", "--print-limit", "50"]
    # No caching allocator under memcheck: every tensor is its own cudaMalloc, so bounds are exact.
    memcheck = Step("memcheck", [sanitizer, "--tool", "memcheck", *common, *script] if sanitizer else None,
                    env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, min_s=10, missing=missing)
    racecheck = Step("racecheck", [sanitizer, "--tool", "racecheck", "--racecheck-report", "all", *common, *script,
                                   "--quick"] if sanitizer else None, reserve=0.5, min_s=10, missing=missing)
    return [memcheck, racecheck]


def benchmark_shapes(run_py: Path) -> list:
    """GPU_SHAPES of bench/local_loss.py, read without importing it ([None]: let it use its default set)."""
    try:
        for node in ast.parse(run_py.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "GPU_SHAPES" for t in node.targets):
                shapes = [tuple(int(x) for x in shape) for shape in ast.literal_eval(node.value)]
                if shapes:
                    return shapes
    except (OSError, SyntaxError, ValueError, TypeError):
        pass
    return [None]


def eager_baseline(run_py: Path) -> str:
    """The runner's name for the eager PyTorch baseline: "eager", or "reference" in older runners."""
    try:
        return "eager" if '"eager"' in run_py.read_text() else "reference"
    except OSError:
        return "eager"


def bench_steps(ctx: Context, stage: Stage) -> list:
    run_py = ROOT / "bench" / "local_loss.py"
    csv = ctx.work / "bench.csv"
    artifact = (Artifact("bench.csv", csv, "bench/results/{device}.csv", append_csv=True),)
    eager = eager_baseline(run_py)
    if not run_py.exists():
        return [Step("run", missing="bench/local_loss.py not found")]
    base = [ctx.python, "bench/local_loss.py", "--csv", str(csv)]
    if ctx.dry_run:
        return [Step("kernels-8x16x4", base + ["--device", "cpu", "--shapes", "8,16,4", "--variants", f"cpu,{eager}",
                                               "--dtype", "float32", "--projection", "dense", "--repeats", "3",
                                               "--warmup", "1", "--no-memory"],
                     artifacts=artifact)]
    base += ["--device", "cuda", "--dtype", "float32,bfloat16", "--projection", "dense,implicit"]
    steps = []
    for backends, prefix in ((f"cuda,triton,{eager}", "kernels"), ("compile", "compile")):
        for shape in benchmark_shapes(run_py):
            shape_args = ["--shapes", ",".join(map(str, shape))] if shape else []
            label = "x".join(map(str, shape)) if shape else "default-shapes"
            steps.append(Step(f"{prefix}-{label}", base + ["--variants", backends, *shape_args], min_s=10,
                              artifacts=artifact))
    return steps


def train_step_steps(ctx: Context, stage: Stage) -> list:
    if not (ROOT / "bench" / "train_step.py").exists():
        return [Step("svp_vs_bp", missing="bench/train_step.py not found")]
    args = ["--help"] if ctx.dry_run else ["--device", "cuda"]
    return [Step("svp_vs_bp", [ctx.python, "bench/train_step.py", *args])]


def memory_depth_steps(ctx: Context, stage: Stage) -> list:
    device = "cpu" if ctx.dry_run else "cuda"
    sizes = ["--width", "16", "--depths", "1,2", "--batch-size", "4"] if ctx.dry_run else \
        ["--width", "1024", "--depths", "2,4,8,16,32", "--batch-size", "128"]
    path = ctx.work / f"memory_depth_{device}.json"
    return [Step("sweep", [ctx.python, "-m", "svp_kernels.train.cli", "memory-depth", "--device", device, *sizes,
                           "--json", str(path), "--no-progress"],
                 artifacts=(Artifact(path.name, path, "bench/results/memory_depth_{device}.json"),))]


# ----------------------------------------------------------------------------------------------------
# Running: process groups, limits, the incremental summary
# ----------------------------------------------------------------------------------------------------

def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def kill_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(process: subprocess.Popen, grace: float) -> None:
    """SIGINT to the step's process group, SIGKILL after `grace` seconds if the leader still runs."""
    kill_group(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    kill_group(process.pid, signal.SIGKILL)
    process.wait()


def write_json_atomically(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def log_tail(path: Path, start: int = 0, lines: int = TAIL_LINES, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(start, size - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-limit:]


def pytest_counts(text: str) -> dict:
    """{"passed": n, "failed": n, ...} from pytest's final line(s)."""
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b", text):
        counts["error" if word.startswith("error") else word] = int(number)
    return counts


def cap_log(path: Path, limit: int = LOG_LIMIT_BYTES) -> None:
    """Keep a log under `limit` bytes: its first MiB and its last (limit − 2 MiB)."""
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size <= limit:
        return
    with open(path, "rb") as handle:
        head = handle.read(1 << 20)
        handle.seek(size - (limit - (2 << 20)))
        tail = handle.read()
    with open(path, "wb") as handle:
        handle.write(head + f"\n[... {size - len(head) - len(tail)} bytes cut ...]\n".encode() + tail)


class Runner:
    """Runs stages within a budget and keeps OUT/summary.json current."""

    def __init__(self, stages: list, ctx: Context, out: Path, budget: float, grace: float = DEFAULT_GRACE_S,
                 label: str = "", echo: bool = True):
        self.stages, self.ctx, self.out, self.budget, self.grace, self.echo = stages, ctx, out, budget, grace, echo
        self.out.mkdir(parents=True, exist_ok=True)
        self.ctx.work.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.deadline = self.start + budget
        self.summary = {
            "schema": SCHEMA, "tool": "tools/gpu_check.py", "mode": "dry-run" if ctx.dry_run else "device",
            "label": label, "state": "running", "started_at": utc_now(), "updated_at": None, "finished_at": None,
            "budget_s": budget, "elapsed_s": 0.0, "grace_s": grace, "exit_status": None, "interrupted_by": None,
            "commit": git_commit(), "env": {}, "artifacts": {},
            "stages": [{"name": s.name, "state": "pending", "share_s": s.share, "min_s": s.min_s,
                        "log": f"{s.name}.log", "limit_s": None, "seconds": None, "reason": None, "steps": []}
                       for s in stages],
        }
        self.write()

    def write(self) -> None:
        self.summary["updated_at"] = utc_now()
        self.summary["elapsed_s"] = round(time.monotonic() - self.start, 2)
        write_json_atomically(self.out / "summary.json", self.summary)

    def say(self, text: str) -> None:
        if self.echo:
            print(f"gpu_check [{time.monotonic() - self.start:6.1f}s] {text}", flush=True)

    def run(self) -> int:
        previous = {}

        def on_signal(signum, frame):
            if self.summary["interrupted_by"] is None:
                self.summary["interrupted_by"] = signal.Signals(signum).name
                raise Interrupted(signum)

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, on_signal)
        try:
            for index, stage in enumerate(self.stages):
                self.run_stage(index, stage)
            status = 0 if all(r["state"] in ("ok", "partial", "missing") for r in self.summary["stages"]) else 1
        except Interrupted as interruption:
            reason = f"driver got {self.summary['interrupted_by']}"
            for record in self.summary["stages"]:
                if record["state"] == "running":
                    record.update(state="interrupted", reason=reason, tail=log_tail(self.out / record["log"]))
                elif record["state"] == "pending":
                    record.update(state="skipped", reason=reason)
                for step in record["steps"]:
                    if step["state"] == "pending":
                        step.update(state="skipped", reason=reason)
            status = 128 + interruption.signum
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self.summary["state"] = "interrupted" if status > 128 else "done"
        self.summary["finished_at"] = utc_now()
        self.summary["exit_status"] = status
        self.write()
        self.say(f"done, exit status {status}; {self.out / 'summary.json'}")
        return status

    def run_stage(self, index: int, stage: Stage) -> None:
        record = self.summary["stages"][index]
        remaining = self.deadline - time.monotonic()
        shares_left = sum(s.share for s in self.stages[index:]) or 1.0
        # Its share of what is left, at least its minimum (earlier stages are worth more), at most all of it.
        limit = min(remaining, max(stage.min_s, remaining * stage.share / shares_left))
        record["limit_s"] = round(limit, 1)
        unmet = self.unmet(stage.requires)
        if "gpu" in stage.requires and not self.ctx.env.get("cuda_available"):
            unmet.insert(0, "a CUDA device (the env stage found none)")
        if unmet:
            return self.finish_stage(record, "skipped", 0.0, "needs " + ", ".join(unmet))
        if remaining < stage.min_s:
            return self.finish_stage(record, "skipped", 0.0,
                                     f"budget: {max(remaining, 0):.1f} s left, needs ≥ {stage.min_s:.0f} s")
        started = time.monotonic()
        stage_deadline = started + limit
        record.update(state="running", started_at=utc_now())
        log_path = self.out / record["log"]
        try:
            steps = stage.steps(self.ctx, stage) if callable(stage.steps) else stage.steps
        except Exception as error:  # a broken plan is a failed stage, not a dead driver
            steps = []
            record["reason"] = f"could not plan the steps: {type(error).__name__}: {error}"
        record["settings"] = stage.settings
        record["steps"] = [{"name": s.name, "command": shlex.join(map(str, s.argv or [])), "state": "pending"}
                           for s in steps]
        self.write()
        self.say(f"{stage.name}: start, limit {limit:.0f} s, {len(steps)} step(s)")
        with open(log_path, "ab", buffering=0) as log:
            log.write(f"# gpu_check {stage.name}: limit {limit:.1f} s, {utc_now()}\n".encode())
            for number, step in enumerate(steps):
                step_record = record["steps"][number]
                left = stage_deadline - time.monotonic()
                reserved = limit * sum(s.reserve for s in steps[number + 1:] if s.missing is None)
                unmet = self.unmet(step.requires)
                if step.missing:
                    step_record.update(state="missing", reason=step.missing)
                    log.write(f"\n=== [{stage.name}/{step.name}] missing: {step.missing}\n".encode())
                elif unmet:
                    step_record.update(state="skipped", reason="needs " + ", ".join(unmet))
                    log.write(f"\n=== [{stage.name}/{step.name}] skipped: {step_record['reason']}\n".encode())
                elif left - reserved < step.min_s:
                    step_record.update(state="skipped", reason=f"stage time: {max(left, 0):.1f} s left, "
                                                              f"{reserved:.1f} s reserved for later steps")
                    log.write(f"\n=== [{stage.name}/{step.name}] skipped: {step_record['reason']}\n".encode())
                else:
                    try:
                        self.run_step(step, step_record, log, log_path, left - reserved)
                    finally:
                        self.collect_artifacts(step)
                        record["seconds"] = round(time.monotonic() - started, 2)
                        self.write()
                self.write()
        cap_log(log_path)
        self.load_env()
        state = stage_state([s["state"] for s in record["steps"]]) if steps else "failed"
        self.finish_stage(record, state, time.monotonic() - started, record.get("reason"))
        record["tail"] = log_tail(log_path)
        self.write()

    def unmet(self, requires: tuple) -> list:
        """The required stages of this run (not "gpu") that did not end ok or partial, with their states.
        A stage left out of this run (--stages) counts as done by an earlier call on the same machine."""
        states = {r["name"]: r["state"] for r in self.summary["stages"]}
        return [f"{name} ({states[name]})" for name in requires
                if name in states and states[name] not in ("ok", "partial")]

    def load_env(self) -> None:
        """The env probe's findings (work/env.json) become summary["env"] and what later stages plan from."""
        path = self.ctx.work / "env.json"
        if not self.ctx.env and path.exists():
            try:
                self.ctx.env = json.loads(path.read_text())
            except ValueError:
                return
            self.summary["env"] = self.ctx.env

    def finish_stage(self, record: dict, state: str, seconds: float, reason: Optional[str]) -> None:
        record.update(state=state, seconds=round(seconds, 2), reason=reason)
        self.write()
        self.say(f"{record['name']}: {state} in {seconds:.1f} s" + (f" ({reason})" if reason else ""))

    def run_step(self, step: Step, record: dict, log, log_path: Path, limit: float) -> None:
        grace = min(self.grace, limit / 4)
        log.write(f"\n=== [{step.name}] {shlex.join(map(str, step.argv))}  (limit {limit:.1f} s)\n".encode())
        offset = log_path.stat().st_size
        # the package of this checkout (built in place by the build stage) for every script a step runs
        python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path, **step.env}
        started = time.monotonic()
        record.update(state="running", limit_s=round(limit, 1), started_at=utc_now())
        self.write()
        state, process = "failed", None
        try:
            process = subprocess.Popen(list(map(str, step.argv)), cwd=ROOT, env=environment, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0)
            try:
                process.wait(timeout=max(limit - grace, 0.01))
                state = "ok" if process.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                stop_group(process, grace)
                state = "timeout"
        except Interrupted:
            state = "interrupted"
            if process is not None:
                stop_group(process, min(grace, 2.0))
            raise
        except OSError as error:  # the program could not start
            log.write(f"could not start: {error}\n".encode())
        finally:
            if process is not None:
                kill_group(process.pid, signal.SIGKILL)  # leftovers of a step that ended
            seconds = time.monotonic() - started
            record.update(state=state, seconds=round(seconds, 2),
                          returncode=process.returncode if process is not None else None)
            text = log_tail(log_path, offset, lines=20)
            if step.pytest:
                record["counts"] = pytest_counts("\n".join(text.splitlines()[-5:]))
            log.write(f"=== [{step.name}] {state} in {seconds:.1f} s, exit status {record['returncode']}\n".encode())
            self.say(f"  {step.name}: {state} in {seconds:.1f} s")

    def collect_artifacts(self, step: Step) -> None:
        for artifact in step.artifacts:
            if not artifact.path.exists():
                continue
            data = artifact.path.read_bytes()
            text = data[:ARTIFACT_LIMIT_BYTES].decode("utf-8", errors="replace")
            self.summary["artifacts"][artifact.name] = {"dest": artifact.dest, "append_csv": artifact.append_csv,
                                                        "bytes": len(data),
                                                        "truncated": len(data) > ARTIFACT_LIMIT_BYTES,
                                                        "text": text}


def stage_state(step_states: list) -> str:
    """One word for a stage from its steps' states (worst first)."""
    for state in ("interrupted", "timeout", "failed"):
        if state in step_states:
            return state
    if all(s == "missing" for s in step_states):
        return "missing"
    if all(s == "skipped" for s in step_states):
        return "skipped"
    if "ok" in step_states and any(s in ("skipped", "missing") for s in step_states):
        return "partial"
    return "ok"


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # a copied working tree without .git


def print_table(summary: dict) -> None:
    print(f"\n{'stage':<13} {'state':<11} {'seconds':>8} {'limit':>7}  detail")
    for record in summary["stages"]:
        details = []
        for step in record["steps"]:
            counts = ", ".join(f"{n} {w}" for w, n in step.get("counts", {}).items())
            if step["state"] != "ok" or counts:
                details.append(f"{step['name']} {step['state']}" + (f" ({counts})" if counts else "")
                               + (f": {step['reason']}" if step.get("reason") else ""))
        if record.get("reason"):
            details.append(record["reason"])
        seconds = "" if record["seconds"] is None else f"{record['seconds']:.1f}"
        limit = "" if record["limit_s"] is None else f"{record['limit_s']:.0f}"
        print(f"{record['name']:<13} {record['state']:<11} {seconds:>8} {limit:>7}  {'; '.join(details)[:200]}")
    env = summary.get("env", {})
    print(f"\n{env.get('device_name') or 'no CUDA device'}, torch {env.get('torch')}, triton {env.get('triton')}, "
          f"{summary['elapsed_s']:.0f} s of {summary['budget_s']:.0f} s; exit status {summary['exit_status']}")


# ----------------------------------------------------------------------------------------------------
# Stage programs run by the steps (hidden flags)
# ----------------------------------------------------------------------------------------------------

def slug(text: str) -> str:
    """The device name as bench/local_loss.py names its CSV (e.g. NVIDIA-H200)."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def first_line(argv: list, timeout: float = 10) -> Optional[str]:
    """The last non-empty output line of a tool (nvcc --version ends with its release), or None."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return lines[-1] if lines else None


def probe_env(path: Path, require_gpu: bool) -> int:
    """Write the machine's description to `path` (JSON) and print it; 1 if require_gpu and no CUDA device."""
    info = {"python": platform.python_version(), "executable": sys.executable, "kernel": platform.release(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "modules": {}}
    for module in ("pytest", "pytest_timeout", "pytest_benchmark", "ninja", "numpy", "sklearn", "tqdm", "matplotlib"):
        info["modules"][module] = importlib.util.find_spec(module) is not None
    import torch

    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        info.update(device_count=torch.cuda.device_count(), device_name=props.name, device_slug=slug(props.name),
                    capability=[major, minor], arch=f"{major}.{minor}", sm_count=props.multi_processor_count,
                    memory_bytes=props.total_memory, l2_bytes=getattr(props, "L2_cache_size", None))
    else:
        info.update(device_name=None, device_slug="cpu", arch=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, info)  # what the build needs, before the slower tool queries
    smi = first_line(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                      "--format=csv,noheader"])
    info["nvidia_smi"] = smi
    info["driver"] = smi.split(",")[1].strip() if smi and smi.count(",") >= 1 else None
    info["nvcc"] = first_line(["nvcc", "--version"])
    sanitizer = find_sanitizer()
    info["compute_sanitizer"] = first_line([sanitizer, "--version"]) if sanitizer else None
    info["ncu"] = first_line(["ncu", "--version"]) if shutil.which("ncu") else None
    for key, value in info.items():
        print(f"{key}: {value}")
    if info["cuda_available"]:
        try:
            subprocess.run(["nvidia-smi"], timeout=10, check=False)
        except (OSError, subprocess.SubprocessError) as error:
            print("nvidia-smi:", error)
    write_json_atomically(path, info)
    if require_gpu and not info["cuda_available"]:
        print("no CUDA device visible to torch", file=sys.stderr)
        return 1
    return 0


def check_build(kind: str) -> int:
    """Import the freshly built package; for "cuda", fail unless _C has the CUDA kernels. Prints the nvcc
    targets setup.py gives under this environment and, where cuobjdump exists, those inside _C."""
    spec = importlib.util.spec_from_file_location("svp_setup", ROOT / "setup.py")
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)
    from torch.utils import cpp_extension

    own = setup_module.nvcc_arch_flags()
    print("TORCH_CUDA_ARCH_LIST:", os.environ.get("TORCH_CUDA_ARCH_LIST"), "-> nvcc targets:",
          own or cpp_extension._get_cuda_arch_flags(own))
    import svp_kernels as sk

    print("svp_kernels from", sk.__file__, "| backends:", sk.available_backends(),
          "| _C loaded:", sk._ops.extension_loaded(), "| _C has CUDA:", sk._ops.extension_has_cuda())
    libraries = sorted((ROOT / "svp_kernels").glob("_C*.so"))
    if libraries and shutil.which("cuobjdump"):
        subprocess.run(["cuobjdump", "--list-elf", str(libraries[0])], timeout=60, check=False)
    if kind == "cuda" and not sk._ops.extension_has_cuda():
        print("svp_kernels._C was built without the CUDA kernels", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------
# --unpack: file a returned folder into the repository
# ----------------------------------------------------------------------------------------------------

def unpack(folder: Path, into: Path) -> list:
    """Copy summary.json and the logs to bench/results/gpu_check-<device>-<time>/ and write the artifacts
    to their destinations; returns the paths written."""
    summary = json.loads((folder / "summary.json").read_text())
    device = summary.get("env", {}).get("device_slug") or "unknown-device"
    stamp = re.sub(r"[^0-9T]", "", summary.get("started_at") or "")[:15]
    keep = into / "bench" / "results" / f"gpu_check-{device}-{stamp}Z"
    keep.mkdir(parents=True, exist_ok=True)
    written = []
    for source in [folder / "summary.json", *sorted(folder.glob("*.log"))]:
        shutil.copy2(source, keep / source.name)
        written.append(keep / source.name)
    for artifact in summary.get("artifacts", {}).values():
        dest = into / artifact["dest"].format(device=device)
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = artifact["text"]
        if artifact.get("append_csv") and dest.exists() and dest.stat().st_size:
            header, _, rows = text.partition("\n")
            existing_header = dest.read_text().partition("\n")[0]
            if header.strip() == existing_header.strip():
                with open(dest, "a") as handle:
                    handle.write(rows)
                written.append(dest)
                continue
            dest = dest.with_name(f"{dest.stem}-{stamp}Z{dest.suffix}")  # another header: keep both
        dest.write_text(text)
        written.append(dest)
    return written


# ----------------------------------------------------------------------------------------------------

def parse_shares(items: list) -> dict:
    shares = {}
    for item in items or []:
        name, _, seconds = item.partition("=")
        if name not in STAGE_SHARES or not seconds:
            raise SystemExit(f"--share wants STAGE=SECONDS with STAGE in {', '.join(STAGE_NAMES)}, got {item!r}")
        shares[name] = float(seconds)
    return shares


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", help="output folder (default: $OUT, else ./gpu_check_out)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="total seconds (default 480)")
    parser.add_argument("--dry-run", action="store_true", help="CPU stand-ins for every stage")
    parser.add_argument("--stages", help=f"comma list, a subset of {','.join(STAGE_NAMES)} (default: all)")
    parser.add_argument("--share", action="append", metavar="STAGE=SECONDS",
                        help="override a stage's share of the default budget (repeatable)")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                        help="seconds between SIGINT and SIGKILL at a step's limit (default 5)")
    parser.add_argument("--work", help="folder for build outputs and artifacts (default: a new temporary one)")
    parser.add_argument("--label", default="", help="free text recorded in summary.json (e.g. the commit)")
    parser.add_argument("--unpack", metavar="DIR", help="file a returned folder into bench/results and exit")
    parser.add_argument("--into", default=str(ROOT), help="repository root for --unpack (default: this one)")
    parser.add_argument("--probe-env", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--require-gpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--check-build", choices=["cpu", "cuda"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_env:
        return probe_env(Path(args.probe_env), args.require_gpu)
    if args.check_build:
        return check_build(args.check_build)
    if args.unpack:
        for path in unpack(Path(args.unpack), Path(args.into)):
            print("wrote", path)
        return 0
    only = args.stages.split(",") if args.stages else None
    unknown = sorted(set(only or []) - set(STAGE_NAMES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {', '.join(STAGE_NAMES)}")
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    ctx = Context(dry_run=args.dry_run, python=sys.executable, work=work)
    stages = stage_plan(args.dry_run, parse_shares(args.share), only)
    runner = Runner(stages, ctx, out, args.budget, args.grace, args.label)
    status = runner.run()
    print_table(runner.summary)
    return status


if __name__ == "__main__":
    sys.exit(main())
