"""One process of a pipeline (``--stages K``, optionally × ``--data-parallel N``): its stage of blocks, fed by
the previous stage's messages (or the data, for stage 0) and feeding the next."""

from __future__ import annotations

import datetime
import math
import time

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
from .common import EVAL_BATCH, Clock, distributed_fields, epoch_means, process_cores, replica_rows, run_meta
from .data_parallel import data_parallel_step, input_alignment_rows
from .plan import (Plan, block_output_shapes, check_global_batch, choose_split, grid_position, keep_blocks,
                   share_sizes, stage_blocks, trainable_batch)
from .protocol import EPOCH_END, EVAL, STOP, TRAIN, Inbound, Message, Outbound, pipeline_schedule
from .traffic import Traffic, counting, os_bytes_written, traffic_fields

PHASES = {TRAIN: "train", EVAL: "eval", EPOCH_END: "epoch", STOP: "epoch"}  # the traffic phase of each message kind


def _source_messages(trainer: LayerwiseTrainer, config: TrainConfig, dataset: Dataset, schedule, bar,
                     replica: int = 0, replicas: int = 1):
    """Stage 0's messages, following the schedule, for replica `replica` of `replicas`: the batches with
    their inputs (the replica's contiguous share of the augmented batch) and targets (the whole batch's) on
    the device; the replica's share of each test slice."""
    device = trainer.device
    for kind, step, rows in schedule:
        if kind == TRAIN:
            inputs = replica_rows(augment(dataset.train_inputs[rows], config, step), replicas, replica, device)
            yield Message(TRAIN, step, inputs, None, dataset.train_targets[rows].to(device))
            bar.update()
        elif kind == EVAL:
            sizes = share_sizes(len(rows), replicas)
            first = rows.start + sum(sizes[:replica])
            share = slice(first, first + sizes[replica])
            yield Message(EVAL, 0, aligned(dataset.test_inputs[share].to(device)), None,
                          dataset.test_targets[share].to(device))
        else:
            yield Message(kind)


