"""The committed static sm_90 analysis (bench/results/sm90-static.csv, written by tools/static_sm90.py, checked
fresh by CI's `tools/static_sm90.py --check --verify`): every CUDA kernel of csrc/cuda has its rows, and none
spills."""

import csv
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSV_PATH = os.path.join(ROOT, "bench", "results", "sm90-static.csv")


def cuda_rows() -> list[dict]:
    with open(CSV_PATH, newline="") as f:
        return [row for row in csv.DictReader(f) if row["source"] == "cuda"]


def test_every_kernel_has_rows():
    kernels = set()
    for name in os.listdir(os.path.join(ROOT, "csrc", "cuda")):
        if name.endswith(".cu"):
            with open(os.path.join(ROOT, "csrc", "cuda", name)) as f:
                kernels |= set(re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(", f.read()))
    listed = {row["kernel"] for row in cuda_rows()}
    assert kernels and kernels <= listed, f"kernels without rows: {sorted(kernels - listed)}"


def test_no_kernel_spills():
    spilling = [f"{row['kernel']}<{row['variant']}>" for row in cuda_rows()
                if int(row["spill_stores"]) or int(row["spill_loads"])]
    assert not spilling, f"spilling kernels: {spilling}"


def test_occupancy_is_consistent():
    """blocks_per_sm · threads / 2048 is the occupancy column, and every block fits its shared memory."""
    for row in cuda_rows():
        blocks, threads = int(row["blocks_per_sm"]), int(row["threads"])
        assert blocks >= 1, row
        assert abs(float(row["occupancy"]) - blocks * threads / 2048) < 1e-3, row
        assert blocks * (int(row["static_smem"]) + int(row["dynamic_smem"]) + 1024) <= 228 * 1024, row
