"""Testing helpers for svp_kernels and for code built on it: the float64 oracle, the closeness assertions
(the accuracy rule of docs/design.md §6), the kernel tables and tolerances, the Philox words of each
implementation and the CUDA launch-plan hook.

The project's tests, benchmarks (bench/) and tools (tools/) all import their reference from here, so there is
exactly one. None of it is needed to train or to call the ops.

    from svp_kernels.testing import Case, make_inputs, run, ground_truth, assert_no_less_accurate
"""

from .closeness import (ACCURACY_ATOL, ACCURACY_RTOL, FLOAT32_ROUNDING, assert_close, assert_equal_masks,
                        assert_no_less_accurate, assert_no_less_accurate_to_rounding, scaled_error, seed_tensor)
from .launch_plans import LAUNCH_PLAN_FIELDS, launch_plan, parse_launch_plan
from .oracle import (Case, as_float64, cosine_gram_ground_truth, cpu_backends, device_backends,
                     epilogue_ground_truth, ground_truth, make_inputs, plain_epilogue, projection_ground_truth, run)
from .philox import philox_words
from .tables import (ACC_TOL, EPILOGUE_PLANS, EPILOGUE_SHAPES, IMPLICIT_TOL, MASK_SHAPES, OUT_TOL, PROJECTION_PLANS,
                     PROJECTION_SHAPES, SMALL_EPILOGUE_SHAPES, SMALL_PROJECTION_SHAPES, WIDE_ROWS, WIDE_ROWS_NARROW_C,
                     bhattacharyya_inputs, wide_row_inputs)

__all__ = ["ACCURACY_ATOL", "ACCURACY_RTOL", "ACC_TOL", "EPILOGUE_PLANS", "EPILOGUE_SHAPES", "FLOAT32_ROUNDING",
           "IMPLICIT_TOL", "LAUNCH_PLAN_FIELDS", "MASK_SHAPES", "OUT_TOL", "PROJECTION_PLANS", "PROJECTION_SHAPES",
           "SMALL_EPILOGUE_SHAPES", "SMALL_PROJECTION_SHAPES", "WIDE_ROWS", "WIDE_ROWS_NARROW_C", "Case",
           "as_float64", "assert_close", "assert_equal_masks",
           "assert_no_less_accurate", "assert_no_less_accurate_to_rounding", "bhattacharyya_inputs",
           "cosine_gram_ground_truth",
           "cpu_backends", "device_backends", "epilogue_ground_truth", "ground_truth", "launch_plan", "make_inputs",
           "parse_launch_plan", "philox_words", "plain_epilogue", "projection_ground_truth", "run", "scaled_error",
           "seed_tensor", "wide_row_inputs"]
