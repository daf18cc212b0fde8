"""Bytes per training step per link: data-parallel backprop (DDP) against SVP's pipeline, data parallel and grid.

    python bench/comm_model.py                     # the table of bench/NOTES.md: MLP widths × depths × links
    python bench/comm_model.py --batch-size 1024 --processes 8

The model, for an MLP in → W × L → C (BatchNorm, float32, the package's mlp: block 0 = Linear(in, W) + BN +
ReLU, L − 1 hidden blocks Linear(W, W) + BN + ReLU, the head Linear(W, C)), a global batch of B rows and K
processes; every count is what one process sends per step:

- BP with DDP: one all_reduce of every gradient, P parameters: a ring sends 2(K − 1)/K · 4P bytes from each
  process (reduce-scatter, then all-gather). gloo's payload (what traffic.py counts) is 4P.
- SVP data parallel: the same all_reduce (block by block, P in all), plus per block (and for v_0) an
  all_gather of this process's ⌈B/K⌉ × C projection: (K − 1) · ⌈B/K⌉ · C · 4 bytes sent (the payload is
  ⌈B/K⌉ · C · 4).
- SVP pipeline (K stages): per link, one message per step: a 24-byte header, h (B × W, float32), v (B × C),
  targets (B, int64), each field 8-byte aligned — independent of P: 4B(W + C) + 8B + 24.
- SVP grid (S stages × R replicas): per stage, the data-parallel terms over its R replicas with its own
  parameters P_s, plus per link the message of a replica's rows of h with the whole batch's v and targets.

Time on a link of bandwidth β: bytes / β (+ a latency α per message, ≈ 10–30 µs, that matters only for small
models). What hides it: DDP overlaps its buckets with the backward pass (about 2/3 of the step's compute on
B/K rows); a pipeline stage receives batch t + 1 while it computes batch t (the whole stage time).
"""

from __future__ import annotations

import argparse
import math

FLOAT = 4
LINKS = {"NVLink (450 GB/s)": 450e9, "PCIe 4 ×16 (25 GB/s)": 25e9, "100 Gb/s Ethernet": 12.5e9,
         "10 Gb/s Ethernet": 1.25e9}


def mlp_block_parameters(inputs: int, width: int, depth: int, classes: int, norm: bool = True) -> list[int]:
    """Parameters of each block of the package's mlp (svp_kernels/train/models.py): weights, biases and the
    normalisation's scale and shift."""
    hidden = [inputs * width + width] + [width * width + width] * (depth - 1)
    return [p + (2 * width if norm else 0) for p in hidden] + [width * classes + classes]


