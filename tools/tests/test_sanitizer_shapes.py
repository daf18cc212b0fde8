"""The small shapes of the sanitizer (tools/sanitize_cuda.py --small, run by tools/gpu_check.py) and of the CUDA
emulator's quick run reach every path of the CUDA kernels (svp_kernels.testing SMALL_*_SHAPES): the tile a forward
takes and the paths below are decided by these properties of the shapes alone (csrc/cuda/projection.cu,
csrc/cuda/epilogue.cu)."""

from svp_kernels.testing import SMALL_EPILOGUE_SHAPES, SMALL_PROJECTION_SHAPES


def test_projection_shapes_reach_every_path():
    classes = [C for _, _, C in SMALL_PROJECTION_SHAPES]
    assert any(C <= 16 for C in classes) and any(16 < C <= 32 for C in classes), "16- and 32-wide forward tiles"
    assert any(C > 32 for C in classes), "the 64-wide forward tile"
    assert any(C > 128 for C in classes), "the backward regenerating its panel per 128-class chunk"
    assert any(C % 4 == 0 for C in classes) and any(C % 4 for C in classes), "16-byte and scalar grad_v loads"
    assert any(D > 256 for _, D, _ in SMALL_PROJECTION_SHAPES), "two panels of D: split-K under the forced plans"
    assert any(B > 1 and D % 4 == 0 for B, D, _ in SMALL_PROJECTION_SHAPES), "16-byte loads of h"


def test_epilogue_shapes_reach_every_path():
    batch = [(B, C, Cp) for B, C, Cp in SMALL_EPILOGUE_SHAPES if C + Cp >= B]
    feature = [(B, C, Cp) for B, C, Cp in SMALL_EPILOGUE_SHAPES if C + Cp < B]
    assert feature, "feature space (C + C' < B)"
    assert any(C + Cp > 32 for _, C, Cp in batch), "batch space with more than one 32-wide K step over C + C'"
