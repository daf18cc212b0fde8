"""Pipeline-parallel SVP training throughput: samples/s with K = 1 and K = 2 stages, one thread per process.

    python bench/train_pipeline.py                      # 784→1024×8→10 MLP, batch 128, 3 interleaved rounds
    python bench/train_pipeline.py --rounds 5 --batches 24

Each round trains the same model on the same random MNIST-shaped data (1 epoch of --batches batches, then
one evaluation batch) once per K, alternating K, through svp_kernels.train.distributed.launch (K spawned
processes; K = 1 is the same code with one process and no messages). samples/s is the run's own figure:
training samples over the wall time from the start barrier to the last stage's end (process start-up
excluded; the pipeline's fill and drain and the evaluation batch included). The speedup is K = 2 over
K = 1 within each round. On a machine shared with other work the wall-clock speedup measures the CPU
share the processes got; the cpu-time speedup (K = 1's CPU seconds over the busiest stage's) is what
K processes on K free cores would gain, before the fill and drain. --control adds, per round, two
independent K = 1 runs at once: their summed samples/s over one K = 1 run alone is the CPU the machine
gives a second process, the ceiling of any 2-stage speedup there. --pin-cores both adds, per round, a
K-stage run with its stages left to the scheduler (svp-train pins them by default). Rows are appended to
bench/results/train_pipeline-<device>.csv (the columns of bench/local_loss.py) with p20/p50/p80 over the
rounds.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import threading
from pathlib import Path

import torch

from svp_kernels.train.data import synthetic
from svp_kernels.train.distributed import Plan, launch
from svp_kernels.train.run import TrainConfig

from local_loss import RESULTS, append_csv, device_slug, git_commit, percentiles, triton_version

CSV_COLUMNS = ["op", "backend", "B", "D", "C", "p", "dtype", "metric", "unit", "p20", "p50", "p80", "device", "torch",
               "triton", "commit", "timestamp"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved K = 1, K = 2 pairs")
    parser.add_argument("--batches", type=int, default=16, help="training batches per run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8, help="hidden blocks")
    parser.add_argument("--stages", default="1,2", help="the K to compare, the first being the baseline")
    parser.add_argument("--control", action="store_true",
                        help="also time two independent 1-stage runs at once (the machine's second-core ceiling)")
    parser.add_argument("--pin-cores", choices=("on", "off", "both"), default="on",
                        help="stages pinned to their own cores (svp-train's default), not pinned, or both "
                        "interleaved (rows of the unpinned runs end in _unpinned)")
    return parser.parse_args(argv)


def concurrent_throughput(config: TrainConfig, dataset, runs: int) -> float:
    """Summed samples/s of `runs` independent 1-stage runs started at once."""
    results = [None] * runs

    def run(index: int) -> None:
        results[index] = launch(Plan("pipeline", 1, timeout=300.0), config, dataset, threads=1)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(result["samples_per_second"] for result in results)


def main(argv=None) -> int:
    args = parse_args(argv)
    stage_counts = [int(k) for k in args.stages.split(",")]
    dataset = synthetic(num_train=args.batch_size * args.batches, num_test=args.batch_size, input_shape=(1, 28, 28))
    config = TrainConfig(model="mlp", dataset="synthetic", epochs=1, batch_size=args.batch_size, width=args.width,
                         depth=args.depth, p=0.1, backend="cpu", device="cpu")
    pins = {"on": [True], "off": [False], "both": [True, False]}[args.pin_cores]
    # (K, pinned, suffix of its metrics) of every run in a round; pinning changes nothing for one process
    variants = [(k, pin, "_unpinned" if not pin and args.pin_cores == "both" else "")
                for k in stage_counts for pin in (pins if k > 1 else pins[:1])]
    throughput = {(k, suffix): [] for k, _, suffix in variants}
    critical_cpu = {(k, suffix): [] for k, _, suffix in variants}
    splits, concurrent = {}, []
    for round_index in range(args.rounds):
        if args.control:
            concurrent.append(concurrent_throughput(config, dataset, 2))
            print(f"round {round_index}: two independent K = 1 runs at once {concurrent[-1]:8.1f} samples/s in all",
                  flush=True)
        for k, pin, suffix in variants:
            label = k, suffix
            result = launch(Plan("pipeline", k, timeout=300.0, pin_cores=pin), config, dataset, threads=1)
            throughput[label].append(result["samples_per_second"])
            critical_cpu[label].append(max(result["cpu_seconds"]))
            splits[label] = result["stage_split"]
            print(f"round {round_index}: K = {k}{suffix.replace('_', ' ')} "
                  f"{result['samples_per_second']:8.1f} samples/s, split {result['stage_split']}, cores "
                  f"{result['cores']}, busy/idle/cpu s per stage " + ", ".join(
                      f"{b:.2f}/{i:.2f}/{c:.2f}" for b, i, c in zip(result["busy_seconds"], result["idle_seconds"],
                                                                     result["cpu_seconds"])), flush=True)
    base_k = variants[0][0]
    baseline = base_k, variants[0][2]
    device = device_slug("cpu", 1)
    common = {"op": "train_pipeline", "backend": "cpu", "B": args.batch_size, "D": args.width, "C": 10, "p": 0.1,
              "dtype": "float32", "device": device, "torch": torch.__version__, "triton": triton_version(),
              "commit": git_commit(), "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds")}
    rows = []
    for k, _, suffix in variants:
        label = k, suffix
        rows.append({**common, "metric": f"samples_per_second_{k}_stages{suffix}", "unit": "samples/s",
                     **dict(zip(("p20", "p50", "p80"), percentiles(throughput[label])))})
        if label != baseline:
            ratios = [a / b for a, b in zip(throughput[label], throughput[baseline])]
            rows.append({**common, "metric": f"speedup_{k}_over_{base_k}_stages{suffix}", "unit": "x",
                         **dict(zip(("p20", "p50", "p80"), percentiles(ratios)))})
            cpu_ratios = [b / a for a, b in zip(critical_cpu[label], critical_cpu[baseline])]
            rows.append({**common, "metric": f"cpu_time_speedup_{k}_over_{base_k}_stages{suffix}", "unit": "x",
                         **dict(zip(("p20", "p50", "p80"), percentiles(cpu_ratios)))})
            print(f"K = {k}{suffix.replace('_', ' ')} over K = {base_k}: median wall-clock speedup "
                  f"{percentiles(ratios)[1]:.2f}x "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}), cpu-time speedup "
                  f"{percentiles(cpu_ratios)[1]:.2f}x (rounds: {', '.join(f'{r:.2f}' for r in cpu_ratios)}); "
                  f"split {splits[label]}")
    if concurrent:
        ratios = [both / alone for both, alone in zip(concurrent, throughput[baseline])]
        rows.append({**common, "metric": "two_concurrent_1_stage_runs_over_one", "unit": "x",
                     **dict(zip(("p20", "p50", "p80"), percentiles(ratios)))})
        print(f"two independent K = 1 runs at once over one alone: median {percentiles(ratios)[1]:.2f}x "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    path = RESULTS / f"train_pipeline-{device}.csv"
    append_csv(path, rows, CSV_COLUMNS)
    print(f"appended {len(rows)} rows to {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
