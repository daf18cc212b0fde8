"""A user's network split into SVP blocks: BlockwiseModel.from_sequential's cuts, shape probe and readouts.

modules[0:cuts[0]], modules[cuts[0]:cuts[1]], …, modules[cuts[-1]:] become the blocks (each an
nn.Sequential); a residual stage written as one module stays one block. One zero batch (B = 2, eval mode,
no gradient) is passed through the blocks to learn every block's output shape (B, *S). The readout of
every block but the last, i.e. what that block's random projection reads, is then inferred:

- S has at most max_features elements: flatten, (B, prod(S)) (nn.Identity when S is already (D,));
- S = (C, H, W) with more: adaptive average pooling to k × k, then flatten, where k is the largest size
  with C·k² ≤ max_features (k ≥ 1: global average pooling when C > max_features), k ≤ min(H, W);
- any other larger S: refused, pass that block's readout yourself.

readouts= overrides: one entry per block but the last, None where the rule above should decide.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

DEFAULT_MAX_FEATURES = 4096


def check_cuts(cuts: Sequence[int], num_modules: int) -> list[int]:
    """cuts as a list of ints, strictly increasing, each in [1, num_modules - 1]; ValueError/TypeError else."""
    if isinstance(cuts, (int, str, bytes)) or not isinstance(cuts, Sequence):
        raise TypeError(f"cuts must be a sequence of ints (indices where a new block starts), got {cuts!r}")
    for cut in cuts:
        if isinstance(cut, bool) or not isinstance(cut, int):
            raise TypeError(f"cuts must hold ints, got {cut!r} in {list(cuts)}")
    for cut in cuts:
        if not 1 <= cut <= num_modules - 1:
            raise ValueError(f"cuts must lie in [1, {num_modules - 1}] (a block starts at each cut; "
                             f"{num_modules} modules), got {cut} in {list(cuts)}")
    for first, second in zip(cuts, cuts[1:]):
        if second <= first:
            raise ValueError(f"cuts must be strictly increasing, got {first} then {second} in {list(cuts)}")
    return list(cuts)


def infer_readout(shape: tuple[int, ...], max_features: int, block: int) -> nn.Module:
    """The readout for a block output of shape (B, *S) by the rule of the module docstring."""
    features = math.prod(shape[1:])
    if len(shape) == 2:
        return nn.Identity() if features <= max_features else _too_large(shape, max_features, block)
    if features <= max_features:
        return nn.Flatten()
    if len(shape) == 4:
        channels, height, width = shape[1:]
        side = max(1, min(math.isqrt(max_features // channels), height, width))
        return nn.Sequential(nn.AdaptiveAvgPool2d(side), nn.Flatten())
    return _too_large(shape, max_features, block)


def _too_large(shape: tuple[int, ...], max_features: int, block: int):
    raise ValueError(f"block {block} outputs {tuple(shape[1:])} per example, {math.prod(shape[1:])} features > "
                     f"max_features = {max_features}, and only 4-D (B, C, H, W) maps are pooled automatically: "
                     f"pass readouts[{block}] (a module mapping the block's output to (B, D)) or raise max_features")


def _module_range(bounds: list[tuple[int, int]], block: int) -> str:
    start, stop = bounds[block]
    return f"module {start}" if stop - start == 1 else f"modules {start}–{stop - 1}"


def split_sequential(modules, cuts: Sequence[int], input_shape: Sequence[int], num_classes: int, *,
                     readouts: Sequence[nn.Module | None] | None = None,
                     max_features: int = DEFAULT_MAX_FEATURES) -> tuple[list[nn.Module], list[nn.Module]]:
    """(blocks, readouts) of modules cut at cuts; see the module docstring. The last block must map
    (B, *input_shape) to (B, num_classes)."""
    if isinstance(modules, nn.Sequential):
        modules = list(modules)
    if not isinstance(modules, (list, tuple)) or not modules:
        raise TypeError(f"modules must be an nn.Sequential or a non-empty list of nn.Module, got {type(modules)}")
    for index, module in enumerate(modules):
        if not isinstance(module, nn.Module):
            raise TypeError(f"modules[{index}] must be an nn.Module, got {type(module).__name__}")
    cuts = check_cuts(cuts, len(modules))
    input_shape = tuple(input_shape)
    if not input_shape or any(isinstance(size, bool) or not isinstance(size, int) or size < 1
                              for size in input_shape):
        raise ValueError(f"input_shape must be the shape of one example, positive ints, got {input_shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int ≥ 1, got {num_classes!r}")
    if isinstance(max_features, bool) or not isinstance(max_features, int) or max_features < 1:
        raise ValueError(f"max_features must be an int ≥ 1, got {max_features!r}")
    starts = [0] + cuts
    bounds = list(zip(starts, cuts + [len(modules)]))
    blocks = [nn.Sequential(*modules[start:stop]) for start, stop in bounds]
    if readouts is not None and len(readouts) != len(blocks) - 1:
        raise ValueError(f"readouts must hold one entry per block but the last ({len(blocks) - 1}), "
                         f"got {len(readouts)}")
    for index, readout in enumerate(readouts or []):
        if readout is not None and not isinstance(readout, nn.Module):
            raise TypeError(f"readouts[{index}] must be an nn.Module or None, got {type(readout).__name__}")
    shapes = _probe_shapes(blocks, bounds, input_shape)
    if shapes[-1] != (2, num_classes):
        raise ValueError(f"the last block ({_module_range(bounds, len(blocks) - 1)}) outputs "
                         f"{tuple(shapes[-1][1:])} per example; it must output (B, num_classes) = "
                         f"(B, {num_classes}) logits: end the model with a layer of {num_classes} outputs")
    chosen = []
    for index, shape in enumerate(shapes[:-1]):
        given = readouts[index] if readouts is not None else None
        readout = given if given is not None else infer_readout(shape, max_features, index)
        _check_readout(readout, shape, index, blocks)
        chosen.append(readout)
    return blocks, chosen


def _device_dtype(blocks: list[nn.Module]) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the first parameter (CPU float32 for a parameter-free model)."""
    parameter = next((p for block in blocks for p in block.parameters()), None)
    return (parameter.device, parameter.dtype) if parameter is not None else (torch.device("cpu"), torch.float32)


