"""Per-process checkpoints of a distributed run: rank-<r>-epoch-<e>.pt in the run's checkpoint folder, written
after every epoch; a restarted run resumes from the newest epoch that every rank has saved.

The files are svp-train checkpoints of kind "distributed" (svp_kernels/train/checkpoint.py: atomic write,
SHA-256 checked before anything is used, weights_only=True loading). One holds this process's blocks'
parameters and buffers, their optimizer states and local losses, the step, the epoch, the curves so far, the
config and the layout (mode, world size, replicas, split). Every rank checks its own file, and the ranks agree:
when one file is refused, every rank stops with that file's CheckpointError, before any of them trains.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

import torch.distributed as dist

from ..checkpoint import FORMAT_VERSION, CheckpointError, check_state_shapes, loading, read_checkpoint, save_checkpoint
from ..run import TrainConfig
from ..trainer import LayerwiseTrainer
from .plan import Plan

KIND = "distributed"
CHECKPOINT_FORMAT = KIND  # the payload's "kind" (svp_kernels.train.checkpoint.KINDS)


def _checkpoint_path(directory: str, rank: int, epoch: int) -> Path:
    return Path(directory) / f"rank-{rank}-epoch-{epoch}.pt"


def save_rank_checkpoint(directory: str, rank: int, epoch: int, state: dict, keep: int) -> None:
    """Write state to rank-<rank>-epoch-<epoch>.pt atomically and remove this rank's checkpoints older than the
    newest `keep` epochs."""
    path = _checkpoint_path(directory, rank, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, state)
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
        raise CheckpointError(f"the checkpoints in {plan.checkpoint_dir} share no epoch across the "
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
    return {"format": FORMAT_VERSION, "kind": KIND, "mode": plan.mode, "rank": rank, "world_size": plan.world_size,
            "replicas": plan.replicas, "stage_split": split, "epoch": epoch, "step": step, "config": asdict(config),
            "curves": curves, "trainer": trainer_state(trainer, blocks)}


def load_trainer_state(path: Path, trainer: LayerwiseTrainer, state: dict, blocks: range) -> None:
    """Load this process's share (trainer_state's) into the trainer: the blocks `blocks`, after checking that
    the file holds exactly them with the shapes of this model."""
    if sorted(state["blocks"]) != list(blocks):
        raise CheckpointError(f"checkpoint {path}: field trainer.blocks holds blocks {sorted(state['blocks'])}, "
                              f"this process trains {list(blocks)}")
    for i in blocks:
        check_state_shapes(path, f"trainer.blocks.{i}", state["blocks"][i], trainer.model.blocks[i].state_dict())
        check_state_shapes(path, f"trainer.local_losses.{i}", state["local_losses"][i],
                           trainer.local_losses[i].state_dict())
    if trainer.input_projection is not None:
        check_state_shapes(path, "trainer.input_projection", state["input_projection"],
                           trainer.input_projection.state_dict())
    for i in blocks:
        with loading(path, f"trainer.blocks.{i}"):
            trainer.model.blocks[i].load_state_dict(state["blocks"][i])
            trainer.local_losses[i].load_state_dict(state["local_losses"][i])
        with loading(path, f"trainer.optimizers.{i}"):
            trainer.optimizers[i].load_state_dict(state["optimizers"][i])
    if trainer.input_projection is not None:
        trainer.input_projection.load_state_dict(state["input_projection"])


def load_checkpoint(plan: Plan, rank: int, epoch: int) -> dict | None:
    """This rank's checkpoint of `epoch` (None when epoch is 0: a fresh start), verified and read without
    running anything in it. Collective when plan.checkpoint_dir is set: a file refused on any rank stops every
    rank with its CheckpointError (agree)."""
    def read():
        if not epoch:
            return None
        path = _checkpoint_path(plan.checkpoint_dir, rank, epoch)
        state = read_checkpoint(path, kind=KIND)
        for field, value in (("rank", rank), ("epoch", epoch)):
            if state.get(field) != value:
                raise CheckpointError(f"checkpoint {path}: field {field} is {state.get(field)!r}, this file "
                                      f"should hold {field} {value}")
        split = state.get("stage_split")
        if split is not None and not (isinstance(split, (list, tuple)) and split and
                                      all(isinstance(part, int) and part >= 1 for part in split)):
            raise CheckpointError(f"checkpoint {path}: field stage_split is {split!r}, not blocks per stage")
        state["path"] = path
        return state

    return agree(plan, read)


def resume(state: dict | None, plan: Plan, config: TrainConfig, trainer: LayerwiseTrainer, split,
           blocks: range) -> tuple[int, int, dict]:
    """Load a checkpoint (load_checkpoint's) of this process's `blocks` into the trainer, after checking that
    this run wrote it. Returns (epochs done, steps done, curves so far): (0, 0, empty curves) for a fresh start
    (state None). Collective when plan.checkpoint_dir is set (agree)."""
    def load():
        if state is None:
            return 0, 0, {"block": [], "loss": [], "accuracy": []}
        path = state["path"]
        with loading(path, "config"):
            check_resumable(path, state, config, plan, split)
        with loading(path, "trainer"):
            load_trainer_state(path, trainer, state["trainer"], blocks)
        with loading(path, "curves"):
            curves = {key: list(state["curves"][key]) for key in ("block", "loss", "accuracy")}
        if not (isinstance(state["step"], int) and state["step"] >= 0):
            raise CheckpointError(f"checkpoint {path}: field step is {state['step']!r}, not a step count")
        return state["epoch"], state["step"], curves

    return agree(plan, load)


def agree(plan: Plan, action):
    """action()'s result on every rank, or, when it raises CheckpointError on any rank, that error (the lowest
    rank's) raised on every rank: all ranks stop together instead of waiting on the one that stopped.
    Collective when plan.checkpoint_dir is set (the only case in which action can refuse a file)."""
    result, error = None, None
    try:
        result = action()
    except CheckpointError as refused:
        error = str(refused)
    if plan.checkpoint_dir is not None and plan.world_size > 1:
        everyone = [None] * plan.world_size
        dist.all_gather_object(everyone, error)
        error = next((message for message in everyone if message is not None), None)
    if error is not None:
        raise CheckpointError(error)
    return result


def check_resumable(path: Path, state: dict, config: TrainConfig, plan: Plan, split) -> None:
    """CheckpointError unless the checkpoint was written by this kind of run (same config but epochs, same
    layout), naming the first field that differs."""
    expected = {"mode": plan.mode, "world_size": plan.world_size, "replicas": plan.replicas,
                "stage_split": None if split is None else tuple(split)}
    for key, value in expected.items():
        found = state[key] if key != "stage_split" or state[key] is None else tuple(state[key])
        if found != value:
            raise CheckpointError(f"checkpoint {path}: field {key} is {found!r}, this run has {value!r} (written by "
                                  f"another run: remove the checkpoints in {plan.checkpoint_dir} to start afresh)")
    saved = state["config"]
    for field in fields(TrainConfig):
        if field.name == "epochs":  # a resumed run may train longer
            continue
        if saved.get(field.name, field.default) != getattr(config, field.name):
            raise CheckpointError(f"checkpoint {path}: field config.{field.name} is {saved.get(field.name)!r}, "
                                  f"this run has {getattr(config, field.name)!r}")
