"""One training run from a config, and the memory-vs-depth sweep: what the CLI, the demo and python/ share."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .data import Dataset, batch_indices, load_dataset
from .memory import measure_step_memory
from .models import BlockwiseModel, mlp, vgg11, vit
from .trainer import LayerwiseTrainer

MODELS = ("mlp", "cnn", "vit")


@dataclass
class TrainConfig:
    """Everything a run depends on; the defaults train the digits MLP with SVP in seconds on 2 CPU cores."""

    model: str = "mlp"
    dataset: str = "digits"
    data_dir: str | None = None
    method: str = "svp"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    p: float = 0.1
    alignment_weight: float = 1.0
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


def build_trainer(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int) -> LayerwiseTrainer:
    """A fresh model and trainer, initialised from config.seed."""
    torch.manual_seed(config.seed)
    model = build_model(config, input_shape, num_classes)
    return LayerwiseTrainer(model, method=config.method, optimizer=config.optimizer, lr=config.lr,
                            weight_decay=config.weight_decay, p=config.p, alignment_weight=config.alignment_weight,
                            proj_dim=config.proj_dim, implicit_projection=config.implicit_projection,
                            backend=config.backend, device=config.device, seed=config.seed)


def run_training(config: TrainConfig, dataset: Dataset | None = None, progress: bool = True) -> dict:
    """Train and evaluate once. Returns the JSON-ready result: test_accuracy (a fraction), per-epoch
    train_loss_curve (cross-entropy of the output logits) and test_accuracy_curve, block_loss_curves
    (per-block local losses), peak_memory_bytes, activation_peak_bytes, wall_seconds (the training
    loop, evaluation included) and config.

    Memory is measured on a probe: a fresh trainer built the same way, one warm-up and one measured step
    on the first batch (measure_step_memory), so the timed run is never profiled.
    """
    from tqdm.auto import tqdm

    dataset = dataset if dataset is not None else load_dataset(config.dataset, config.data_dir)
    shape, classes = dataset.input_shape, dataset.num_classes
    probe_batch = dataset.train_inputs[:config.batch_size], dataset.train_targets[:config.batch_size]
    memory = measure_step_memory(lambda: build_trainer(config, shape, classes), *probe_batch, config.device)

    trainer = build_trainer(config, shape, classes)
    generator = torch.Generator().manual_seed(config.seed)
    epochs = [batch_indices(len(dataset.train_targets), config.batch_size, generator) for _ in range(config.epochs)]
    loss_curve, accuracy_curve, block_curves = [], [], []
    start = time.perf_counter()
    bar = tqdm(total=sum(map(len, epochs)), desc=f"{config.method} {config.model} {config.dataset}", unit="step",
               disable=not progress)
    for batches in epochs:
        step_losses = []
        for indices in batches:
            step_losses.append(trainer.train_step(dataset.train_inputs[indices], dataset.train_targets[indices]))
            bar.update()
        loss_curve.append(sum(step.output_ce for step in step_losses) / len(step_losses))
        block_curves.append([sum(values) / len(values) for values in zip(*(step.block_losses for step in step_losses))])
        accuracy_curve.append(trainer.evaluate(dataset.test_inputs, dataset.test_targets))
        bar.set_postfix(epoch=len(loss_curve), loss=f"{loss_curve[-1]:.3f}", test_acc=f"{accuracy_curve[-1]:.3f}")
    bar.close()
    return {"test_accuracy": accuracy_curve[-1], "train_loss_curve": loss_curve,
            "test_accuracy_curve": accuracy_curve, "block_loss_curves": block_curves,
            "peak_memory_bytes": memory.peak_memory_bytes, "activation_peak_bytes": memory.activation_peak_bytes,
            "wall_seconds": time.perf_counter() - start, "config": asdict(config),
            "device": str(trainer.device), "torch_version": torch.__version__}


def memory_depth_rows(width: int = 1024, depths: tuple[int, ...] = (2, 4, 8, 16, 32), batch_size: int = 128,
                      device: str = "cpu", input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                      methods: tuple[str, ...] = ("svp", "bp"), progress: bool = True) -> list[dict]:
    """Peak training memory of a width-wide MLP with depth hidden blocks (the paper's Fig. 2a), per method
    and depth, on one random MNIST-shaped batch. Rows: method, depth, batch_size, peak_memory_bytes,
    activation_peak_bytes."""
    from tqdm.auto import tqdm

    inputs = torch.randn(batch_size, *input_shape)
    targets = torch.randint(0, num_classes, (batch_size,))
    rows = []
    for depth, method in tqdm([(d, m) for d in depths for m in methods], desc="memory-depth", disable=not progress):
        config = TrainConfig(method=method, width=width, depth=depth, device=device)
        memory = measure_step_memory(lambda: build_trainer(config, input_shape, num_classes), inputs, targets, device)
        rows.append({"method": method, "depth": depth, "batch_size": batch_size, "width": width,
                     "peak_memory_bytes": memory.peak_memory_bytes,
                     "activation_peak_bytes": memory.activation_peak_bytes})
    return rows
