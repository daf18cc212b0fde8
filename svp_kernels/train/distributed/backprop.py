"""One process of data-parallel backprop (``--method bp --data-parallel N``, or torchrun without ``--stages``):
the model trained end to end through torch's DistributedDataParallel, on this process's share of every global
batch, with the single process's optimizer, learning-rate schedule and batches.

Per batch of B rows, rank r holds the contiguous share b_r (share_sizes) and minimises

    L_r = (N / B) · Σ_{i in b_r} CE(model(x_i), y_i)

DDP averages the gradients over the N ranks (torch's allreduce_hook: divide by N, sum), so every rank steps
with ∇ (1/B) Σ_i CE_i: the one-process gradient of the whole batch, up to the order of the float32 sums (not
bit for bit: GEMMs over b_r rows and the all_reduce round differently). The all_reduce runs in DDP's
buckets, overlapped with the backward pass. BatchNorm normalises with each rank's own batch statistics (as
in the data-parallel SVP mode); DDP's per-step buffer broadcast is off (broadcast_buffers=False) because
training never reads the running statistics: they are broadcast from rank 0 before each evaluation
instead (data_parallel.run_replica), which evaluates with rank 0's, as DDP's default would. The training
loop, the evaluations, the curves and the result are data_parallel.run_replica's.
"""

from __future__ import annotations

import inspect

import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from ..data import Dataset
from ..run import TrainConfig
from ..trainer import LayerwiseTrainer
from .common import Clock
from .data_parallel import run_replica
from .plan import Plan


# DDP's per-forward buffer broadcast off (its flag was renamed forward_sync_buffers in later torch versions)
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})


class BackpropReplicaStep:
    """One DDP step of rank `rank` of `world` (data_parallel.ReplicaStep): the losses it returns are its part
    of the whole batch's mean cross-entropy, summed over the ranks once per epoch by the loop."""

    partial_losses = True

    def __init__(self, trainer: LayerwiseTrainer, rank: int, world: int, clock: Clock):
        if trainer.method != "bp":
            raise ValueError(f"data-parallel backprop needs a trainer of method 'bp', got {trainer.method!r}")
        self.trainer, self.rank, self.world = trainer, rank, world
        device_ids = [trainer.device] if trainer.device.type == "cuda" else None
        self.model = DistributedDataParallel(trainer.model, device_ids=device_ids, **_NO_BUFFER_SYNC)
        # torch's own reference hook (DDP's default arithmetic), so that its all_reduce is counted (traffic.py)
        self.model.register_comm_hook(None, allreduce_hook)

    def __call__(self, inputs, global_targets, sizes, step):
        (optimizer,) = self.trainer.optimizers
        rows = slice(sum(sizes[:self.rank]), sum(sizes[:self.rank + 1]))
        self.model.train()
        logits = self.model(inputs)
        loss = F.cross_entropy(logits, global_targets[rows], reduction="sum") * (self.world / sum(sizes))
        loss.backward()  # DDP averages the gradients over the ranks as they become ready
        self.trainer.set_lr(optimizer, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        part = loss.detach() / self.world  # this rank's Σ CE / B
        return part.reshape(1), part


def run_backprop_rank(plan: Plan, rank: int, config: TrainConfig, dataset: Dataset, progress: bool) -> dict | None:
    """Rank `rank` of a data-parallel backprop run; returns the run's result on rank 0, None elsewhere."""
    return run_replica(plan, rank, config, dataset, progress, BackpropReplicaStep)

