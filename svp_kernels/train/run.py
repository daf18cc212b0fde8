"""One training run from a config, the per-dataset recipes, and the memory-vs-depth sweep: what the CLI,
the demo and python/ share."""

from __future__ import annotations

import functools
import hashlib
import math
import signal
import time
from dataclasses import asdict, dataclass, fields

import torch

from .. import __version__
from ..validation import ALIGNMENTS
from .checkpoint import (FORMAT_VERSION, CheckpointError, check_state_shapes, loading, read_checkpoint,
                         save_checkpoint)
from .data import Dataset, batch_indices, load_dataset
from .evaluations import EvaluationLog, check_eval_every
from .extras import iterate, progress_bar
from .memory import measure_step_memory
from .models import BlockwiseModel, mlp, vgg11, vit
from .trainer import FIRST_ALIGNMENTS, BlockSeedTable, LayerwiseTrainer

MODELS = ("mlp", "cnn", "vit")
LR_SCHEDULES = ("constant", "cosine", "step")
AUGMENT_STREAM = 2**31 - 1  # block_step_seed's block index of the data-augmentation stream (no real block)

@dataclass
class TrainConfig:
    """Everything a run depends on; the defaults are the digits recipe (an MLP trained in seconds)."""

    model: str = "mlp"
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None  # image folders: shorter side resized to N, then centre-cropped to N × N
    method: str = "svp"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (to 0) | step (×0.1 at 50 % and 75 % of the steps)
    warmup_epochs: float = 0.0  # linear warm-up from lr / warm-up steps, before the schedule
    optimizer: str = "adam"
    weight_decay: float = 0.0
    augment_shift: int = 0  # random translation of every training image by up to this many pixels
    augment_flip: bool = False  # random horizontal flips
    p: float = 0.1
    alignment_weight: float = 1.0
    alignment: str = "cosine_gram"  # the local losses' alignment term: cosine_gram | bhattacharyya
    first_alignment: str = "input"  # block 0's v_prev: input (a random projection of x) | onehot (the target)
    proj_dim: int | None = None
    implicit_projection: bool = False
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0
    width: int = 512  # MLP width; ViT embedding dim
    depth: int = 3  # MLP hidden blocks; ViT transformer blocks
    norm: str = "batchnorm"  # MLP
    cnn_width_multiplier: float = 0.25
    pool_size: int | None = None  # CNN: adaptive pooling before each projection
    vit_patch_size: int = 4
    vit_blocks_per_unit: int = 1
    vit_token: str = "cls"
    cuda_graph: bool = False  # capture the whole step as a CUDA graph per batch shape (LayerwiseTrainer)


# Per-dataset defaults (svp-train --dataset picks one; every field stays overridable). Fields not named
# keep TrainConfig's defaults. Measured results: docs/training.md.
_IMAGE_RECIPE = dict(model="mlp", width=1024, depth=3, epochs=10, batch_size=128, lr=2e-3,
                     lr_schedule="cosine", warmup_epochs=1.0, weight_decay=0.0, augment_shift=2, p=0.1)
RECIPES: dict[str, dict] = {
    "digits": {},
    "synthetic": {},
    "mnist": dict(_IMAGE_RECIPE),
    "fashion-mnist": dict(_IMAGE_RECIPE),
    "cifar10": dict(model="cnn", epochs=50, batch_size=128, lr=1e-3, lr_schedule="cosine", warmup_epochs=1.0,
                    weight_decay=5e-4, optimizer="adamw", augment_shift=4, augment_flip=True),
    "cifar100": dict(model="cnn", epochs=50, batch_size=128, lr=1e-3, lr_schedule="cosine", warmup_epochs=1.0,
                     weight_decay=5e-4, optimizer="adamw", augment_shift=4, augment_flip=True),
}
RECIPES["imagefolder"] = dict(RECIPES["cifar10"])  # natural images of any size: the CIFAR CNN recipe


