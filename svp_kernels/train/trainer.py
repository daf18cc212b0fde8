"""The layer-wise SVP trainer: every block learns from its own local loss, never from a later block.

For each batch, block by block (docs/design.md §1):

    h_l = block_l(h_{l-1}.detach())
    L_l = CE(v_l, y) + λ‖S(v_l) − S(v_{l-1})‖²,   v_l = Dropout(R_l) readout_l(h_l)   (fused_local_loss)
    L_l.backward(); step block l's optimizer; drop the graph — then block l + 1 runs.

(alignment="bhattacharyya": λ·mean_b BD(v_l,b, v_{l-1},b) in place of the cosine-Gram term, docs/design.md §2.)
v_0 is a fixed random projection of the input, or (first_alignment="onehot") the one-hot target; the last block
uses the identity projection (v = logits).
Only one block's activations and gradients are ever alive. Block l's dropout seed at step t is
block_step_seed(seed, l, t), so its masks do not depend on which process runs it. method="bp" trains the
same model end to end with the same optimizer and learning-rate schedule.

What changes from step to step reaches the step on the device: before each step one copy writes every block's
seed (and, with cuda_graph=True, the learning rate) into a device buffer the kernels read (graphs.StepScalars).
So the step itself reads no per-step host value, and cuda_graph=True captures it whole, once per static batch
shape, and replays it (graphs.StepGraphs).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends, gradient_interface
from ..api import fused_local_loss
from ..nn import LocalLoss, RandomProjection
from ..validation import ALIGNMENTS, ProjectionArgs, check_choice, check_projection, check_target_range
from .aligned import aligned
from .graphs import StepGraphs, StepScalars, check_graph_device
from .models import BlockwiseModel
from .seeds import block_step_seed, block_step_seeds, check_seed_arguments

METHODS = ("svp", "bp")
FIRST_ALIGNMENTS = ("input", "onehot")  # what block 0 aligns to: v_0 = a random projection of x, or onehot(y)
OPTIMIZERS = ("adam", "adamw", "sgd")


class StepLosses(NamedTuple):
    """Detached device tensors, so a step never waits on the host; read them once per logging interval.
    With cuda_graph=True they are the graph's outputs, overwritten by the next step: accumulate them (as
    run_training does) or copy them before it.

    output_ce: 0-dim cross-entropy of the model's logits (comparable across methods);
    block_losses: (n,) each block's local loss (svp, n = blocks), or the end-to-end loss (bp, n = 1).
    """

    output_ce: torch.Tensor
    block_losses: torch.Tensor


def make_optimizer(name: str, parameters, lr: float | torch.Tensor, weight_decay: float,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD with Nesterov momentum 0.9; one multi-tensor (fused where torch has it) update.
    capturable: the update may be captured in a CUDA graph (Adam's step counter on the device; SGD needs
    nothing), with lr a 0-dim float32 tensor on the parameters' device that the caller updates in place."""
    parameters = list(parameters)
    fused = bool(parameters) and all(param.device.type in ("cpu", "cuda") for param in parameters)
    adam_options = {"capturable": True} if capturable else {}
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, fused=fused, **adam_options)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused, **adam_options)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay,
                               fused=fused)
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


class BlockSeedTable:
    """block_step_seed(run_seed, block, step) for every block, computed for STEPS steps at a time with one
    block_step_seeds call per block (a scalar call costs milliseconds of a training step)."""

    STEPS = 1024

    def __init__(self, run_seed: int):
        self.run_seed = run_seed
        self._tables: dict[int, tuple[int, list[int]]] = {}  # block -> (first step, seeds)

    def __call__(self, block: int, step: int) -> int:
        first, seeds = self._tables.get(block, (-1, []))
        if not first <= step < first + len(seeds):
            check_seed_arguments(self.run_seed, block, step, step)
            first = step - step % self.STEPS
            seeds = block_step_seeds(self.run_seed, block, first, min(self.STEPS, 2**32 - first))
            self._tables[block] = (first, seeds)
        return seeds[step - first]


def _check_targets(targets: torch.Tensor, num_classes: int) -> None:
    """The range of integer targets, by the ops' one rule (svp_kernels.validation.check_target_range: on the
    host for CPU tensors; unchecked device targets give NaN losses). Shapes and dtypes are the lean path's
    own condition; fused_local_loss refuses the others with its own message."""
    if not (targets.dtype.is_floating_point or targets.dtype == torch.bool):
        check_target_range(targets, num_classes)


