"""Peak training memory vs depth of a 1024-wide MLP, SVP against backprop (the paper's Fig. 2a).

    python python/memory_vs_depth.py [--device cuda] [--plot memory_vs_depth.png]

Same measurement as `svp-train memory-depth`: CUDA max_memory_allocated, or on CPU the allocator's own
allocation events replayed by the profiler. SVP keeps one block's activations and gradients alive at a
time, so its activation peak stays flat while backprop's grows with depth.
"""

import argparse

import torch

from svp_kernels.train.cli import memory_depth_summary
from svp_kernels.train.outputs import plot_memory_depth
from svp_kernels.train.run import memory_depth_rows

MIB = 2.0**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plot", default="memory_vs_depth.png")
    args = parser.parse_args()
    rows = memory_depth_rows(args.width, (2, 4, 8, 16, 32), args.batch_size, args.device)
    for depth in sorted({row["depth"] for row in rows}):
        svp, bp = (next(row for row in rows if row["method"] == method and row["depth"] == depth)
                   for method in ("svp", "bp"))
        print(f"depth {depth:2d}: activation peak SVP {svp['activation_peak_bytes'] / MIB:7.1f} MiB, "
              f"BP {bp['activation_peak_bytes'] / MIB:7.1f} MiB "
              f"({bp['activation_peak_bytes'] / svp['activation_peak_bytes']:.1f}x)")
    summary = memory_depth_summary(rows)
    print(f"SVP depth {summary['deepest']} / depth {summary['shallowest']}: {summary['svp_depth_ratio']:.2f}x")
    plot_memory_depth(rows, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
