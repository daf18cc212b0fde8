"""Run the CUDA kernels of csrc/cuda on the CPU, under a fiber-based emulator, against the float64 reference.

    python tools/emulate_cuda/run_emulation.py [--quick] [-k SUBSTRING] [--keep-build DIR]
    python tools/emulate_cuda/run_emulation.py --quick --dump before.pt      # every output the checks produced
    python tools/emulate_cuda/run_emulation.py --quick --compare before.pt   # ... the same bits as then?

No GPU needed: each csrc/cuda/*.cu is rewritten for g++ (launches -> svp_emu::launcher, __shared__ ->
static, dynamic shared memory -> a NaN-poisoned buffer; see svp_emu.h), compiled with the launchers into
a shared library, and driven through ctypes on CPU tensors. Outputs and workspaces start as NaN, so a read
of anything no kernel wrote shows up. Every check runs twice, with the fibers of a block scheduled in
forward and in reverse order (a missing __syncthreads then gives wrong numbers in one of them), and with
several SM counts and under every forced plan of PLANS (passed to the launchers as a svp_cuda::LaunchPlan),
so the launch plans (split-K, resident/regenerated panels, Gram splits) change; a first check proves that a
forced plan reaches the launchers (workspace sizes and block counts change with it).

This checks the kernels' logic (indexing, tiling, bounds, barriers, reductions, plans); it says nothing about
performance, and the GPU's memory model is stricter than the emulator's (run tools/gpu_check.py there).
Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
# Only svp_kernels' pure-Python parts run here; CI emulates before svp_kernels._C is built, so its
# "could not be loaded" warning would only mislead.
warnings.filterwarnings("ignore", message=r"svp_kernels\._C .* could not be loaded")

from svp_kernels import philox  # noqa: E402
from svp_kernels.backends import reference  # noqa: E402
from svp_kernels.backends.cuda import LAUNCH_PLAN_FIELDS, parse_launch_plan  # noqa: E402

from cases import (ACC_TOL, ALIGNED_FEATURE_SPACE, EPILOGUE_SHAPES, IMPLICIT_TOL, MASK_SHAPES,  # noqa: E402
                   OUT_TOL, PROJECTION_SHAPES, SMALL_EPILOGUE_SHAPES, SMALL_PROJECTION_SHAPES, WIDE_ROWS_NARROW_C,
                   aligned_inputs, cosine_gram_ground_truth, epilogue_ground_truth, plain_epilogue,
                   projection_ground_truth, wide_row_inputs)
from helpers import assert_no_less_accurate_to_rounding  # noqa: E402
from svp_kernels.testing import assert_no_less_accurate, bhattacharyya_inputs  # noqa: E402
from svp_kernels.testing.closeness import FLOAT32_ROUNDING  # noqa: E402

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
ALIGNMENT_CODES = {"cosine_gram": 0, "bhattacharyya": 1}  # svp_cuda::Alignment


# ----------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------

LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}()]*?>)?)<<<(.*?)>>>\(", re.S)


def rewrite_for_host(source: str) -> str:
    """CUDA C++ -> host C++ for the emulator."""
    source = re.sub(r"extern\s+__shared__\s+__align__\(\d+\)\s+unsigned\s+char\s+(\w+)\[\];",
                    r"unsigned char* \1 = svp_emu::dynamic_shared();", source)
    source = re.sub(r"\b__shared__\b", "static", source)
    source = re.sub(r"__launch_bounds__\((?:[^()]|\([^()]*\))*\)", "", source)
    source = LAUNCH.sub(lambda m: f"svp_emu::launcher({m.group(1)}, {m.group(2)})(", source)
    if "<<<" in source:
        raise RuntimeError("a kernel launch was not rewritten")
    return source


def build(build_dir: str, cuda_dir: str = os.path.join(ROOT, "csrc", "cuda")) -> str:
    cuda_include = next((d for d in (os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "include"),
                                     "/usr/local/cuda/include") if os.path.exists(os.path.join(d, "cuda_runtime.h"))),
                        None)
    if cuda_include is None:
        raise SystemExit("run_emulation: cuda_runtime.h not found (set CUDA_HOME)")
    sources = []
    for name in sorted(os.listdir(cuda_dir)):
        path = os.path.join(cuda_dir, name)
        if name.endswith((".cuh", ".h")):
            with open(path) as f:
                text = rewrite_for_host(f.read())
            with open(os.path.join(build_dir, name), "w") as f:
                f.write(text)
        elif name.endswith(".cu"):
            with open(path) as f:
                text = rewrite_for_host(f.read())
            target = os.path.join(build_dir, name[:-3] + ".cpp")
            with open(target, "w") as f:
                f.write(text)
            sources.append(target)
    sources.append(os.path.join(HERE, "emu_api.cpp"))
    flags = ["-std=c++17", "-O2", "-fPIC", "-g", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
             "-include", os.path.join(HERE, "svp_emu.h"), "-I", build_dir, "-I", os.path.join(ROOT, "csrc", "include"),
             "-isystem", cuda_include]

    def compile_one(src):
        obj = os.path.join(build_dir, os.path.basename(src) + ".o")
        result = subprocess.run(["g++", *flags, "-c", src, "-o", obj], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"run_emulation: compiling {src} failed:\n{result.stderr}")
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objects = list(pool.map(compile_one, sources))
    library = os.path.join(build_dir, "libsvp_emu.so")
    # -Bsymbolic: the launchers call this library's own cudaGetDevice & co. (emu_api.cpp) even in a process
    # where a CUDA build of torch has loaded the real runtime, whose symbols would otherwise win.
    subprocess.run(["g++", "-shared", "-Wl,-Bsymbolic", "-o", library, *objects], check=True)
    return library


# ----------------------------------------------------------------------------------------------------
# ctypes wrappers: the svp_cuda launchers on CPU tensors
# ----------------------------------------------------------------------------------------------------

class LaunchPlan(ctypes.Structure):
    """svp_cuda::LaunchPlan (csrc/cuda/svp_cuda.h): int64 fields in declaration order."""

    _fields_ = [(name, ctypes.c_int64) for name in LAUNCH_PLAN_FIELDS]

    @classmethod
    def parse(cls, text: str) -> "LaunchPlan":
        """From a "key=value,..." plan string ("" = the heuristic)."""
        return cls(**parse_launch_plan(text))

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in LAUNCH_PLAN_FIELDS}


class Emulated:
    """The launchers on CPU tensors; every launch and workspace query gets the LaunchPlan `plan`."""

    def __init__(self, library: str):
        lib = ctypes.CDLL(library)
        i64, u64, vp, sz = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t
        plan = ctypes.POINTER(LaunchPlan)
        lib.emu_default_launch_plan.argtypes = [plan]
        lib.emu_take_blocks_run.restype = u64
        lib.emu_take_launches_run.restype = u64
        lib.emu_dropped_projection.argtypes = [vp, vp, i64, i64, u64, ctypes.c_float, ctypes.c_double, vp, ctypes.c_int]
        lib.emu_projection_forward_workspace_bytes.argtypes = [i64, i64, i64, ctypes.c_int, ctypes.POINTER(sz), plan]
        lib.emu_projection_forward_counters.argtypes = [i64, i64, i64, ctypes.c_int, ctypes.POINTER(i64), plan]
        lib.emu_projection_forward.argtypes = [vp, vp, vp, i64, i64, i64, u64, ctypes.c_float, ctypes.c_double, vp,
                                               ctypes.c_int, vp, sz, plan, vp, i64]
        lib.emu_projection_backward.argtypes = [vp, vp, vp, i64, i64, i64, u64, ctypes.c_float, ctypes.c_double, vp,
                                                ctypes.c_int, plan, vp]
        lib.emu_loss_epilogue_workspace_bytes.argtypes = [i64, i64, i64, ctypes.c_bool, ctypes.c_int,
                                                          ctypes.POINTER(sz), plan, ctypes.c_int]
        lib.emu_loss_epilogue.argtypes = [vp, vp, vp, vp, vp, vp, vp, i64, i64, i64, ctypes.c_double, ctypes.c_bool,
                                          ctypes.c_bool, ctypes.c_int, vp, sz, plan, ctypes.c_int]
        lib.emu_cosine_gram_workspace_bytes.argtypes = [i64, i64, ctypes.c_int, ctypes.POINTER(sz)]
        lib.emu_cosine_gram.argtypes = [vp, vp, i64, i64, ctypes.c_bool, ctypes.c_int, vp, sz]
        self.lib = lib
        self.plan = LaunchPlan.parse("")
        # The forward's arrival counters (split-K reduced in its kernel): zero, and zero again after each launch.
        # reduce_in_kernel=False passes none: the launcher's second kernel reduces instead.
        self.counters = torch.zeros(1 << 16, dtype=torch.int32)
        self.reduce_in_kernel = True
        default = LaunchPlan()
        lib.emu_default_launch_plan(ctypes.byref(default))
        if default.as_dict() != self.plan.as_dict():
            raise SystemExit(f"run_emulation: the C++ default LaunchPlan {default.as_dict()} differs from the "
                             f"heuristic plan of svp_kernels.backends.cuda {self.plan.as_dict()}")

    def take_blocks_run(self) -> int:
        """Thread blocks launched since the last call."""
        return self.lib.emu_take_blocks_run()

    def take_launches_run(self) -> int:
        """Kernel launches since the last call."""
        return self.lib.emu_take_launches_run()

    def dropped_projection(self, weight, C, D, proj_seed, std, p, seed, dtype):
        """R̃ (C, D) of `dtype` written by the GEMM path's Philox kernel (svp_cuda::dropped_projection)."""
        seed = torch.tensor(seed, dtype=torch.int64)
        out = torch.full((C, D), float("nan"), dtype=dtype)
        self._check(self.lib.emu_dropped_projection(self._ptr(weight), self._ptr(out), C, D, proj_seed, std, p,
                                                    self._ptr(seed), DTYPE_CODES[dtype]), "dropped_projection")
        return out

    def projection_forward_workspace_bytes(self, B, C, D, dtype):
        size = ctypes.c_size_t()
        self._check(self.lib.emu_projection_forward_workspace_bytes(B, C, D, DTYPE_CODES[dtype], ctypes.byref(size),
                                                                    ctypes.byref(self.plan)), "ws")
        return size.value

    def loss_epilogue_workspace_bytes(self, B, C, Cp, has_v_prev, dtype, alignment="cosine_gram"):
        size = ctypes.c_size_t()
        self._check(self.lib.emu_loss_epilogue_workspace_bytes(B, C, Cp, has_v_prev, DTYPE_CODES[dtype],
                                                               ctypes.byref(size), ctypes.byref(self.plan),
                                                               ALIGNMENT_CODES[alignment]), "ws")
        return size.value

    @staticmethod
    def _ptr(tensor):
        return None if tensor is None else ctypes.c_void_p(tensor.data_ptr())

    @staticmethod
    def _check(status, name):
        if status != 0:
            raise RuntimeError(f"{name} returned cudaError {status}")

    @staticmethod
    def _nan_bytes(count):
        workspace = torch.full((max(count, 8) // 8 + 1,), float("nan"), dtype=torch.float64)
        return workspace

    def projection_forward(self, h, weight, C, proj_seed, std, p, seed):
        """The launcher reads the dropout seed through a pointer, as the CUDA kernels read a device tensor."""
        seed = torch.tensor(seed, dtype=torch.int64)
        B, D = h.shape
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        size = self.projection_forward_workspace_bytes(B, C, D, h.dtype)
        workspace = self._nan_bytes(size)
        v = torch.full((B, C), float("nan"), dtype=acc)
        count = ctypes.c_int64()
        self._check(self.lib.emu_projection_forward_counters(B, C, D, DTYPE_CODES[h.dtype], ctypes.byref(count),
                                                             ctypes.byref(self.plan)), "counters")
        if count.value > self.counters.numel():
            raise RuntimeError(f"projection_forward wants {count.value} counters")
        counters = self.counters if self.reduce_in_kernel else None
        self._check(self.lib.emu_projection_forward(self._ptr(h), self._ptr(weight), self._ptr(v), B, C, D, proj_seed,
                                                    std, p, self._ptr(seed), DTYPE_CODES[h.dtype], self._ptr(workspace),
                                                    size, ctypes.byref(self.plan), self._ptr(counters),
                                                    count.value if counters is not None else 0),
                    "projection_forward")
        if self.counters.any():
            raise AssertionError("projection_forward left its arrival counters non-zero")
        return v

    def projection_backward(self, grad_v, weight, D, proj_seed, std, p, seed, dtype, grad_scale=None):
        """grad_scale: None or a 0-dim tensor of grad_v's dtype that the kernel multiplies in."""
        seed = torch.tensor(seed, dtype=torch.int64)
        B, C = grad_v.shape
        dh = torch.full((B, D), float("nan"), dtype=dtype)
        self._check(self.lib.emu_projection_backward(self._ptr(grad_v), self._ptr(weight), self._ptr(dh), B, C, D,
                                                     proj_seed, std, p, self._ptr(seed), DTYPE_CODES[dtype],
                                                     ctypes.byref(self.plan), self._ptr(grad_scale)),
                    "projection_backward")
        return dh

    def loss_epilogue(self, v, target, v_prev, weight, mean, center, alignment="cosine_gram"):
        B, C = v.shape
        Cp = 0 if v_prev is None else v_prev.shape[1]
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        size = self.loss_epilogue_workspace_bytes(B, C, Cp, v_prev is not None, v.dtype, alignment)
        workspace = self._nan_bytes(size)
        loss, ce, term = (torch.full((), float("nan"), dtype=acc) for _ in range(3))
        g_v = torch.full((B, C), float("nan"), dtype=acc)
        self._check(self.lib.emu_loss_epilogue(self._ptr(v), self._ptr(target), self._ptr(v_prev), self._ptr(loss),
                                               self._ptr(ce), self._ptr(term), self._ptr(g_v), B, C, Cp, weight,
                                               mean, center, DTYPE_CODES[v.dtype], self._ptr(workspace), size,
                                               ctypes.byref(self.plan), ALIGNMENT_CODES[alignment]),
                    "loss_epilogue")
        return loss, ce, term, g_v

    def cosine_gram(self, v, center):
        B, C = v.shape
        code = DTYPE_CODES[v.dtype]
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        size = ctypes.c_size_t()
        self._check(self.lib.emu_cosine_gram_workspace_bytes(B, C, code, ctypes.byref(size)), "ws")
        workspace = self._nan_bytes(size.value)
        S = torch.full((B, B), float("nan"), dtype=acc)
        self._check(self.lib.emu_cosine_gram(self._ptr(v), self._ptr(S), B, C, center, code, self._ptr(workspace),
                                             size.value), "cosine_gram")
        return S


# ----------------------------------------------------------------------------------------------------
# Checks (mirroring tests/test_cuda_backend.py)
# ----------------------------------------------------------------------------------------------------

def scaled_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    if expected.numel() == 0:
        return 0.0
    scale = max(1.0, expected.abs().max().item())
    return (actual - expected).abs().max().item() / scale


def expect_close(actual, expected, tol, name):
    error = scaled_error(actual, expected)
    if not error <= tol:
        raise AssertionError(f"{name}: scaled error {error:.3e} > {tol:.1e}")


def randn(*shape, dtype=torch.float64, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def check_masks(emu, dtypes):
    for C, D, p, seed in MASK_SHAPES:
        expected = philox.keep_mask(seed, C, D, p)
        for dtype in dtypes:
            ones = torch.ones(C, D, dtype=dtype)
            v = emu.projection_forward(torch.eye(D, dtype=dtype), ones, C, 0, 0.0, p, seed)
            if not torch.equal(v.t() != 0, expected):
                raise AssertionError(f"forward mask differs: C={C} D={D} p={p} {dtype}")
            scale = torch.tensor(1.0 / (1.0 - p), dtype=v.dtype).item()
            if not torch.all(v.t()[expected] == scale):
                raise AssertionError(f"kept values are not 1/(1-p): C={C} D={D} p={p} {dtype}")
            dh = emu.projection_backward(torch.eye(C, dtype=v.dtype), ones, D, 0, 0.0, p, seed, dtype)
            if not torch.equal(dh != 0, expected):
                raise AssertionError(f"backward mask differs: C={C} D={D} p={p} {dtype}")
    # Implicit R against the reference's float32 generation.
    C, D = 37, 45
    v = emu.projection_forward(torch.eye(D), None, C, 123, D**-0.5, 0.4, 9)
    expect_close(v.t(), reference.dropped_weight(None, D, C, 123, D**-0.5, 0.4, 9, torch.float32, "cpu"), 2e-6,
                 "implicit R̃")


def check_dropped_projection(emu, dtypes):
    """The GEMM path's R̃ kernel writes, element for element, the R̃ of the fused forward's panels (h = I makes
    its v exactly R̃ᵀ): float32/float64 bit for bit, dense and implicit; bfloat16/float16 that value rounded to
    the dtype. Against the CPU kernels' R̃ (the compiled op) bit for bit when svp_kernels._C is loaded; masks
    against the §3 spec always."""
    from svp_kernels import _ops

    for C, D, p, seed in MASK_SHAPES:
        for implicit in (False, True):
            for dtype in dtypes:
                weight = None if implicit else randn(C, D, seed=C + D, dtype=dtype)
                written = emu.dropped_projection(weight, C, D, 77, D**-0.5, p, seed, dtype)
                name = f"dropped_projection C={C} D={D} p={p} implicit={implicit} {dtype}"
                if not torch.equal(written != 0, philox.keep_mask(seed, C, D, p)):
                    raise AssertionError(f"{name}: mask differs from the spec")
                fused = emu.projection_forward(torch.eye(D, dtype=dtype), weight, C, 77, D**-0.5, p, seed).t()
                if not torch.equal(written, fused.to(dtype)):
                    raise AssertionError(f"{name}: differs from the fused forward's R̃")
                if _ops.extension_loaded() and dtype in (torch.float32, torch.float64):
                    cpu = torch.ops.svp_kernels.dropped_projection(weight, C, D, 77, D**-0.5, p,
                                                                   torch.tensor(seed), dtype)
                    equal = torch.equal(written, cpu) if not implicit else torch.equal(written != 0, cpu != 0)
                    if not equal:
                        raise AssertionError(f"{name}: differs from the CPU kernels' R̃")
                    if implicit:
                        expect_close(written, cpu, IMPLICIT_TOL, f"{name} vs the CPU kernels' implicit R")


def check_projection(emu, dtypes, shapes):
    for B, D, C in shapes:
        for dtype in dtypes:
            for implicit, p in ((False, 0.0), (False, 0.3), (True, 0.25)):
                proj_seed, std, seed = 31, D**-0.5, 2024
                h = randn(B, D, dtype=dtype)
                weight = None if implicit else randn(C, D, seed=1, dtype=dtype, scale=D**-0.5)
                acc = torch.float64 if dtype == torch.float64 else torch.float32
                grad_v = randn(B, C, seed=2, dtype=acc)
                name = f"B={B} D={D} C={C} {dtype} implicit={implicit} p={p}"
                v = emu.projection_forward(h, weight, C, proj_seed, std, p, seed)
                emu.reduce_in_kernel = False  # split-K summed by the second kernel: the same bits
                try:
                    if not torch.equal(v, emu.projection_forward(h, weight, C, proj_seed, std, p, seed)):
                        raise AssertionError(f"split-K reduced in the kernel differs from the reduction kernel: {name}")
                finally:
                    emu.reduce_in_kernel = True
                dh = emu.projection_backward(grad_v, weight, D, proj_seed, std, p, seed, dtype)
                expected_v, expected_dh = projection_ground_truth(h, weight, grad_v, C, proj_seed, std, p, seed)
                extra = IMPLICIT_TOL if implicit else 0.0
                expect_close(v, expected_v, max(ACC_TOL[dtype], extra), f"v {name}")
                expect_close(dh, expected_dh, max(OUT_TOL[dtype], extra), f"dh {name}")
                # The incoming gradient's scale, multiplied in as grad_v is read: the bits of scaling first.
                scale = torch.tensor(-0.37, dtype=acc)
                scaled = emu.projection_backward(grad_v, weight, D, proj_seed, std, p, seed, dtype, scale)
                if not torch.equal(scaled, emu.projection_backward(scale * grad_v, weight, D, proj_seed, std, p,
                                                                   seed, dtype)):
                    raise AssertionError(f"dh with grad_scale differs from dh of grad_scale · grad_v: {name}")


def check_epilogue(emu, dtypes, shapes):
    for B, C, Cp in shapes:
        for dtype in dtypes:
            v = randn(B, C, dtype=dtype, scale=2.0)
            v_prev = None if Cp is None else randn(B, Cp, seed=2, dtype=dtype)
            target = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(1))
            for with_target in (True, False):
                for mean, center in ((True, False), (False, True)):
                    t = target if with_target else None
                    actual = emu.loss_epilogue(v, t, v_prev, 0.7, mean, center)
                    expected = epilogue_ground_truth(v, t, v_prev, 0.7, mean, center)
                    for name, a, e in zip(("loss", "ce", "alignment", "g_v"), actual, expected):
                        expect_close(a, e, ACC_TOL[dtype], f"{name} B={B} C={C} C'={Cp} {dtype} target={with_target}"
                                                           f" mean={mean} center={center}")
            for center in (False, True):
                expect_close(emu.cosine_gram(v, center), cosine_gram_ground_truth(v, center), ACC_TOL[dtype],
                             f"cosine_gram B={B} C={C} {dtype} center={center}")
    # ‖v_b‖ <= ε rows take the g / ε branch.
    v = randn(6, 5, seed=4)
    v[2], v[4] = 0.0, 3.0
    v_prev = randn(6, 4, seed=5)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    for center in (False, True):
        for name, a, e in zip(("loss", "ce", "alignment", "g_v"), emu.loss_epilogue(v, target, v_prev, 0.5, True, center),
                              epilogue_ground_truth(v, target, v_prev, 0.5, True, center)):
            expect_close(a, e, 1e-10, f"zero/constant rows {name} center={center}")
    # A target outside [0, C) is never read through: its row's CE and g_v are NaN, the other rows exact.
    v, v_prev = randn(4, 3, seed=6), randn(4, 2, seed=7)
    for bad in (3, -1, 10**9):
        target = torch.tensor([0, bad, 2, 1])
        loss, ce, _, g_v = emu.loss_epilogue(v, target, v_prev, 0.5, True, False)
        if not (torch.isnan(loss) and torch.isnan(ce) and torch.isnan(g_v[1]).all()):
            raise AssertionError(f"target {bad}: loss {loss.item()}, ce {ce.item()}, g_v row {g_v[1].tolist()}")
        if not torch.isfinite(g_v[[0, 2, 3]]).all():
            raise AssertionError(f"target {bad}: rows with valid targets are not finite")


def check_bhattacharyya(emu, dtypes, shapes):
    """The Bhattacharyya term (alignment kBhattacharyya) against the float64 oracle on every epilogue shape with
    C' = C, with and without a target, mean and sum, v_prev holding a confident row, the log of a one-hot row (−inf)
    and a copy of v's row (bhattacharyya_inputs); float32 element by element no less accurate than plain float32
    torch; two launches (the row kernel and the scalars); a Bhattacharyya call with center or C' ≠ C refused."""
    for B, C, _ in shapes:
        for dtype in dtypes:
            v, target, v_prev = bhattacharyya_inputs(B, C, dtype)
            for with_target in (True, False):
                for mean in (True, False):
                    t = target if with_target else None
                    name = f"B={B} C={C} {dtype} target={with_target} mean={mean}"
                    emu.take_launches_run()
                    actual = emu.loss_epilogue(v, t, v_prev, 0.7, mean, False, "bhattacharyya")
                    launches = emu.take_launches_run()
                    if launches != 2:
                        raise AssertionError(f"bhattacharyya {name}: {launches} launches, expected 2")
                    expected = epilogue_ground_truth(v, t, v_prev, 0.7, mean, False, "bhattacharyya")
                    for label, a, e in zip(("loss", "ce", "alignment", "g_v"), actual, expected):
                        expect_close(a, e, ACC_TOL[dtype], f"bhattacharyya {label} {name}")
                    if dtype == torch.float32:
                        plain = plain_epilogue(v, t, v_prev, 0.7, mean, False, "bhattacharyya")
                        for label, a, r, e in zip(("loss", "ce", "alignment", "g_v"), actual, plain, expected):
                            assert_no_less_accurate(a, r, e, f"bhattacharyya {label} {name}")
    v, target, v_prev = bhattacharyya_inputs(5, 4, torch.float32)
    for bad_prev, center in ((v_prev[:, :3].contiguous(), False), (v_prev, True)):
        try:
            emu.loss_epilogue(v, target, bad_prev, 0.7, True, center, "bhattacharyya")
        except RuntimeError:
            continue
        raise AssertionError(f"loss_epilogue accepted bhattacharyya with C' = {bad_prev.shape[1]}, center={center}")


def check_wide_rows(emu):
    """float32, wide rows: loss, alignment and g_v element by element no less accurate than plain float32 torch
    (to two float32 ulps), both against float64; the cosine Gram likewise."""
    for B, C, Cp in WIDE_ROWS_NARROW_C:
        v, target, v_prev = wide_row_inputs(B, C, Cp)
        for center in (True, False):
            actual = emu.loss_epilogue(v, target, v_prev, 0.7, False, center)
            plain = plain_epilogue(v, target, v_prev, 0.7, False, center)
            expected = epilogue_ground_truth(v, target, v_prev, 0.7, False, center)
            for name, a, r, e in zip(("loss", "ce", "alignment", "g_v"), actual, plain, expected):
                if name != "ce":
                    assert_no_less_accurate_to_rounding(a, r, e, f"{name} B={B} C={C} C'={Cp} center={center}")
            gram = emu.cosine_gram(v_prev, center)
            assert_no_less_accurate_to_rounding(gram, reference.cosine_gram(v_prev, center),
                                                cosine_gram_ground_truth(v_prev, center),
                                                f"cosine_gram B={B} C={Cp} center={center}")


# The aligned feature-space cases of the suite plus two larger batches (the identity's float32 error grew with B).
ALIGNED_FEATURE_SPACE_EMULATED = ALIGNED_FEATURE_SPACE + [(200, 6), (1000, 10)]


def check_aligned_feature_space(emu, shapes=ALIGNED_FEATURE_SPACE_EMULATED):
    """float32, C + C' < B and v_prev ≈ v (tests/test_fused_local_loss.py, reduction "sum", v = h): the
    feature-space identity FA = ‖âᵀâ‖² − 2‖b̂ᵀâ‖² + ‖b̂ᵀb̂‖² cancels, so its Grams must be wide. Loss and alignment
    no less accurate than plain float32 torch (batch space) to two float32 ulps, g_v (= dh) by the suite's rule;
    also under the forced feature-space plan, whatever the emulator group's plan. And g_v on the rows with
    ‖v_b‖ > 1e-6 (not the g/ε branch of all-zero post-ReLU rows, whose ~1e12 entries set the rule's scale) as a
    whole: its largest error no larger than plain's there, to two float32 ulps of its largest |truth| (P = Z diag(s) G
    summed in float32 fails this: 3.3e-6 against plain's 2.1e-6 at B = 40, C = 6, centred)."""
    saved = emu.plan
    try:
        for plan in ("", "epilogue_feature=1,gram_splits=3"):
            emu.plan = LaunchPlan.parse(plan) if plan else saved
            for B, C in shapes:
                v, target, v_prev = aligned_inputs(B, C)
                for center in (True, False):
                    actual = emu.loss_epilogue(v, target, v_prev, 0.7, False, center)
                    plain = plain_epilogue(v, target, v_prev, 0.7, False, center)
                    expected = epilogue_ground_truth(v, target, v_prev, 0.7, False, center)
                    for name, a, r, e in zip(("loss", "ce", "alignment", "g_v"), actual, plain, expected):
                        label = f"aligned {name} B={B} C={C} center={center} plan={plan or 'group'}"
                        if name in ("loss", "alignment"):
                            assert_no_less_accurate_to_rounding(a, r, e, label)
                        elif name == "g_v":
                            assert_no_less_accurate(a, r, e, label)
                            u = v.double() - (v.double().mean(1, keepdim=True) if center else 0.0)
                            regular = u.norm(dim=1) > 1e-6
                            error, plain_error = ((x.double() - e)[regular].abs().max().item() for x in (a, r))
                            slack = FLOAT32_ROUNDING * e[regular].abs().max().item()
                            if not error <= plain_error + slack:
                                raise AssertionError(f"{label}, rows with ‖v_b‖ > 1e-6: largest error {error:.2e} > "
                                                     f"plain's {plain_error:.2e} + {slack:.1e}")
    finally:
        emu.plan = saved


def check_plans_reach_launchers(emu):
    """Each LaunchPlan field changes what the launchers do (a plan silently ignored fails here): the workspace
    sizes of split-K, of the two alignment forms and of split Grams / column tiles, and the blocks launched
    for a batch tiling. The results of every plan are checked by the other groups."""
    saved = emu.plan

    def workspace(plan, query, *args):
        emu.plan = LaunchPlan.parse(plan)
        return query(*args)

    def blocks(plan, run):
        emu.plan = LaunchPlan.parse(plan)
        emu.take_blocks_run()
        run()
        return emu.take_blocks_run()

    def expect(condition, what):
        if not condition:
            raise AssertionError(f"a forced launch plan did not reach the launchers: {what}")

    try:
        f32 = torch.float32
        forward = emu.projection_forward_workspace_bytes
        # (33, 300, 17): two 256-column panels of D; one panel per split is split-K with a (2, B, C) partial.
        split, whole = (workspace(f"forward_panels_per_split={n}", forward, 33, 17, 300, f32) for n in (1, 1000))
        expect(split == 2 * 33 * 17 * 4 and whole == 0, f"forward workspace {split} / {whole} bytes")
        # B = 300: three 128-row batch tiles, one block per tile or one block for all.
        h, grad_v = randn(300, 64, dtype=f32), randn(300, 10, seed=1, dtype=f32)
        weight = randn(10, 64, seed=2, dtype=f32)
        counts = [blocks(f"forward_panels_per_split=1000,forward_btiles_per_block={n}",
                         lambda: emu.projection_forward(h, weight, 10, 0, 0.0, 0.0, 0)) for n in (1, 3)]
        expect(counts[0] > counts[1], f"forward blocks {counts} for 1 / 3 batch tiles per block")
        counts = [blocks(f"backward_btiles_per_block={n}",
                         lambda: emu.projection_backward(grad_v, weight, 64, 0, 0.0, 0.0, 0, f32)) for n in (1, 3)]
        expect(counts[0] == 3 * counts[1], f"backward blocks {counts} for 1 / 3 batch tiles per block")
        # (300, 10, 12): C + C' < B, so the heuristic takes feature space.
        epilogue = emu.loss_epilogue_workspace_bytes
        sizes = {plan: workspace(plan, epilogue, 300, 10, 12, True, f32)
                 for plan in ("", "epilogue_feature=1", "epilogue_feature=0", "epilogue_feature=1,gram_splits=1",
                              "epilogue_feature=1,gram_splits=3", "epilogue_feature=0,batch_splits=1",
                              "epilogue_feature=0,batch_splits=2")}
        expect(sizes[""] == sizes["epilogue_feature=1"] != sizes["epilogue_feature=0"], f"epilogue workspace {sizes}")
        expect(sizes["epilogue_feature=1,gram_splits=1"] < sizes["epilogue_feature=1,gram_splits=3"],
               f"epilogue workspace {sizes}")
        expect(sizes["epilogue_feature=0,batch_splits=1"] < sizes["epilogue_feature=0,batch_splits=2"],
               f"epilogue workspace {sizes}")
    finally:
        emu.plan = saved


def record_outputs(emu) -> list:
    """Make every launcher method of `emu` also append (name, outputs) to the returned list."""
    outputs = []
    for name in ("projection_forward", "projection_backward", "loss_epilogue", "cosine_gram", "dropped_projection"):
        method = getattr(emu, name)

        def recording(*args, _method=method, _name=name, **kwargs):
            result = _method(*args, **kwargs)
            outputs.append((_name, [t.clone() for t in (result if isinstance(result, tuple) else (result,))]))
            return result

        setattr(emu, name, recording)
    return outputs


def compare_outputs(outputs: list, saved: list) -> int:
    """1 (a failed group) unless both lists hold the same calls with bit-identical outputs (NaN equal to NaN,
    −0 equal to +0), else 0. Prints which outputs (op, index in its result) differ, in how many calls."""
    if [name for name, _ in outputs] != [name for name, _ in saved]:
        print(f"FAILED  compare: {len(outputs)} calls now, {len(saved)} saved, or in another order", flush=True)
        return 1
    differing = {}
    for (name, now), (_, then) in zip(outputs, saved):
        for index, (a, b) in enumerate(zip(now, then)):
            if a.dtype != b.dtype or not torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0)):
                differing[(name, index)] = differing.get((name, index), 0) + 1
    if differing:
        print("FAILED  compare: outputs that differ from the saved run (op, output index: calls): "
              + ", ".join(f"{name} {index}: {count}" for (name, index), count in sorted(differing.items())), flush=True)
        return 1
    print(f"ok      compare: {len(outputs)} calls, every output bit-identical to the saved run", flush=True)
    return 0


