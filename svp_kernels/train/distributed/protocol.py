"""The pipeline's wire protocol: the schedule of messages every stage derives from the seed, the byte layout of
a packed message, and the two ends of a link (Outbound: bounded in-flight sends; Inbound: the next receive
posted while the current message is computed)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..data import Dataset
from ..aligned import ALIGNMENT, aligned_empty
from ..run import TrainConfig
from .common import EVAL_BATCH, Clock, DistributedTrainingError, epoch_batches
from .plan import share_sizes

TRAIN, EVAL, EPOCH_END, STOP = range(4)  # message kinds

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
    """The byte layout of one packed message, a uint8 buffer that starts on an ALIGNMENT-byte boundary: header
    (kind, B, step) as 3 int64, then h (h_rows, *h_shape) and v (B, C) in dtype, then targets (B,) int64; v in
    TRAIN only, h and targets in TRAIN and EVAL. h_rows is B but in a grid's TRAIN messages, which carry a
    replica's share of h with the whole batch's v and targets.

    Every field starts on an ALIGNMENT-byte (64-byte) boundary, so the receiving stage computes on h and v
    exactly where a fresh allocation would put them: a GEMM whose kernel depends on the address of its
    operands (MKL on some CPUs) sums in the same order as in the sequential trainer (svp_kernels/train/aligned.py)."""

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
            self.nbytes += -(-math.prod(shape) * field_dtype.itemsize // ALIGNMENT) * ALIGNMENT

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of buffer (uint8, nbytes, ALIGNMENT-aligned), one per field."""
        return {name: buffer[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                for name, (offset, shape, dtype) in self.fields.items()}

    def pack(self, message: Message, buffer: torch.Tensor) -> None:
        """Write message (its kind, batch size and step, and its h, v and targets) into buffer."""
        views = self.views(buffer)
        batch = 0 if message.targets is None else len(message.targets)
        views["header"].copy_(torch.tensor([message.kind, batch, message.step], dtype=torch.int64))
        for name in ("h", "v", "targets"):
            if name in views:
                views[name].copy_(getattr(message, name))

    def unpack(self, buffer: torch.Tensor) -> tuple[tuple[int, ...], Message]:
        """(the header (kind, B, step), the message) of a packed buffer; h, v and targets are views of it."""
        views = self.views(buffer)
        kind, batch, step = views["header"].tolist()
        return (kind, batch, step), Message(kind, step, views.get("h"), views.get("v"), views.get("targets"))


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
        packing.pack(message, buffer)
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
        return (kind, batch, step), buffer, packing, dist.irecv(buffer, self.peer)

    def __iter__(self):
        upcoming = iter(self.expected)
        posted = self._post(next(upcoming))
        while posted is not None:
            expected, buffer, packing, work = posted
            self.clock.charge("busy")
            work.wait()
            self.clock.charge("idle")
            header, message = packing.unpack(buffer)
            if header != expected:
                raise DistributedTrainingError(
                    f"stage {self.peer} sent (kind, rows, step) = {header}, the schedule expects {expected}: "
                    f"the stages disagree on the data or the config")
            following = next(upcoming, None)
            posted = None if following is None else self._post(following)  # in flight while t is computed
            yield message
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
    """A uint8 buffer of nbytes on an ALIGNMENT-byte boundary: a free one of that size if there is one, else a
    new one."""
    for index, buffer in enumerate(free):
        if buffer.numel() == nbytes:
            return free.pop(index)
    return aligned_empty(nbytes, device)