def with_evaluations(schedule, eval_every: int | None, num_test: int):
    """The schedule with the test set's EVAL slices inserted after every eval_every-th TRAIN step that does not
    end its epoch (the epoch's last step is followed by the epoch-end evaluation anyway)."""
    entries = iter(schedule)
    entry = next(entries)
    for following in entries:
        yield entry
        kind, step, _ = entry
        if eval_every and kind == TRAIN and (step + 1) % eval_every == 0 and following[0] == TRAIN:
            for start in range(0, num_test, EVAL_BATCH):
                yield EVAL, 0, range(start, min(start + EVAL_BATCH, num_test))
        entry = following
    yield entry


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
    plan.replicas > 1: every block is trained as data_parallel_step trains it, within the stage's replicas); returns
    the run's result on rank 0, None elsewhere."""
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
    epochs_done, step, curves = resume(state, plan, config, trainer, split, blocks)
    dtype = next(trainer.model.blocks[blocks.start].parameters()).dtype
    v_width = meta["proj_dim"]
    clock = Clock(trainer.device)
    first, last = stage == 0, stage == stages - 1
    schedule = with_evaluations(pipeline_schedule(config, dataset, epochs_done, step, min_batch), plan.eval_every,
                                meta["num_test"])
    slices_per_evaluation = math.ceil(meta["num_test"] / EVAL_BATCH)
    messages_per_epoch = meta["batches_per_epoch"] + math.ceil(meta["num_test"] / EVAL_BATCH) + 1
    # epochs stage 0 may run ahead of the last: per link, the message computed, the one received ahead and
    # the unfinished sends
    keep = 2 + (stages - 1) * (plan.max_in_flight + 2) // messages_per_epoch

    grid = f" × {replicas} replicas" if replicas > 1 else ""
    bar = progress_bar(total=meta["batches_per_epoch"] * (config.epochs - epochs_done), unit="step",
                       disable=not progress, desc=f"svp {config.model} {config.dataset}, {stages} stages{grid}")
    if first:
        messages = _source_messages(trainer, config, dataset, schedule, bar, replica, replicas)
    else:
        messages = Inbound(rank - 1, schedule, shapes[blocks.start], v_width, dtype, trainer.device, clock,
                           replica, replicas)
    outbound = None if last else Outbound(rank + 1, shapes[blocks.stop], v_width, dtype, trainer.device,
                                          plan.max_in_flight, clock)
    block_losses, output_ce, correct, evaluated, slices, mode, samples = [], [], 0, 0, 0, None, 0
    first_step, accuracy, traffic, log = step, None, Traffic(), EvaluationLog(trainer.device)  # log: the last stage's
    dist.barrier()
    start, written = time.perf_counter(), os_bytes_written()
    clock.restart()
    log.start()
    with counting(traffic):
        for message in messages:
            traffic.phase = PHASES[message.kind]
            if message.kind == TRAIN:
                if mode != "train":
                    trainer.model.train()
                    mode = "train"
                h = message.h
                samples += len(message.targets)
                if replicas == 1:
                    v = trainer.input_alignment(h, message.targets) if first else message.v
                    losses = []
                    for index in blocks:
                        h, v, loss = trainer.train_block(index, h, v, message.targets, message.step)
                        losses.append(loss)
                    if last:  # the last block's kernel cross-entropy of the logits, as the sequential step reports
                        output_ce.append(trainer.last_block_ce)
                else:
                    sizes = share_sizes(len(message.targets), replicas)
                    v = (input_alignment_rows(trainer, h, sizes, replica, group, message.targets) if first
                         else message.v)
                    h, v, losses = data_parallel_step(trainer, blocks, h, v, message.targets, sizes, replica,
                                                      message.step, clock, group)
                    if last:  # the cross-entropy of the global logits, as the data-parallel mode reports it
                        output_ce.append(F.cross_entropy(v, message.targets))
                block_losses.append(torch.stack(losses))
                step = message.step + 1
                message = Message(TRAIN, message.step, h, v, message.targets)
                if last:
                    log.trained()
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
                slices += 1
                if last:
                    correct += (h.argmax(dim=1) == message.targets).sum().item()
                    evaluated += len(message.targets)
                    if slices == slices_per_evaluation:  # the evaluation's last slice
                        if replicas > 1:
                            clock.charge("busy")
                            counts = torch.tensor([correct, evaluated], dtype=torch.int64, device=trainer.device)
                            dist.all_reduce(counts, group=group)
                            correct, evaluated = counts.tolist()
                            clock.charge("idle")
                        accuracy = correct / evaluated
                        log.record(step, accuracy)
                if slices == slices_per_evaluation:
                    slices, correct, evaluated = 0, 0, 0
                message = Message(EVAL, 0, h, None, message.targets)
            elif message.kind == EPOCH_END:
                curves["block"].append(epoch_means(block_losses))
                if last:
                    curves["loss"].append(epoch_means(output_ce)[0])
                    curves["accuracy"].append(accuracy)
                block_losses, output_ce = [], []
                epochs_done += 1
                if plan.checkpoint_dir is not None:
                    saved = checkpoint_state(plan, rank, split, epochs_done, step, config, curves, trainer, blocks)
                    save_rank_checkpoint(plan.checkpoint_dir, rank, epochs_done, saved, keep)
            clock.charge("busy")
            if not last:
                outbound.send(message)
            if message.kind == STOP:
                break
        if not last:
            outbound.flush()
        traffic.phase = None
    written = None if written is None else os_bytes_written() - written
    bar.close()
    stats = {"stage": stage, "replica": replica, "blocks": [blocks.start, blocks.stop], "busy_seconds": clock.busy,
             "idle_seconds": clock.idle, "cpu_seconds": clock.cpu_seconds(), "cores": process_cores(),
             "curves": curves, "evaluations": log.records, **traffic_fields(traffic, step - first_step, written)}
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
            **distributed_fields(plan, config, step, samples, wall, pipeline[-1]["evaluations"], everyone),
            "stage_split": list(split),
            "stage_blocks": [s["blocks"] for s in pipeline]}