@torch.no_grad()
def _probe_shapes(blocks: list[nn.Module], bounds: list[tuple[int, int]],
                  input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every block's output shape on a zero batch of two, in eval mode (training modes restored after)."""
    device, dtype = _device_dtype(blocks)
    modes = [module.training for block in blocks for module in block.modules()]
    for block in blocks:
        block.eval()
    h, shapes = torch.zeros(2, *input_shape, device=device, dtype=dtype), []
    try:
        for index, block in enumerate(blocks):
            try:
                h = block(h)
            except Exception as error:  # a layer of the wrong size raises RuntimeError, others their own
                raise ValueError(f"block {index} ({_module_range(bounds, index)}) fails on input of shape "
                                 f"{tuple(h.shape)}: {type(error).__name__}: {error}") from error
            if not isinstance(h, torch.Tensor) or h.dim() < 2 or h.shape[0] != 2:
                raise ValueError(f"block {index} ({_module_range(bounds, index)}) must return one tensor "
                                 f"(B, …) with the batch first, got {type(h).__name__} "
                                 f"{tuple(h.shape) if isinstance(h, torch.Tensor) else ''}")
            shapes.append(tuple(h.shape))
    finally:
        for module, mode in zip((m for block in blocks for m in block.modules()), modes):
            module.training = mode
    return shapes


@torch.no_grad()
def _check_readout(readout: nn.Module, shape: tuple[int, ...], index: int, blocks: list[nn.Module]) -> None:
    """ValueError unless readout is parameter-free (SVP never trains it) and maps a (2, *S) block output to
    (2, …) features."""
    if any(True for _ in readout.parameters()):
        raise ValueError(f"readouts[{index}] must be parameter-free (SVP trains blocks, never readouts): put "
                         f"its layers at the end of block {index} instead")
    device, dtype = _device_dtype(blocks)
    h = torch.zeros(shape, device=device, dtype=dtype)
    try:
        features = readout(h)
    except Exception as error:
        raise ValueError(f"readouts[{index}] fails on block {index}'s output of shape {tuple(shape)}: "
                         f"{type(error).__name__}: {error}") from error
    if not isinstance(features, torch.Tensor) or features.dim() < 2 or features.shape[0] != shape[0]:
        raise ValueError(f"readouts[{index}] must map block {index}'s output (B, …) to features (B, D), "
                         f"got {tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)}")
