"""`make demo`: the digits MLP trained with SVP (fused kernels, backend auto) and with backprop, 3 seeds each;
with a data folder (`make demo DATA_DIR=…`) also the MNIST recipe, one seed per method.

    python -m svp_kernels.train.demo [--data-dir FOLDER_WITH_MNIST_IDX_FILES] [--mnist-epochs N]

Prints side-by-side tables: test accuracy (mean ± std over seeds), wall time per run and peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from .. import backends
from .data import load_dataset, load_digits
from .extras import MissingExtraError, iterate
from .run import TrainConfig, recipe_config, run_training

SEEDS = (0, 1, 2)
MIB = 2.0**20


def describe(config: TrainConfig, dataset) -> str:
    kernels = backends.resolve(config.backend, torch.device(config.device), torch.float32).NAME
    inputs = dataset.train_inputs[0].numel()
    layers = "-".join([str(inputs)] + [str(config.width)] * config.depth + [str(dataset.num_classes)])
    augmentation = f", ±{config.augment_shift} px shifts" if config.augment_shift else ""
    return (f"{config.dataset} ({len(dataset.train_targets)} train / {len(dataset.test_targets)} test), MLP {layers} "
            f"({config.norm}), {config.epochs} epochs, batch {config.batch_size}, {config.optimizer} lr {config.lr} "
            f"({config.lr_schedule}{augmentation}); SVP p={config.p}, λ={config.alignment_weight}; "
            f"{config.device}, {kernels} kernels")


def compare(config: TrainConfig, dataset, seeds: tuple[int, ...]) -> dict[str, float]:
    """Trains config with SVP and BP for every seed, prints the table, returns the mean accuracy (%) per method."""
    results = {"svp": [], "bp": []}
    runs = [(method, seed) for method in results for seed in seeds]
    for method, seed in iterate(runs, desc=f"{config.dataset} runs"):
        config_run = TrainConfig(**{**vars(config), "method": method, "seed": seed})
        results[method].append(run_training(config_run, dataset, progress=False))
    print(f"\n{describe(config, dataset)}\n")
    print(f"{'method':<8}{'test accuracy (%)':>20}{'per seed':>24}{'wall s / run':>14}{'peak MiB':>10}{'step MiB':>10}")
    mean_accuracy = {}
    for method, method_runs in results.items():
        accuracies = [100 * run["test_accuracy"] for run in method_runs]
        mean_accuracy[method] = statistics.mean(accuracies)
        spread = f" ± {statistics.stdev(accuracies):4.2f}" if len(accuracies) > 1 else "       "
        per_seed = " / ".join(f"{accuracy:.2f}" for accuracy in accuracies)
        wall = statistics.mean(run["wall_seconds"] for run in method_runs)
        peak, step = method_runs[0]["peak_memory_bytes"] / MIB, method_runs[0]["activation_peak_bytes"] / MIB
        print(f"{method.upper():<8}{mean_accuracy[method]:>13.2f}{spread}{per_seed:>24}{wall:>14.1f}"
              f"{peak:>10.2f}{step:>10.2f}")
    return mean_accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svp_kernels.train.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder with the MNIST IDX files: adds the MNIST recipe (one seed)")
    parser.add_argument("--mnist-epochs", type=int, help="shorten the MNIST run (default: the recipe's epochs)")
    args = parser.parse_args(argv)
    mnist = None
    if args.data_dir:
        try:
            mnist = load_dataset("mnist", args.data_dir)
        except (FileNotFoundError, ValueError) as error:
            print(f"demo: error: DATA_DIR / --data-dir: {error}", file=sys.stderr)
            return 2
    try:
        digits_data = load_digits()
    except MissingExtraError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 2
    digits = compare(TrainConfig(), digits_data, SEEDS)
    print(f"\nSVP − BP: {digits['svp'] - digits['bp']:+.2f} points (target: ≥ −1). "
          "peak MiB: all the training step allocates (parameters, optimizer state, batch, activations, gradients); "
          "step MiB: its transient part alone.")
    if mnist is not None:
        overrides = {} if args.mnist_epochs is None else {"epochs": args.mnist_epochs}
        accuracy = compare(recipe_config("mnist", **overrides), mnist, (0,))
        print(f"\nMNIST SVP − BP: {accuracy['svp'] - accuracy['bp']:+.2f} points (seed 0; docs/training.md: 3 seeds).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
