"""The CUDA launch-plan hook (svp_kernels.testing.launch_plan, docs/backends.md): the plan strings the
tests and tools force (svp_kernels.testing) parse into every field of svp_cuda::LaunchPlan, bad ones raise
ValueError, and on a CUDA build the hook sets the adapter's process-wide plan and restores it. The kernels
under each plan are tested by tests/test_cuda_backend.py (GPU) and tools/emulate_cuda (CPU).
"""

from __future__ import annotations

import pytest

import svp_kernels as sk
from svp_kernels.testing import EPILOGUE_PLANS, LAUNCH_PLAN_FIELDS, PROJECTION_PLANS, launch_plan, parse_launch_plan

HEURISTIC = {"forward_panels_per_split": 0, "forward_btiles_per_block": 0, "backward_btiles_per_block": 0,
             "gram_splits": 0, "batch_splits": 0, "epilogue_feature": -1}


def test_parse_fills_every_field_with_the_heuristic():
    assert parse_launch_plan("") == HEURISTIC == LAUNCH_PLAN_FIELDS
    plan = parse_launch_plan(" forward_panels_per_split=2, epilogue_feature=0 ,", gram_splits=3)
    assert plan == {**HEURISTIC, "forward_panels_per_split": 2, "epilogue_feature": 0, "gram_splits": 3}
    for text in PROJECTION_PLANS + EPILOGUE_PLANS:
        forced = {key: int(value) for key, value in (item.split("=") for item in text.split(",") if item)}
        assert parse_launch_plan(text) == {**HEURISTIC, **forced}, text


@pytest.mark.parametrize("text,fields,message", [
    ("gram_split=2", {}, "unknown key 'gram_split'"),
    ("", {"batch_split": 1}, "unknown key 'batch_split'"),
    ("gram_splits", {}, "expected key=value"),
    ("gram_splits=two", {}, "gram_splits must be an integer"),
    ("", {"gram_splits": 2.0}, "gram_splits must be an integer"),
    ("", {"gram_splits": True}, "gram_splits must be an integer"),
    ("batch_splits=-1", {}, "batch_splits must be an integer >= 0"),
    ("epilogue_feature=2", {}, "epilogue_feature must be -1, 0 or 1"),
    ("gram_splits=1,gram_splits=2", {}, "gram_splits is given twice"),
    ("gram_splits=1", {"gram_splits": 2}, "gram_splits is given twice"),
])
def test_bad_plans_raise_value_error(text, fields, message):
    with pytest.raises(ValueError, match=message):
        parse_launch_plan(text, **fields)
    with pytest.raises(ValueError, match=message):  # before anything is set, on any build
        with launch_plan(text, **fields):
            pass


@pytest.mark.skipif(sk._ops.extension_has_cuda(), reason="svp_kernels._C has the CUDA kernels")
def test_launch_plan_needs_the_cuda_kernels():
    with pytest.raises(RuntimeError, match="needs the CUDA kernels"):
        with launch_plan("gram_splits=2"):
            pass


@pytest.mark.skipif(not sk._ops.extension_has_cuda(), reason="svp_kernels._C was built without the CUDA kernels")
def test_launch_plan_sets_and_restores_the_adapter_plan():
    C = sk._ops._C
    assert C._cuda_launch_plan() == HEURISTIC
    with launch_plan("forward_panels_per_split=1", epilogue_feature=0) as plan:
        assert C._cuda_launch_plan() == plan == {**HEURISTIC, "forward_panels_per_split": 1, "epilogue_feature": 0}
        with pytest.raises(KeyError):
            with launch_plan(gram_splits=3):
                assert C._cuda_launch_plan() == {**HEURISTIC, "gram_splits": 3}
                raise KeyError("an error inside the block")
        assert C._cuda_launch_plan() == plan
    assert C._cuda_launch_plan() == HEURISTIC
    with pytest.raises(ValueError, match="unknown LaunchPlan field 'gram_split'"):
        C._set_cuda_launch_plan({"gram_split": 1})
    assert C._cuda_launch_plan() == HEURISTIC
