"""Time to accuracy, SVP against backprop, each run the way a user runs it, on one machine, in one invocation.

    python bench/time_to_accuracy.py --mnist ../shared/data/mnist                      # K = 2, 3 repetitions
    python bench/time_to_accuracy.py --mnist DIR --cifar10 /tmp/cifar10-jpeg --processes 2 --repetitions 3
    python bench/time_to_accuracy.py --synthetic --repetitions 1                      # the tooling, in a minute
    python bench/time_to_accuracy.py --summarise bench/results/time_to_accuracy-cifar10-….json --threshold 57
                                                         # an earlier run's summary again, at another threshold

Configurations (--configs; the default is every one for K = --processes):
    bp-1           svp-train --method bp, one process on all cores (--threads = the cores this process may use)
    bp-ddp-K       --method bp --data-parallel K: DistributedDataParallel over K processes
    svp-1          --method svp, one process on all cores
    svp-stages-K   --stages K: a K-stage pipeline (each stage pinned to its own core when there are K cores)
    svp-dp-K       --data-parallel K
    svp-grid-SxR   --stages S --data-parallel R (default: S × R = K with S, R ≥ 2, the most stages; none for a
                   prime K)
Every run is a fresh `python -m svp_kernels.train.cli` process with the dataset's recipe, --eval-every N and
--json; each repetition runs every configuration once, in order (A B C … A B C …), so a drift of the machine's
load hits them alike. From each run's JSON:

- time to threshold: the training clock (evaluations excluded: svp_kernels/train/evaluations.py) at the first
  evaluation whose test accuracy reaches the threshold — by default the median final accuracy of the first BP
  configuration minus 0.3 points (--threshold sets it); also the wall clock at that evaluation (evaluations
  included) and the run's start-up (process launch, data loading, spawning: the command's time minus the
  run's wall time);
- samples/s: training examples over the training clock; the final test accuracy;
- bytes per step: the payloads every process handed to torch.distributed per training step, summed over the
  processes (counted: svp_kernels/train/distributed/traffic.py), the operating system's bytes written per step
  (sockets; evaluations included), and the model's prediction of the payloads (bench/comm_model.py);
- foreign CPUs: the CPUs other processes used meanwhile (a quiet machine reads ≈ 0).

The summary gives the medians over the repetitions and the best SVP configuration's median time over the best BP
configuration's. Rows (every run, then the medians) are appended to bench/results/time_to_accuracy-<device>.csv;
everything, the runs' JSON included, goes to bench/results/time_to_accuracy-<dataset>-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from comm_model import (ddp_step_bytes, grid_step_bytes, mlp_block_parameters, pipeline_step_bytes,
                        svp_data_parallel_step_bytes)
from local_loss import ForeignLoad, RESULTS, append_csv, cpu_model, device_slug, git_commit

REPO = Path(__file__).resolve().parent.parent
# svp-train flags of each dataset (its recipe does the rest), the input's features and the classes
DATASETS = {
    "mnist": (["--dataset", "mnist"], 784, 10),
    "cifar10": (["--dataset", "cifar10", "--model", "mlp", "--width", "1024", "--depth", "3", "--epochs", "15"],
                3072, 10),
    "synthetic": (["--dataset", "synthetic", "--width", "32", "--depth", "3", "--epochs", "2"], 64, 10),
}
CONFIG_PATTERN = re.compile(r"^(bp|svp)-(?:(1)|ddp-(\d+)|stages-(\d+)|dp-(\d+)|grid-(\d+)x(\d+))$")
CSV_COLUMNS = ["dataset", "config", "repetition", "method", "processes", "threads_per_process", "epochs",
               "eval_every", "threshold", "time_to_threshold_s", "wall_to_threshold_s", "step_to_threshold",
               "train_seconds", "wall_seconds", "startup_seconds", "samples_per_second", "final_accuracy",
               "bytes_per_step", "bytes_per_step_max_process", "predicted_bytes_per_step", "os_bytes_per_step",
               "stage_split", "foreign_cpus", "cpu_model", "cores", "device", "torch", "commit", "timestamp"]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_configs(processes: int) -> list[str]:
    names = ["bp-1", f"bp-ddp-{processes}", "svp-1", f"svp-stages-{processes}", f"svp-dp-{processes}"]
    grids = [(s, processes // s) for s in range(processes // 2, 1, -1) if processes % s == 0 and processes // s >= 2]
    return names + [f"svp-grid-{s}x{r}" for s, r in grids[:1]]


def config_flags(name: str, threads: int | None = None) -> tuple[str, list[str], int]:
    """(method, svp-train flags, processes) of a configuration name (module docstring); threads: of the
    one-process configurations (default: every core)."""
    match = CONFIG_PATTERN.match(name)
    if match is None:
        raise ValueError(f"configuration {name!r}: expected bp-1, bp-ddp-K, svp-1, svp-stages-K, svp-dp-K or "
                         "svp-grid-SxR")
    method, one, ddp, stages, data_parallel, grid_stages, grid_replicas = match.groups()
    if one:
        return method, ["--method", method, "--threads", str(threads or cores())], 1
    if ddp and method == "bp":
        return method, ["--method", "bp", "--data-parallel", ddp], int(ddp)
    if method == "svp" and stages:
        return method, ["--method", "svp", "--stages", stages], int(stages)
    if method == "svp" and data_parallel:
        return method, ["--method", "svp", "--data-parallel", data_parallel], int(data_parallel)
    if method == "svp" and grid_stages:
        return method, ["--method", "svp", "--stages", grid_stages, "--data-parallel", grid_replicas], \
            int(grid_stages) * int(grid_replicas)
    raise ValueError(f"configuration {name!r}: bp runs in one process or with ddp; svp has no ddp")


def run_once(command: list[str]) -> tuple[dict, float, float]:
    """Run one svp-train command; returns (its JSON result, the command's seconds, foreign CPUs meanwhile)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.json"
        with ForeignLoad(children=True) as load:
            start = time.perf_counter()
            done = subprocess.run(command + ["--json", str(path)], cwd=REPO, capture_output=True, text=True)
            seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
        return json.loads(path.read_text()), seconds, load.cpus


def predicted_bytes(method: str, name: str, result: dict, inputs: int, classes: int) -> float:
    """comm_model's payload bytes per step summed over the processes, for the run's mean batch (its training
    examples over its steps: the last batch of an epoch may be smaller)."""
    config = result["config"]
    width, depth, processes = config["width"], config["depth"], result.get("world_size", 1)
    if processes == 1:
        return 0.0
    if config["model"] != "mlp":
        return math.nan
    parameters = mlp_block_parameters(inputs, width, depth, classes, norm=config["norm"] != "none")
    rows = result["samples"] / result["steps"]
    if method == "bp":
        return processes * ddp_step_bytes(parameters, processes)["payload"]
    if name.startswith("svp-dp"):
        return processes * svp_data_parallel_step_bytes(parameters, rows, classes, processes)["payload"]
    if result["replicas"] == 1:
        return (processes - 1) * pipeline_step_bytes(rows, width, classes)["payload"]
    stages = grid_step_bytes(parameters, result["stage_split"], rows, width, classes, result["replicas"])
    return result["replicas"] * sum(stage["payload"] for stage in stages)


def run_row(dataset: str, name: str, repetition: int, result: dict, command_seconds: float, foreign: float,
            common: dict) -> dict:
    """The CSV row of one run (the threshold columns are filled in by fill_threshold)."""
    method, _, processes = config_flags(name)
    _, inputs, classes = DATASETS[dataset]
    steps = max(result["steps"], 1)
    sent = result.get("bytes_sent_per_step", [0.0])
    written = result.get("os_bytes_written") or [None]
    return {"dataset": dataset, "config": name, "repetition": repetition, "method": method, "processes": processes,
            "threads_per_process": result.get("threads_per_process", result.get("threads")),
            "epochs": result["config"]["epochs"], "eval_every": result["eval_every"],
            "train_seconds": result["train_seconds"], "wall_seconds": result["wall_seconds"],
            "startup_seconds": command_seconds - result["wall_seconds"],
            "samples_per_second": result["samples"] / result["train_seconds"],
            "final_accuracy": result["test_accuracy"], "bytes_per_step": sum(sent),
            "bytes_per_step_max_process": max(sent),
            "predicted_bytes_per_step": predicted_bytes(method, name, result, inputs, classes),
            "os_bytes_per_step": None if None in written else sum(written) / steps,
            "stage_split": "+".join(map(str, result.get("stage_split") or [])), "foreign_cpus": foreign,
            **common}


def fill_threshold(row: dict, evaluations: list[dict], threshold: float) -> None:
    """The time, wall time and step at which the run's test accuracy first reached threshold (None: never)."""
    reached = next((record for record in evaluations if record["test_accuracy"] >= threshold), None)
    row["threshold"] = threshold
    row["time_to_threshold_s"] = reached and reached["train_seconds"]
    row["wall_to_threshold_s"] = reached and reached["wall_seconds"]
    row["step_to_threshold"] = reached and reached["step"]


def median_of(rows: list[dict], key: str):
    values = [row[key] for row in rows if row[key] is not None and not (isinstance(row[key], float)
                                                                          and math.isnan(row[key]))]
    if len(values) < len(rows):  # a run that never reached the threshold: the median is unknown
        return None
    return statistics.median(values)


def summarise(dataset: str, names: list[str], rows: list[dict], threshold: float) -> tuple[list[dict], dict]:
    """One median row per configuration, and the best SVP over best BP ratio of median time to threshold."""
    medians = []
    for name in names:
        own = [row for row in rows if row["config"] == name]
        median = dict(own[0], repetition="median")
        for key in ("time_to_threshold_s", "wall_to_threshold_s", "step_to_threshold", "train_seconds",
                    "wall_seconds", "startup_seconds", "samples_per_second", "final_accuracy", "bytes_per_step",
                    "bytes_per_step_max_process", "predicted_bytes_per_step", "os_bytes_per_step", "foreign_cpus"):
            median[key] = median_of(own, key)
        medians.append(median)

    def best(method: str):
        timed = [row for row in medians if row["method"] == method and row["time_to_threshold_s"] is not None]
        return min(timed, key=lambda row: row["time_to_threshold_s"], default=None)

    svp, bp = best("svp"), best("bp")
    ratio = svp["time_to_threshold_s"] / bp["time_to_threshold_s"] if svp and bp else None
    return medians, {"dataset": dataset, "threshold": threshold, "best_svp": svp and svp["config"],
                     "best_bp": bp and bp["config"], "best_svp_over_best_bp": ratio}


def print_summary(medians: list[dict], verdict: dict, repetitions: int) -> None:
    def number(value, digits=1, scale=1.0):
        return "—" if value is None else f"{value * scale:.{digits}f}"

    print(f"\n{verdict['dataset']}: threshold {100 * verdict['threshold']:.2f} %, medians of {repetitions} "
          "repetition(s)")
    print("| config | time to threshold s | wall to threshold s | step | samples/s | final % | bytes/step counted "
          "| predicted | OS-written | start-up s | foreign CPUs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in medians:
        print(f"| {row['config']} | {number(row['time_to_threshold_s'])} | {number(row['wall_to_threshold_s'])} | "
              f"{number(row['step_to_threshold'], 0)} | {number(row['samples_per_second'], 0)} | "
              f"{number(row['final_accuracy'], 2, 100)} | {number(row['bytes_per_step'], 0)} | "
              f"{number(row['predicted_bytes_per_step'], 0)} | {number(row['os_bytes_per_step'], 0)} | "
              f"{number(row['startup_seconds'])} | {number(row['foreign_cpus'], 2)} |")
    ratio = verdict["best_svp_over_best_bp"]
    print(f"best SVP ({verdict['best_svp']}) / best BP ({verdict['best_bp']}) time to threshold: "
          f"{'—' if ratio is None else f'{ratio:.3f}×'} (target ≤ 0.85×)")


def measure(dataset: str, data_dir: str | None, names: list[str], args) -> dict:
    """Every repetition of every configuration on one dataset; returns everything written to the JSON file."""
    flags, _, _ = DATASETS[dataset]
    base = [sys.executable, "-m", "svp_kernels.train.cli", *flags, "--seed", str(args.seed), "--eval-every",
            str(args.eval_every), "--no-progress"]
    if data_dir is not None:
        base += ["--data-dir", data_dir]
    base += args.extra.split() if args.extra else []
    common = {"cpu_model": cpu_model(), "cores": cores(), "device": device_slug("cpu", cores()),
              "torch": torch.__version__, "commit": git_commit(),
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    runs, rows = [], []
    for repetition in range(args.repetitions):
        for name in names:
            method, config_args, _ = config_flags(name, args.threads)
            own = getattr(args, f"{method}_extra")
            config_args = config_args + (own.split() if own else [])
            result, seconds, foreign = run_once(base + config_args)
            rows.append(run_row(dataset, name, repetition, result, seconds, foreign, common))
            runs.append({"config": name, "repetition": repetition, "command": base + config_args, "result": result})
            print(f"{dataset} repetition {repetition} {name}: final {100 * result['test_accuracy']:.2f} %, "
                  f"train {result['train_seconds']:.1f} s, wall {result['wall_seconds']:.1f} s, command "
                  f"{seconds:.1f} s, foreign CPUs {foreign:.2f}", flush=True)
    medians, verdict = score(dataset, names, rows, runs, args.repetitions, args.threshold, args.drop)
    return {"rows": rows, "medians": medians, "verdict": verdict, "runs": runs, "machine": common,
            "repetitions": args.repetitions, "eval_every": args.eval_every}


def combine(reports: list[dict]) -> dict:
    """Reports of separate invocations on one dataset as one, for score(): their rows and runs in order."""
    datasets = {report["verdict"]["dataset"] for report in reports}
    if len(datasets) != 1:
        raise SystemExit(f"--summarise: the reports measure different datasets {sorted(datasets)}")
    return {"rows": [row for report in reports for row in report["rows"]],
            "runs": [run for report in reports for run in report["runs"]],
            "repetitions": sum(report["repetitions"] for report in reports), "verdict": reports[0]["verdict"]}


def score(dataset: str, names: list[str], rows: list[dict], runs: list[dict], repetitions: int,
          threshold_percent: float | None, drop: float) -> tuple[list[dict], dict]:
    """Each run's time to the threshold (in %; None: the first BP configuration's median final − drop) from the
    evaluations it recorded, then the medians and the verdict, printed; returns them."""
    threshold = threshold_percent / 100 if threshold_percent is not None else reference_threshold(rows, names, drop)
    for row, run in zip(rows, runs):
        fill_threshold(row, run["result"]["evaluations"], threshold)
    medians, verdict = summarise(dataset, names, rows, threshold)
    print_summary(medians, verdict, repetitions)
    return medians, verdict


def reference_threshold(rows: list[dict], names: list[str], drop: float) -> float:
    """The first BP configuration's median final accuracy minus `drop` points."""
    reference = next((name for name in names if name.startswith("bp-")), None)
    if reference is None:
        raise SystemExit("no BP configuration to take the threshold from: pass --threshold")
    return statistics.median(row["final_accuracy"] for row in rows if row["config"] == reference) - drop / 100


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", metavar="DIR", help="MNIST IDX files: measure the MNIST recipe")
    parser.add_argument("--cifar10", metavar="DIR", help="CIFAR-10 python batches or image folder: measure the "
                        "MLP 3072→1024×3→10, 15 epochs")
    parser.add_argument("--synthetic", action="store_true", help="measure tiny synthetic data (the tooling's test)")
    parser.add_argument("--processes", type=int, default=2, help="K of the multi-process configurations")
    parser.add_argument("--configs", help="comma-separated configuration names (default: all for K)")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--threshold", type=float, help="test accuracy in %% (default: BP's final − --drop)")
    parser.add_argument("--drop", type=float, default=0.3, help="points below BP's final accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="threads of the one-process runs (default: every core)")
    parser.add_argument("--extra", help="more svp-train flags for every run, e.g. '--epochs 3'")
    parser.add_argument("--svp-extra", help="more flags for the SVP runs only (a recipe of SVP's own, e.g. "
                        "'--alignment-weight 0.5'); the command of every run is in the JSON")
    parser.add_argument("--bp-extra", help="more flags for the BP runs only")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the CSV and JSON files")
    parser.add_argument("--summarise", metavar="JSON", type=Path, nargs="+", help="print the summary of earlier "
                        "runs again from their JSON (several: one dataset's repetitions pooled), at --threshold (or "
                        "BP's final − --drop); runs and writes nothing")
    args = parser.parse_args(argv)
    if args.summarise:
        return args, [], []
    datasets = [(name, folder) for name, folder in (("mnist", args.mnist), ("cifar10", args.cifar10)) if folder]
    if args.synthetic:
        datasets.append(("synthetic", None))
    if not datasets:
        parser.error("name at least one of --mnist DIR, --cifar10 DIR, --synthetic")
    names = args.configs.split(",") if args.configs else default_configs(args.processes)
    for name in names:
        try:
            config_flags(name)
        except ValueError as error:
            parser.error(str(error))
    return args, datasets, names


def main(argv=None) -> int:
    args, datasets, names = parse_args(argv)
    if args.summarise:
        report = combine([json.loads(path.read_text()) for path in args.summarise])
        names = list(dict.fromkeys(row["config"] for row in report["rows"]))
        score(report["verdict"]["dataset"], names, report["rows"], report["runs"], report["repetitions"],
              args.threshold, args.drop)
        return 0
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for dataset, folder in datasets:
        report = measure(dataset, folder, names, args)
        args.results.mkdir(parents=True, exist_ok=True)
        append_csv(args.results / f"time_to_accuracy-{report['machine']['device']}.csv",
                   report["rows"] + report["medians"], CSV_COLUMNS)
        path = args.results / f"time_to_accuracy-{dataset}-{stamp}.json"
        path.write_text(json.dumps(report, indent=1))
        print(f"rows appended to {args.results / ('time_to_accuracy-' + report['machine']['device'] + '.csv')}; "
              f"everything in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
