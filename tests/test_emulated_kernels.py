"""CUDA kernels under the CPU emulator (tools/emulate_cuda/run_emulation.py runs the whole kernel suite this way):
the GEMM path's R̃ kernel (svp_cuda::dropped_projection) against the CPU kernels' R̃ (svp_kernels::dropped_projection
on CPU tensors) — bit for bit for a dense R, the mask bit for bit and the values to float32 rounding of log/cos for
an implicit R (the CPU generates it with vector polynomials) — and against the fused forward's R̃ bit for bit; and
the backward's folded incoming-gradient scale against scaling grad_v first."""

import pytest
import torch

import svp_kernels as sk
from svp_kernels.philox import keep_mask

from svp_kernels.testing import IMPLICIT_TOL, MASK_SHAPES, assert_close, assert_equal_masks

from emulated_cuda import emulator

pytestmark = pytest.mark.skipif(not sk.backends.is_available("cpu"), reason="the cpu backend did not load")


@pytest.mark.parametrize("C,D,p,seed", MASK_SHAPES)
@pytest.mark.parametrize("implicit", [False, True])
def test_emulated_r_tilde_matches_the_cpu_kernels(C, D, p, seed, implicit):
    emu = emulator()
    for dtype in (torch.float32, torch.float64):
        weight = None if implicit else torch.randn(C, D, generator=torch.Generator().manual_seed(C), dtype=dtype)
        args = (weight, C, D, 77, D**-0.5, p)
        emulated = emu.dropped_projection(*args, seed, dtype)
        cpu = torch.ops.svp_kernels.dropped_projection(*args, torch.tensor(seed), dtype)
        name = f"C={C} D={D} p={p} implicit={implicit} {dtype}"
        assert_equal_masks(emulated != 0, keep_mask(seed, C, D, p), f"emulated mask {name}")
        if implicit:
            assert_equal_masks(emulated != 0, cpu != 0, f"emulated vs cpu mask {name}")
            assert_close(emulated, cpu, IMPLICIT_TOL, f"emulated vs cpu implicit R̃ {name}")
        else:
            assert torch.equal(emulated, cpu), f"emulated R̃ differs from the CPU kernels' ({name})"
        fused = emu.projection_forward(torch.eye(D, dtype=dtype), weight, C, 77, D**-0.5, p, seed)
        assert torch.equal(emulated, fused.t()), f"emulated R̃ differs from the fused forward's ({name})"


def test_emulated_r_tilde_in_bfloat16_is_the_float32_value_rounded():
    emu = emulator()
    C, D, p, seed = 13, 17, 0.1, 2**40 + 3
    weight = torch.randn(C, D, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    written = emu.dropped_projection(weight, C, D, 0, 0.0, p, seed, torch.bfloat16)
    expected = emu.dropped_projection(weight.float(), C, D, 0, 0.0, p, seed, torch.float32).to(torch.bfloat16)
    assert torch.equal(written, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_backward_folds_the_gradient_scale(dtype):
    """dh of (grad_v, grad_scale) is, bit for bit, dh of grad_scale · grad_v: on the emulated CUDA kernel, on the
    CPU op, and the two agree with the float64 truth."""
    emu = emulator()
    B, C, D, p, seed = 9, 10, 200, 0.3, 5
    generator = torch.Generator().manual_seed(3)
    grad_v = torch.randn(B, C, generator=generator, dtype=dtype)
    weight = torch.randn(C, D, generator=generator, dtype=dtype)
    scale = torch.tensor(-0.37, dtype=dtype)
    folded = emu.projection_backward(grad_v, weight, D, 0, 0.0, p, seed, dtype, scale)
    assert torch.equal(folded, emu.projection_backward(scale * grad_v, weight, D, 0, 0.0, p, seed, dtype))
    ops = torch.ops.svp_kernels
    cpu = ops.projection_backward(grad_v, weight, D, 0, 0.0, p, torch.tensor(seed), dtype, scale)
    assert torch.equal(cpu, ops.projection_backward(scale * grad_v, weight, D, 0, 0.0, p, torch.tensor(seed), dtype))
    assert_close(folded, cpu, 1e-5 if dtype == torch.float32 else 1e-12, "emulated vs cpu dh")