def aligned(nbytes: int) -> int:
    return -(-nbytes // 8) * 8


def pipeline_message_bytes(rows: int, h_features: int, classes: int, h_rows: int | None = None) -> int:
    """One TRAIN message: header (3 int64), h (h_rows × h_features), v (rows × classes), targets (rows, int64)."""
    h_rows = rows if h_rows is None else h_rows
    return 24 + aligned(h_rows * h_features * FLOAT) + aligned(rows * classes * FLOAT) + rows * 8


def ring_all_reduce_bytes(nbytes: int, processes: int) -> float:
    """What each of K processes sends in a ring all_reduce of nbytes: 2 (K − 1)/K · nbytes."""
    return 2 * (processes - 1) / processes * nbytes


def ddp_step_bytes(block_parameters: list[int], processes: int) -> dict:
    """BP with DDP: {"payload": bytes handed to all_reduce per process, "wire": bytes sent per process (ring)}."""
    payload = FLOAT * sum(block_parameters)
    return {"payload": payload, "wire": ring_all_reduce_bytes(payload, processes)}


def svp_data_parallel_step_bytes(block_parameters: list[int], batch: int, classes: int, processes: int) -> dict:
    """SVP data parallel: the all_reduce of every block's gradients and len(blocks) + 1 all_gathers of v."""
    share = math.ceil(batch / processes)
    gathers = (len(block_parameters) + 1) * share * classes * FLOAT
    reduced = FLOAT * sum(block_parameters)
    return {"payload": reduced + gathers,
            "wire": ring_all_reduce_bytes(reduced, processes) + (processes - 1) * gathers}


def pipeline_step_bytes(batch: int, width: int, classes: int) -> dict:
    """SVP pipeline: per link (from each stage but the last), one message per step."""
    message = pipeline_message_bytes(batch, width, classes)
    return {"payload": message, "wire": message}


def grid_step_bytes(block_parameters: list[int], split: list[int], batch: int, width: int, classes: int,
                    replicas: int) -> list[dict]:
    """SVP grid: per stage, its replicas' all_reduce and all_gathers and (but the last) its message."""
    rows = math.ceil(batch / replicas)
    stages, start = [], 0
    for index, blocks in enumerate(split):
        parameters = block_parameters[start:start + blocks]
        gathers = (blocks + (index == 0)) * rows * classes * FLOAT
        reduced = FLOAT * sum(parameters)
        message = pipeline_message_bytes(batch, width, classes, h_rows=rows) if index < len(split) - 1 else 0
        stages.append({"payload": reduced + gathers + message,
                       "wire": ring_all_reduce_bytes(reduced, replicas) + (replicas - 1) * gathers + message})
        start += blocks
    return stages


def table(batch: int, processes: int, widths, depths, inputs: int = 784, classes: int = 10) -> str:
    """The markdown table of bench/NOTES.md: per width and depth, megabytes per step sent by one process (DDP)
    and over one link (pipeline), and milliseconds per step on each link."""
    lines = ["| W × L | P (M) | DDP MB/step/process | pipeline MB/step/link | DDP / pipeline | "
             + " | ".join(f"{name}: DDP / pipeline ms" for name in LINKS) + " |",
             "|---|---|---|---|---|" + "---|" * len(LINKS)]
    for width in widths:
        for depth in depths:
            parameters = mlp_block_parameters(inputs, width, depth, classes)
            ddp = ddp_step_bytes(parameters, processes)["wire"]
            pipe = pipeline_step_bytes(batch, width, classes)["wire"]
            times = " | ".join(f"{1e3 * ddp / speed:.3g} / {1e3 * pipe / speed:.3g}" for speed in LINKS.values())
            lines.append(f"| {width} × {depth} | {sum(parameters) / 1e6:.1f} | {ddp / 1e6:.3g} | {pipe / 1e6:.3g} | "
                         f"{ddp / pipe:.0f}× | {times} |")
    return "\n".join(lines)


def exposure_table(batch: int, processes: int, widths, depths, flops: float, inputs: int = 784,
                   classes: int = 10) -> str:
    """Communication time over compute time per step, per link: DDP's all_reduce over the compute of one rank
    (6 (B/K) P FLOPs: forward 2, backward 4), and the pipeline's message
    over the compute of one stage (its share P/K of the parameters on all B rows; SVP skips the input
    gradients: 4 B P / K FLOPs). flops: FLOP/s a device achieves on these GEMMs. DDP hides at most the
    backward (≈ 2/3 of its compute) behind its all_reduce; a pipeline stage hides its whole compute."""
    lines = ["| W × L | " + " | ".join(f"{name}: DDP / pipeline" for name in LINKS) + " |",
             "|---|" + "---|" * len(LINKS)]
    for width in widths:
        for depth in depths:
            parameters = mlp_block_parameters(inputs, width, depth, classes)
            total = sum(parameters)
            ddp_compute = 6 * batch / processes * total / flops
            stage_compute = 4 * batch * total / processes / flops
            ddp = ddp_step_bytes(parameters, processes)["wire"]
            pipe = pipeline_step_bytes(batch, width, classes)["wire"]
            cells = " | ".join(f"{ddp / speed / ddp_compute:.2g} / {pipe / speed / stage_compute:.2g}"
                               for speed in LINKS.values())
            lines.append(f"| {width} × {depth} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--processes", type=int, default=2, help="K: DDP ranks (the pipeline's links carry the same)")
    parser.add_argument("--widths", default="1024,2048,4096,8192")
    parser.add_argument("--depths", default="3,8")
    parser.add_argument("--tflops", type=float, default=100.0, help="achieved TFLOP/s of one device, for the "
                        "second table (communication time over compute time)")
    args = parser.parse_args(argv)
    widths, depths = [int(w) for w in args.widths.split(",")], [int(d) for d in args.depths.split(",")]
    print(table(args.batch_size, args.processes, widths, depths))
    print(f"\ncommunication / compute per step at {args.tflops:g} TFLOP/s, B = {args.batch_size}, "
          f"K = {args.processes}:")
    print(exposure_table(args.batch_size, args.processes, widths, depths, args.tflops * 1e12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
