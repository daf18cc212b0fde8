"""A training step captured as a CUDA graph: per-step values on the device, one graph per static input shape.

A captured step replays the kernels it recorded with the arguments it recorded, so everything that changes
from step to step must live in device memory that the step reads:

    StepScalars   the per-block dropout seeds (0-dim int64) and the learning rate (0-dim float32), one device
                  buffer written before every step by a single copy from pinned host memory (outside the graph)
    StepGraphs    per static (inputs, targets) shape: the first `warmup_steps` calls run the step eagerly on a
                  side stream (lazy initialisation: optimizer state, cuBLAS workspaces, JIT compilation, the
                  trainer's validated lean path), the next is captured on that stream, and every later call
                  copies its batch into the graph's static input buffers and replays it

The captured step returns its outputs in the graph's own memory: each replay overwrites them, so a caller reads
or accumulates them before the next step. The eager calls and the replays run the same Python function on the
same device tensors, so a replay gives the bits of the eager step (tests/test_train_graphs.py, on CUDA).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch


def check_graph_device(device: torch.device, flag: str = "cuda_graph") -> None:
    """ValueError unless `device` is a CUDA device with torch seeing a GPU (graph capture is CUDA's)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"{flag} needs a CUDA device (a captured CUDA graph replays GPU work), got device "
                         f"{str(device)!r}" + ("" if torch.cuda.is_available() else " and no GPU is visible"))


class StepScalars:
    """One int64 device buffer holding `seeds` dropout seeds and, in its last element's low 4 bytes, a float32
    learning rate; `seeds_view[i]` and `lr` are 0-dim views into it, so kernels (and a captured graph) read the
    current values. write() fills it with one host-to-device copy, from a ring of pinned host rows on CUDA (an
    event per row: a row is rewritten only after its previous copy ran, so the host never waits on the GPU
    unless it is `SLOTS` steps ahead)."""

    SLOTS = 16

    def __init__(self, seeds: int, device: torch.device):
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self.values = torch.zeros(seeds + 1, dtype=torch.int64, device=self.device)
        self.seeds = [self.values[i] for i in range(seeds)]
        self.lr = self.values[seeds:].view(torch.float32)[0]  # little-endian: the low 4 bytes
        slots = self.SLOTS if self._cuda else 1
        self._host = torch.zeros(slots, seeds + 1, dtype=torch.int64, pin_memory=self._cuda)
        self._rows = self._host.numpy()
        self._events: list = [None] * slots
        self._next = 0

    def write(self, seeds: list[int], lr: float | None = None) -> None:
        """Seeds (each in [0, 2**63)) and, if given, the learning rate, for the next step's kernels."""
        slot = self._next
        self._next = (slot + 1) % len(self._rows)
        if self._events[slot] is not None:
            self._events[slot].synchronize()
        row = self._rows[slot]
        row[:len(seeds)] = seeds
        if lr is not None:
            row[-1:].view(np.float32)[0] = lr
        self.values.copy_(self._host[slot], non_blocking=self._cuda)
        if self._cuda:
            event = self._events[slot] or torch.cuda.Event()
            event.record()
            self._events[slot] = event


class GraphRunner(NamedTuple):
    """How StepGraphs runs a step outside the plain eager path (tests substitute a CPU stand-in):
    warm(fn) -> fn()'s outputs, run eagerly where the capture will happen; capture(fn) -> (replay, outputs):
    fn recorded once and its work run once (this step's), replay() re-runs what was recorded and refreshes
    `outputs` in place."""

    warm: Callable
    capture: Callable


def cuda_runner(device: torch.device) -> GraphRunner:
    """Warm-up and capture on one side stream of `device` (torch.cuda.graph's rule: warm up where you capture),
    replays on the current stream."""
    stream = torch.cuda.Stream(device)

    def warm(fn):
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            outputs = fn()
        current.wait_stream(stream)
        return outputs

    def capture(fn):
        graph = torch.cuda.CUDAGraph()
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.graph(graph, stream=stream):
            outputs = fn()
        graph.replay()  # capturing records the step without running it
        return graph.replay, outputs

    return GraphRunner(warm, capture)


class _Captured(NamedTuple):
    inputs: torch.Tensor
    targets: torch.Tensor
    calls: list  # [eager calls so far]; the graph once captured
    replay: Callable | None
    outputs: object


class StepGraphs:
    """step(inputs, targets) -> outputs run eagerly `warmup_steps` times per static shape, then captured once
    and replayed (module docstring). inputs and targets are copied into the shape's static buffers on the
    device first (a batch already there costs one device copy each)."""

    def __init__(self, step: Callable, device: torch.device, warmup_steps: int = 2,
                 runner: GraphRunner | None = None):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be ≥ 1 (the first step initialises the optimizer state), "
                             f"got {warmup_steps}")
        self.step, self.device, self.warmup_steps = step, torch.device(device), warmup_steps
        self._runner = runner
        self._shapes: dict = {}

    @property
    def runner(self) -> GraphRunner:
        """The GraphRunner (cuda_runner of the device, made at the first step that needs it)."""
        if self._runner is None:
            self._runner = cuda_runner(self.device)
        return self._runner

    @property
    def captured_shapes(self) -> list[tuple]:
        """The (inputs shape, targets shape) of every captured graph."""
        return [key[:2] for key, entry in self._shapes.items() if entry.replay is not None]

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor):
        key = (tuple(inputs.shape), tuple(targets.shape), inputs.dtype, targets.dtype)
        entry = self._shapes.get(key)
        if entry is None:
            entry = _Captured(torch.empty(inputs.shape, dtype=inputs.dtype, device=self.device),
                              torch.empty(targets.shape, dtype=targets.dtype, device=self.device), [0], None, None)
            self._shapes[key] = entry
        entry.inputs.copy_(inputs, non_blocking=True)
        entry.targets.copy_(targets, non_blocking=True)
        if entry.replay is not None:
            entry.replay()
            return entry.outputs
        if entry.calls[0] < self.warmup_steps:
            entry.calls[0] += 1
            return self.runner.warm(lambda: self.step(entry.inputs, entry.targets))
        replay, outputs = self.runner.capture(lambda: self.step(entry.inputs, entry.targets))
        self._shapes[key] = entry._replace(replay=replay, outputs=outputs)
        return outputs
