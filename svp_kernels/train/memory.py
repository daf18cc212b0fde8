"""Peak training memory, measured at the allocator (never estimated from shapes).

CUDA: torch.cuda.memory_allocated / max_memory_allocated. CPU: torch's CPU allocator reports every
allocation and free to the profiler when it runs with profile_memory=True; replaying those events in
time order gives the live bytes at every moment, hence the peak. Only memory allocated after start()
counts (a free of older memory is not reported), so the dataset and anything built earlier are excluded.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, NamedTuple

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

CHECKPOINT_MARK = "svp_kernels.memory_checkpoint"


class MemoryReport(NamedTuple):
    """peak_memory_bytes: peak live bytes allocated since start() (model, optimizer state, batch,
    activations, gradients). activation_peak_bytes: peak after checkpoint() minus the bytes live at
    checkpoint() — the transient memory of a training step, without parameters and optimizer state."""

    peak_memory_bytes: int
    activation_peak_bytes: int


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler's native code logs a line to fd 2 when it starts and stops; keep the terminal clean."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class PeakMemoryMeter:
    """start(); build and warm up; checkpoint(); run the step to measure; stop() -> MemoryReport."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self._profiler: profile | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with _native_stderr_silenced():
                self._profiler.__enter__()

    def checkpoint(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._peak_before_checkpoint = torch.cuda.max_memory_allocated(self.device)
            self._checkpoint_bytes = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with record_function(CHECKPOINT_MARK):
                pass

    def stop(self) -> MemoryReport:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak_after = torch.cuda.max_memory_allocated(self.device)
            peak = max(self._peak_before_checkpoint, peak_after) - self._start_bytes
            return MemoryReport(peak, peak_after - self._checkpoint_bytes)
        with _native_stderr_silenced():
            self._profiler.__exit__(None, None, None)
        return _replay_cpu_allocations(self._profiler)


def _replay_cpu_allocations(profiler: profile) -> MemoryReport:
    """Live-byte peaks from the profiler's allocation events (+size on allocation, −size on free)."""
    allocations, marks = [], []
    stack = list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        elif event.name == CHECKPOINT_MARK:
            marks.append(event.start_time_ns)
    if len(marks) != 1:
        raise RuntimeError(f"expected one memory checkpoint in the profile, found {len(marks)}")
    live = peak = peak_after = checkpoint_live = 0
    checkpoint_seen = False
    for time_ns, size in sorted(allocations):
        if not checkpoint_seen and time_ns >= marks[0]:
            checkpoint_seen, checkpoint_live, peak_after = True, live, live
        live += size
        peak = max(peak, live)
        if checkpoint_seen:
            peak_after = max(peak_after, live)
    if not checkpoint_seen:
        checkpoint_live = peak_after = live
    return MemoryReport(peak, peak_after - checkpoint_live)


def measure_step_memory(build_trainer: Callable[[], object], inputs: torch.Tensor, targets: torch.Tensor,
                        device: str | torch.device) -> MemoryReport:
    """Peak memory of training: build_trainer() (a fresh LayerwiseTrainer), one warm-up step that creates
    the optimizer state, then the measured step on the same batch — every step after the first is alike."""
    meter = PeakMemoryMeter(device)
    meter.start()
    trainer = build_trainer()
    trainer.train_step(inputs, targets)
    meter.checkpoint()
    trainer.train_step(inputs, targets)
    return meter.stop()