class SharedBatch(Protocol):
    """The hook through which train_block trains a block on a batch shared out between data-parallel
    processes (svp_kernels/train/distributed/data_parallel.py implements it). The local loss couples a batch
    through its B×B Gram, so a process holding rows of h needs the whole batch's projection v, and the
    block's gradient summed over the processes before its step:

        batch_size                   B, the rows of the whole batch (targets and v_prev are (B,) and (B, C'))
        rows                         slice of this process's rows in it
        gather(v) -> (B, C)          every process's rows of v (b, C) in order, this process's being v itself
                                     (so that autograd reaches it); the others constants
        reduce_gradients(parameters) sum the gradients of `parameters` over the processes, in place
    """

    batch_size: int
    rows: slice

    def gather(self, v: torch.Tensor) -> torch.Tensor: ...

    def reduce_gradients(self, parameters: list[torch.Tensor]) -> None: ...


class _LossCall(NamedTuple):
    """One block's validated fused_local_loss arguments, kept for the lean path of later steps."""

    module: object  # the resolved backend (one with the gradient interface of docs/backends.md)
    shape: tuple[int, ...]  # (b, D) the arguments were validated for
    device: torch.device
    projection: ProjectionArgs


# The projection of the whole batch's gathered v in a shared batch's loss: v itself.
_IDENTITY = ProjectionArgs(True, None, 0, 0, 0.0)


