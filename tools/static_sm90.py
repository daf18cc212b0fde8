"""Static sm_90 analysis of the CUDA kernels: registers, spills, shared memory, theoretical occupancy, and the
instruction mix of each kernel's inner loop, read from what the local nvcc builds (no GPU needed).

    python tools/static_sm90.py                       # print the table and the inner-loop mix
    python tools/static_sm90.py --write               # also rewrite the source=cuda rows of the CSV
    python tools/static_sm90.py --check               # exit 1 on any spill (CI)
    python tools/static_sm90.py --check --verify      # ... or when the committed CSV's cuda rows are stale (CI)
    python tools/static_sm90.py --mix projection_forward --sass-dir /tmp/sass   # keep the SASS

Each csrc/cuda/*.cu is compiled as tools/check_cuda.sh compiles it (torch's CUDAExtension flags) for sm_90
alone, with `-Xptxas -v` (registers, stack frame, spill stores/loads per kernel) and --keep (the PTX gives
each kernel's `.maxntid`, its threads per block); `cuobjdump -res-usage` gives the static shared memory, and
`cuobjdump -sass` the machine code. The dynamic shared memory of the projection kernels is the Tile formula of
csrc/cuda/projection.cu (Tile::smem_bytes), taken from the Tile<...> of the kernel's name.

Theoretical occupancy on an H100/H200 SM (compute capability 9.0): 65 536 registers allocated per warp in
units of 256, at most 64 warps, 2048 threads and 32 blocks, 228 KiB of shared memory of which each block
also reserves 1 KiB. `limiter` names what caps the blocks per SM.

The inner-loop mix: among the kernel's loops (a backward branch and its target), the innermost one (no other
backward branch inside it) holding the most multiply-adds (FFMA/DFMA/HFMA2/HMMA/HGMMA); counted there: shared
loads (LDS*), global loads (LDG*), shared stores (STS*), FFMA, DFMA, HFMA2, HMMA/HGMMA, barriers.

The CSV (bench/results/sm90-static.csv) has a `source` column: the rows this tool writes are source=cuda;
rows of other sources are kept as they are.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSV_PATH = os.path.join(ROOT, "bench", "results", "sm90-static.csv")
COLUMNS = ["source", "kernel", "variant", "file", "threads", "registers", "stack_bytes", "spill_stores",
           "spill_loads", "static_smem", "dynamic_smem", "blocks_per_sm", "occupancy", "limiter"]
NVCC_FLAGS = ["-std=c++17", "-O3", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
# sm_90 limits (CUDA occupancy calculator, compute capability 9.0).
REGS_PER_SM, REG_UNIT, MAX_WARPS, MAX_THREADS, MAX_BLOCKS = 65536, 256, 64, 2048, 32
SMEM_PER_SM, SMEM_PER_BLOCK_RESERVED = 228 * 1024, 1024
FMA_OPS = ("FFMA", "DFMA", "HFMA2", "HMMA", "HGMMA")
MIX_OPS = ("LDS", "LDG", "STS", "FFMA", "DFMA", "HFMA2", "HMMA", "HGMMA", "BAR")


def find_tool(name: str) -> str:
    """nvcc from the toolkit (setup.py's search), cuobjdump from the toolkit or from Triton's package."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", name),
                  os.path.join("/usr/local/cuda", "bin", name)]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    found = shutil.which(name)
    for path in candidates + ([found] if found else []):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise SystemExit(f"static_sm90: {name} not found (set CUDA_HOME, or install triton for cuobjdump)")


def demangle(names: list[str]) -> dict:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def short_name(demangled: str) -> tuple[str, str]:
    """('projection_forward_kernel', 'Tile<128, 16, 32, 4, 2, 256>, float, float') from a demangled name."""
    name = re.sub(r"svp_cuda::detail::(\(anonymous namespace\)::)?", "", demangled)
    depth, end = 0, len(name)
    for index, char in enumerate(name):  # the parameter list: the first "(" outside the template arguments
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "(" and depth == 0:
            end = index
            break
    head = re.sub(r"^void ", "", name[:end])
    match = re.search(r"(\w+)<(.*)>$", head)
    if match is None:
        return head.split("::")[-1], ""
    return match.group(1), match.group(2)


