"""Layer-parallel (pipeline) and data-parallel SVP training over torch.distributed.

Pipeline (``--stages K``): the blocks are split into K contiguous stages, one process each. Stage s receives
(h, v_prev, targets) of batch t from stage s − 1, trains its blocks on it with ``train_block`` and sends
(h_out, v_out, targets) on; no gradient ever crosses a stage. That is the sequential trainer's computation
in another order (each block's dropout seed is block_step_seed(run seed, block, step)), so with the same
device type and thread count the parameters after any number of steps are bit-identical to ``svp-train``
without ``--stages``. A stage keeps at most ``max_in_flight`` unfinished sends, so a slow stage
back-pressures its predecessors instead of growing their memory; it receives batch t + 1 while it computes
batch t. Unless given, the split balances the blocks' measured step times.

Data parallel (``--data-parallel N`` or torchrun without ``--stages``): every rank holds the whole model and
trains each global batch (``--batch-size``) on its contiguous 1/N share of the rows. The SVP loss couples a
batch through its B×B similarity Gram, so each block all-gathers the (B/N, C) projections v of all ranks
and evaluates the global loss with only its own rows differentiable; one bucketed all_reduce (sum) of the
block's gradients then gives every rank the global-batch gradient before the block's step. Matches a single
process to float32 rounding, except BatchNorm, whose batch statistics are per rank (running statistics are
broadcast from rank 0 before each evaluation).

Both (``--stages K --data-parallel N``): a K × N grid; rank r · K + s trains stage s as replica r. Each stage
trains its blocks as the data-parallel mode does, within the process group of its N replicas, on the share
of every batch that replica r of stage 0 takes; the messages carry the replica's rows of h and the whole
batch's v and targets. Bit-identical to data parallel with N ranks, as the pipeline is to one process.

Processes are started here (torch.multiprocessing, spawn) or by torchrun (RANK, WORLD_SIZE, LOCAL_RANK in
the environment). gloo on CPU, nccl on CUDA (one GPU per process). A process that raises or dies makes the
others exit within ``timeout`` seconds with an error naming it; children die with their parent.

Checkpoints (``checkpoint_dir``): after every epoch each process atomically writes rank-<r>-epoch-<e>.pt
(its blocks' parameters and buffers, their optimizer states and local losses, step, epoch, curves, config);
a restarted run resumes from the newest epoch that every rank has saved.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import datetime
import math
import os
import signal
import socket
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..api import fused_local_loss
from .data import Dataset, batch_indices
from .run import TrainConfig, augment, build_trainer
from .trainer import LayerwiseTrainer

MODES = ("pipeline", "data_parallel")
EVAL_BATCH = 1024  # LayerwiseTrainer.evaluate's batch size: the same batches, the same logits
TRAIN, EVAL, EPOCH_END, STOP = range(4)  # pipeline message kinds
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
CHECKPOINT_FORMAT = "svp-kernels-distributed-checkpoint/1"


class DistributedTrainingError(RuntimeError):
    """A process of a distributed run failed; the message names it (stage/rank) and the cause."""


@dataclass(frozen=True)
class Plan:
    """How a run is distributed.

    mode: "pipeline" (world_size / replicas stages) or "data_parallel" (world_size replicas). replicas
    (pipeline only): data-parallel copies of every stage, a stages × replicas grid in which rank
    replica · stages + stage trains its stage on its share of every batch (grid_position). stage_split:
    blocks per stage (pipeline; None: choose_split decides). timeout: seconds a process waits on a peer, and the
    parent on the survivors of a failure. max_in_flight: unfinished sends a stage may hold.
    checkpoint_dir: where every process writes and resumes its per-epoch checkpoint (None: none).
    pin_cores: processes spawned by launch (not torchrun's) each run on their own share of the cores when
    there are at least as many cores as processes (pin_to_cores).
    """

    mode: str
    world_size: int
    stage_split: tuple[int, ...] | None = None
    timeout: float = 60.0
    max_in_flight: int = 2
    checkpoint_dir: str | None = None
    pin_cores: bool = True
    replicas: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be ≥ 1, got {self.world_size}")
        if self.replicas < 1 or self.world_size % self.replicas:
            raise ValueError(f"replicas must be ≥ 1 and divide world_size = {self.world_size}, got {self.replicas}")
        if self.replicas > 1 and self.mode != "pipeline":
            raise ValueError("replicas applies to the pipeline mode only (data_parallel: world_size is the replicas)")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be ≥ 1, got {self.max_in_flight}")
        if self.stage_split is not None:
            if self.mode != "pipeline":
                raise ValueError("stage_split applies to the pipeline mode only")
            if len(self.stage_split) != self.stages or min(self.stage_split) < 1:
                raise ValueError(f"stage_split must give ≥ 1 block to each of the {self.stages} stages, "
                                 f"got {self.stage_split}")

    @property
    def stages(self) -> int:
        """Pipeline stages: world_size / replicas (pipeline), 1 (data_parallel)."""
        return self.world_size // self.replicas if self.mode == "pipeline" else 1


def grid_position(plan: Plan, rank: int) -> tuple[int, int]:
    """(stage, replica) of a pipeline rank: rank = replica · stages + stage, so replica 0's stages are ranks
    0 … stages − 1 and a plain pipeline's rank is its stage."""
    return rank % plan.stages, rank // plan.stages


def trainable_batch(model: nn.Module, replicas: int) -> int:
    """The fewest rows a batch needs to be shared out to `replicas` data-parallel replicas: one row each,
    two with BatchNorm (which cannot train on one); 1 for a single replica, whose batches are
    run_training's. Smaller batches are skipped."""
    if replicas == 1:
        return 1
    batch_norm = any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    return replicas * (2 if batch_norm else 1)


def check_global_batch(config: TrainConfig, min_batch: int, replicas: int) -> None:
    """ValueError unless --batch-size (the global batch) can be shared out to the replicas."""
    if config.batch_size < min_batch:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch: it must be ≥ {min_batch}, "
                         f"{min_batch // replicas} row(s) for each of the {replicas} data-parallel replicas"
                         + (" (BatchNorm trains on 2 rows at least)" if min_batch > replicas else ""))


