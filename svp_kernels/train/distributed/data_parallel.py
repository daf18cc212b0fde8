"""One process of a data-parallel run (``--data-parallel N``, or a grid's stage replicas): every block trains on
this process's share of each global batch through the trainer's own block step (LayerwiseTrainer.train_block
with a SharedBatch: the whole batch's v all-gathered, the gradients all-reduced). run_replica is the loop of a
data-parallel rank whatever trains its batches: SVP's step here, backprop's DDP step in backprop.py."""

from __future__ import annotations

import time
from typing import Callable, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..aligned import aligned
from ..data import Dataset
from ..evaluations import EvaluationLog
from ..extras import progress_bar
from ..run import TrainConfig, augment, build_trainer
from ..trainer import LayerwiseTrainer
from .checkpoint import checkpoint_state, common_resume_epoch, load_checkpoint, resume, save_rank_checkpoint
from .common import (EVAL_BATCH, Clock, distributed_fields, epoch_batches, epoch_means, process_cores, replica_rows,
                     run_meta)
from .plan import Plan, check_global_batch, share_sizes, trainable_batch
from .traffic import Traffic, counting, os_bytes_written, traffic_fields


def gather_rows(local: torch.Tensor, sizes: list[int], rank: int, group=None) -> torch.Tensor:
    """(Σ sizes, C): every rank's rows in rank order, this rank's being `local` itself (so gradients reach
    it); the others are constants. local: (sizes[rank], C); rank: this process's rank in `group` (None:
    the whole world)."""
    padded = local.new_zeros(max(sizes), *local.shape[1:])
    padded[:len(local)] = local.detach()
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded, group=group)
    return join_rows([piece[:size] for piece, size in zip(pieces, sizes)], local, rank)


def join_rows(pieces: list[torch.Tensor], local: torch.Tensor, rank: int) -> torch.Tensor:
    """torch.cat of pieces with pieces[rank] replaced by `local` (so that gradients reach it). The gradient
    that reaches local is a slice of the whole batch's, off its start: it is handed on from an aligned copy
    (svp_kernels/train/aligned.py), as a process holding the whole batch would compute on it."""
    pieces = list(pieces)
    pieces[rank] = local
    if local.requires_grad:
        local.register_hook(aligned)
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


class ProcessShare:
    """This process's share of a global batch, as LayerwiseTrainer.train_block takes it (its SharedBatch hook):
    rank `rank` of `group` (None: the world) holds rows sizes[rank] of a batch of sum(sizes) rows. gather is
    an all_gather of every rank's rows of v, reduce_gradients one bucketed all_reduce (sum); the time waiting
    on the peers is charged to the clock as idle."""

    def __init__(self, sizes: list[int], rank: int, clock: Clock, group=None):
        self.sizes, self.rank, self.clock, self.group = sizes, rank, clock, group
        self.batch_size = sum(sizes)
        first = sum(sizes[:rank])
        self.rows = slice(first, first + sizes[rank])

    def gather(self, v: torch.Tensor) -> torch.Tensor:
        self.clock.charge("busy")
        rows = gather_rows(v, self.sizes, self.rank, self.group)
        self.clock.charge("idle")
        return rows

    def reduce_gradients(self, parameters: list[torch.Tensor]) -> None:
        self.clock.charge("busy")
        all_reduce_gradients(parameters, self.group)
        self.clock.charge("idle")


@torch.no_grad()
def input_alignment_rows(trainer: LayerwiseTrainer, inputs: torch.Tensor, sizes: list[int], rank: int,
                         group=None, global_targets: torch.Tensor | None = None) -> torch.Tensor:
    """v_0 (Σ sizes, C) of the whole batch, from this rank's rows `inputs` (sizes[rank], …); with
    first_alignment="onehot", from the whole batch's targets (B,) directly (every rank alike: no gather)."""
    if trainer.first_alignment == "onehot":
        return trainer.input_alignment(inputs, global_targets)
    return gather_rows(trainer.input_alignment(inputs), sizes, rank, group)