class LayerwiseTrainer:
    """Trains a BlockwiseModel with SVP (one optimizer and local loss per block) or with backprop.

    proj_dim: rows C of every hidden block's R (C, D_l); v_l (B, C) is the block's local logits, so
    C ≥ num_classes (default num_classes; extra columns are logits of no class). p: dropout on R's elements.
    implicit_projection: R regenerated from a seed by the kernels instead of stored. seed: the run seed of
    the per-block dropout streams. lr_at: step -> learning rate (default: the constant lr), applied before
    every optimizer step; a pure function of the step, so a resumed run follows the same schedule.
    alignment: the local losses' alignment term, "cosine_gram" or "bhattacharyya" (then proj_dim must be
    num_classes: every block's v is compared with the previous one's over the same classes).
    first_alignment: block 0's v_prev: "input" (a fixed random projection of the input, v_0 = x Rᵀ) or "onehot"
    (the target: onehot(y) for cosine_gram; for bhattacharyya its log, 0 at y and −inf elsewhere, so that block
    0's term is BD(v, onehot(y)) = ½ CE, as in the Bhattacharyya formulation's code).
    cuda_graph (CUDA only; svp and bp): the whole step (every block's forward, loss, backward and optimizer
    step) is captured as a CUDA graph per static batch shape after graph_warmup_steps eager steps of that
    shape, and replayed (svp_kernels/train/graphs.py). The optimizers are then capturable with the learning
    rate a float32 device tensor, which rounds it to float32: the eager steps of such a trainer and its replays
    give the same bits, a trainer without cuda_graph may differ from both in the last bits.
    """

    def __init__(self, model: BlockwiseModel, *, method: str = "svp", optimizer: str = "adam", lr: float = 1e-3,
                 weight_decay: float = 0.0, p: float = 0.0, alignment_weight: float = 1.0,
                 proj_dim: int | None = None, implicit_projection: bool = False, backend: str = "auto",
                 device: str | torch.device = "cpu", seed: int = 0, lr_at: Callable[[int], float] | None = None,
                 cuda_graph: bool = False, graph_warmup_steps: int = 2, alignment: str = "cosine_gram",
                 first_alignment: str = "input"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.alignment = check_choice(alignment, "alignment", ALIGNMENTS)
        self.first_alignment = check_choice(first_alignment, "first_alignment", FIRST_ALIGNMENTS)
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        num_classes = model.num_classes
        proj_dim = num_classes if proj_dim is None else proj_dim
        if proj_dim < num_classes:
            raise ValueError(f"proj_dim must be ≥ num_classes = {num_classes} (v holds the local logits), "
                             f"got {proj_dim}")
        if alignment == "bhattacharyya" and proj_dim != num_classes:
            raise ValueError(f"proj_dim must equal num_classes = {num_classes} with alignment='bhattacharyya' (each "
                             f"block's softmax is compared with the previous block's over the same classes), got "
                             f"{proj_dim}")
        self.proj_dim = proj_dim
        self.method, self.device, self.seed = method, torch.device(device), seed
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph:
            check_graph_device(self.device)
        self.block_seed = BlockSeedTable(seed)
        self.lr_at = lr_at if lr_at is not None else (lambda step: lr)
        self.step = 0  # optimizer steps taken since the start of the run
        self.model = model.to(self.device)
        # Every block's dropout seed of the current step (and the learning rate, with cuda_graph) on the device.
        self._scalars = StepScalars(len(model.blocks) if method == "svp" else 0, self.device)
        self._graph_warmup_steps = graph_warmup_steps
        self._graphs = StepGraphs(self._step_body, self.device, graph_warmup_steps) if self.cuda_graph else None
        step_lr = self._scalars.lr if self.cuda_graph else lr
        if method == "bp":
            self.optimizers = [make_optimizer(optimizer, model.parameters(), step_lr, weight_decay, self.cuda_graph)]
            return
        self.optimizers = [make_optimizer(optimizer, block.parameters(), step_lr, weight_decay, self.cuda_graph)
                           for block in model.blocks]
        # Every step passes block_step_seed(seed, block, step) explicitly, so the modules' own seed streams are
        # never used: their bases come from a reserved step (no global RNG draw, which would shift the
        # projection seeds drawn after it).
        hidden_losses = [LocalLoss(features, proj_dim, p=p, alignment_weight=alignment_weight,
                                   implicit=implicit_projection, backend=backend, alignment=alignment,
                                   dropout_seed=block_step_seed(seed, index, 2**32 - 1))
                         for index, features in enumerate(readout_features(model, self.device))]
        output_loss = LocalLoss(num_classes, num_classes, identity=True, alignment_weight=alignment_weight,
                                backend=backend, alignment=alignment)
        self.local_losses = nn.ModuleList(hidden_losses + [output_loss]).to(self.device)
        self.input_projection = RandomProjection(math.prod(model.input_shape), proj_dim,
                                                 implicit=implicit_projection, backend=backend,
                                                 dropout_seed=0).to(self.device)  # p = 0: never draws a mask
        self.readouts = list(model.readouts) + [nn.Identity()]
        self._loss_calls: list[_LossCall | None] = [None] * len(model.blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepLosses:
        """One update of every block on a batch: inputs (B, *input_shape) float, targets (B,) int64 in
        [0, num_classes). Advances self.step by one."""
        self.model.train()
        step = self.step
        self._begin_step(step)
        if self._graphs is not None:
            losses = self._graphs(inputs, targets)
        else:
            losses = self._step_body(aligned(inputs.to(self.device)), targets.to(self.device))
        self.step = step + 1
        return losses

    def _begin_step(self, step: int) -> None:
        """What step `step` reads that the host decides, written before it (outside any graph): the blocks'
        seeds into the device buffer, the learning rate into it (cuda_graph) or into the optimizers."""
        seeds = [self.block_seed(index, step) for index in range(len(self._scalars.seeds))]
        lr = self.lr_at(step)
        if self.cuda_graph:
            self._scalars.write(seeds, lr)
            return
        if seeds:
            self._scalars.write(seeds)
        for optimizer in self.optimizers:
            self._set_lr(optimizer, lr)

    def _step_body(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepLosses:
        """The step on device tensors: what cuda_graph captures. It reads the per-step values only from the
        device (self._scalars, the optimizers' state)."""
        return self._backprop_step(inputs, targets) if self.method == "bp" else self._svp_step(inputs, targets)

    @torch.no_grad()
    def input_alignment(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """v_0 (B, proj_dim), the alignment target of block 0, detached: inputs.flatten(1) Rᵀ (no dropout), or
        with first_alignment="onehot" the targets (B,) one-hot (alignment "cosine_gram") or its log (0 at the
        target, −inf elsewhere: "bhattacharyya"), built by tensor ops only (no host synchronisation)."""
        if self.first_alignment == "input":
            return self.input_projection(aligned(inputs.to(self.device)).flatten(1))
        if targets is None:
            raise ValueError("first_alignment='onehot' aligns block 0 to the targets: pass targets")
        targets = targets.to(self.device)
        off, on = (float("-inf"), 0.0) if self.alignment == "bhattacharyya" else (0.0, 1.0)
        v = torch.full((targets.shape[0], self.proj_dim), off, device=self.device)
        return v.scatter_(1, targets.reshape(-1, 1).to(torch.int64), on)

    def _svp_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepLosses:
        _check_targets(targets, self.model.num_classes)  # once for every block's lean path
        h, v = inputs, self.input_alignment(inputs, targets)
        block_losses = []
        for index in range(self.num_blocks):
            h, v, loss, ce = self._train_block(index, h, v, targets, self._scalars.seeds[index])
            block_losses.append(loss)
        return StepLosses(ce, torch.stack(block_losses))  # ce: the last block's, i.e. of the logits

    def train_block(self, index: int, h: torch.Tensor, v_prev: torch.Tensor, targets: torch.Tensor,
                    step: int, share: SharedBatch | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Trains block `index` (svp) on its input h (detached here) with alignment target v_prev (B, C')
        at global step `step`. Returns (h_out, v_out, loss), all detached: the block's output computed
        before its update, its projection v (B, C), and its local loss (0-dim, on the device). The block's
        detached cross-entropy is kept as last_block_ce (of the logits when index is the last block).

        share: this process holds only share.rows of a batch shared out between data-parallel processes
        (SharedBatch); h is those rows, v_prev and targets the whole batch's, and the returned v the whole
        batch's projection. The loss is the whole batch's, and the block steps with the gradient summed over
        the processes."""
        if self.method != "svp":
            raise ValueError(f"train_block trains one SVP block; this trainer's method is {self.method!r}")
        if self.cuda_graph:
            raise ValueError("train_block steps one block on its own; a trainer with cuda_graph=True steps whole "
                             "batches (train_step)")
        if not 0 <= index < self.num_blocks:
            raise ValueError(f"index must be in [0, {self.num_blocks}), got {index}")
        _check_targets(targets, self.model.num_classes)
        seed = torch.full((), self.block_seed(index, step), dtype=torch.int64, device=self.device)
        # h and v_prev may be views into a message buffer or a share of a batch: compute on them where a fresh
        # tensor would lie (svp_kernels/train/aligned.py), as the sequential step does
        h_out, v, loss, self.last_block_ce = self._train_block(index, aligned(h), aligned(v_prev), targets, seed,
                                                               share, lr_step=step)
        return h_out, v, loss

    def _train_block(self, index: int, h: torch.Tensor, v_prev: torch.Tensor, targets: torch.Tensor,
                     seed: torch.Tensor, share: SharedBatch | None = None, lr_step: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """train_block's work with the block's dropout seed (0-dim int64 on the device); also returns the
        block's detached cross-entropy. lr_step: set the block's learning rate to lr_at(lr_step) first (None:
        the caller has set it)."""
        block, local_loss, optimizer = self.model.blocks[index], self.local_losses[index], self.optimizers[index]
        if not (block.training and local_loss.training):
            block.train()
            local_loss.train()
        h_out = block(h.detach())  # no gradient flows back into earlier blocks
        features = self.readouts[index](h_out)
        loss, ce, v, grad_features = self._local_loss(index, features, targets, v_prev, seed, share)
        # Either backward frees this block's graph: its activations die before the next block runs.
        if grad_features is None:
            loss.backward()
        else:
            features.backward(grad_features)
        if share is not None:
            share.reduce_gradients(list(block.parameters()))
        if lr_step is not None:
            self._set_lr(optimizer, self.lr_at(lr_step))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return h_out.detach(), v, loss.detach(), ce

    def _local_loss(self, index: int, features: torch.Tensor, targets: torch.Tensor, v_prev: torch.Tensor,
                    seed: torch.Tensor, share: SharedBatch | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(loss, ce, v, grad_features) of block index's fused_local_loss (over the whole batch with `share`).

        The first call, and any call whose shapes, dtypes or devices differ from it, goes through the
        validating public ops and returns grad_features None (loss carries the graph). Later calls run the
        backend's gradient interface (svp_kernels/gradient_interface.py) on the arguments validated then: the
        same kernels without the per-call checks and without an autograd node, returning loss detached and
        grad_features = dloss/dfeatures for features.backward. The callers range-check the targets first
        (_check_targets)."""
        local_loss = self.local_losses[index]
        projection = local_loss.projection
        p = projection.p if projection is not None and local_loss.training else 0.0
        call = self._loss_calls[index]
        flat = features.reshape(features.shape[0], -1)
        batch = flat.shape[0] if share is None else share.batch_size
        if call is None or call.shape != tuple(flat.shape) or flat.device != call.device or \
                flat.dtype != torch.float32 or v_prev.dtype != torch.float32 or v_prev.dim() != 2 or \
                v_prev.shape[0] != batch or v_prev.shape[1] == 0 or v_prev.device != flat.device or \
                targets.dtype != torch.int64 or targets.shape != (batch,) or targets.device != flat.device:
            if share is None:
                out = local_loss(features, targets, v_prev, seed=seed)
            else:  # the local rows' projection, then the loss of the whole batch's (an identity projection)
                v = flat if projection is None else projection(flat, seed=seed)
                out = fused_local_loss(share.gather(v), targets, v_prev, alignment_weight=local_loss.alignment_weight,
                                       reduction=local_loss.reduction, center=local_loss.center,
                                       backend=local_loss.backend, alignment=local_loss.alignment)
            self._loss_calls[index] = self._validated_call(local_loss, flat)
            return out.loss, out.ce, out.v, None
        h = flat.detach().contiguous()
        mean = local_loss.reduction == "mean"
        targets, v_prev = targets.contiguous(), v_prev.detach().contiguous()
        if share is None:
            loss, ce, _, v, grad_v = gradient_interface.local_loss_with_grad(
                call.module, h, call.projection, p, seed, targets, v_prev, local_loss.alignment_weight, mean,
                local_loss.center, local_loss.alignment)
        else:
            rows = share.gather(gradient_interface.projection_value(call.module, h, call.projection, p, seed))
            loss, ce, _, v, grad_v = gradient_interface.local_loss_with_grad(
                call.module, rows, _IDENTITY, 0.0, seed, targets, v_prev, local_loss.alignment_weight, mean,
                local_loss.center, local_loss.alignment)
            grad_v = aligned(grad_v[share.rows])  # this process's rows, off the start of grad_v
        grad_h = gradient_interface.input_grad(call.module, grad_v, call.projection, h.shape[1], p, seed,
                                               torch.float32)
        return loss, ce, v, grad_h.view(features.shape)

    @staticmethod
    def _validated_call(local_loss: LocalLoss, flat: torch.Tensor) -> _LossCall | None:
        """The arguments the lean path reuses for float32 (B, D) features on a backend with the gradient
        interface and the fused projection, or None to stay on the public op (the reference backend: its
        autograd formulation; a call for which the auto table picks the GEMM projection path). The backend is
        chosen as the public op chooses it (backends.choose)."""
        if flat.dtype != torch.float32:
            return None
        projection = None if local_loss.projection is None else local_loss.projection.projection
        args = check_projection(projection, flat, 0.0)
        shape = None if args.identity else (flat.shape[0], flat.shape[1], args.out_features)
        module, gemm = backends.choose(local_loss.backend, "auto", flat.device, flat.dtype, shape,
                                       implicit=args.weight is None)
        if gemm or not backends.has_gradient_interface(module):
            return None
        return _LossCall(module, tuple(flat.shape), flat.device, args)

    def set_lr(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set the learning rate of every group of `optimizer` to the schedule's lr_at(step)."""
        self._set_lr(optimizer, self.lr_at(step))

    @staticmethod
    def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr

    def _backprop_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepLosses:
        (optimizer,) = self.optimizers
        loss = F.cross_entropy(self.model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        return StepLosses(loss, loss.reshape(1))

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 1024) -> float:
        """Accuracy (a fraction) of the last block's logits: inputs (N, *input_shape), targets (N,)."""
        self.model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for start in range(0, len(targets), batch_size):
            logits = self.model(aligned(inputs[start:start + batch_size].to(self.device)))
            correct += (logits.argmax(dim=1) == targets[start:start + batch_size].to(self.device)).sum()
        return correct.item() / len(targets)

    def state_dict(self) -> dict:
        """Everything a resumed run needs from the trainer: model (with BatchNorm statistics), local losses
        (the fixed projections), input projection, optimizers and the step counter."""
        state = {"method": self.method, "step": self.step, "model": self.model.state_dict(),
                 "optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}
        if self.method == "svp":
            state["local_losses"] = self.local_losses.state_dict()
            state["input_projection"] = self.input_projection.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores state_dict()'s output; the caller has checked that it belongs to this model and method."""
        self.model.load_state_dict(state["model"])
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)
            if self.cuda_graph:  # the saved lr is a copy: point every group back at the device value
                self._set_lr(optimizer, self._scalars.lr)
        if self.cuda_graph:  # captured graphs hold the addresses of the replaced optimizer state
            self._graphs = StepGraphs(self._step_body, self.device, self._graph_warmup_steps)
        if self.method == "svp":
            self.local_losses.load_state_dict(state["local_losses"])
            self.input_projection.load_state_dict(state["input_projection"])
            self._loss_calls = [None] * self.num_blocks
        self.step = state["step"]
