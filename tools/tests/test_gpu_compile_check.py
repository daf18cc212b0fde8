"""tools/gpu_compile_check.py and its committed output, bench/results/sm90-static.csv.

The compilation itself runs in CI's own step (tools/triton_versions.sh: every launch variant, with Triton
3.5, 3.6 and the suite's); here: its arithmetic (occupancy, ptxas's report, the shared CSV), that the
committed table covers exactly the launch variants the launchers make now at the supported versions and
records no spill of the suite's Triton, and a quick compilation with the suite's Triton.
"""

import csv
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from svp_kernels.backends import triton as triton_backend  # noqa: E402
from tools import gpu_compile_check  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "gpu_compile_check.py")
TABLE = os.path.join(ROOT, "bench", "results", "sm90-static.csv")
REQUIRED_SOURCES = ("triton-" + ".".join(map(str, triton_backend.MIN_TRITON)), "triton-3.6.0")


def _tool(*args, timeout=600):
    """Run the tool as CI does: TRITON_INTERPRET unset, so that the kernels are JIT functions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + sys.path)
    return subprocess.run([sys.executable, "-W", "ignore", TOOL, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_occupancy_follows_the_sm90_limits():
    occupancy = gpu_compile_check.occupancy_warps_per_sm
    assert occupancy(32, 4, 0) == 64  # 1024 registers a warp: the 64-warp limit binds
    assert occupancy(128, 4, 0) == 16  # 4096 registers a warp: 16 warps fit in 64 Ki
    assert occupancy(80, 4, 0) == 24  # 2560 a warp: 25 warps, in units of 4: 24
    assert occupancy(33, 4, 0) == 48  # 1056 a warp, allocated as 1280: 51 warps, in units of 4: 48
    assert occupancy(255, 8, 0) == 8  # 8192 a warp (rounded up to 256): one 8-warp block
    assert occupancy(32, 4, 100 * 1024) == 8  # two blocks of 100 KiB (+1 KiB each) in 228 KiB
    assert occupancy(32, 1, 0) == 32  # at most 32 blocks
    assert occupancy(32, 4, 228 * 1024) == 0  # more shared memory than a block may have


def test_ptxas_report_is_read():
    report = """ptxas info    : Compiling entry function 'rows_kernel' for 'sm_90a'
ptxas info    : Function properties for __internal_trig_reduction_slowpathd
    40 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Function properties for rows_kernel
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 72 bytes cumulative stack size
"""
    assert gpu_compile_check.ptxas_usage(report) == (96, 8, 4)
    with pytest.raises(RuntimeError, match="no register count"):
        gpu_compile_check.ptxas_usage("ptxas info    : 0 bytes gmem")


def test_csv_writer_keeps_other_sources(tmp_path):
    path = str(tmp_path / "static.csv")
    columns = gpu_compile_check.CSV_COLUMNS
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns + ("notes",))
        writer.writerow(("cuda", "projection_forward", "fp32 C<=16", "80", "0", "0", "0", "24", "sm_90"))
        writer.writerow(("triton-9.9.9", "old_kernel", "x", "1", "0", "0", "0", "64", ""))
    usage = gpu_compile_check.Usage("rows_kernel", "fp32 warps=4", 96, 0, 0, 256, 20)
    gpu_compile_check.write_rows(path, "triton-9.9.9", [usage.row("triton-9.9.9")])
    rows = gpu_compile_check.read_rows(path)
    assert [(r["source"], r["kernel"]) for r in rows] == [("cuda", "projection_forward"),
                                                          ("triton-9.9.9", "rows_kernel")]
    assert rows[0]["notes"] == "sm_90" and rows[1]["registers"] == "96"


def test_committed_table_covers_every_variant_without_spills():
    """The committed rows of each supported Triton are exactly today's launch variants (regenerate with
    `bash tools/triton_versions.sh --write` after changing a kernel or a block size), and none of the suite's
    Triton spills (a pinned older Triton's few reviewed spills are in bench/NOTES.md)."""
    import triton

    listed = _tool("--list")
    assert listed.returncode == 0, listed.stderr[-3000:]
    variants = {tuple(line.split("\t")) for line in listed.stdout.splitlines()}
    assert len(variants) > 100
    rows = gpu_compile_check.read_rows(TABLE)
    sources = {row["source"] for row in rows if row["source"].startswith("triton-")}
    assert set(REQUIRED_SOURCES) <= sources, sources
    for source in sorted(sources):
        table = [row for row in rows if row["source"] == source]
        assert {(row["kernel"], row["variant"]) for row in table} == variants, f"{source}: stale rows in {TABLE}"
        for row in table:
            assert int(row["registers"]) > 0 and int(row["occupancy_warps_per_sm"]) > 0, row
            if source == gpu_compile_check.source_name():
                assert row["spill_stores"] == "0" and row["spill_loads"] == "0", row
    assert gpu_compile_check.source_name() == f"triton-{triton.__version__.split('+')[0]}"


def _nvidia_toolchain():
    import triton

    backend = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia")
    return os.path.exists(os.path.join(backend, "bin", "ptxas"))


@pytest.mark.skipif(not _nvidia_toolchain(), reason="this Triton wheel ships no NVIDIA ptxas")
def test_quick_variants_compile_for_sm90_without_spills():
    """The suite's Triton compiles a quick selection of variants for an H100 (no GPU needed), spilling none."""
    result = _tool("--quick", "--jobs", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "; 0 failed; 0 spill;" in summary, summary
