"""One LayerwiseTrainer.train_step, SVP (fused kernels) vs SVP (plain "reference" formulation) vs backprop.

    python bench/train_step.py                     # every shape, 2 threads, CSV + markdown table
    python bench/train_step.py --shapes mlp:1024x3:128 --repeats 40 --threads 1
    python bench/train_step.py --device cuda       # each step timed between two synchronisations
    python bench/train_step.py --device cuda --cuda-graph   # svp, bp and the floor each captured as a CUDA graph

Each shape builds the trainers on the same model initialisation and batch (Adam, p = 0.1, BatchNorm
MLPs), then times one step of each in turn, repeat after repeat, in this one process, so a load change
on a shared machine hits all alike. A fourth variant, "floor", is the SVP step without its loss
(LossFreeStep): the least any block-local step of this model and optimizer costs. Reported: median with
p20/p80 (ms) and the median of the per-repeat ratios to BP and to the floor. Rows (op=train_step) are
appended to bench/results/train_step-<device>.csv (or --csv), their "step" column "eager" or "graph".

--cuda-graph (CUDA): every variant's whole step is captured once and replayed (LayerwiseTrainer(cuda_graph=True)
for svp and bp, CapturedFloor for the floor), so the launch cost of the host is gone from all alike and
svp / floor is what the loss costs on the device. Variants: svp with the auto backend, svp-triton where
Triton runs and auto is not it, bp, floor (svp-reference is left out: its formulation draws on the host).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from svp_kernels import backends  # noqa: E402
from svp_kernels.train import LayerwiseTrainer, mlp, vgg11  # noqa: E402
from svp_kernels.train.graphs import StepGraphs  # noqa: E402

from local_loss import ForeignLoad, append_csv, device_slug, git_commit, percentiles  # noqa: E402  (bench/local_loss.py)

GRAPH_WARMUP = 3  # StepGraphs' two eager steps, then the capture: the timed steps are all replays
DEFAULT_SHAPES = "mlp:1024x3:128,mlp:1024x3:2048,mlp:1024x8:128,mlp:256x3:64,cnn:0.25:64"
CSV_COLUMNS = ["op", "model", "method", "backend", "batch", "width", "depth", "p", "dtype", "threads", "metric",
               "unit", "p20", "p50", "p80", "ratio_to_bp_p50", "foreign_cpus", "device", "torch", "commit",
               "timestamp", "step", "ratio_to_floor_p50"]


def parse_shape(text: str) -> dict:
    """"mlp:WIDTHxDEPTH:BATCH" (784 → width×depth → 10 on 1×28×28) or "cnn:MULTIPLIER:BATCH"
    (VGG-11 on 3×32×32)."""
    kind, size, batch = text.split(":")
    if kind == "mlp":
        width, depth = (int(part) for part in size.split("x"))
        return {"model": "mlp", "width": width, "depth": depth, "batch": int(batch), "input_shape": (1, 28, 28)}
    if kind == "cnn":
        return {"model": "cnn", "width": float(size), "depth": 8, "batch": int(batch), "input_shape": (3, 32, 32)}
    raise ValueError(f"shape {text!r}: expected mlp:WIDTHxDEPTH:BATCH or cnn:MULTIPLIER:BATCH")


def build(shape: dict, method: str, backend: str, device: str = "cpu", cuda_graph: bool = False) -> LayerwiseTrainer:
    torch.manual_seed(0)
    if shape["model"] == "mlp":
        model = mlp(shape["input_shape"], 10, width=shape["width"], depth=shape["depth"])
    else:
        model = vgg11(shape["input_shape"], 10, width_multiplier=shape["width"])
    return LayerwiseTrainer(model, method=method, p=0.1, backend=backend, device=device, cuda_graph=cuda_graph)


class LossFreeStep:
    """The SVP trainer's step without its loss: per block, the forward, the backward of a fixed gradient
    at its readout features (what a block-local loss hands back, here at no cost), the block's optimizer
    step. No projection, no epilogue, no input alignment: the floor under any block-local step of this model
    and optimizer, so (fused SVP − floor) is what the SVP loss costs and floor / BP bounds fused / BP."""

    def __init__(self, trainer: LayerwiseTrainer, inputs: torch.Tensor):
        self.trainer = trainer
        generator = torch.Generator().manual_seed(0)
        self.grads, h = [], inputs
        with torch.no_grad():
            for block, readout in zip(trainer.model.blocks, trainer.readouts):
                h = block(h)
                self.grads.append(1e-3 * torch.randn(readout(h).shape, generator=generator).to(h.device))

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        trainer = self.trainer
        trainer.model.train()
        h = inputs
        for block, readout, optimizer, grad in zip(trainer.model.blocks, trainer.readouts, trainer.optimizers,
                                                   self.grads):
            out = block(h.detach())
            readout(out).backward(grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            h = out.detach()


class CapturedFloor:
    """The loss-free floor captured as a CUDA graph the way a cuda_graph trainer captures its step (StepGraphs:
    eager warm-up steps on a side stream, then one capture, then replays); the learning rate is written to the
    device before each step by the trainer's own step preamble, as for the captured svp and bp steps."""

    def __init__(self, trainer: LayerwiseTrainer, inputs: torch.Tensor, runner=None):
        self.trainer = trainer
        self.floor = LossFreeStep(trainer, inputs)
        self.graphs = StepGraphs(self.floor.train_step, trainer.device, runner=runner)  # runner: tests' stand-in

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.trainer._begin_step(self.trainer.step)
        self.graphs(inputs, targets)
        self.trainer.step += 1


