"""Forward + backward timings of sk.predsim_loss and sk.alignment_loss against the plain formulation.

    python bench/similarity_losses.py [--op predsim|alignment_loss] [--threads N] [--no-compile] [--only 0,3]
                                      [--repeats 25]

Rows: op=predsim (local-loss's predsim block loss: decoder CE + similarity MSE against the labels) and
op=alignment_loss (the SVP alignment term with a centred similarity, against a float target), each for
variant = eager (the plain PyTorch formulation, svp_kernels/similarity/reference.py, which is what
local-learning code writes), compile (torch.compile of it) and fused (svp_kernels). Every timed call is
`loss.backward()` on fresh inputs' grads (or value only for mode=no_grad). The variants of one shape are
interleaved call by call in one process, because the machine may be shared: <variant>_ms are medians,
<variant>_over_fused the median over repeats of the time ratio of calls made back to back.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import svp_kernels as sk  # noqa: E402
from svp_kernels.similarity import reference as similarity_reference  # noqa: E402

B = 128
# (name, h_dec shape, h_sim shape, reduce, classes): MLP blocks (h_dec = h, h_sim = linear_loss(h)) and conv
# blocks (h_dec = the average-pooled h, h_sim = conv_loss(h)), the shapes local-loss trains.
PREDSIM_SHAPES = [
    ("mlp", (B, 64), (B, 64), "flatten", 10),
    ("mlp", (B, 1024), (B, 1024), "flatten", 10),
    ("mlp", (B, 4096), (B, 4096), "flatten", 100),
    ("mlp", (B, 32768), (B, 32768), "flatten", 10),
    ("conv", (B, 2048), (B, 128, 16, 16), "std", 10),
    ("conv", (B, 2048), (B, 128, 16, 16), "flatten", 100),
    ("conv", (B, 4096), (B, 512, 8, 8), "std", 100),
    ("conv", (B, 4096), (B, 512, 8, 8), "flatten", 10),
]
# (name, v shape, v_prev shape, reduce): alignment to the labels' one-hot and to a 3072-wide input.
ALIGNMENT_SHAPES = [
    ("onehot", (B, 64), (B, 10), "flatten"),
    ("onehot", (B, 1024), (B, 100), "flatten"),
    ("onehot", (B, 32768), (B, 10), "flatten"),
    ("input", (B, 1024), (B, 3072), "flatten"),
    ("input", (B, 4096), (B, 3072), "flatten"),
    ("conv-std", (B, 128, 16, 16), (B, 10), "std"),
]


def eager_predsim(h_dec, h_sim, target, weight, bias, reduce):
    return similarity_reference.predsim_loss(h_dec, weight, bias, h_sim, target, 0.99, 0.0, 0, reduce)[0]


def fused_predsim(h_dec, h_sim, target, weight, bias, reduce):
    return sk.predsim_loss(h_dec, h_sim, target, weight, bias, beta=0.99, reduce=reduce).loss


def eager_alignment(v, v_prev, reduce):
    return similarity_reference.similarity_loss(v, v_prev, None, 0, reduce, True, False, True)


def fused_alignment(v, v_prev, reduce):
    return sk.alignment_loss(v, v_prev, center=True, reduce=reduce)


def timed(fn, args, grads, no_grad):
    for tensor in grads:
        tensor.grad = None
    start = time.perf_counter()
    if no_grad:
        with torch.no_grad():
            fn(*args)
    else:
        fn(*args).backward()
    return time.perf_counter() - start


def measure(variants, args, grads, repeats, no_grad):
    """(medians (ms) of each variant, median over repeats of each variant's time / fused's), interleaved call
    by call after two warm-ups each: a ratio within one repeat compares calls made milliseconds apart, so
    it follows the load of a shared machine less than a ratio of medians does."""
    for fn in variants.values():
        for _ in range(2):
            timed(fn, args, grads, no_grad)
    samples = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].append(timed(fn, args, grads, no_grad))
    medians = {name: 1e3 * statistics.median(values) for name, values in samples.items()}
    ratios = {name: statistics.median(t / f for t, f in zip(values, samples["fused"]))
              for name, values in samples.items() if name != "fused"}
    return medians, ratios


def row_fields(times, ratios):
    """The CSV columns of one shape and mode: <variant>_ms, then <variant>_over_fused."""
    fields = {f"{name}_ms": round(value, 4) for name, value in times.items()}
    fields.update({f"{name}_over_fused": round(value, 3) for name, value in ratios.items()})
    return fields


def predsim_rows(repeats, compile_too, only):
    generator = torch.Generator().manual_seed(0)
    for index, (name, dec_shape, sim_shape, reduce, classes) in enumerate(PREDSIM_SHAPES):
        if only and index not in only:
            continue
        h_dec = torch.randn(*dec_shape, generator=generator).requires_grad_(True)
        h_sim = torch.randn(*sim_shape, generator=generator).requires_grad_(True)
        weight = (0.01 * torch.randn(classes, dec_shape[1], generator=generator)).requires_grad_(True)
        bias = torch.zeros(classes).requires_grad_(True)
        target = torch.randint(0, classes, (B,), generator=generator)
        args = (h_dec, h_sim, target, weight, bias, reduce)
        variants = {"eager": eager_predsim, "fused": fused_predsim}
        if compile_too:
            variants["compile"] = torch.compile(eager_predsim, dynamic=False)
        for mode in ("fwd+bwd", "no_grad"):
            times, ratios = measure(variants, args, (h_dec, h_sim, weight, bias), repeats, mode == "no_grad")
            yield dict(op="predsim", block=name, h_dec=dec_shape, h_sim=sim_shape, reduce=reduce, classes=classes,
                       mode=mode, **row_fields(times, ratios))


def alignment_rows(repeats, compile_too, only):
    generator = torch.Generator().manual_seed(1)
    for index, (name, v_shape, prev_shape, reduce) in enumerate(ALIGNMENT_SHAPES):
        if only and index not in only:
            continue
        v = torch.randn(*v_shape, generator=generator).requires_grad_(True)
        v_prev = torch.randn(*prev_shape, generator=generator)
        args = (v, v_prev, reduce)
        variants = {"eager": eager_alignment, "fused": fused_alignment}
        if compile_too:
            variants["compile"] = torch.compile(eager_alignment, dynamic=False)
        for mode in ("fwd+bwd", "no_grad"):
            times, ratios = measure(variants, args, (v,), repeats, mode == "no_grad")
            yield dict(op="alignment_loss", block=name, h_dec="", h_sim=v_shape, reduce=reduce,
                       classes=prev_shape[1], mode=mode, **row_fields(times, ratios))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--op", choices=("all", "predsim", "alignment_loss"), default="all")
    parser.add_argument("--csv", default=None, help="default: bench/results/predsim-<device>.csv")
    parser.add_argument("--append", action="store_true", help="append rows (same columns) to the CSV")
    parser.add_argument("--only", default="", help="comma-separated shape indices of the op's list (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = {int(index) for index in args.only.split(",") if index}
    device = f"cpu-{torch.get_num_threads()}threads"
    path = args.csv or os.path.join(ROOT, "bench", "results", f"predsim-{device}.csv")
    rows = []
    generators = []
    if args.op in ("all", "predsim"):
        generators.append(predsim_rows(args.repeats, not args.no_compile, only))
    if args.op in ("all", "alignment_loss"):
        generators.append(alignment_rows(args.repeats, not args.no_compile, only))
    for generator in generators:
        for row in generator:
            row.update(torch=torch.__version__, machine=platform.processor() or platform.machine(),
                       threads=torch.get_num_threads(), repeats=args.repeats)
            print(row, flush=True)
            rows.append(row)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "a" if args.append else "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        if not args.append:
            writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