# (dataset, model) pairs with a recipe of their own, used instead of RECIPES[dataset] when that model is
# asked for. The CIFAR-10 MLP: the base row of bench/cifar_mlp_sweep.py (docs/training.md, "Accuracy
# against backprop").
MODEL_RECIPES: dict[tuple[str, str], dict] = {
    ("cifar10", "mlp"): dict(model="mlp", width=1024, depth=3, epochs=15, batch_size=128, lr=2e-3,
                             lr_schedule="cosine", warmup_epochs=1.0, optimizer="adam", weight_decay=0.0,
                             augment_shift=4, augment_flip=True, p=0.1),
}


def recipe_config(dataset: str = "digits", **overrides) -> TrainConfig:
    """The recipe of the dataset and model (MODEL_RECIPES, else RECIPES[dataset]; the model is
    overrides["model"], else the dataset recipe's) with overrides (TrainConfig field names) applied on top."""
    if dataset not in RECIPES:
        raise ValueError(f"dataset must be one of {tuple(RECIPES)}, got {dataset!r}")
    model = overrides.get("model", RECIPES[dataset].get("model", TrainConfig.model))
    recipe = MODEL_RECIPES.get((dataset, model), RECIPES[dataset])
    return TrainConfig(**{"dataset": dataset, **recipe, **overrides})