def share_sizes(rows: int, parts: int) -> list[int]:
    """Rows of each of `parts` contiguous shares of `rows` rows, as Tensor.tensor_split cuts them."""
    return [rows // parts + (part < rows % parts) for part in range(parts)]


# ----------------------------------------------------------------------------------------------------
# Stage boundaries
# ----------------------------------------------------------------------------------------------------

def measured_block_costs(trainer: LayerwiseTrainer, inputs: torch.Tensor, targets: torch.Tensor,
                         repeats: int = 5) -> list[float]:
    """Seconds of one training step of every block (forward, local loss, backward, optimizer step), the
    input projection charged to block 0, from `repeats` training steps of a copy of the trainer on the
    batch (inputs (B, *input_shape), targets (B,)) after one warm-up step: block l costs the median over
    steps of its share of the step, times the median step. Shares, not raw times, so that other work on the
    machine slowing a whole step cancels, and medians, so that a burst during part of one step does not
    move a block. The trainer is left as it was (the copy holds the whole model's optimizer state while it
    runs), and no global RNG is drawn from (the dropout seeds are explicit)."""
    device = trainer.device
    inputs, targets = inputs.to(device), targets.to(device)
    probe = copy.deepcopy(trainer)
    samples = [[] for _ in range(probe.num_blocks)]
    for step in range(1 + repeats):
        clock = Clock(device)
        h, v = inputs, probe.input_alignment(inputs)
        for index in range(probe.num_blocks):
            h, v, _ = probe.train_block(index, h, v, targets, step)
            clock.charge("busy")
            samples[index].append(clock.busy)
            clock.restart()
    steps = [sum(seconds) for seconds in zip(*samples)][1:]
    shares = [statistics.median(t / step for t, step in zip(seconds[1:], steps)) for seconds in samples]
    return [share * statistics.median(steps) for share in shares]


def choose_split(plan: Plan, rank: int, trainer: LayerwiseTrainer, dataset: Dataset, batch_size: int,
                 saved_split: tuple[int, ...] | None) -> tuple[int, ...]:
    """Blocks per stage: plan.stage_split when given; all blocks for a single stage; else rank 0's choice,
    broadcast to every stage (so that all agree although timings differ between processes): the split of
    the checkpoint being resumed (saved_split), or the balanced_split of measured_block_costs on the first
    batch_size training examples. Collective in that last case. Which process trains a block does not
    change the result, so neither does the split."""
    if plan.stage_split is not None:
        return plan.stage_split
    if plan.stages == 1:
        return (trainer.num_blocks,)
    choice = [None]
    if rank == 0:
        choice[0] = tuple(saved_split) if saved_split is not None else balanced_split(measured_block_costs(
            trainer, dataset.train_inputs[:batch_size], dataset.train_targets[:batch_size]), plan.stages)
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def balanced_split(costs: list[float], stages: int) -> tuple[int, ...]:
    """Blocks per stage: the contiguous split of costs into `stages` non-empty parts with the smallest
    maximum part (exact, by dynamic programming over prefix sums)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"stages must be between 1 and the number of blocks ({n}), got {stages}")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    # best[k][j]: the smallest maximum part splitting the first j blocks into k parts; cut[k][j]: its last cut
    best = [[math.inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    sizes, j = [], n
    for k in range(stages, 0, -1):
        sizes.append(j - cut[k][j])
        j = cut[k][j]
    return tuple(reversed(sizes))


def stage_blocks(split: tuple[int, ...], stage: int) -> range:
    """The block indices of stage `stage` under split (blocks per stage)."""
    start = sum(split[:stage])
    return range(start, start + split[stage])


def keep_blocks(trainer: LayerwiseTrainer, blocks: range) -> None:
    """Drop every block but `blocks` from the trainer, with its optimizer and local loss (and the input
    projection unless block 0 is kept), so that a stage holds only its own parameters."""
    for index in range(len(trainer.model.blocks)):
        if index not in blocks:
            trainer.model.blocks[index] = nn.Identity()
            trainer.local_losses[index] = nn.Identity()
            trainer.optimizers[index] = None
    if 0 not in blocks:
        trainer.input_projection = None


@torch.no_grad()
def block_output_shapes(trainer: LayerwiseTrainer) -> list[tuple[int, ...]]:
    """The per-example output shape of every block, from one zero example in eval mode."""
    model = trainer.model
    was_training = model.training
    model.eval()
    h = torch.zeros(1, *model.input_shape, device=trainer.device)
    shapes = []
    for block in model.blocks:
        h = block(h)
        shapes.append(tuple(h.shape[1:]))
    model.train(was_training)
    return shapes


# ----------------------------------------------------------------------------------------------------
# Shared by both modes: the batches, timing, checkpoints
# ----------------------------------------------------------------------------------------------------

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


def _checkpoint_path(directory: str, rank: int, epoch: int) -> Path:
    return Path(directory) / f"rank-{rank}-epoch-{epoch}.pt"


def save_checkpoint(directory: str, rank: int, epoch: int, state: dict, keep: int) -> None:
    """Write state to rank-<rank>-epoch-<epoch>.pt atomically (temporary file, fsync, rename) and remove
    this rank's checkpoints older than the newest `keep` epochs."""
    path = _checkpoint_path(directory, rank, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    for old in saved_epochs(directory, rank):
        if old <= epoch - keep:
            _checkpoint_path(directory, rank, old).unlink(missing_ok=True)


def saved_epochs(directory: str | None, rank: int) -> list[int]:
    """The epochs this rank has checkpoints of, ascending."""
    if directory is None or not Path(directory).is_dir():
        return []
    prefix = f"rank-{rank}-epoch-"
    return sorted(int(path.stem[len(prefix):]) for path in Path(directory).glob(f"{prefix}*.pt")
                  if path.stem[len(prefix):].isdigit())


def common_resume_epoch(plan: Plan, rank: int) -> int:
    """The newest epoch every rank has a checkpoint of (0: start afresh; always 0 without a checkpoint
    directory). Collective when plan.checkpoint_dir is set."""
    if plan.checkpoint_dir is None:
        return 0
    everyone = [None] * plan.world_size
    dist.all_gather_object(everyone, saved_epochs(plan.checkpoint_dir, rank))
    common = set.intersection(*(set(epochs) for epochs in everyone))
    if not common and any(everyone):
        raise DistributedTrainingError(f"the checkpoints in {plan.checkpoint_dir} share no epoch across the "
                                       f"{plan.world_size} ranks (found {everyone}); remove them to start afresh")
    return max(common, default=0)


def trainer_state(trainer: LayerwiseTrainer, blocks: range) -> dict:
    """This process's share of the trainer: its blocks, their local losses and optimizers, the input projection."""
    state = {"blocks": {i: trainer.model.blocks[i].state_dict() for i in blocks},
             "local_losses": {i: trainer.local_losses[i].state_dict() for i in blocks},
             "optimizers": {i: trainer.optimizers[i].state_dict() for i in blocks}}
    if trainer.input_projection is not None:
        state["input_projection"] = trainer.input_projection.state_dict()
    return state


def load_trainer_state(trainer: LayerwiseTrainer, state: dict) -> None:
    for i, block_state in state["blocks"].items():
        trainer.model.blocks[i].load_state_dict(block_state)
        trainer.local_losses[i].load_state_dict(state["local_losses"][i])
        trainer.optimizers[i].load_state_dict(state["optimizers"][i])
    if "input_projection" in state:
        trainer.input_projection.load_state_dict(state["input_projection"])


def load_checkpoint(plan: Plan, rank: int, epoch: int) -> dict | None:
    """This rank's checkpoint of `epoch` (None when epoch is 0: a fresh start)."""
    if not epoch:
        return None
    state = torch.load(_checkpoint_path(plan.checkpoint_dir, rank, epoch), weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a {CHECKPOINT_FORMAT} file (format {state.get('format')!r})")
    return state


def resume(state: dict | None, plan: Plan, config: TrainConfig, trainer: LayerwiseTrainer,
           split) -> tuple[int, int, dict]:
    """Load a checkpoint (load_checkpoint's) into the trainer, after checking that this run wrote it.
    Returns (epochs done, steps done, curves so far): (0, 0, empty curves) for a fresh start (state None)."""
    if state is None:
        return 0, 0, {"block": [], "loss": [], "accuracy": []}
    check_resumable(state, config, plan, split)
    load_trainer_state(trainer, state["trainer"])
    return state["epoch"], state["step"], state["curves"]


def _comparable(config: TrainConfig) -> dict:
    """What a checkpoint must agree on with the run resuming it: the config but its epoch count."""
    return {key: value for key, value in asdict(config).items() if key != "epochs"}


# ----------------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------------

@dataclass
class Message:
    """One pipeline message: kind, step (TRAIN), h (B, *shape), v (B, C) (TRAIN only), targets (B,)."""

    kind: int
    step: int = 0
    h: torch.Tensor | None = None
    v: torch.Tensor | None = None
    targets: torch.Tensor | None = None


def pipeline_schedule(config: TrainConfig, dataset: Dataset, start_epoch: int, start_step: int, min_batch: int = 1):
    """(kind, step, rows) of every message stage 0 sends, in order: per epoch from start_epoch on, its
    training batches (rows: the example indices, drawn as run_training draws them; one smaller than
    min_batch is skipped, as the data-parallel mode skips it: see trainable_batch), the test set in
    EVAL_BATCH slices (rows: a range), EPOCH_END; then STOP (rows None). Every stage computes it, so a
    receiver knows the size of each message before it arrives."""
    step, num_test = start_step, len(dataset.test_targets)
    for batches in epoch_batches(config, len(dataset.train_targets), start_epoch):
        for indices in batches:
            if len(indices) < min_batch:
                continue
            yield TRAIN, step, indices
            step += 1
        for start in range(0, num_test, EVAL_BATCH):
            yield EVAL, 0, range(start, min(start + EVAL_BATCH, num_test))
        yield EPOCH_END, 0, None
    yield STOP, 0, None


class Packing:
    """The byte layout of one packed message, a uint8 buffer: header (kind, B, step) as 3 int64, then h
    (h_rows, *h_shape) and v (B, C) in dtype, then targets (B,) int64, each field 8-byte aligned; v in
    TRAIN only, h and targets in TRAIN and EVAL. h_rows is B but in a grid's TRAIN messages, which carry a
    replica's share of h with the whole batch's v and targets."""

    def __init__(self, kind: int, batch: int, h_shape: tuple[int, ...], v_width: int, dtype: torch.dtype,
                 h_rows: int | None = None):
        fields = [("header", (3,), torch.int64)]
        if kind in (TRAIN, EVAL):
            fields.append(("h", (batch if h_rows is None else h_rows, *h_shape), dtype))
            if kind == TRAIN:
                fields.append(("v", (batch, v_width), dtype))
            fields.append(("targets", (batch,), torch.int64))
        self.fields, self.nbytes = {}, 0
        for name, shape, field_dtype in fields:
            self.fields[name] = (self.nbytes, shape, field_dtype)
            self.nbytes += -(-math.prod(shape) * field_dtype.itemsize // 8) * 8

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of buffer (uint8, nbytes), one per field."""
        return {name: buffer[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                for name, (offset, shape, dtype) in self.fields.items()}


class Outbound:
    """Messages to the next stage: each packed into one buffer and sent with one isend. At most
    max_in_flight sends are unfinished (a full link waits on the oldest: back-pressure); a buffer is reused
    once its send has completed."""

    def __init__(self, peer: int, h_shape: tuple[int, ...], v_width: int, dtype: torch.dtype,
                 device: torch.device, max_in_flight: int, clock: Clock):
        self.peer, self.h_shape, self.v_width, self.dtype, self.device = peer, h_shape, v_width, dtype, device
        self.max_in_flight, self.clock = max_in_flight, clock
        self.pending: deque[tuple[object, torch.Tensor]] = deque()  # (work, the buffer it reads)
        self.free: list[torch.Tensor] = []

    def send(self, message: Message) -> None:
        while len(self.pending) >= self.max_in_flight:
            self._wait_oldest()
        batch = 0 if message.targets is None else len(message.targets)
        h_rows = None if message.h is None else len(message.h)
        packing = Packing(message.kind, batch, self.h_shape, self.v_width, self.dtype, h_rows)
        buffer = _take(self.free, packing.nbytes, self.device)
        views = packing.views(buffer)
        views["header"].copy_(torch.tensor([message.kind, batch, message.step], dtype=torch.int64))
        for name in ("h", "v", "targets"):
            if name in views:
                views[name].copy_(getattr(message, name))
        self.pending.append((dist.isend(buffer, self.peer), buffer))

    def _wait_oldest(self) -> None:
        self.clock.charge("busy")
        work, buffer = self.pending.popleft()
        work.wait()
        self.free.append(buffer)
        self.clock.charge("idle")

    def flush(self) -> None:
        while self.pending:
            self._wait_oldest()


class Inbound:
    """Messages from the previous stage, in the order of `expected` ((kind, step, rows) as pipeline_schedule
    yields them), for replica `replica` of `replicas` (message_rows). The receive of message t + 1 is posted
    before message t is handed out, so its transfer overlaps the computation on message t (two buffers,
    reused); every header is checked against the schedule."""

    def __init__(self, peer: int, expected, h_shape: tuple[int, ...], v_width: int, dtype: torch.dtype,
                 device: torch.device, clock: Clock, replica: int = 0, replicas: int = 1):
        self.peer, self.expected, self.clock = peer, expected, clock
        self.h_shape, self.v_width, self.dtype, self.device = h_shape, v_width, dtype, device
        self.replica, self.replicas = replica, replicas
        self.free: list[torch.Tensor] = []

    def _post(self, entry):
        kind, step, rows = entry
        batch, h_rows = message_rows(kind, rows, self.replica, self.replicas)
        packing = Packing(kind, batch, self.h_shape, self.v_width, self.dtype, h_rows)
        buffer = _take(self.free, packing.nbytes, self.device)
        return (kind, batch, step), buffer, packing.views(buffer), dist.irecv(buffer, self.peer)

    def __iter__(self):
        upcoming = iter(self.expected)
        posted = self._post(next(upcoming))
        while posted is not None:
            expected, buffer, views, work = posted
            self.clock.charge("busy")
            work.wait()
            self.clock.charge("idle")
            header = tuple(views["header"].tolist())
            if header != expected:
                raise DistributedTrainingError(
                    f"stage {self.peer} sent (kind, rows, step) = {header}, the schedule expects {expected}: "
                    f"the stages disagree on the data or the config")
            following = next(upcoming, None)
            posted = None if following is None else self._post(following)  # in flight while t is computed
            yield Message(expected[0], expected[2], views.get("h"), views.get("v"), views.get("targets"))
            self.free.append(buffer)  # the stage is done with message t


def message_rows(kind: int, rows, replica: int, replicas: int) -> tuple[int, int]:
    """(B, h_rows) of the message for schedule entry (kind, ·, rows) that replica `replica` of a stage
    receives: TRAIN carries the replica's share of h with the whole batch's v and targets; EVAL the
    replica's share of the slice (h and targets); the others nothing."""
    if rows is None:
        return 0, 0
    share = share_sizes(len(rows), replicas)[replica]
    return (len(rows), share) if kind == TRAIN else (share, share)


def _take(free: list[torch.Tensor], nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 buffer of nbytes: a free one of that size if there is one, else a new one."""
    for index, buffer in enumerate(free):
        if buffer.numel() == nbytes:
            return free.pop(index)
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _source_messages(trainer: LayerwiseTrainer, config: TrainConfig, dataset: Dataset, schedule, bar,
                     replica: int = 0, replicas: int = 1):
    """Stage 0's messages, following the schedule, for replica `replica` of `replicas`: the batches with
    their inputs (the replica's contiguous share of the augmented batch) and targets (the whole batch's) on
    the device; the replica's share of each test slice."""
    device = trainer.device
    for kind, step, rows in schedule:
        if kind == TRAIN:
            inputs = augment(dataset.train_inputs[rows], config, step).tensor_split(replicas)[replica]
            yield Message(TRAIN, step, inputs.to(device), None, dataset.train_targets[rows].to(device))
            bar.update()
        elif kind == EVAL:
            sizes = share_sizes(len(rows), replicas)
            first = rows.start + sum(sizes[:replica])
            share = slice(first, first + sizes[replica])
            yield Message(EVAL, 0, dataset.test_inputs[share].to(device), None,
                          dataset.test_targets[share].to(device))
        else:
            yield Message(kind)


def stage_groups(plan: Plan):
    """The process group of every stage's replicas (None without replicas). Collective: every rank creates
    every group, in stage order."""
    if plan.replicas == 1:
        return None
    timeout = datetime.timedelta(seconds=plan.timeout)
    return [dist.new_group([replica * plan.stages + stage for replica in range(plan.replicas)], timeout=timeout)
            for stage in range(plan.stages)]


def run_pipeline_stage(plan: Plan, rank: int, config: TrainConfig, dataset: Dataset, progress: bool) -> dict | None:
    """Rank `rank` of the pipeline: its stage of blocks, for its replica's share of every batch (a grid,
    plan.replicas > 1: every block is trained as data_parallel_block within the stage's replicas); returns
    the run's result on rank 0, None elsewhere."""
    from tqdm.auto import tqdm

    stages, replicas, meta = plan.stages, plan.replicas, run_meta(config, dataset)
    stage, replica = grid_position(plan, rank)
    groups = stage_groups(plan)
    group = None if groups is None else groups[stage]
    resume_epoch = common_resume_epoch(plan, rank)
    state = load_checkpoint(plan, rank, resume_epoch)
    trainer = build_trainer(config, dataset.input_shape, dataset.num_classes, meta["batches_per_epoch"])
    split = choose_split(plan, rank, trainer, dataset, config.batch_size,
                         None if state is None else state["stage_split"])
    if sum(split) != len(trainer.model.blocks):
        raise ValueError(f"stage_split {split} covers {sum(split)} blocks; the model has {len(trainer.model.blocks)}")
    blocks = stage_blocks(split, stage)
    shapes = [dataset.input_shape] + block_output_shapes(trainer)
    min_batch = trainable_batch(trainer.model, replicas)  # of the whole model: every stage skips alike
    check_global_batch(config, min_batch, replicas)
    keep_blocks(trainer, blocks)
    epochs_done, step, curves = resume(state, plan, config, trainer, split)
    dtype = next(trainer.model.blocks[blocks.start].parameters()).dtype
    v_width = meta["proj_dim"]
    clock = Clock(trainer.device)
    first, last = stage == 0, stage == stages - 1
    schedule = pipeline_schedule(config, dataset, epochs_done, step, min_batch)
    messages_per_epoch = meta["batches_per_epoch"] + math.ceil(meta["num_test"] / EVAL_BATCH) + 1
    # epochs stage 0 may run ahead of the last: per link, the message computed, the one received ahead and
    # the unfinished sends
    keep = 2 + (stages - 1) * (plan.max_in_flight + 2) // messages_per_epoch

    grid = f" × {replicas} replicas" if replicas > 1 else ""
    bar = tqdm(total=meta["batches_per_epoch"] * (config.epochs - epochs_done), unit="step", disable=not progress,
               desc=f"svp {config.model} {config.dataset}, {stages} stages{grid}")
    if first:
        messages = _source_messages(trainer, config, dataset, schedule, bar, replica, replicas)
    else:
        messages = Inbound(rank - 1, schedule, shapes[blocks.start], v_width, dtype, trainer.device, clock,
                           replica, replicas)
    outbound = None if last else Outbound(rank + 1, shapes[blocks.stop], v_width, dtype, trainer.device,
                                          plan.max_in_flight, clock)
    block_losses, output_ce, correct, evaluated, mode, samples = [], [], 0, 0, None, 0
    dist.barrier()
    start = time.perf_counter()
    clock.restart()
    for message in messages:
        if message.kind == TRAIN:
            if mode != "train":
                trainer.model.train()
                mode = "train"
            h = message.h
            samples += len(message.targets)
            if replicas == 1:
                v = trainer.input_alignment(h) if first else message.v
                losses = []
                for index in blocks:
                    h, v, loss = trainer.train_block(index, h, v, message.targets, message.step)
                    losses.append(loss)
                if last:  # the last block's kernel cross-entropy of the logits, as the sequential step reports it
                    output_ce.append(trainer.last_block_ce)
            else:
                sizes = share_sizes(len(message.targets), replicas)
                v = input_alignment_rows(trainer, h, sizes, replica, group) if first else message.v
                h, v, losses = data_parallel_step(trainer, blocks, h, v, message.targets, sizes, replica,
                                                  message.step, clock, group)
                if last:  # the cross-entropy of the global logits, as the data-parallel mode reports it
                    output_ce.append(F.cross_entropy(v, message.targets))
            block_losses.append(torch.stack(losses))
            step = message.step + 1
            message = Message(TRAIN, message.step, h, v, message.targets)
        elif message.kind == EVAL:
            if mode != "eval":
                trainer.model.eval()
                mode = "eval"
                if replicas > 1:  # BatchNorm running statistics: replica 0's, as the data-parallel mode does
                    clock.charge("busy")
                    for index in blocks:
                        for buffer in trainer.model.blocks[index].buffers():
                            dist.broadcast(buffer, stage, group=group)
                    clock.charge("idle")
            with torch.no_grad():
                h = message.h
                for index in blocks:
                    h = trainer.model.blocks[index](h)
            if last:
                correct += (h.argmax(dim=1) == message.targets).sum().item()
                evaluated += len(message.targets)
            message = Message(EVAL, 0, h, None, message.targets)
        elif message.kind == EPOCH_END:
            curves["block"].append(epoch_means(block_losses))
            if last:
                if replicas > 1:
                    clock.charge("busy")
                    counts = torch.tensor([correct, evaluated], dtype=torch.int64, device=trainer.device)
                    dist.all_reduce(counts, group=group)
                    correct, evaluated = counts.tolist()
                    clock.charge("idle")
                curves["loss"].append(epoch_means(output_ce)[0])
                curves["accuracy"].append(correct / evaluated)
            block_losses, output_ce, correct, evaluated = [], [], 0, 0
            epochs_done += 1
            if plan.checkpoint_dir is not None:
                save_checkpoint(plan.checkpoint_dir, rank, epochs_done,
                                {"format": CHECKPOINT_FORMAT, "mode": plan.mode, "rank": rank,
                                 "world_size": plan.world_size, "replicas": replicas, "stage_split": split,
                                 "epoch": epochs_done, "step": step, "config": asdict(config), "curves": curves,
                                 "trainer": trainer_state(trainer, blocks)}, keep)
        clock.charge("busy")
        if not last:
            outbound.send(message)
        if message.kind == STOP:
            break
    if not last:
        outbound.flush()
    bar.close()
    stats = {"stage": stage, "replica": replica, "blocks": [blocks.start, blocks.stop], "busy_seconds": clock.busy,
             "idle_seconds": clock.idle, "cpu_seconds": clock.cpu_seconds(), "cores": process_cores(),
             "curves": curves}
    everyone = [None] * plan.world_size if rank == 0 else None
    dist.gather_object(stats, everyone, dst=0)
    if rank != 0:
        return None
    wall = time.perf_counter() - start
    pipeline = everyone[:stages]  # replica 0's stages (every replica's curves are the same)
    final = pipeline[-1]["curves"]
    block_curves = [sum((s["curves"]["block"][epoch] for s in pipeline), []) for epoch in range(config.epochs)]
    return {"test_accuracy": final["accuracy"][-1], "train_loss_curve": final["loss"],
            "test_accuracy_curve": final["accuracy"], "block_loss_curves": block_curves,
            **_distributed_fields(plan, config, samples / wall, wall, everyone),
            "stage_split": list(split),
            "stage_blocks": [s["blocks"] for s in pipeline]}


def check_resumable(state: dict, config: TrainConfig, plan: Plan, split) -> None:
    """ValueError unless the checkpoint was written by this kind of run (same config but epochs, same layout)."""
    expected = {"mode": plan.mode, "world_size": plan.world_size, "replicas": plan.replicas, "stage_split": split,
                "config": _comparable(config)}
    found = {"mode": state["mode"], "world_size": state["world_size"], "replicas": state.get("replicas", 1),
             "stage_split": state["stage_split"], "config": _comparable(TrainConfig(**state["config"]))}
    if found != expected:
        differing = [key for key in expected if expected[key] != found[key]]
        raise ValueError(f"the checkpoint in {plan.checkpoint_dir} was written by another run: its {differing} "
                         f"differ ({ {k: found[k] for k in differing} } vs this run's "
                         f"{ {k: expected[k] for k in differing} })")


def _distributed_fields(plan: Plan, config: TrainConfig, samples_per_second: float, wall: float,
                        everyone: list[dict]) -> dict:
    """The JSON fields every distributed run adds to run_training's."""
    return {"wall_seconds": wall, "config": asdict(config), "device": config.device,
            "torch_version": torch.__version__, "mode": plan.mode, "world_size": plan.world_size,
            "stages": plan.stages, "replicas": plan.replicas if plan.mode == "pipeline" else plan.world_size,
            "busy_seconds": [s["busy_seconds"] for s in everyone],
            "idle_seconds": [s["idle_seconds"] for s in everyone],
            "cpu_seconds": [s["cpu_seconds"] for s in everyone],
            "cores": [s["cores"] for s in everyone],
            "samples_per_second": samples_per_second, "threads_per_process": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------
# Data parallel
# ----------------------------------------------------------------------------------------------------

def gather_rows(local: torch.Tensor, sizes: list[int], rank: int, group=None) -> torch.Tensor:
    """(Σ sizes, C): every rank's rows in rank order, this rank's being `local` itself (so gradients reach
    it); the others are constants. local: (sizes[rank], C); rank: this process's rank in `group` (None:
    the whole world)."""
    padded = local.new_zeros(max(sizes), *local.shape[1:])
    padded[:len(local)] = local.detach()
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded, group=group)
    pieces = [piece[:size] for piece, size in zip(pieces, sizes)]
    pieces[rank] = local
    return torch.cat(pieces)


def all_reduce_gradients(parameters: list[torch.Tensor], group=None) -> None:
    """Sum the gradients of `parameters` over all ranks of `group` (None: the world) in one flat all_reduce
    (parameters without a gradient are skipped; every rank skips the same ones)."""
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def data_parallel_block(trainer: LayerwiseTrainer, index: int, h: torch.Tensor, v_prev: torch.Tensor,
                        global_targets: torch.Tensor, sizes: list[int], rank: int, step: int, clock: Clock,
                        group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One update of block `index` on a global batch of which this rank (of `group`; None: the world) holds
    rows h (sizes[rank], …), v_prev (Σ sizes, C') being the previous block's projection of the whole batch.

    h_l = block_l(h), v_l = its projection (block_step_seed as in train_block), V = v_l of all ranks,
    loss = fused_local_loss(V, y, v_prev) over the global batch with only this rank's rows differentiable;
    backward, all_reduce (sum) of the block's gradients, step. Returns (h_l detached, V, the global loss).
    """
    from .seeds import block_step_seed

    block, local_loss, optimizer = trainer.model.blocks[index], trainer.local_losses[index], trainer.optimizers[index]
    h = block(h.detach())
    features = trainer.readouts[index](h).flatten(1)
    projection = local_loss.projection
    v = features if projection is None else projection(features, seed=block_step_seed(trainer.seed, index, step))
    clock.charge("busy")
    v = gather_rows(v, sizes, rank, group)
    clock.charge("idle")
    out = fused_local_loss(v, global_targets, v_prev, alignment_weight=local_loss.alignment_weight,
                           reduction=local_loss.reduction, center=local_loss.center, backend=local_loss.backend)
    out.loss.backward()
    clock.charge("busy")
    all_reduce_gradients(list(block.parameters()), group)
    clock.charge("idle")
    trainer._set_lr(optimizer, step)  # the run's learning-rate schedule, as train_block applies it
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return h.detach(), out.v, out.loss.detach()


@torch.no_grad()
def input_alignment_rows(trainer: LayerwiseTrainer, inputs: torch.Tensor, sizes: list[int], rank: int,
                         group=None) -> torch.Tensor:
    """v_0 (Σ sizes, C) of the whole batch, from this rank's rows `inputs` (sizes[rank], …)."""
    return gather_rows(trainer.input_alignment(inputs), sizes, rank, group)


def data_parallel_step(trainer: LayerwiseTrainer, blocks: range, h: torch.Tensor, v: torch.Tensor,
                       global_targets: torch.Tensor, sizes: list[int], rank: int, step: int, clock: Clock,
                       group=None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One update of `blocks` (data_parallel_block, in order) on a global batch of which this rank holds
    rows h (sizes[rank], …), v (Σ sizes, C') being the projection of the block before them. Returns (the
    last block's output rows, its global v — the logits after the last block —, every block's global loss)."""
    losses = []
    for index in blocks:
        h, v, loss = data_parallel_block(trainer, index, h, v, global_targets, sizes, rank, step, clock, group)
        losses.append(loss)
    return h, v, losses


def run_data_parallel_rank(plan: Plan, rank: int, config: TrainConfig, dataset: Dataset,
                           progress: bool) -> dict | None:
    """Rank `rank` of a data-parallel run; returns the run's result on rank 0, None elsewhere."""
    from tqdm.auto import tqdm

    world, meta = plan.world_size, run_meta(config, dataset)
    trainer = build_trainer(config, dataset.input_shape, dataset.num_classes, meta["batches_per_epoch"])
    everything, min_batch = range(len(trainer.model.blocks)), trainable_batch(trainer.model, world)
    check_global_batch(config, min_batch, world)
    clock, device = Clock(trainer.device), trainer.device
    state = load_checkpoint(plan, rank, common_resume_epoch(plan, rank))
    epochs_done, step, curves = resume(state, plan, config, trainer, None)
    trainer.step = step
    bar = tqdm(total=meta["batches_per_epoch"] * (config.epochs - epochs_done), unit="step",
               disable=not progress or rank != 0, desc=f"svp {config.model} {config.dataset}, {world} data-parallel ranks")
    samples = 0
    dist.barrier()
    start = time.perf_counter()
    clock.restart()
    for batches in epoch_batches(config, meta["num_train"], epochs_done):
        trainer.model.train()
        block_losses, output_ce = [], []
        # a last batch too small to share out is skipped (a single process trains it): trainable_batch
        for indices in [batch for batch in batches if len(batch) >= min_batch]:
            samples += len(indices)
            sizes = share_sizes(len(indices), world)
            global_targets = dataset.train_targets[indices].to(device)
            inputs = augment(dataset.train_inputs[indices], config, step).tensor_split(world)[rank].to(device)
            _, logits, losses = data_parallel_step(trainer, everything, inputs,
                                                   input_alignment_rows(trainer, inputs, sizes, rank),
                                                   global_targets, sizes, rank, step, clock)
            block_losses.append(torch.stack(losses))
            output_ce.append(F.cross_entropy(logits, global_targets))
            step += 1
            trainer.step = step
            bar.update()
        curves["block"].append(epoch_means(block_losses))
        curves["loss"].append(epoch_means(output_ce)[0])
        clock.charge("busy")
        for buffer in trainer.model.buffers():  # BatchNorm running statistics: rank 0's, as DDP does
            dist.broadcast(buffer, 0)
        clock.charge("idle")
        curves["accuracy"].append(_sharded_accuracy(trainer, dataset, rank, world, clock))
        epochs_done += 1
        if plan.checkpoint_dir is not None:
            save_checkpoint(plan.checkpoint_dir, rank, epochs_done,
                            {"format": CHECKPOINT_FORMAT, "mode": plan.mode, "rank": rank, "world_size": world,
                             "stage_split": None, "epoch": epochs_done, "step": step, "config": asdict(config),
                             "curves": curves, "trainer": trainer_state(trainer, everything)}, keep=2)
    bar.close()
    stats = {"rank": rank, "busy_seconds": clock.busy, "idle_seconds": clock.idle, "cpu_seconds": clock.cpu_seconds(),
             "cores": process_cores()}
    everyone = [None] * world if rank == 0 else None
    dist.gather_object(stats, everyone, dst=0)
    if rank != 0:
        return None
    wall = time.perf_counter() - start
    return {"test_accuracy": curves["accuracy"][-1], "train_loss_curve": curves["loss"],
            "test_accuracy_curve": curves["accuracy"], "block_loss_curves": curves["block"],
            **_distributed_fields(plan, config, samples / wall, wall, everyone)}


@torch.no_grad()
def _sharded_accuracy(trainer: LayerwiseTrainer, dataset: Dataset, rank: int, world: int, clock: Clock) -> float:
    """Test accuracy with the test set split into `world` contiguous shares, correct counts summed."""
    trainer.model.eval()
    share = torch.arange(len(dataset.test_targets)).tensor_split(world)[rank]
    correct = 0
    for start in range(0, len(share), EVAL_BATCH):
        indices = share[start:start + EVAL_BATCH]
        logits = trainer.model(dataset.test_inputs[indices].to(trainer.device))
        correct += (logits.argmax(dim=1).cpu() == dataset.test_targets[indices]).sum().item()
    clock.charge("busy")
    total = torch.tensor([correct], dtype=torch.int64, device=trainer.device)
    dist.all_reduce(total)
    clock.charge("idle")
    return total.item() / len(dataset.test_targets)


# ----------------------------------------------------------------------------------------------------
# Processes: one worker per rank, started here or by torchrun; failures end the whole run
# ----------------------------------------------------------------------------------------------------

def process_cores() -> list[int] | None:
    """The cores this process may run on (None where the platform does not say)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def role(plan: Plan, rank: int) -> str:
    """How errors name a process: "stage 1 of 2 (rank 1)" or "data-parallel rank 1 of 2"."""
    if plan.mode == "pipeline":
        stage, replica = grid_position(plan, rank)
        where = f", replica {replica} of {plan.replicas}" if plan.replicas > 1 else ""
        return f"stage {stage} of {plan.stages}{where} (rank {rank})"
    return f"data-parallel rank {rank} of {plan.world_size}"


def torchrun_environment() -> dict | None:
    """{rank, world_size, local_rank} when started by torchrun (its variables are set), else None."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return None
    return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
            "local_rank": int(os.environ["LOCAL_RANK"])}


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
        run = run_pipeline_stage if plan.mode == "pipeline" else run_data_parallel_rank
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


def validate(plan: Plan, config: TrainConfig) -> None:
    """ValueError for a config the distributed trainer cannot run."""
    if config.method != "svp":
        raise ValueError(f"{plan.mode.replace('_', '-')} training is layer-wise: it needs method 'svp', "
                         f"got {config.method!r}")
    if torch.device(config.device).type == "cuda" and torchrun_environment() is None and \
            plan.world_size > torch.cuda.device_count():
        raise ValueError(f"{plan.world_size} processes need one GPU each; {torch.cuda.device_count()} are visible")


def plan_from_arguments(args, environment: dict | None) -> Plan | None:
    """The Plan that the CLI's --stages/--stage-split/--data-parallel/--dist-timeout/--stage-checkpoints/
    --no-pin-cores and torchrun's environment ask for; None for a single-process run. --stages K with
    --data-parallel N is a K × N grid of K · N processes."""
    stages, replicas = args.stages, args.data_parallel
    for flag, value in (("--stages", stages), ("--data-parallel", replicas)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be ≥ 1, got {value}")
    split = None
    if args.stage_split is not None:
        if stages is None:
            raise ValueError("--stage-split needs --stages")
        try:
            split = tuple(int(part) for part in args.stage_split.split(","))
        except ValueError:
            raise ValueError(f"--stage-split must be comma-separated block counts such as 3,2, "
                             f"got {args.stage_split!r}") from None
    asked = None if stages is None and replicas is None else (stages or 1) * (replicas or 1)
    world = environment["world_size"] if environment else None
    if world is not None:
        if asked is not None and asked != world:
            flags = " ".join(f"{flag} {value}" for flag, value in (("--stages", stages), ("--data-parallel", replicas))
                             if value is not None)
            raise ValueError(f"{flags} under torchrun needs WORLD_SIZE = {asked}, got {world}")
        if asked is None and world == 1:
            return None
    elif asked is None:
        return None
    if stages is None:
        return Plan("data_parallel", replicas or world, None, args.dist_timeout,
                    checkpoint_dir=args.stage_checkpoints, pin_cores=not args.no_pin_cores)
    return Plan("pipeline", stages * (replicas or 1), split, args.dist_timeout, checkpoint_dir=args.stage_checkpoints,
                pin_cores=not args.no_pin_cores, replicas=replicas or 1)


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
    print(f"svp {config.model} on {config.dataset}, {layout}: test accuracy "
          f"{100 * result['test_accuracy']:.2f}% | wall {result['wall_seconds']:.1f} s | "
          f"{result['samples_per_second']:.0f} samples/s | busy/idle s per rank: "
          + ", ".join(f"{b:.1f}/{i:.1f}" for b, i in zip(result["busy_seconds"], result["idle_seconds"])))
    from .cli import write_outputs  # cli imports this module

    write_outputs(result, args)
    return 0
