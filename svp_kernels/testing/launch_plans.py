"""The CUDA kernels' launch plans, a testing and diagnostic hook (docs/backends.md, "CUDA launch plans").

How the CUDA launchers split their work is a ``svp_cuda::LaunchPlan`` (csrc/cuda/svp_cuda.h); the plan strings
``"key=value,key=value"`` of the tests and tools name its fields. ``launch_plan`` forces one inside a ``with``
block; every plan gives the heuristic's results up to the order of the sums.
"""

from __future__ import annotations

import contextlib

from .. import _ops, backends

# The fields of svp_cuda::LaunchPlan in declaration order, each with its heuristic value and the values it
# may be forced to: counts of at least 1 (0 = the heuristic); epilogue_feature 1 (feature space) or 0 (batch).
LAUNCH_PLAN_FIELDS = {
    "forward_panels_per_split": 0,
    "forward_btiles_per_block": 0,
    "backward_btiles_per_block": 0,
    "gram_splits": 0,
    "batch_splits": 0,
    "epilogue_feature": -1,
}


def parse_launch_plan(text: str = "", **fields) -> dict:
    """The full launch plan (every field of LAUNCH_PLAN_FIELDS) from a plan string and/or keyword fields.

    ``text`` is ``"key=value,key=value"`` ("" = the heuristic everywhere); ``fields`` add to it. A field
    not named keeps its heuristic value. Raises ValueError for an unknown key, a key given twice, or a
    value that is not an allowed integer (counts >= 0, epilogue_feature in {-1, 0, 1}).
    """
    if not isinstance(text, str):
        raise TypeError(f"launch plan: expected a 'key=value,...' string, got {type(text).__name__}")
    given = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = (piece.strip() for piece in item.partition("="))
        if not sep:
            raise ValueError(f"launch plan: expected key=value, got {item!r}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"launch plan: {key} must be an integer, got {value!r}") from None
        if key in given:
            raise ValueError(f"launch plan: {key} is given twice")
        given[key] = number
    for key, value in fields.items():
        if key in given:
            raise ValueError(f"launch plan: {key} is given twice")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"launch plan: {key} must be an integer, got {value!r}")
        given[key] = value
    plan = dict(LAUNCH_PLAN_FIELDS)
    for key, value in given.items():
        if key not in plan:
            raise ValueError(f"launch plan: unknown key {key!r} (expected one of {', '.join(LAUNCH_PLAN_FIELDS)})")
        allowed = value in (-1, 0, 1) if key == "epilogue_feature" else value >= 0
        if not allowed:
            expected = "-1, 0 or 1" if key == "epilogue_feature" else "an integer >= 0"
            raise ValueError(f"launch plan: {key} must be {expected}, got {value}")
        plan[key] = value
    return plan


@contextlib.contextmanager
def launch_plan(text: str = "", **fields):
    """Force the CUDA kernels' launch plan inside the ``with`` block (a testing and diagnostic hook).

    ``launch_plan("forward_panels_per_split=1,epilogue_feature=0")`` or ``launch_plan(gram_splits=3)``:
    the fields of parse_launch_plan; the fields not named take the heuristic. The plan is process-wide
    (it also reaches the backward that autograd runs on its own thread) and the previous one is restored
    on exit. Every plan gives the heuristic's results up to the order of the sums.
    """
    plan = parse_launch_plan(text, **fields)
    if not _ops.extension_has_cuda():
        raise RuntimeError(f"launch_plan needs the CUDA kernels: {backends.unavailable_reason('cuda')}")
    previous = _ops._C._cuda_launch_plan()
    _ops._C._set_cuda_launch_plan(plan)
    try:
        yield plan
    finally:
        _ops._C._set_cuda_launch_plan(previous)
