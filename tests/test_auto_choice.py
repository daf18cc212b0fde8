"""backend="auto" / projection_path="auto" on CUDA follow the committed table of measurements
(svp_kernels/backends/auto_table.py, read by svp_kernels.backends.auto; the decision is backends.choose). Checked
on CPU: the table is data, and choose's candidates are faked as available CUDA backends."""

from types import SimpleNamespace

import pytest
import torch

from svp_kernels import backends
from svp_kernels.backends import auto, auto_table

CUDA = torch.device("cuda")


def ALL(candidate: str) -> bool:  # noqa: N802  (every candidate allowed)
    return True


def fastest_measured(row) -> str:
    timed = [(ms, name) for name, ms in zip(auto_table.CANDIDATES, row.times) if ms != auto_table.UNMEASURED]
    return min(timed)[1]


def test_each_row_names_its_fastest_measured_candidate_and_the_choice_there_is_it():
    assert auto.ROWS, "the table has measurements"
    for row in auto.ROWS:
        assert row.fastest == fastest_measured(row), row
        assert auto.measured_choice(row.dtype, row.projection, (row.B, row.D, row.C), ALL) == row.fastest


def test_gemm_is_unmeasured_until_measured_and_then_the_fused_path_stays():
    """Today's table (an H100, cuda-gemm not yet timed): cuda fused wherever the table decides."""
    gemm = auto_table.CANDIDATES.index("cuda-gemm")
    if all(row.times[gemm] == auto_table.UNMEASURED for row in auto.ROWS):
        assert {row.fastest for row in auto.ROWS} == {"cuda"}


SYNTHETIC = (  # triton fastest at small shapes, cuda-gemm at wide C, cuda fused in between
    (256, 4096, 10, "float32", "dense", (0.30, 0.50, 0.20), "triton", "t"),
    (1024, 65536, 100, "float32", "dense", (2.00, 1.00, 3.00), "cuda-gemm", "t"),
    (4096, 1024, 10, "float32", "dense", (0.40, 0.90, 0.60), "cuda", "t"),
    (4096, 1024, 10, "float32", "implicit", (0.40, "unmeasured", 0.60), "cuda", "t"),
)


@pytest.fixture
def synthetic(monkeypatch):
    """auto's table replaced by SYNTHETIC; cuda and triton 'available' CUDA backends (stand-in modules)."""
    rows = tuple(auto.ranked(row) for row in SYNTHETIC)
    kinds = {}
    for row in rows:
        kinds.setdefault((row.dtype, row.projection), []).append(row)
    monkeypatch.setattr(auto, "ROWS", rows)
    monkeypatch.setattr(auto, "_BY_KIND", kinds)
    monkeypatch.setattr(backends, "_TABLE_CHOICES", {})  # choices remembered under the real table
    fakes = {name: SimpleNamespace(NAME=name, PROJECTION_PATHS=("fused", "gemm") if name == "cuda" else (),
                                   supports=lambda device, dtype: device.type == "cuda")
             for name in ("cuda", "triton")}
    real_load, real_available = backends.load, backends.is_available
    monkeypatch.setattr(backends, "load", lambda name: fakes.get(name) or real_load(name))
    monkeypatch.setattr(backends, "is_available", lambda name: name in fakes or real_available(name))
    return fakes


def chosen(backend, path, shape, dtype=torch.float32, implicit=False):
    module, gemm = backends.choose(backend, path, CUDA, dtype, shape, implicit)
    return module.NAME + ("-gemm" if gemm else "")


def test_auto_follows_the_table_at_the_nearest_measured_shape(synthetic):
    assert chosen("auto", "auto", (256, 4096, 10)) == "triton"
    assert chosen("auto", "auto", (200, 3000, 12)) == "triton"          # nearest: (256, 4096, 10)
    assert chosen("auto", "auto", (1024, 65536, 100)) == "cuda-gemm"
    assert chosen("auto", "auto", (512, 32768, 128)) == "cuda-gemm"     # nearest: (1024, 65536, 100)
    assert chosen("auto", "auto", (8192, 1024, 10)) == "cuda"           # nearest: (4096, 1024, 10)


def test_the_request_limits_the_candidates(synthetic):
    assert chosen("cuda", "auto", (256, 4096, 10)) == "cuda"            # triton not asked for: cuda fused 0.30
    assert chosen("auto", "fused", (1024, 65536, 100)) == "cuda"        # the gemm path not asked for
    assert chosen("auto", "gemm", (4096, 1024, 10)) == "cuda-gemm"      # only cuda has the gemm path
    assert chosen("triton", "auto", (1024, 65536, 100)) == "triton"
    assert chosen("cuda", "fused", (256, 4096, 10)) == "cuda"           # nothing to choose: no table


def test_outside_the_table_the_fixed_rule_decides(synthetic, monkeypatch):
    # implicit R: one row, uniform, so it decides without reading the shape
    assert chosen("auto", "auto", (3, 5, 7), implicit=True) == "cuda"
    # a dtype without rows: AUTO_CUDA_ORDER and the fused path
    assert chosen("auto", "auto", (256, 4096, 10), dtype=torch.bfloat16) == "cuda"
    # no shape (an identity projection): the same
    assert chosen("auto", "auto", None) == "cuda"
    # the table's winner not available here: the fastest of what is
    monkeypatch.setitem(synthetic, "triton", SimpleNamespace(NAME="triton", supports=lambda device, dtype: False))
    assert chosen("auto", "auto", (256, 4096, 10)) == "cuda"


def test_a_uniform_choice_reads_no_shape(synthetic):
    """Where one candidate wins at every measured shape the shape is never looked at (no guards on dynamic
    sizes under torch.compile): an object that fails on any use stands in for it."""
    class Untouchable:
        def __iter__(self):
            raise AssertionError("the shape was read")

    assert auto.measured_choice("float32", "implicit", Untouchable(), ALL) == "cuda"
    with pytest.raises(AssertionError, match="the shape was read"):
        auto.measured_choice("float32", "dense", Untouchable(), ALL)


def test_cpu_calls_do_not_consult_the_table(synthetic):
    module, gemm = backends.choose("auto", "auto", torch.device("cpu"), torch.float32, (256, 4096, 10))
    assert module.NAME in ("cpu", "reference") and not gemm


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("implicit", [False, True])
def test_the_choice_traces_under_torch_compile(synthetic, dynamic, implicit):
    """fullgraph: no graph break in the decision, with static or dynamic sizes, where the table depends on the
    shape (dense) and where it does not (implicit)."""
    def step(x):
        module, gemm = backends.choose("auto", "auto", CUDA, x.dtype, (x.shape[0], x.shape[1], 10), implicit)
        return x + {"cuda": 1.0, "triton": 2.0}[module.NAME] + (10.0 if gemm else 0.0)

    torch._dynamo.reset()  # the nested step's code object is shared by the parametrisations
    compiled = torch.compile(step, fullgraph=True, backend="eager", dynamic=dynamic)
    for shape in [(256, 4096), (4096, 1024), (300, 3000)]:
        x = torch.zeros(shape)
        assert torch.equal(compiled(x), step(x)), shape
    assert compiled(torch.zeros(256, 4096))[0, 0] == (1.0 if implicit else 2.0)