PLANS = {
    "default": "",
    "max-split": "forward_panels_per_split=1,backward_btiles_per_block=1,epilogue_feature=1,gram_splits=3",
    "regenerate": "forward_panels_per_split=2,forward_btiles_per_block=1,epilogue_feature=0,batch_splits=2",
    "no-split": "forward_panels_per_split=1000,forward_btiles_per_block=2,backward_btiles_per_block=2,"
                "epilogue_feature=0",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="float32/float64, fewer shapes, default plan only")
    parser.add_argument("--keep-build", help="build into this directory and keep it")
    parser.add_argument("-k", dest="only", default="", help="run only the groups whose name contains this")
    parser.add_argument("--cuda-dir", default=os.path.join(ROOT, "csrc", "cuda"),
                        help="the CUDA sources to emulate (default csrc/cuda; e.g. a copy of an earlier version)")
    parser.add_argument("--dump", help="save every output of the launchers (in call order) to this file")
    parser.add_argument("--compare", help="fail unless every output equals, bit for bit, the one saved by --dump "
                                          "in this file (a kernel change that must not change results)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    build_dir = args.keep_build or tempfile.mkdtemp(prefix="svp_emu_")
    os.makedirs(build_dir, exist_ok=True)
    start = time.time()
    emu = Emulated(build(build_dir, args.cuda_dir))
    print(f"run_emulation: built the kernels for the CPU in {time.time() - start:.0f}s ({build_dir})", flush=True)
    outputs = record_outputs(emu) if args.dump or args.compare else None

    all_dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    dtypes = all_dtypes[:2] if args.quick else all_dtypes
    # Quick: every projection shape still (the 64-wide tile, C > 128, 16-byte grad_v loads), plus the sanitizer's.
    projection_shapes = PROJECTION_SHAPES + [s for s in SMALL_PROJECTION_SHAPES if s not in PROJECTION_SHAPES]
    # Quick: still one multi-tile batch-space shape (70, 70, 50) and one split-Gram shape (300, 10, 12).
    epilogue_shapes = [EPILOGUE_SHAPES[i] for i in (0, 2, 3, 5, 6)] if args.quick else EPILOGUE_SHAPES
    epilogue_shapes = epilogue_shapes + [s for s in SMALL_EPILOGUE_SHAPES if s not in epilogue_shapes]
    # (name, launch plan, emulator knobs, check): the plan goes to every launcher as a LaunchPlan argument;
    # SVP_EMU_REVERSE and SVP_EMU_SMS are read by the emulator (svp_emu.h, emu_api.cpp).
    groups = [("plans reach the launchers", "", {"SVP_EMU_REVERSE": "0", "SVP_EMU_SMS": "4"},
               lambda: check_plans_reach_launchers(emu))]
    for plan_name, plan in (PLANS.items() if not args.quick else [("default", "")]):
        for reverse in ("0", "1"):
            for sms in ("4", "132") if plan_name == "default" else ("4",):
                plan_dtypes = dtypes if plan_name == "default" else [torch.float32, torch.float64]
                env = {"SVP_EMU_REVERSE": reverse, "SVP_EMU_SMS": sms}
                label = f"plan={plan_name} reverse={reverse} sms={sms}"
                if plan_name == "default" and reverse == "0" and sms == "4":
                    groups.append((f"masks {label}", plan, env, lambda d=plan_dtypes: check_masks(emu, d)))
                    groups.append((f"dropped projection {label}", plan, env,
                                   lambda d=plan_dtypes: check_dropped_projection(emu, d)))
                groups.append((f"projection {label}", plan, env,
                               lambda d=plan_dtypes: check_projection(emu, d, projection_shapes)))
                groups.append((f"epilogue {label}", plan, env,
                               lambda d=plan_dtypes: check_epilogue(emu, d, epilogue_shapes)))
                groups.append((f"bhattacharyya {label}", plan, env,
                               lambda d=plan_dtypes: check_bhattacharyya(emu, d, epilogue_shapes)))
                # Wide rows (C + C' > B) take the batch-space path; the max-split plan forces the feature-space
                # identity onto them, whose float32 Grams cancel there (docs/migration.md), so it is left out.
                if reverse == "0" and sms == "4" and plan_name != "max-split":
                    groups.append((f"wide-row accuracy {label}", plan, env, lambda: check_wide_rows(emu)))
                if reverse == "0" and sms == "4" and plan_name == "default":
                    groups.append((f"aligned feature-space accuracy {label}", plan, env,
                                   lambda: check_aligned_feature_space(emu)))
    failures = 0
    for name, plan, env, check in groups:
        if args.only not in name:
            continue
        os.environ.update(env)
        emu.plan = LaunchPlan.parse(plan)
        start = time.time()
        try:
            check()
            print(f"ok      {name}  ({time.time() - start:.0f}s)", flush=True)
        except AssertionError as error:
            failures += 1
            print(f"FAILED  {name}: {error}", flush=True)
    if not args.keep_build:
        shutil.rmtree(build_dir, ignore_errors=True)
    if args.dump:
        torch.save(outputs, args.dump)
        print(f"run_emulation: saved {len(outputs)} outputs to {args.dump}")
    if args.compare:
        failures += compare_outputs(outputs, torch.load(args.compare, weights_only=True))  # tensors only: runs no code
    print("run_emulation: " + ("all ok" if failures == 0 else f"{failures} group(s) FAILED"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
