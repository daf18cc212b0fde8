"""The CIFAR-10 MLP sweep: SVP's levers against BP, one svp-train run per (config, seed), from a table.

    python bench/cifar_mlp_sweep.py run --data-dir D --configs base,pd256 --seeds 0 [--epochs 5]
    python bench/cifar_mlp_sweep.py run --data-dir MNIST_DIR --configs mnist-svp,mnist-bp --seeds 0,1,2
    python bench/cifar_mlp_sweep.py summary [--configs ...]
    python bench/cifar_mlp_sweep.py list

Every run is `python -m svp_kernels.train.cli` with the config's flags plus --seed, --threads 1,
--no-progress and --json; its JSON (svp-train's result: per-epoch test accuracy, final accuracy, wall
time, peak memory) is written to bench/results/cifar10_mlp/<config>-e<epochs>-s<seed>.json together with
the exact command, the CPU model and the load average before and after the run (the 2-core machine is
shared: wall times are indicative only unless the load says otherwise). A run whose JSON exists is
skipped (--force reruns it). One run at a time: each is single-threaded so that a sweep and other work
can share the machine.

CONFIGS maps a name to svp-train flags on top of BASE (the CIFAR-10 MLP, 3072→1024×3→10); --epochs
overrides the config's epochs (screening at a short budget, confirming at the full one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "cifar10_mlp"

# The CIFAR-10 MLP of the paper's Table 1 row (3 hidden blocks of 1024), with the MNIST recipe's optimiser
# (Adam 2e-3, 1-epoch warm-up, cosine to 0, batch 128) and CIFAR's usual augmentation.
BASE = {"--dataset": "cifar10", "--model": "mlp", "--width": 1024, "--depth": 3, "--norm": "batchnorm",
        "--epochs": 15, "--batch-size": 128, "--optimizer": "adam", "--lr": 2e-3, "--lr-schedule": "cosine",
        "--warmup-epochs": 1, "--weight-decay": 0, "--augment-shift": 4, "--augment-flip": "on",
        "--p": 0.1, "--alignment-weight": 1.0, "--proj-dim": 10}

MNIST_BASE = {"--dataset": "mnist", "--model": "mlp", "--width": 1024, "--depth": 3, "--epochs": 10}


def _config(base: dict, **flags) -> dict:
    """base with flags (python names: proj_dim -> --proj-dim) applied."""
    return {**base, **{"--" + key.replace("_", "-"): value for key, value in flags.items()}}


CONFIGS: dict[str, dict] = {
    # baselines
    "bp": _config(BASE, method="bp"),
    "base": _config(BASE, method="svp"),
    "bp-noaug": _config(BASE, method="bp", augment_shift=0, augment_flip="off"),
    "base-noaug": _config(BASE, method="svp", augment_shift=0, augment_flip="off"),
    # projection width d' (the paper's d' ablation; extra columns are logits of no class)
    "pd64": _config(BASE, method="svp", proj_dim=64),
    "pd256": _config(BASE, method="svp", proj_dim=256),
    "pd512": _config(BASE, method="svp", proj_dim=512),
    "pd1024": _config(BASE, method="svp", proj_dim=1024),
    "pd512-lam10": _config(BASE, method="svp", proj_dim=512, alignment_weight=10.0),
    # alignment weight λ
    "lam0": _config(BASE, method="svp", alignment_weight=0.0),
    "lam0.1": _config(BASE, method="svp", alignment_weight=0.1),
    "lam10": _config(BASE, method="svp", alignment_weight=10.0),
    # dropout on R
    "p0": _config(BASE, method="svp", p=0.0),
    "p0.3": _config(BASE, method="svp", p=0.3),
    # learning rate, both methods
    "lr1e-3": _config(BASE, method="svp", lr=1e-3),
    "lr4e-3": _config(BASE, method="svp", lr=4e-3),
    "bp-lr1e-3": _config(BASE, method="bp", lr=1e-3),
    "bp-lr4e-3": _config(BASE, method="bp", lr=4e-3),
    # the Bhattacharyya alignment (issue 25), first block aligned to the one-hot target as in the SLL code
    "bd-onehot": _config(BASE, method="svp", alignment="bhattacharyya", first_alignment="onehot"),
    "bd-input": _config(BASE, method="svp", alignment="bhattacharyya", first_alignment="input"),
    "bd-onehot-lam0.1": _config(BASE, method="svp", alignment="bhattacharyya", first_alignment="onehot",
                                alignment_weight=0.1),
    "bd-onehot-lam10": _config(BASE, method="svp", alignment="bhattacharyya", first_alignment="onehot",
                               alignment_weight=10.0),
    # MNIST check with the same method (its own recipe otherwise)
    "mnist-svp": _config(MNIST_BASE, method="svp"),
    "mnist-bp": _config(MNIST_BASE, method="bp"),
    "mnist-svp-p0": _config(MNIST_BASE, method="svp", p=0.0),
    # the Bhattacharyya alignment's λ on MNIST (first block aligned to the one-hot target)
    **{f"mnist-bd-onehot-lam{lam:g}": _config(MNIST_BASE, method="svp", alignment="bhattacharyya",
                                              first_alignment="onehot", alignment_weight=lam)
       for lam in (0.1, 1.0, 10.0)},
}


def command(name: str, data_dir: str, seed: int, epochs: int | None, json_path: Path) -> list[str]:
    flags = dict(CONFIGS[name])
    if epochs is not None:
        flags["--epochs"] = epochs
    argv = [sys.executable, "-m", "svp_kernels.train.cli", "--data-dir", data_dir]
    for flag, value in flags.items():
        argv += [flag, str(value)]
    return argv + ["--seed", str(seed), "--threads", "1", "--no-progress", "--json", str(json_path)]


def result_path(name: str, epochs: int, seed: int) -> Path:
    return RESULTS / f"{name}-e{epochs}-s{seed}.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_one(name: str, data_dir: str, seed: int, epochs: int | None, force: bool) -> Path:
    epochs = int(CONFIGS[name]["--epochs"]) if epochs is None else epochs
    path = result_path(name, epochs, seed)
    if path.exists() and not force:
        print(f"skip {path.name} (exists)", flush=True)
        return path
    RESULTS.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".partial.json")
    argv = command(name, data_dir, seed, epochs, scratch)
    load_before = os.getloadavg()
    start = time.perf_counter()
    completed = subprocess.run(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed ({completed.returncode}):\n{completed.stderr}")
    result = json.loads(scratch.read_text())
    scratch.unlink()
    shown = ["svp-train"] + argv[3:]  # `python -m svp_kernels.train.cli` is the svp-train entry point
    result["sweep"] = {"config": name, "seed": seed, "epochs": epochs,
                       "command": shlex.join(shown).replace(shlex.quote(data_dir), "DATA_DIR"),
                       "process_seconds": elapsed, "cpu_model": cpu_model(),
                       "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                       "timing": "noisy: shared 2-core machine, indicative only", "stdout": completed.stdout.strip()}
    path.write_text(json.dumps(result, indent=2))
    curve = " ".join(f"{100 * a:.2f}" for a in result["test_accuracy_curve"])
    print(f"{name} e{epochs} s{seed}: {100 * result['test_accuracy']:.2f} % in {result['wall_seconds']:.0f} s "
          f"(load {load_before[0]:.1f}) | {curve}", flush=True)
    return path


def summary(names: list[str] | None) -> list[dict]:
    """One row per (config, epochs): per-seed accuracies, mean ± std, wall and peak memory."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for path in sorted(RESULTS.glob("*.json")):
        if path.name.endswith(".partial.json"):
            continue
        result = json.loads(path.read_text())
        sweep = result["sweep"]
        if names and sweep["config"] not in names:
            continue
        groups.setdefault((sweep["config"], sweep["epochs"]), []).append(result)
    rows = []
    for (name, epochs), results in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        results.sort(key=lambda result: result["sweep"]["seed"])
        accuracies = [100 * result["test_accuracy"] for result in results]
        rows.append({"config": name, "epochs": epochs, "seeds": [r["sweep"]["seed"] for r in results],
                     "accuracies": accuracies, "mean": statistics.mean(accuracies),
                     "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                     "wall_seconds": statistics.mean(r["wall_seconds"] for r in results),
                     "peak_mib": results[0]["peak_memory_bytes"] / 2**20})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run")
    run.add_argument("--data-dir", required=True)
    run.add_argument("--configs", required=True, help="comma-separated names of CONFIGS")
    run.add_argument("--seeds", default="0")
    run.add_argument("--epochs", type=int, help="override every config's epochs")
    run.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")
    show = sub.add_parser("summary")
    show.add_argument("--configs", help="comma-separated names (default: all)")
    sub.add_parser("list")
    args = parser.parse_args(argv)
    if args.action == "list":
        for name, flags in CONFIGS.items():
            print(f"{name:<14} " + " ".join(f"{flag} {value}" for flag, value in flags.items()))
        return 0
    names = args.configs.split(",") if args.configs else None
    if args.action == "summary":
        print(f"{'config':<16} {'ep':>3} {'mean':>6} {'std':>5}  {'per seed':<24} {'wall s':>7} {'peak MiB':>9}")
        for row in summary(names):
            seeds = " / ".join(f"{a:.2f}" for a in row["accuracies"])
            print(f"{row['config']:<16} {row['epochs']:>3} {row['mean']:>6.2f} {row['std']:>5.2f}  {seeds:<24} "
                  f"{row['wall_seconds']:>7.0f} {row['peak_mib']:>9.1f}")
        return 0
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; `list` shows them")
    for seed in (int(seed) for seed in args.seeds.split(",")):
        for name in names:
            run_one(name, args.data_dir, seed, args.epochs, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
