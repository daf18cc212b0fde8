"""The host cost of the triton backend's eager path (bench/NOTES.md, "Host cost of the triton backend").

At small shapes a GPU finishes a call's kernels before the host has queued them, so the Python around the
launches sets the speed. These checks run the launchers with compiled (JIT) kernels whose launches are
stubbed (svp_kernels/testing/host_cost.py), in a child process without TRITON_INTERPRET, and hold what
can be counted exactly on CPU: every launch goes to the kernel directly (not through torch's
triton_kernel_wrapper_mutation higher-order op, ~0.5 ms of Python per launch on an H100's host, which also
added an entry to torch's kernel side table per launch for the life of the process), and a budget of Python
function calls per forward + backward (a timing would depend on the machine's load).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Python function calls of one forward + backward through the node, stubbed launches included: 136 without
# v_prev, 147 with (torch 2.13, Triton 3.9); 2885 and 3358 when every launch went through wrap_triton's
# higher-order op, and 213 with v_prev when the launchers called triton.cdiv (a constexpr function).
PYTHON_CALL_BUDGET = 200

CHILD = textwrap.dedent("""
    import json, sys, torch
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper, kernel_side_table
    from svp_kernels.backends.triton import kernels, ops
    from svp_kernels.testing.host_cost import inputs, python_calls, step, stubbed_launches

    assert not ops.INTERPRETED
    ops._sm_count = lambda device: 132
    result = {}
    with stubbed_launches() as launched:
        for with_prev in (False, True):
            args = inputs(256, 4096, 10, with_prev)
            step(*args)
            launched.clear()
            tables = len(kernel_side_table.constant_args)
            calls = python_calls(lambda: step(*args))
            result["prev" if with_prev else "no_prev"] = dict(
                launches=list(launched), calls=calls, side_table=len(kernel_side_table.constant_args) - tables)
        # The gradient interface (the trainer's path) launches directly too.
        import svp_kernels.backends.triton as backend
        h, weight, target, v_prev, seed = inputs(64, 300, 10, True)
        launched.clear()
        tables = len(kernel_side_table.constant_args)
        v = backend.projection_value(h.detach(), weight, 10, 0, 1.0, 0.1, seed)
        backend.epilogue_with_grad(v, target, v_prev, 1.0, True, False)
        backend.projection_backward(v, weight, 300, 0, 1.0, 0.1, seed, torch.float32)
        result["gradient_interface"] = dict(launches=list(launched),
                                            side_table=len(kernel_side_table.constant_args) - tables)
        # Outside the eager nodes (the triton_op bodies that torch.compile traces) a launch stays wrapped.
        result["wrapped_outside"] = isinstance(ops._launch(kernels.projection_forward_kernel),
                                               TraceableTritonKernelWrapper)
        try:
            with ops.direct_launches():
                raise KeyError
        except KeyError:
            pass
        result["restored_after_error"] = isinstance(ops._launch(kernels.projection_forward_kernel),
                                                    TraceableTritonKernelWrapper)
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def child_result():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["no_prev", "prev"])
def test_eager_node_launches_kernels_directly(child_result, case):
    result = child_result[case]
    expected = ["projection_forward_kernel", "rows_kernel"] + (["feature_grams_kernel"] if case == "prev" else [])
    assert result["launches"] == expected + ["gradient_kernel", "projection_backward_kernel"], result
    assert result["side_table"] == 0, f"launches went through torch's wrap_triton higher-order op: {result}"


@pytest.mark.parametrize("case", ["no_prev", "prev"])
def test_eager_node_python_call_budget(child_result, case):
    result = child_result[case]
    assert 0 < result["calls"] <= PYTHON_CALL_BUDGET, result


def test_gradient_interface_launches_kernels_directly(child_result):
    result = child_result["gradient_interface"]
    assert "projection_forward_kernel" in result["launches"], result
    assert result["launches"][-1] == "projection_backward_kernel", result
    assert result["side_table"] == 0, f"launches went through torch's wrap_triton higher-order op: {result}"


def test_launches_outside_the_eager_nodes_stay_wrapped_for_compile(child_result):
    assert child_result["wrapped_outside"]
    assert child_result["restored_after_error"]