def dynamic_smem(kernel: str, args: str) -> int:
    """Dynamic shared memory at launch: Tile::smem_bytes<Acc>() of csrc/cuda/projection.cu for the projection
    kernels (A_STAGES A tiles of BK × (BM + 1) and a panel of KP × (BN + 1) accumulators); 0 elsewhere."""
    if not kernel.startswith("projection_"):
        return 0
    tile = re.search(r"Tile<(\d+), (\d+), (\d+), (\d+), (\d+), (\d+)(?:, (\d+))?>", args)
    if tile is None:
        raise SystemExit(f"static_sm90: no Tile<...> in {kernel}<{args}>")
    bm, bn, bk, _, _, kp = (int(tile.group(i)) for i in range(1, 7))
    stages = int(tile.group(7) or 1)
    acc = 8 if args.rstrip().endswith("double") else 4
    return (stages * bk * (bm + 1) + kp * (bn + 1)) * acc


def occupancy(threads: int, registers: int, smem: int) -> tuple[int, float, str]:
    warps = (threads + 31) // 32
    regs_per_warp = -(-registers * 32 // REG_UNIT) * REG_UNIT
    limits = {
        "warps": MAX_WARPS // warps,
        "threads": MAX_THREADS // threads,
        "blocks": MAX_BLOCKS,
        "registers": (REGS_PER_SM // regs_per_warp) // warps if regs_per_warp else MAX_BLOCKS,
        "shared": SMEM_PER_SM // (smem + SMEM_PER_BLOCK_RESERVED),
    }
    limiter = min(limits, key=lambda key: (limits[key], key != "registers"))
    blocks = limits[limiter]
    return blocks, blocks * warps / MAX_WARPS, limiter


def compile_one(nvcc: str, cuobjdump: str, source: str, work: str) -> dict:
    """Per kernel of `source`: its ptxas resources, threads, static shared memory and SASS lines."""
    name = os.path.splitext(os.path.basename(source))[0]
    keep = os.path.join(work, name)
    os.makedirs(keep, exist_ok=True)
    cubin = os.path.join(keep, name + ".cubin")
    result = subprocess.run([nvcc, "-cubin", "-arch=sm_90", *NVCC_FLAGS, "-I", os.path.join(ROOT, "csrc", "include"),
                             "-Xptxas", "-v", "--keep", "--keep-dir", keep, source, "-o", cubin],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"static_sm90: compiling {source} failed:\n{result.stderr}")
    kernels: dict = {}
    current = None
    for line in result.stderr.splitlines():
        match = re.search(r"Compiling entry function '(\w+)' for 'sm_90'", line)
        if match:
            current = kernels.setdefault(match.group(1), {"file": os.path.relpath(source, ROOT)})
            continue
        if current is None:
            continue
        match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if match:
            current["stack_bytes"], current["spill_stores"], current["spill_loads"] = map(int, match.groups())
        match = re.search(r"Used (\d+) registers", line)
        if match:
            current["registers"] = int(match.group(1))
    ptx = "".join(open(path).read() for path in glob.glob(os.path.join(keep, "*.ptx")))
    for mangled, info in kernels.items():
        match = re.search(r"\.entry " + re.escape(mangled) + r"\((?:[^)]*)\)\s*((?:\.\w+[^\n]*\n\s*)*)", ptx)
        threads = re.search(r"\.maxntid (\d+), (\d+), (\d+)", match.group(1) if match else "")
        info["threads"] = int(threads.group(1)) * int(threads.group(2)) * int(threads.group(3)) if threads else 1024
    usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    for mangled, shared in re.findall(r"Function (\w+):\s*\n\s*REG:\d+ STACK:\d+ SHARED:(\d+)", usage):
        if mangled in kernels:
            kernels[mangled]["static_smem"] = int(shared)
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        mangled = block.split("\n", 1)[0].strip()
        if mangled in kernels:
            kernels[mangled]["sass"] = block
    return kernels


INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([.\w]*)\s*([^;]*);")


def inner_loop_mix(sass: str) -> dict:
    """Instruction counts of the innermost loop with the most multiply-adds (module docstring)."""
    code = [(int(m.group(1), 16), m.group(3), m.group(5)) for m in INSTRUCTION.finditer(sass)]
    loops = []
    for address, op, operands in code:
        target = re.match(r"(?:U?P\w+,\s*)?(0x[0-9a-f]+)", operands.strip()) if op == "BRA" else None
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    innermost = [(lo, hi) for lo, hi in loops if not any(lo <= a < b <= hi and (a, b) != (lo, hi) for a, b in loops)]

    def counts(lo, hi):
        ops = [op for address, op, _ in code if lo <= address <= hi]
        mix = {name: sum(op.startswith(name) for op in ops) for name in MIX_OPS}
        mix["instructions"] = len(ops)
        return mix

    best = max((counts(lo, hi) for lo, hi in innermost), key=lambda mix: sum(mix[op] for op in FMA_OPS),
               default=None)
    return best or {name: 0 for name in (*MIX_OPS, "instructions")}


def analyse(work: str) -> list[dict]:
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    with ThreadPoolExecutor(max_workers=int(os.environ.get("JOBS", "2"))) as pool:
        per_file = list(pool.map(lambda source: compile_one(nvcc, cuobjdump, source, work), sources))
    kernels = {mangled: info for found in per_file for mangled, info in found.items()}
    names = demangle(list(kernels))
    rows = []
    for mangled, info in kernels.items():
        kernel, variant = short_name(names[mangled])
        smem = info.get("static_smem", 0) + dynamic_smem(kernel, variant)
        blocks, occ, limiter = occupancy(info["threads"], info["registers"], smem)
        rows.append({"source": "cuda", "kernel": kernel, "variant": variant, "file": info["file"],
                     "threads": info["threads"], "registers": info["registers"],
                     "stack_bytes": info.get("stack_bytes", 0), "spill_stores": info.get("spill_stores", 0),
                     "spill_loads": info.get("spill_loads", 0), "static_smem": info.get("static_smem", 0),
                     "dynamic_smem": dynamic_smem(kernel, variant), "blocks_per_sm": blocks,
                     "occupancy": f"{occ:.3f}", "limiter": limiter,
                     "_mix": inner_loop_mix(info.get("sass", "")), "_sass": info.get("sass", "")})
    rows.sort(key=lambda row: (row["file"], row["kernel"], row["variant"]))
    return rows


def write_csv(rows: list[dict]) -> None:
    kept = []
    if os.path.exists(CSV_PATH):
        with open(CSV_PATH, newline="") as f:
            kept = [row for row in csv.DictReader(f) if row.get("source") != "cuda"]
    header = list(COLUMNS)
    for row in kept:
        header += [key for key in row if key not in header]
    with open(CSV_PATH, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore", restval="")
        writer.writeheader()
        for row in [*(r for r in rows), *kept]:
            writer.writerow(row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite the source=cuda rows of {CSV_PATH}")
    parser.add_argument("--check", action="store_true", help="exit 1 when any kernel spills")
    parser.add_argument("--verify", action="store_true",
                        help="exit 1 unless the committed CSV's source=cuda rows are what this build gives")
    parser.add_argument("--mix", default="projection_", help="print the inner-loop mix of kernels whose name "
                                                             "contains this ('' for all)")
    parser.add_argument("--sass-dir", help="write each kernel's SASS into this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="svp_sm90_") as work:
        rows = analyse(work)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    print(out.getvalue(), end="")
    print("\ninner loop (innermost loop with the most multiply-adds), sm_90:")
    print("| kernel | variant | " + " | ".join(MIX_OPS) + " | instructions |")
    print("|---|---|" + "---|" * (len(MIX_OPS) + 1))
    for row in rows:
        if args.mix in row["kernel"]:
            mix = row["_mix"]
            print(f"| {row['kernel']} | {row['variant']} | " + " | ".join(str(mix[op]) for op in MIX_OPS)
                  + f" | {mix['instructions']} |")
    if args.sass_dir:
        os.makedirs(args.sass_dir, exist_ok=True)
        for i, row in enumerate(rows):
            with open(os.path.join(args.sass_dir, f"{i:02d}_{row['kernel']}.sass"), "w") as f:
                f.write(f"// {row['kernel']}<{row['variant']}>\n{row['_sass']}")
    if args.write:
        write_csv(rows)
        print(f"\nwrote {len(rows)} source=cuda rows to {os.path.relpath(CSV_PATH, ROOT)}")
    spilling = [row for row in rows if row["spill_stores"] or row["spill_loads"]]
    for row in spilling:
        print(f"SPILL: {row['kernel']}<{row['variant']}>: {row['spill_stores']} bytes stored, "
              f"{row['spill_loads']} loaded", file=sys.stderr)
    status = 1 if args.check and spilling else 0
    if args.verify:
        with open(CSV_PATH, newline="") as f:
            committed = [{key: row[key] for key in COLUMNS} for row in csv.DictReader(f) if row["source"] == "cuda"]
        fresh = [{key: str(row[key]) for key in COLUMNS} for row in rows]
        def key(row):  # the order of kernels in the cubin (as cuobjdump lists them) carries no meaning
            return tuple(row[column] for column in COLUMNS)

        if sorted(committed, key=key) != sorted(fresh, key=key):
            stale = [row for row in fresh if row not in committed] + [row for row in committed if row not in fresh]
            print(f"STALE: {os.path.relpath(CSV_PATH, ROOT)} differs from this build in {len(stale)} row(s), e.g. "
                  f"{stale[:2]}; rerun `python tools/static_sm90.py --write`", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
