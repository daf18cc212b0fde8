"""`make demo`: the digits MLP trained with SVP (fused kernels, backend auto) and with backprop, 3 seeds each.

    python -m svp_kernels.train.demo

Prints a side-by-side table: test accuracy (mean ± std over seeds), wall time per run and peak memory.
"""

from __future__ import annotations

import statistics

import torch
from tqdm.auto import tqdm

from .. import backends
from .data import load_digits
from .run import TrainConfig, run_training

SEEDS = (0, 1, 2)
MIB = 2.0**20


def main() -> None:
    dataset = load_digits()
    config = TrainConfig()
    results = {"svp": [], "bp": []}
    for method, seed in tqdm([(method, seed) for method in results for seed in SEEDS], desc="demo runs"):
        results[method].append(run_training(TrainConfig(method=method, seed=seed), dataset, progress=False))

    kernels = backends.resolve(config.backend, torch.device(config.device), torch.float32).NAME
    layers = "-".join(["64"] + [str(config.width)] * config.depth + ["10"])
    print(f"\ndigits ({len(dataset.train_targets)} train / {len(dataset.test_targets)} test), MLP {layers} "
          f"({config.norm}), {config.epochs} epochs, batch {config.batch_size}, {config.optimizer} lr {config.lr}; "
          f"SVP p={config.p}, λ={config.alignment_weight}; {config.device}, {kernels} kernels\n")
    print(f"{'method':<8}{'test accuracy (%)':>20}{'per seed':>24}{'wall s / run':>14}{'peak MiB':>10}{'step MiB':>10}")
    mean_accuracy = {}
    for method, runs in results.items():
        accuracies = [100 * run["test_accuracy"] for run in runs]
        mean_accuracy[method] = statistics.mean(accuracies)
        per_seed = " / ".join(f"{accuracy:.2f}" for accuracy in accuracies)
        wall = statistics.mean(run["wall_seconds"] for run in runs)
        peak, step = runs[0]["peak_memory_bytes"] / MIB, runs[0]["activation_peak_bytes"] / MIB
        print(f"{method.upper():<8}{mean_accuracy[method]:>13.2f} ± {statistics.stdev(accuracies):4.2f}"
              f"{per_seed:>24}{wall:>14.1f}{peak:>10.2f}{step:>10.2f}")
    print(f"\nSVP − BP: {mean_accuracy['svp'] - mean_accuracy['bp']:+.2f} points (target: ≥ −1). "
          "peak MiB: all the training step allocates (parameters, optimizer state, batch, activations, gradients); "
          "step MiB: its transient part alone.")


if __name__ == "__main__":
    main()