def validate_config(config: TrainConfig, num_train: int | None = None) -> None:
    """ValueError naming the flag (--field-name) of the first nonsensical value."""
    def need(condition: bool, field: str, expected: str) -> None:
        if not condition:
            raise ValueError(f"--{field.replace('_', '-')} must be {expected}, got {getattr(config, field)!r}")

    need(config.model in MODELS, "model", f"one of {MODELS}")
    need(config.image_size is None or config.image_size >= 1, "image_size", "≥ 1")
    need(config.epochs >= 1, "epochs", "≥ 1")
    need(config.batch_size >= 2, "batch_size", "≥ 2 (BatchNorm needs two examples)")
    if num_train is not None:
        need(config.batch_size <= num_train, "batch_size", f"≤ the {num_train} training examples")
    need(math.isfinite(config.lr) and config.lr > 0, "lr", "a finite number > 0")
    need(config.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {LR_SCHEDULES}")
    need(math.isfinite(config.warmup_epochs) and 0 <= config.warmup_epochs <= config.epochs, "warmup_epochs",
         f"in [0, --epochs = {config.epochs}]")
    need(math.isfinite(config.weight_decay) and config.weight_decay >= 0, "weight_decay", "≥ 0")
    need(config.augment_shift >= 0, "augment_shift", "≥ 0")
    need(0 <= config.p < 1, "p", "in [0, 1)")
    need(math.isfinite(config.alignment_weight) and config.alignment_weight >= 0, "alignment_weight", "≥ 0")
    need(config.proj_dim is None or config.proj_dim >= 1, "proj_dim", "≥ 1")
    need(config.alignment in ALIGNMENTS, "alignment", f"one of {ALIGNMENTS}")
    need(config.first_alignment in FIRST_ALIGNMENTS, "first_alignment", f"one of {FIRST_ALIGNMENTS}")
    need(0 <= config.seed < 2**63, "seed", "in [0, 2**63)")
    need(config.width >= 1, "width", "≥ 1")
    need(config.depth >= 1, "depth", "≥ 1")
    need(config.cnn_width_multiplier > 0, "cnn_width_multiplier", "> 0")
    need(config.pool_size is None or config.pool_size >= 1, "pool_size", "≥ 1")
    need(config.vit_patch_size >= 1, "vit_patch_size", "≥ 1")
    need(config.vit_blocks_per_unit >= 1, "vit_blocks_per_unit", "≥ 1")
    if config.cuda_graph and torch.device(config.device).type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device (--device cuda): a captured CUDA graph replays GPU "
                         f"work; got --device {config.device}")


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int):
    """step -> learning rate: linear warm-up over warmup_epochs, then constant, cosine to 0, or step decay."""
    total = config.epochs * steps_per_epoch
    warmup = min(round(config.warmup_epochs * steps_per_epoch), total - 1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return config.lr * (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        if config.lr_schedule == "cosine":
            return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        if config.lr_schedule == "step":
            return config.lr * 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
        return config.lr

    return lr_at


def augment(images: torch.Tensor, config: TrainConfig, step: int) -> torch.Tensor:
    """images (B, C, H, W) randomly translated by up to augment_shift pixels (edges replicated) and, with
    augment_flip, mirrored; the draws are a pure function of (config.seed, step)."""
    shift, flip = config.augment_shift, config.augment_flip
    if not shift and not flip:
        return images
    generator = torch.Generator().manual_seed(_augment_seeds(config.seed)(AUGMENT_STREAM, step))
    batch, channels, height, width = images.shape
    rows = torch.arange(height).expand(batch, height)
    cols = torch.arange(width).expand(batch, width)
    if shift:
        offsets = torch.randint(-shift, shift + 1, (2, batch, 1), generator=generator)
        rows = (rows + offsets[0]).clamp(0, height - 1)
        cols = (cols + offsets[1]).clamp(0, width - 1)
    if flip:
        mirrored = torch.rand(batch, 1, generator=generator) < 0.5
        cols = torch.where(mirrored, width - 1 - cols, cols)
    # out[b, c, i, j] = images[b, c, rows[b, i], cols[b, j]]: two gathers, rows then columns
    shape = (batch, channels, height, width)
    out = images.gather(2, rows.to(images.device)[:, None, :, None].expand(shape))
    return out.gather(3, cols.to(images.device)[:, None, None, :].expand(shape))


@functools.lru_cache(maxsize=8)
def _augment_seeds(run_seed: int) -> BlockSeedTable:
    """The run's seed table (block_step_seed of every stream, 1024 steps per vectorised call), kept per seed."""
    return BlockSeedTable(run_seed)


def build_model(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int) -> BlockwiseModel:
    """The config's model for inputs (B, *input_shape) and num_classes classes."""
    if config.model == "mlp":
        return mlp(input_shape, num_classes, width=config.width, depth=config.depth, norm=config.norm)
    if config.model == "cnn":
        return vgg11(input_shape, num_classes, width_multiplier=config.cnn_width_multiplier,
                     pool_size=config.pool_size)
    if config.model == "vit":
        return vit(input_shape, num_classes, patch_size=config.vit_patch_size, dim=config.width,
                   depth=config.depth, blocks_per_unit=config.vit_blocks_per_unit, token=config.vit_token)
    raise ValueError(f"model must be one of {MODELS}, got {config.model!r}")


def build_trainer(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int,
                  steps_per_epoch: int | None = None) -> LayerwiseTrainer:
    """A fresh model and trainer, initialised from config.seed; the learning-rate schedule needs
    steps_per_epoch (None: the constant config.lr)."""
    torch.manual_seed(config.seed)
    model = build_model(config, input_shape, num_classes)
    lr_at = None if steps_per_epoch is None else learning_rate_schedule(config, steps_per_epoch)
    return LayerwiseTrainer(model, method=config.method, optimizer=config.optimizer, lr=config.lr,
                            weight_decay=config.weight_decay, p=config.p, alignment_weight=config.alignment_weight,
                            proj_dim=config.proj_dim, implicit_projection=config.implicit_projection,
                            backend=config.backend, device=config.device, seed=config.seed, lr_at=lr_at,
                            cuda_graph=config.cuda_graph, alignment=config.alignment,
                            first_alignment=config.first_alignment)


# Fields a resumed run may change: where the data lives does not change the computation.
RESUMABLE_DIFFERENCES = ("data_dir",)


def _check_resumable(path, payload: dict, config: TrainConfig, trainer: LayerwiseTrainer) -> None:
    """CheckpointError naming the first field where the checkpoint does not belong to this run."""
    for key in ("config", "trainer", "epoch", "batch_in_epoch", "progress"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path}: field {key} is missing")
    saved_config = payload["config"]
    for field in fields(TrainConfig):
        if field.name in RESUMABLE_DIFFERENCES:
            continue
        if field.name not in saved_config and getattr(config, field.name) == field.default:
            continue  # a field newer than the checkpoint, left at its default: the run computes what it did
        if field.name not in saved_config:
            raise CheckpointError(f"checkpoint {path}: field config.{field.name} is missing")
        if saved_config[field.name] != getattr(config, field.name):
            raise CheckpointError(f"checkpoint {path}: field config.{field.name} is {saved_config[field.name]!r}, "
                                  f"this run has {getattr(config, field.name)!r}")
    state = payload["trainer"]
    current = trainer.state_dict()
    for key in current:
        if key not in state:
            raise CheckpointError(f"checkpoint {path}: field trainer.{key} is missing")
    if state["method"] != trainer.method:
        raise CheckpointError(f"checkpoint {path}: field trainer.method is {state['method']!r}, "
                              f"this run has {trainer.method!r}")
    for key in ("model", "local_losses", "input_projection"):
        if key in current:
            check_state_shapes(path, f"trainer.{key}", state[key], current[key])
    if len(state["optimizers"]) != len(current["optimizers"]):
        raise CheckpointError(f"checkpoint {path}: field trainer.optimizers holds {len(state['optimizers'])} "
                              f"optimizers, this run has {len(current['optimizers'])}")


def _check_position(path, state: _Progress, step: int, epochs: list[list]) -> None:
    """CheckpointError unless the checkpoint's epoch, batch and step are a position of this run's batches: a
    batch inside an epoch, or the start of the epoch after the last one saved."""
    epoch, batch = state.epoch, state.batch_in_epoch
    fits = isinstance(epoch, int) and isinstance(batch, int) and 0 <= epoch <= len(epochs) and \
        0 <= batch < (len(epochs[epoch]) if epoch < len(epochs) else 1) and \
        step == sum(map(len, epochs[:epoch])) + batch
    if not fits:
        raise CheckpointError(f"checkpoint {path}: field epoch: epoch {epoch!r}, batch {batch!r} and step {step!r} "
                              f"are no position of this run's {len(epochs)} epochs")


class _Progress:
    """The loop's position and curves: what a checkpoint stores beside the trainer."""

    def __init__(self, num_blocks: int, device):
        self.epoch, self.batch_in_epoch, self.wall_seconds = 0, 0, 0.0
        self.loss_curve: list[float] = []
        self.accuracy_curve: list[float] = []
        self.block_curves: list[list[float]] = []
        self.evaluations = EvaluationLog(device)
        self.samples = 0  # training examples seen
        self.num_blocks, self.device = num_blocks, device
        self.reset_sums()

    def reset_sums(self) -> None:
        """Per-epoch sums of the step losses, kept on the device and read once per epoch."""
        self.ce_sum = torch.zeros((), device=self.device)
        self.block_sums = torch.zeros(self.num_blocks, device=self.device)

    def state(self) -> dict:
        return {"loss_curve": self.loss_curve, "accuracy_curve": self.accuracy_curve,
                "block_curves": self.block_curves, "wall_seconds": self.wall_seconds,
                "ce_sum": self.ce_sum.cpu(), "block_sums": self.block_sums.cpu(),
                "evaluations": self.evaluations.records, "samples": self.samples}

    def load(self, payload: dict) -> None:
        self.epoch, self.batch_in_epoch = payload["epoch"], payload["batch_in_epoch"]
        state = payload["progress"]
        self.loss_curve, self.accuracy_curve = list(state["loss_curve"]), list(state["accuracy_curve"])
        self.block_curves, self.wall_seconds = [list(row) for row in state["block_curves"]], state["wall_seconds"]
        self.ce_sum, self.block_sums = state["ce_sum"].to(self.device), state["block_sums"].to(self.device)
        # checkpoints written before evaluations were logged hold none
        self.evaluations = EvaluationLog(self.device, records=state.get("evaluations", []))
        self.samples = state.get("samples", 0)


class _InterruptFlag:
    """While active, Ctrl-C (SIGINT) only sets a flag that the loop reads between steps."""

    def __init__(self, active: bool):
        self.active, self.raised, self.previous = active, False, None

    def __enter__(self):
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGINT, self.previous)


def run_training(config: TrainConfig, dataset: Dataset | None = None, progress: bool = True,
                 checkpoint: str | None = None, checkpoint_every: int | None = None,
                 resume: str | None = None, measure_memory: bool = True, eval_every: int | None = None) -> dict:
    """Train and evaluate once. Returns the JSON-ready result: test_accuracy (a fraction), per-epoch
    train_loss_curve (cross-entropy of the output logits) and test_accuracy_curve, block_loss_curves
    (per-block local losses), final_parameters_sha256, peak_memory_bytes, activation_peak_bytes,
    wall_seconds (the training loop, evaluation included), train_seconds (the same without evaluations),
    samples (training examples seen), samples_per_second (over wall_seconds), evaluations
    (svp_kernels.train.evaluations: step, test_accuracy, train_seconds, wall_seconds, eval_seconds of each
    evaluation) and config.

    checkpoint: path written at every epoch end, every checkpoint_every steps, and on Ctrl-C (then
    KeyboardInterrupt is raised). resume: a checkpoint of the same config to continue from. eval_every:
    also evaluate the test set after every eval_every-th step (training is bit-identical either way).
    Memory is measured on a probe: a fresh trainer built the same way, one warm-up and one measured step
    on the first batch (measure_step_memory), so the timed run is never profiled.
    """
    check_eval_every(eval_every)
    if dataset is None:
        dataset = load_dataset(config.dataset, config.data_dir, image_size=config.image_size, progress=progress)
    validate_config(config, len(dataset.train_targets))
    shape, classes = dataset.input_shape, dataset.num_classes
    generator = torch.Generator().manual_seed(config.seed)
    epochs = [batch_indices(len(dataset.train_targets), config.batch_size, generator) for _ in range(config.epochs)]
    steps_per_epoch = len(epochs[0])
    memory = None
    if measure_memory:
        probe_batch = dataset.train_inputs[:config.batch_size], dataset.train_targets[:config.batch_size]
        memory = measure_step_memory(lambda: build_trainer(config, shape, classes), *probe_batch, config.device)

    trainer = build_trainer(config, shape, classes, steps_per_epoch)
    state = _Progress(len(trainer.model.blocks) if config.method == "svp" else 1, trainer.device)
    if resume is not None:
        payload = read_checkpoint(resume)
        with loading(resume, "config"):
            _check_resumable(resume, payload, config, trainer)
        with loading(resume, "trainer"):
            trainer.load_state_dict(payload["trainer"])
        with loading(resume, "progress"):
            state.load(payload)
        _check_position(resume, state, trainer.step, epochs)

    def write_checkpoint() -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, {"format": FORMAT_VERSION, "kind": "single-process", "config": asdict(config),
                                         "trainer": trainer.state_dict(), "epoch": state.epoch,
                                         "batch_in_epoch": state.batch_in_epoch, "progress": state.state()})

    bar = progress_bar(total=sum(map(len, epochs)), initial=trainer.step, desc=f"{config.method} {config.model} "
                       f"{config.dataset}", unit="step", disable=not progress)
    train_inputs, train_targets = dataset.train_inputs, dataset.train_targets
    start = time.perf_counter() - state.wall_seconds
    log = state.evaluations
    log.start(state.wall_seconds)

    def evaluate() -> float:
        log.trained()
        accuracy = trainer.evaluate(dataset.test_inputs, dataset.test_targets)
        log.record(trainer.step, accuracy)
        return accuracy

    with _InterruptFlag(checkpoint is not None) as interrupt:
        while state.epoch < config.epochs:
            batches = epochs[state.epoch]
            while state.batch_in_epoch < len(batches):
                indices = batches[state.batch_in_epoch]
                inputs = augment(train_inputs[indices], config, trainer.step)
                losses = trainer.train_step(inputs, train_targets[indices])
                state.ce_sum += losses.output_ce
                state.block_sums += losses.block_losses
                state.batch_in_epoch += 1
                state.samples += len(indices)
                bar.update()
                if state.batch_in_epoch == len(batches):
                    break  # the epoch-end checkpoint follows the evaluation
                if eval_every and trainer.step % eval_every == 0:
                    evaluate()
                if interrupt.raised or (checkpoint_every and trainer.step % checkpoint_every == 0):
                    state.wall_seconds = time.perf_counter() - start
                    write_checkpoint()
                    if interrupt.raised:
                        raise KeyboardInterrupt
            steps = len(batches)
            state.loss_curve.append(state.ce_sum.item() / steps)
            state.block_curves.append((state.block_sums / steps).tolist())
            state.accuracy_curve.append(evaluate())
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            state.reset_sums()
            state.wall_seconds = time.perf_counter() - start
            write_checkpoint()
            bar.set_postfix(epoch=state.epoch, loss=f"{state.loss_curve[-1]:.3f}",
                            test_acc=f"{state.accuracy_curve[-1]:.4f}")
            if interrupt.raised:
                raise KeyboardInterrupt
    bar.close()
    return {"test_accuracy": state.accuracy_curve[-1], "train_loss_curve": state.loss_curve,
            "test_accuracy_curve": state.accuracy_curve, "block_loss_curves": state.block_curves,
            "final_parameters_sha256": parameters_digest(trainer.model),
            "peak_memory_bytes": memory.peak_memory_bytes if memory else None,
            "activation_peak_bytes": memory.activation_peak_bytes if memory else None,
            "wall_seconds": state.wall_seconds, "train_seconds": state.wall_seconds - log.eval_seconds,
            "samples": state.samples, "samples_per_second": state.samples / max(state.wall_seconds, 1e-9),
            "evaluations": log.records, "eval_every": eval_every, "steps": trainer.step, "config": asdict(config),
            "device": str(trainer.device), "torch_version": torch.__version__, "svp_kernels_version": __version__,
            "threads": torch.get_num_threads()}


