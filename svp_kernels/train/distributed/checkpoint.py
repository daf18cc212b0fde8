"""Per-process checkpoints of a distributed run: rank-<r>-epoch-<e>.pt in the run's checkpoint folder, written
atomically after every epoch; a restarted run resumes from the newest epoch that every rank has saved.

A checkpoint holds this process's blocks' parameters and buffers, their optimizer states and local losses,
the step, the epoch, the curves so far, the config and the layout (mode, world size, replicas, split)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..run import TrainConfig
from ..trainer import LayerwiseTrainer
from .common import DistributedTrainingError
from .plan import Plan

CHECKPOINT_FORMAT = "svp-kernels-distributed-checkpoint/1"

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


def checkpoint_state(plan: Plan, rank: int, split: tuple[int, ...] | None, epoch: int, step: int,
                     config: TrainConfig, curves: dict, trainer: LayerwiseTrainer, blocks: range) -> dict:
    """What rank `rank` saves after `epoch` epochs (`step` steps): its share of the trainer (`blocks`), the
    curves so far, the config and the layout that check_resumable compares."""
    return {"format": CHECKPOINT_FORMAT, "mode": plan.mode, "rank": rank, "world_size": plan.world_size,
            "replicas": plan.replicas, "stage_split": split, "epoch": epoch, "step": step, "config": asdict(config),
            "curves": curves, "trainer": trainer_state(trainer, blocks)}


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


def _comparable(config: TrainConfig) -> dict:
    """What a checkpoint must agree on with the run resuming it: the config but its epoch count."""
    return {key: value for key, value in asdict(config).items() if key != "epochs"}