def data_parallel_step(trainer: LayerwiseTrainer, blocks: range, h: torch.Tensor, v: torch.Tensor,
                       global_targets: torch.Tensor, sizes: list[int], rank: int, step: int, clock: Clock,
                       group=None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One update of `blocks`, in order, on a global batch of which this rank (of `group`; None: the world)
    holds rows h (sizes[rank], …), v (Σ sizes, C') being the projection of the block before them, by the
    trainer's own block step on a ProcessShare: per block h_l = block_l(h), its projection v_l (the dropout
    seed of train_block), V = v_l of all ranks, the local loss of the whole batch with only this rank's rows
    differentiable, the gradients summed over the ranks, the step. Returns (the last block's output rows, its
    global v — the logits after the last block —, every block's global loss)."""
    share = ProcessShare(sizes, rank, clock, group)
    losses = []
    for index in blocks:
        h, v, loss = trainer.train_block(index, h, v, global_targets, step, share)
        losses.append(loss)
    return h, v, losses


class ReplicaStep(Protocol):
    """One optimizer step of a data-parallel rank: made by make_step(trainer, rank, world, clock), called with
    this rank's rows of the augmented batch (inputs, on the device), the whole batch's targets (B,), the share
    sizes and the step. Returns (block losses (k,), output cross-entropy (0-dim)), detached on the device:
    the whole batch's values, or, when partial_losses is True, this rank's part of them (they are summed
    over the ranks once per epoch)."""

    partial_losses: bool

    def __call__(self, inputs: torch.Tensor, global_targets: torch.Tensor, sizes: list[int],
                 step: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class SvpReplicaStep:
    """The SVP step of a data-parallel rank: every block by data_parallel_step (its loss the whole batch's)."""

    partial_losses = False

    def __init__(self, trainer: LayerwiseTrainer, rank: int, world: int, clock: Clock):
        self.trainer, self.rank, self.clock = trainer, rank, clock
        self.blocks = range(trainer.num_blocks)

    def __call__(self, inputs, global_targets, sizes, step):
        v = input_alignment_rows(self.trainer, inputs, sizes, self.rank, global_targets=global_targets)
        _, logits, losses = data_parallel_step(self.trainer, self.blocks, inputs, v, global_targets, sizes, self.rank,
                                               step, self.clock)
        return torch.stack(losses), F.cross_entropy(logits, global_targets)


def run_data_parallel_rank(plan: Plan, rank: int, config: TrainConfig, dataset: Dataset,
                           progress: bool) -> dict | None:
    """Rank `rank` of a data-parallel SVP run; returns the run's result on rank 0, None elsewhere."""
    return run_replica(plan, rank, config, dataset, progress, SvpReplicaStep)


def _summed_over_ranks(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each step's partial losses summed over the ranks, in one all_reduce."""
    total = torch.stack(values)
    dist.all_reduce(total)
    return list(total.unbind())


def run_replica(plan: Plan, rank: int, config: TrainConfig, dataset: Dataset, progress: bool,
                make_step: Callable[[LayerwiseTrainer, int, int, Clock], ReplicaStep]) -> dict | None:
    """Rank `rank` of a data-parallel run whose batches make_step's ReplicaStep trains (SVP's or backprop's):
    the shared batches, the evaluations (BatchNorm running statistics broadcast from rank 0 first, the test set
    shared out), the curves, the checkpoints, the traffic and the result (on rank 0; None elsewhere)."""
    world, meta = plan.world_size, run_meta(config, dataset)
    trainer = build_trainer(config, dataset.input_shape, dataset.num_classes, meta["batches_per_epoch"])
    everything, min_batch = range(len(trainer.model.blocks)), trainable_batch(trainer.model, world)
    check_global_batch(config, min_batch, world)
    clock, device = Clock(trainer.device), trainer.device
    state = load_checkpoint(plan, rank, common_resume_epoch(plan, rank))
    epochs_done, step, curves = resume(state, plan, config, trainer, None, everything)
    trainer.step = first_step = step
    train_batch = make_step(trainer, rank, world, clock)
    bar = progress_bar(total=meta["batches_per_epoch"] * (config.epochs - epochs_done), unit="step",
                       disable=not progress or rank != 0,
                       desc=f"{config.method} {config.model} {config.dataset}, {world} data-parallel ranks")
    samples, traffic, log = 0, Traffic(), EvaluationLog(device)

    def evaluate() -> float:
        traffic.phase = "eval"
        log.trained()
        clock.charge("busy")
        for buffer in trainer.model.buffers():  # BatchNorm running statistics: rank 0's, as DDP does
            dist.broadcast(buffer, 0)
        clock.charge("idle")
        accuracy = _sharded_accuracy(trainer, dataset, rank, world, clock)
        log.record(step, accuracy)
        traffic.phase = "train"
        return accuracy

    dist.barrier()
    start, written = time.perf_counter(), os_bytes_written()
    clock.restart()
    log.start()
    with counting(traffic):
        traffic.phase = "train"
        for batches in epoch_batches(config, meta["num_train"], epochs_done):
            trainer.model.train()
            block_losses, output_ce = [], []
            # a last batch too small to share out is skipped (a single process trains it): trainable_batch
            trained = [batch for batch in batches if len(batch) >= min_batch]
            for position, indices in enumerate(trained):
                samples += len(indices)
                sizes = share_sizes(len(indices), world)
                global_targets = dataset.train_targets[indices].to(device)
                inputs = replica_rows(augment(dataset.train_inputs[indices], config, step), world, rank, device)
                losses, ce = train_batch(inputs, global_targets, sizes, step)
                block_losses.append(losses)
                output_ce.append(ce)
                step += 1
                trainer.step = step
                bar.update()
                if plan.eval_every and step % plan.eval_every == 0 and position < len(trained) - 1:
                    evaluate()
                    trainer.model.train()
            if train_batch.partial_losses:
                traffic.phase = "epoch"
                block_losses, output_ce = _summed_over_ranks(block_losses), _summed_over_ranks(output_ce)
            curves["block"].append(epoch_means(block_losses))
            curves["loss"].append(epoch_means(output_ce)[0])
            curves["accuracy"].append(evaluate())
            epochs_done += 1
            if plan.checkpoint_dir is not None:
                saved = checkpoint_state(plan, rank, None, epochs_done, step, config, curves, trainer, everything)
                save_rank_checkpoint(plan.checkpoint_dir, rank, epochs_done, saved, keep=2)
        traffic.phase = None
    written = None if written is None else os_bytes_written() - written
    bar.close()
    stats = {"rank": rank, "busy_seconds": clock.busy, "idle_seconds": clock.idle, "cpu_seconds": clock.cpu_seconds(),
             "cores": process_cores(), **traffic_fields(traffic, step - first_step, written)}
    everyone = [None] * world if rank == 0 else None
    dist.gather_object(stats, everyone, dst=0)
    if rank != 0:
        return None
    wall = time.perf_counter() - start
    return {"test_accuracy": curves["accuracy"][-1], "train_loss_curve": curves["loss"],
            "test_accuracy_curve": curves["accuracy"], "block_loss_curves": curves["block"],
            **distributed_fields(plan, config, step, samples, wall, log.records, everyone)}


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