def parameters_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every state tensor's bytes in state_dict order: equal digests mean bit-identical models."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def memory_depth_rows(width: int = 1024, depths: tuple[int, ...] = (2, 4, 8, 16, 32), batch_size: int = 128,
                      device: str = "cpu", input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                      methods: tuple[str, ...] = ("svp", "bp"), progress: bool = True) -> list[dict]:
    """Peak training memory of a width-wide MLP with depth hidden blocks (the paper's Fig. 2a), per method
    and depth, on one random MNIST-shaped batch. Rows: method, depth, batch_size, peak_memory_bytes,
    activation_peak_bytes."""
    inputs = torch.randn(batch_size, *input_shape)
    targets = torch.randint(0, num_classes, (batch_size,))
    rows = []
    for depth, method in iterate([(d, m) for d in depths for m in methods], desc="memory-depth",
                                 disable=not progress):
        config = TrainConfig(method=method, width=width, depth=depth, device=device)
        memory = measure_step_memory(lambda: build_trainer(config, input_shape, num_classes), inputs, targets, device)
        rows.append({"method": method, "depth": depth, "batch_size": batch_size, "width": width,
                     "peak_memory_bytes": memory.peak_memory_bytes,
                     "activation_peak_bytes": memory.activation_peak_bytes})
    return rows
