"""How a run is distributed: the Plan (modes, grid, split), what torchrun's environment and the CLI's flags ask
for, and the stage boundaries (the split of the blocks, balanced by timing every block's training step)."""

from __future__ import annotations

import copy
import math
import os
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..data import Dataset
from ..evaluations import check_eval_every
from ..run import TrainConfig
from ..trainer import LayerwiseTrainer
from .common import Clock

MODES = ("pipeline", "data_parallel")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

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
    there are at least as many cores as processes (pin_to_cores). eval_every: also evaluate after every
    eval_every-th step (None: at epoch ends only).
    """

    mode: str
    world_size: int
    stage_split: tuple[int, ...] | None = None
    timeout: float = 60.0
    max_in_flight: int = 2
    checkpoint_dir: str | None = None
    pin_cores: bool = True
    replicas: int = 1
    eval_every: int | None = None

    def __post_init__(self):
        check_eval_every(self.eval_every)
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


def role(plan: Plan, rank: int) -> str:
    """How errors name a process: "stage 1 of 2 (rank 1)" or "data-parallel rank 1 of 2"."""
    if plan.mode == "pipeline":
        stage, replica = grid_position(plan, rank)
        where = f", replica {replica} of {plan.replicas}" if plan.replicas > 1 else ""
        return f"stage {stage} of {plan.stages}{where} (rank {rank})"
    return f"data-parallel rank {rank} of {plan.world_size}"


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


def torchrun_environment() -> dict | None:
    """{rank, world_size, local_rank} when started by torchrun (its variables are set), else None."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return None
    return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
            "local_rank": int(os.environ["LOCAL_RANK"])}


def validate(plan: Plan, config: TrainConfig) -> None:
    """ValueError for a config the distributed trainer cannot run."""
    if config.method == "bp" and plan.mode == "pipeline":
        raise ValueError("backprop cannot be split into pipeline stages (its gradient crosses every stage): "
                         "train --method bp data parallel (--data-parallel N), or --method svp with --stages")
    if config.method == "bp" and plan.checkpoint_dir is not None:
        raise ValueError("--stage-checkpoints: checkpoints of data-parallel backprop are not supported; "
                         "train it without --stage-checkpoints, or in one process with --checkpoint")
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
    common = dict(checkpoint_dir=args.stage_checkpoints, pin_cores=not args.no_pin_cores,
                  eval_every=getattr(args, "eval_every", None))
    if stages is None:
        return Plan("data_parallel", replicas or world, None, args.dist_timeout, **common)
    return Plan("pipeline", stages * (replicas or 1), split, args.dist_timeout, replicas=replicas or 1, **common)


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
        h, v = inputs, probe.input_alignment(inputs, targets)
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
