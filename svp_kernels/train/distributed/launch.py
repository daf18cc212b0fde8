"""Process control: one worker per rank, spawned here (torch.multiprocessing) or started by torchrun; a process
that raises or dies ends the whole run with an error naming it; and the CLI's entry (train_main)."""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from ..data import Dataset
from ..outputs import write_outputs
from ..run import TrainConfig
from .common import DistributedTrainingError
from .backprop import run_backprop_rank
from .data_parallel import run_data_parallel_rank
from .pipeline import run_pipeline_stage
from .plan import Plan, plan_from_arguments, role, torchrun_environment, validate


def die_with_parent(parent_pid: int) -> None:
    """Make this process exit when its parent does: PR_SET_PDEATHSIG = SIGKILL on Linux, else a watchdog
    thread that polls os.getppid() every second."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError):
        def watch():
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)
        threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)


def name_process(name: str) -> None:
    """Set this process's name as ps and /proc/<pid>/comm show it (Linux; at most 15 characters)."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15 = PR_SET_NAME
    except (OSError, AttributeError):
        pass


def run_worker(plan: Plan, rank: int, local_rank: int, config: TrainConfig, dataset: Dataset, init_method: str,
               progress: bool) -> dict | None:
    """Join the process group as `rank` and train; returns the result on rank 0. On CUDA the process uses
    GPU local_rank and nccl, else gloo; every wait on a peer gives up after plan.timeout seconds."""
    if torch.device(config.device).type == "cuda":
        torch.cuda.set_device(local_rank)
        config = dataclasses.replace(config, device=f"cuda:{local_rank}")
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=plan.world_size,
                            timeout=datetime.timedelta(seconds=plan.timeout))
    name_process(f"svp-rank-{rank}")
    try:
        run = run_pipeline_stage if plan.mode == "pipeline" else \
            run_backprop_rank if config.method == "bp" else run_data_parallel_rank
        result = run(plan, rank, config, dataset, progress and rank == 0)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return result


def describe(error: BaseException) -> str:
    """The exception's type, message and innermost frame of this package, on one line."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [frame for frame in frames if f"{os.sep}svp_kernels{os.sep}" in frame.filename] or frames
    where = f" (at {Path(ours[-1].filename).name}:{ours[-1].lineno} in {ours[-1].name})" if ours else ""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message[:600]}{where}"


def _spawned_entry(rank: int, parent_pid: int, plan: Plan, config: TrainConfig, dataset: Dataset,
                   init_method: str, progress: bool, threads: int | None, connection) -> None:
    """A process started by spawn: runs rank `rank` and sends ("result", dict) or ("error", text) to the
    parent, then exits at once (os._exit: no teardown can hang on a dead peer)."""
    from tqdm.auto import tqdm

    die_with_parent(parent_pid)
    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock, which os._exit would leak
    if threads is not None:
        torch.set_num_threads(threads)
    if plan.pin_cores:
        pin_to_cores(rank, plan.world_size)
    try:
        result = run_worker(plan, rank, rank, config, dataset, init_method, progress)
        connection.send(("result", result))
        code = 0
    except BaseException as error:  # noqa: BLE001 — reported to the parent, which names this rank
        connection.send(("error", describe(error)))
        code = 1
    connection.close()
    sys.stderr.flush()
    os._exit(code)


def pin_to_cores(local_rank: int, local_processes: int) -> list[int] | None:
    """Restrict this process (and the threads it starts from now on) to the local_rank-th of
    local_processes equal, contiguous groups of the cores it may run on. Nothing happens for a single
    process, with fewer cores than processes, or without sched_setaffinity (not Linux). Returns the cores,
    or None when left unpinned."""
    if local_processes < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < local_processes:
        return None
    share = len(allowed) // local_processes
    cores = allowed[local_rank * share:(local_rank + 1) * share]
    os.sched_setaffinity(0, cores)
    return cores


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the rendezvous of spawned processes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def default_threads(processes: int) -> int | None:
    """Threads per spawned process: OMP_NUM_THREADS when set (torch honours it), else the cores shared out."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // processes)


