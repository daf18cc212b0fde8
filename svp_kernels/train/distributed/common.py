"""What the distributed modes share: the error they raise, the batches of every epoch, the curves' epoch means,
the busy/idle clock of a process and the fields a distributed run adds to the JSON result."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

from ..data import Dataset, batch_indices
from ..run import TrainConfig
from .traffic import TRAFFIC_FIELDS

if TYPE_CHECKING:  # plan.py imports this module
    from .plan import Plan


EVAL_BATCH = 1024  # LayerwiseTrainer.evaluate's batch size: the same batches, the same logits

class DistributedTrainingError(RuntimeError):
    """A process of a distributed run failed; the message names it (stage/rank) and the cause."""


def epoch_batches(config: TrainConfig, num_examples: int, start_epoch: int = 0):
    """Yields the index batches of every epoch from start_epoch on, drawn exactly as run_training draws them
    (the epochs before start_epoch are drawn and dropped, so a resumed run sees the same batches)."""
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        batches = batch_indices(num_examples, config.batch_size, generator)
        if epoch >= start_epoch:
            yield batches


def epoch_means(values: list[torch.Tensor]) -> list[float]:
    """Per-column means over an epoch's steps of (k,) or 0-dim float tensors, exactly as run_training
    averages its curves: a running float32 sum on the device, then the block curves divided as tensors and
    the loss curve (0-dim values) as a Python float."""
    total = torch.zeros_like(values[0])
    for value in values:
        total += value
    return [total.item() / len(values)] if total.dim() == 0 else (total / len(values)).tolist()


def run_meta(config: TrainConfig, dataset: Dataset) -> dict:
    """What every process knows of the run: num_train, num_test, batches_per_epoch, proj_dim (the width of
    every v sent)."""
    num_train = len(dataset.train_targets)
    return {"num_train": num_train, "num_test": len(dataset.test_targets),
            "batches_per_epoch": len(batch_indices(num_train, config.batch_size, torch.Generator())),
            "proj_dim": dataset.num_classes if config.proj_dim is None else config.proj_dim}


class Clock:
    """Busy (computing) and idle (waiting on peers) seconds of one process, and the CPU seconds it used
    (all its threads). On CUDA, time is taken after a synchronize, so kernels are charged to the phase that
    queued them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.restart()

    def restart(self) -> None:
        """Zero both counters and start counting now."""
        self.busy, self.idle, self._mark, self._cpu = 0.0, 0.0, time.perf_counter(), time.process_time()

    def cpu_seconds(self) -> float:
        """CPU time this process used since the last restart."""
        return time.process_time() - self._cpu

    def charge(self, phase: str) -> None:
        """Add the seconds since the last charge to `phase` ("busy" or "idle")."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        setattr(self, phase, getattr(self, phase) + now - self._mark)
        self._mark = now


def process_cores() -> list[int] | None:
    """The cores this process may run on (None where the platform does not say)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def distributed_fields(plan: Plan, config: TrainConfig, steps: int, samples: int, wall: float,
                        evaluations: list[dict], everyone: list[dict]) -> dict:
    """The JSON fields of a distributed run, beside its curves: run_training's (wall and training clocks, the
    evaluations: svp_kernels/train/evaluations.py) and each process's (busy, idle and CPU seconds, cores, the
    bytes it communicated: traffic.py)."""
    train_seconds = wall - sum(record["eval_seconds"] for record in evaluations)
    return {"wall_seconds": wall, "train_seconds": train_seconds, "evaluations": evaluations,
            "eval_every": plan.eval_every, "steps": steps, "samples": samples, "config": asdict(config),
            "device": config.device, "torch_version": torch.__version__, "mode": plan.mode,
            "world_size": plan.world_size,
            "stages": plan.stages, "replicas": plan.replicas if plan.mode == "pipeline" else plan.world_size,
            "busy_seconds": [s["busy_seconds"] for s in everyone],
            "idle_seconds": [s["idle_seconds"] for s in everyone],
            "cpu_seconds": [s["cpu_seconds"] for s in everyone],
            "cores": [s["cores"] for s in everyone],
            "samples_per_second": samples / wall, "threads_per_process": torch.get_num_threads(),
            **{key: [s[key] for s in everyone] for key in TRAFFIC_FIELDS}}
