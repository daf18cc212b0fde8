"""The layer-wise SVP trainer: every block learns from its own local loss, never from a later block.

For each batch, block by block (DESIGN.md §1):

    h_l = block_l(h_{l-1}.detach())
    L_l = CE(v_l, y) + λ‖S(v_l) − S(v_{l-1})‖²,   v_l = Dropout(R_l) readout_l(h_l)   (fused_local_loss)
    L_l.backward(); step; zero_grad(set_to_none=True); drop the graph — then block l + 1 runs.

v_0 is a fixed random projection of the input; the last block uses the identity projection (v = logits).
Only one block's activations and gradients are ever alive. method="bp" trains the same model end to end.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import LocalLoss, RandomProjection
from .models import BlockwiseModel
from .seeds import block_step_seed

METHODS = ("svp", "bp")
OPTIMIZERS = ("adam", "adamw", "sgd")


class StepLosses(NamedTuple):
    """output_ce: cross-entropy of the model's logits (comparable across methods);
    block_losses: each block's local loss (svp), or the single end-to-end loss (bp)."""

    output_ce: float
    block_losses: list[float]


def make_optimizer(name: str, parameters, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD with Nesterov momentum 0.9."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


@torch.no_grad()
def readout_features(model: BlockwiseModel, device) -> list[int]:
    """D_l of every block's readout but the last, found by passing one zero example through the model."""
    was_training = model.training
    model.eval()
    h = torch.zeros(1, *model.input_shape, device=device)
    features = []
    for block, readout in zip(model.blocks, model.readouts):
        h = block(h)
        features.append(readout(h).flatten(1).shape[1])
    model.train(was_training)
    return features


class LayerwiseTrainer:
    """Trains a BlockwiseModel with SVP (one optimizer and local loss per block) or with backprop.

    proj_dim: rows C of every hidden block's R (C, D_l); v_l (B, C) is the block's local logits, so
    C ≥ num_classes (default num_classes; extra columns are logits of no class). p: dropout on R's elements.
    implicit_projection: R regenerated from a seed by the kernels instead of stored. seed: the run seed; block
    l's dropout seed at step t is block_step_seed(seed, l, t), t counting optimizer steps since the run started.
    """

    def __init__(self, model: BlockwiseModel, *, method: str = "svp", optimizer: str = "adam", lr: float = 1e-3,
                 weight_decay: float = 0.0, p: float = 0.0, alignment_weight: float = 1.0,
                 proj_dim: int | None = None, implicit_projection: bool = False, backend: str = "auto",
                 device: str | torch.device = "cpu", seed: int = 0):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        num_classes = model.num_classes
        proj_dim = num_classes if proj_dim is None else proj_dim
        if proj_dim < num_classes:
            raise ValueError(f"proj_dim must be ≥ num_classes = {num_classes} (v holds the local logits), "
                             f"got {proj_dim}")
        self.method, self.device, self.seed, self.global_step = method, torch.device(device), seed, 0
        self.model = model.to(self.device)
        if method == "bp":
            self.optimizers = [make_optimizer(optimizer, model.parameters(), lr, weight_decay)]
            return
        self.optimizers = [make_optimizer(optimizer, block.parameters(), lr, weight_decay) for block in model.blocks]
        hidden_losses = [LocalLoss(features, proj_dim, p=p, alignment_weight=alignment_weight,
                                   implicit=implicit_projection, backend=backend)
                         for features in readout_features(model, self.device)]
        output_loss = LocalLoss(num_classes, num_classes, identity=True, alignment_weight=alignment_weight,
                                backend=backend)
        self.local_losses = nn.ModuleList(hidden_losses + [output_loss]).to(self.device)
        self.input_projection = RandomProjection(math.prod(model.input_shape), proj_dim,
                                                 implicit=implicit_projection, backend=backend).to(self.device)
        self.readouts = list(model.readouts) + [nn.Identity()]

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepLosses:
        """One update of every block on a batch: inputs (B, *input_shape) float, targets (B,) int64."""
        self.model.train()
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        step = self._backprop_step(inputs, targets) if self.method == "bp" else self._svp_step(inputs, targets)
        self.global_step += 1
        return step

    @torch.no_grad()
    def input_alignment(self, inputs: torch.Tensor) -> torch.Tensor:
        """v_0 (B, proj_dim): the fixed random projection of the flattened inputs (B, *input_shape), the first
        block's alignment target."""
        return self.input_projection(inputs.flatten(1))

    def train_block(self, index: int, h: torch.Tensor, v_prev: torch.Tensor, targets: torch.Tensor,
                    step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One update of block `index` on its input h (detached here) with alignment target v_prev (B, C′), at
        training step `step` (its dropout seed is block_step_seed(seed, index, step)).

        Returns (h_out, v_out, loss), all detached: the block's output computed before its update, its
        projection v (B, C), and its local loss (0-dim).
        """
        h_out = self.model.blocks[index](h.detach())  # no gradient flows back into earlier blocks
        out = self.local_losses[index](self.readouts[index](h_out), targets, v_prev,
                                       seed=block_step_seed(self.seed, index, step))
        out.loss.backward()  # frees this block's graph: its activations die before the next block runs
        self.optimizers[index].step()
        self.optimizers[index].zero_grad(set_to_none=True)
        return h_out.detach(), out.v, out.loss.detach()

    def _svp_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepLosses:
        h, v_prev = inputs, self.input_alignment(inputs)
        block_losses = []
        for index in range(len(self.model.blocks)):
            h, v_prev, loss = self.train_block(index, h, v_prev, targets, self.global_step)
            block_losses.append(loss)
        return StepLosses(F.cross_entropy(h, targets).item(), torch.stack(block_losses).tolist())

    def _backprop_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepLosses:
        (optimizer,) = self.optimizers
        loss = F.cross_entropy(self.model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        return StepLosses(value, [value])

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 1024) -> float:
        """Accuracy (a fraction) of the last block's logits: inputs (N, *input_shape), targets (N,)."""
        self.model.eval()
        correct = 0
        for start in range(0, len(targets), batch_size):
            logits = self.model(inputs[start:start + batch_size].to(self.device))
            correct += (logits.argmax(dim=1).cpu() == targets[start:start + batch_size]).sum().item()
        return correct / len(targets)