def launch(plan: Plan, config: TrainConfig, dataset: Dataset, progress: bool = False,
           threads: int | None = None) -> dict:
    """Spawn plan.world_size processes on this machine, train, and return rank 0's result.

    threads: torch threads per process (default: OMP_NUM_THREADS if set, else cores // processes). If a
    process raises or dies, the others are given plan.timeout seconds to exit, then killed; raises
    DistributedTrainingError naming the first failure and every other.
    """
    import multiprocessing.connection

    import torch.multiprocessing as mp

    validate(plan, config)
    context = mp.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    threads = default_threads(plan.world_size) if threads is None else threads
    processes, connections = [], []
    for rank in range(plan.world_size):
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(target=_spawned_entry, name=f"svp-train-rank-{rank}", args=(
            rank, os.getpid(), plan, config, dataset, init_method, progress, threads, writer))
        process.start()
        writer.close()
        processes.append(process)
        connections.append(reader)
    reports, failures, deadline = {}, [], None
    waiting = {process.sentinel: rank for rank, process in enumerate(processes)}
    waiting.update({connection: rank for rank, connection in enumerate(connections)})

    def drain(rank: int) -> None:
        """Read rank's report (it sends one, then exits); EOF if it died first."""
        if waiting.pop(connections[rank], None) is not None:
            try:
                reports[rank] = connections[rank].recv()
            except EOFError:
                pass

    try:
        while waiting:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = multiprocessing.connection.wait(list(waiting), timeout)
            if not ready:  # survivors of a failure that did not exit in time
                for handle, rank in list(waiting.items()):
                    if handle == processes[rank].sentinel:
                        processes[rank].kill()
                        failures.append((rank, f"did not exit within {plan.timeout:g} s of the failure; killed"))
                deadline = math.inf
                continue
            for handle in ready:
                if handle not in waiting:  # a connection drained with its process's exit
                    continue
                rank = waiting[handle]
                if handle == processes[rank].sentinel:
                    del waiting[handle]
                    processes[rank].join()
                    drain(rank)  # what it sent before exiting, if anything
                    if processes[rank].exitcode != 0:
                        failures.append((rank, _exit_cause(processes[rank].exitcode, reports.get(rank))))
                else:
                    drain(rank)
            if failures and deadline is None:
                deadline = time.monotonic() + plan.timeout
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
    if failures:
        (rank, cause), others = failures[0], failures[1:]
        message = f"{role(plan, rank)} failed: {cause}"
        message += "".join(f"; then {role(plan, r)} failed: {c}" for r, c in others)
        raise DistributedTrainingError(message)
    _, result = reports[0]
    return result


def _exit_cause(exitcode: int, report: tuple | None) -> str:
    if report is not None and report[0] == "error":
        return report[1]
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode} without a report"


def train_main(args, config: TrainConfig, dataset: Dataset) -> int | None:
    """The CLI's distributed run: spawn the processes (or be one rank under torchrun), train, and on rank 0
    print the summary and write --json/--plot. Returns the exit code (1: a process failed, its cause
    printed; 2: bad flags), or None when the arguments ask for a single-process run."""
    environment = torchrun_environment()
    try:
        plan = plan_from_arguments(args, environment)
        if plan is None:
            return None
        validate(plan, config)
    except ValueError as error:
        print(f"svp-train: error: {error}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    try:
        if environment is None:
            result = launch(plan, config, dataset, progress)
        else:
            die_with_parent(os.getppid())
            result = run_worker(plan, environment["rank"], environment["local_rank"], config, dataset, "env://",
                                progress)
    except DistributedTrainingError as error:
        print(f"svp-train: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 — this torchrun rank: name it, exit now (peers may be gone)
        print(f"svp-train: {role(plan, environment['rank'])} failed: {describe(error)}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    if result is None:
        return 0
    layout = f"{plan.mode.replace('_', ' ')} × {plan.stages if plan.mode == 'pipeline' else plan.world_size}"
    layout += f" × {plan.replicas} replicas" if plan.replicas > 1 else ""
    print(f"{config.method} {config.model} on {config.dataset}, {layout}: test accuracy "
          f"{100 * result['test_accuracy']:.2f}% | wall {result['wall_seconds']:.1f} s | "
          f"{result['samples_per_second']:.0f} samples/s | busy/idle s per rank: "
          + ", ".join(f"{b:.1f}/{i:.1f}" for b, i in zip(result["busy_seconds"], result["idle_seconds"])))
    write_outputs(result, args)
    return 0
