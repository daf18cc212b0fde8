"""The GEMM path's CUDA R̃ kernel (svp_cuda::dropped_projection) under the CPU emulator against the CPU kernels'
R̃ (svp_kernels::dropped_projection on CPU tensors): bit for bit for a dense R, the mask bit for bit and the
values to float32 rounding of log/cos for an implicit R (the CPU generates it with vector polynomials); and the
fused forward's R̃ bit for bit. tools/emulate_cuda/run_emulation.py runs the whole kernel suite this way."""

import pytest
import torch

import svp_kernels as sk
from svp_kernels.philox import keep_mask

from cases import IMPLICIT_TOL, MASK_SHAPES
from emulated_cuda import emulator
from helpers import assert_close, assert_equal_masks

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