def make_trainers(shape: dict, fused_backend: str, inputs: torch.Tensor, device: str, cuda_graph: bool) -> dict:
    """{variant: object with train_step(inputs, targets)}: the eager set (svp-fused, svp-reference, bp, floor) or
    the captured one (module docstring)."""
    if not cuda_graph:
        return {f"svp-{fused_backend}": build(shape, "svp", fused_backend, device),
                "svp-reference": build(shape, "svp", "reference", device),
                "bp": build(shape, "bp", "auto", device),
                "floor": LossFreeStep(build(shape, "svp", fused_backend, device), inputs)}
    trainers = {f"svp-{fused_backend}": build(shape, "svp", fused_backend, device, cuda_graph=True)}
    if fused_backend != "triton" and backends.is_available("triton"):
        trainers["svp-triton"] = build(shape, "svp", "triton", device, cuda_graph=True)
    trainers["bp"] = build(shape, "bp", "auto", device, cuda_graph=True)
    trainers["floor"] = CapturedFloor(build(shape, "svp", fused_backend, device, cuda_graph=True), inputs)
    return trainers


def time_shape(shape: dict, fused_backend: str, warmup: int, repeats: int, device: str = "cpu",
               cuda_graph: bool = False) -> tuple[dict, float]:
    """{variant: [ms per step]} for the variants of make_trainers, interleaved; and the foreign load."""
    inputs = torch.randn(shape["batch"], *shape["input_shape"]).to(device)
    targets = torch.randint(0, 10, (shape["batch"],)).to(device)
    trainers = make_trainers(shape, fused_backend, inputs, device, cuda_graph)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    samples = {name: [] for name in trainers}
    for _ in range(warmup):
        for trainer in trainers.values():
            trainer.train_step(inputs, targets)
    with ForeignLoad() as load:
        for _ in range(repeats):
            for name, trainer in trainers.items():
                sync()
                start = time.perf_counter()
                trainer.train_step(inputs, targets)
                sync()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return samples, load.cpus


def median_ratio(values: list, baseline: list) -> float:
    """The median of the per-repeat ratios values[i] / baseline[i] (the repeats are interleaved)."""
    return statistics.median(v / b for v, b in zip(values, baseline))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated (default {DEFAULT_SHAPES})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--csv", help="output CSV (default bench/results/train_step-<device>.csv)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture every variant's step as a CUDA graph (module docstring); the warm-up is then "
                             f"at least {GRAPH_WARMUP} steps (eager steps, the capture)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph needs --device cuda (a captured CUDA graph replays GPU work)")
    warmup = max(args.warmup, GRAPH_WARMUP) if args.cuda_graph else args.warmup
    fused = backends.resolve("auto", torch.device(args.device), torch.float32).NAME
    device = device_slug(args.device, args.threads)
    commit, stamp = git_commit(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    path = Path(args.csv) if args.csv else REPO / "bench" / "results" / f"train_step-{device}.csv"
    step_kind = "graph" if args.cuda_graph else "eager"
    fused_name = f"svp-{fused}"
    for number, text in enumerate(args.shapes.split(",")):
        shape = parse_shape(text)
        samples, foreign = time_shape(shape, fused, warmup, args.repeats, args.device, args.cuda_graph)
        ratios = {name: median_ratio(values, samples["bp"]) for name, values in samples.items()}
        over_floor = {name: median_ratio(values, samples["floor"]) for name, values in samples.items()}
        cells = {name: percentiles(values) for name, values in samples.items()}
        if number == 0:
            print("| model | batch | step | " + " | ".join(f"{name} ms (p20–p80)" for name in cells)
                  + " | fused / bp | fused / floor | floor / bp | fused / reference | other CPUs busy |")
            print("|---" * (len(cells) + 8) + "|")
        label = (f"MLP 784→{shape['width']}×{shape['depth']}→10" if shape["model"] == "mlp"
                 else f"VGG-11 ×{shape['width']} on 3×32×32")
        reference = (f"{median_ratio(samples[fused_name], samples['svp-reference']):.2f}×"
                     if "svp-reference" in samples else "")
        print(f"| {label} | {shape['batch']} | {step_kind} | " + " | ".join(
            f"{p50:.3g} ({p20:.3g}–{p80:.3g})" for p20, p50, p80 in cells.values())
            + f" | {ratios[fused_name]:.2f}× | {over_floor[fused_name]:.2f}× | {ratios['floor']:.2f}× | "
              f"{reference} | {foreign:.2f} |", flush=True)
        rows = []
        for name, (p20, p50, p80) in cells.items():
            method, _, backend = name.partition("-")
            backend = backend or ("none" if method == "floor" else "autograd")
            rows.append({"op": "train_step", "model": shape["model"], "method": method,
                         "backend": backend, "batch": shape["batch"], "width": shape["width"],
                         "depth": shape["depth"], "p": 0.1, "dtype": "float32", "threads": args.threads,
                         "metric": "time", "unit": "ms", "p20": f"{p20:.4g}", "p50": f"{p50:.4g}",
                         "p80": f"{p80:.4g}", "ratio_to_bp_p50": f"{ratios[name]:.4g}",
                         "foreign_cpus": f"{foreign:.2f}", "device": device, "torch": torch.__version__,
                         "commit": commit, "timestamp": stamp, "step": step_kind,
                         "ratio_to_floor_p50": f"{over_floor[name]:.4g}"})
        if not args.no_csv:  # shape by shape, so that a run stopped at a time limit keeps what it measured
            append_csv(path, rows, CSV_COLUMNS)
    if not args.no_csv:
        print(f"rows appended to {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
