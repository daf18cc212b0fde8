"""Networks split into blocks for layer-wise training: an MLP, a VGG-11-style CNN, a small ViT, and any
nn.Sequential cut where the user says (BlockwiseModel.from_sequential).

Every model is a ``BlockwiseModel``: ``blocks[i]`` maps the previous block's output to its own, the last
block returns logits (B, num_classes), and ``readouts[i]`` (parameter-free) turns the output of block i
(every block but the last) into the (B, D_i) features that block's random projection reads.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .split import DEFAULT_MAX_FEATURES, split_sequential

NORMS = ("batchnorm", "layernorm", "none")
VGG11_CHANNELS = (64, "pool", 128, "pool", 256, 256, "pool", 512, 512, "pool", 512, 512, "pool")


class BlockwiseModel(nn.Module):
    """blocks: the trainable units in order; readouts: features to project, one per block but the last.

    input_shape: the shape of one example, e.g. (1, 8, 8); forward(x (B, *input_shape)) -> logits (B, C).
    """

    def __init__(self, blocks: list[nn.Module], readouts: list[nn.Module], input_shape: tuple[int, ...],
                 num_classes: int):
        super().__init__()
        if len(readouts) != len(blocks) - 1:
            raise ValueError(f"need one readout per block but the last: {len(blocks)} blocks, {len(readouts)} readouts")
        self.blocks = nn.ModuleList(blocks)
        self.readouts = nn.ModuleList(readouts)
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    @classmethod
    def from_sequential(cls, modules, cuts: Sequence[int], input_shape: Sequence[int], num_classes: int, *,
                        readouts: Sequence[nn.Module | None] | None = None,
                        max_features: int = DEFAULT_MAX_FEATURES) -> "BlockwiseModel":
        """A user's network as blocks: modules (an nn.Sequential or a list of modules) cut before each index
        in cuts, e.g. cuts=(2, 5) gives blocks modules[0:2], modules[2:5], modules[5:].

        The last block must map (B, *input_shape) to logits (B, num_classes). Readouts are inferred from
        each block's output (B, *S): flattened when S has ≤ max_features elements, else (B, C, H, W) maps
        are average-pooled to the largest k × k with C·k² ≤ max_features (split.py); readouts= overrides
        (one entry per block but the last, None to infer). ValueError/TypeError name a bad cut, block or
        readout.
        """
        blocks, chosen = split_sequential(modules, cuts, input_shape, num_classes, readouts=readouts,
                                          max_features=max_features)
        return cls(blocks, chosen, tuple(input_shape), num_classes)


def _norm_1d(norm: str, width: int) -> nn.Module:
    if norm == "batchnorm":
        return nn.BatchNorm1d(width)
    if norm == "layernorm":
        return nn.LayerNorm(width)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def mlp(input_shape: tuple[int, ...], num_classes: int, *, width: int = 256, depth: int = 3,
        norm: str = "batchnorm") -> BlockwiseModel:
    """depth hidden blocks Linear → norm → ReLU of `width` units, then a Linear head block (width → C).

    Input (B, *input_shape) is flattened by the first block; every hidden block's readout is its (B, width)
    output itself.
    """
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be ≥ 1, got depth={depth}, width={width}")
    in_features = math.prod(input_shape)
    blocks: list[nn.Module] = []
    for index in range(depth):
        layers = [nn.Flatten()] if index == 0 else []
        layers += [nn.Linear(in_features if index == 0 else width, width), _norm_1d(norm, width), nn.ReLU()]
        blocks.append(nn.Sequential(*layers))
    blocks.append(nn.Linear(width, num_classes))
    return BlockwiseModel(blocks, [nn.Identity() for _ in range(depth)], input_shape, num_classes)


def _feature_readout(pool_size: int | None) -> nn.Module:
    """(B, C, H, W) -> (B, C·H·W), after adaptive average pooling to pool_size × pool_size when given."""
    if pool_size is None:
        return nn.Flatten()
    return nn.Sequential(nn.AdaptiveAvgPool2d(pool_size), nn.Flatten())


def vgg11(input_shape: tuple[int, int, int], num_classes: int, *, width_multiplier: float = 1.0,
          pool_size: int | None = None) -> BlockwiseModel:
    """VGG-11 (8 conv blocks, CIFAR-style single Linear classifier block).

    Each block is conv3×3 → BatchNorm → ReLU, followed by 2×2 max pooling where VGG-11 pools (skipped once
    the feature map is 1×1, so small images such as digits' 8×8 work). Channels are VGG's 64…512 times
    width_multiplier. pool_size: adaptive average pooling before each block's projection (the paper's
    ablation) where the map is larger than pool_size × pool_size; None projects the whole flattened map.
    """
    channels, height, width = input_shape
    blocks: list[nn.Module] = []
    readouts: list[nn.Module] = []
    for index, item in enumerate(VGG11_CHANNELS):
        if item == "pool":
            continue
        out_channels = max(1, round(item * width_multiplier))
        layers: list[nn.Module] = [nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels), nn.ReLU()]
        pools_next = index + 1 < len(VGG11_CHANNELS) and VGG11_CHANNELS[index + 1] == "pool"
        if pools_next and min(height, width) >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        blocks.append(nn.Sequential(*layers))
        readouts.append(_feature_readout(pool_size if pool_size and min(height, width) > pool_size else None))
        channels = out_channels
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, num_classes)))
    return BlockwiseModel(blocks, readouts, input_shape, num_classes)


class PatchEmbedding(nn.Module):
    """(B, C, H, W) -> (B, 1 + N, dim) tokens: class token, then N non-overlapping patches, plus positions."""

    def __init__(self, input_shape: tuple[int, int, int], patch_size: int, dim: int):
        super().__init__()
        channels, height, width = input_shape
        if height % patch_size or width % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide the image size {height}×{width}")
        num_patches = (height // patch_size) * (width // patch_size)
        self.project = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.positions = nn.Parameter(torch.randn(1, 1 + num_patches, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.project(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), patches], dim=1)
        return tokens + self.positions


class ClassifierHead(nn.Module):
    """(B, 1 + N, dim) tokens -> (B, C) logits from the final LayerNorm of the class or mean token."""

    def __init__(self, dim: int, num_classes: int, token: str):
        super().__init__()
        self.read = TokenReadout(token)
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(self.read(tokens)))


class TokenReadout(nn.Module):
    """(B, 1 + N, dim) -> (B, dim): the class token ("cls") or the mean over all tokens ("mean")."""

    def __init__(self, token: str):
        super().__init__()
        if token not in ("cls", "mean"):
            raise ValueError(f"token must be 'cls' or 'mean', got {token!r}")
        self.token = token

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.token == "cls" else tokens.mean(dim=1)


def vit(input_shape: tuple[int, int, int], num_classes: int, *, patch_size: int = 4, dim: int = 128,
        depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0, blocks_per_unit: int = 2,
        token: str = "cls") -> BlockwiseModel:
    """A small pre-norm ViT in depth / blocks_per_unit trainable units (the paper's SVP+).

    Unit 0 also holds the patch embedding; the last unit also holds the classifier head. Every other
    unit's readout is its class token ("cls") or mean token ("mean"), (B, dim).
    """
    if depth % blocks_per_unit:
        raise ValueError(f"depth {depth} must be a multiple of blocks_per_unit {blocks_per_unit}")

    def transformer_blocks() -> list[nn.Module]:
        return [nn.TransformerEncoderLayer(dim, heads, round(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True) for _ in range(blocks_per_unit)]

    num_units = depth // blocks_per_unit
    blocks: list[nn.Module] = []
    for index in range(num_units):
        layers = [PatchEmbedding(input_shape, patch_size, dim)] if index == 0 else []
        layers += transformer_blocks()
        if index == num_units - 1:
            layers.append(ClassifierHead(dim, num_classes, token))
        blocks.append(nn.Sequential(*layers))
    return BlockwiseModel(blocks, [TokenReadout(token) for _ in range(num_units - 1)], input_shape, num_classes)
