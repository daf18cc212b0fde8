"""What a training run leaves behind besides its printed summary: the --json file and the --plot PNGs.

Both svp-train's single-process run (train/cli.py) and a distributed run's rank 0 (train/distributed/launch.py)
write their results here.
"""

from __future__ import annotations

import argparse
import json

from .extras import require

MIB = 2.0**20


def write_outputs(result: dict, args: argparse.Namespace) -> None:
    """The run's --json file and --plot PNG, where asked for."""
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    if args.plot:
        plot_training(result, args.plot)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only), or MissingExtraError naming --plot."""
    require("matplotlib", "matplotlib", "--plot").use("Agg")
    return require("matplotlib.pyplot", "matplotlib", "--plot")


def plot_training(result: dict, path: str) -> None:
    """Two panels: per-epoch training losses (output CE, and each block's local loss) and test accuracy."""
    plt = pyplot()

    epochs = range(1, len(result["train_loss_curve"]) + 1)
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, result["train_loss_curve"], label="output cross-entropy", linewidth=2)
    if result["config"]["method"] == "svp":
        for index, curve in enumerate(zip(*result["block_loss_curves"])):
            loss_axis.plot(epochs, curve, label=f"block {index} local loss", linewidth=0.8, alpha=0.7)
    loss_axis.set(xlabel="epoch", ylabel="training loss", yscale="log")
    loss_axis.legend(fontsize=7)
    accuracy_axis.plot(epochs, [100 * value for value in result["test_accuracy_curve"]])
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy (%)")
    config = result["config"]
    figure.suptitle(f"{config['method']} {config['model']} on {config['dataset']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_memory_depth(rows: list[dict], path: str) -> None:
    """Peak and activation-peak memory (MiB) against depth, one line per method."""
    plt = pyplot()

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, title in zip(axes, ("peak_memory_bytes", "activation_peak_bytes"),
                                ("peak training memory", "activation peak (minus parameters, optimizer state)")):
        for method in sorted({row["method"] for row in rows}, reverse=True):
            points = [(row["depth"], row[key] / MIB) for row in rows if row["method"] == method]
            axis.plot(*zip(*points), marker="o", label=method.upper())
        axis.set(xlabel="depth (hidden blocks)", ylabel="MiB", title=title)
        axis.set_xscale("log", base=2)
        axis.minorticks_off()
        depths = sorted({row["depth"] for row in rows})
        axis.set_xticks(depths, labels=[str(depth) for depth in depths])
        axis.legend()
    figure.suptitle(f"width {rows[0]['width']}, batch {rows[0]['batch_size']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
