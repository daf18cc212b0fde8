"""Bring your own model: a small ResNet-style CNN, written as a plain list of modules, cut into SVP blocks
with BlockwiseModel.from_sequential and trained on digits with SVP and with backprop.

    python python/train_own_resnet.py [--epochs 15] [--seed 0]

Blocks: the stem, a residual stage (two residual units with their skip connections: one block, trained by
one local loss), a strided downsampling conv, a second residual stage, and the head (pool, Linear). The
readouts of blocks 0-2 are inferred from their outputs: (B, 16, 8, 8) and (B, 32, 4, 4) maps have at most
max_features = 4096 elements, so they are flattened. Block 3's is given: the global average the head reads.
"""

import argparse

import torch
from torch import nn

from svp_kernels.train import BlockwiseModel, LayerwiseTrainer, batch_indices, load_dataset


class ResidualUnit(nn.Module):
    """x + conv-BN-ReLU-conv-BN(x), then ReLU: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


def resnet_modules(in_channels: int, num_classes: int, width: int = 16) -> tuple[list[nn.Module], list[int]]:
    """The network as a flat list of modules and the indices where SVP blocks start."""
    modules = [
        conv_bn_relu(in_channels, width),                             # 0: stem            block 0
        nn.Sequential(ResidualUnit(width), ResidualUnit(width)),      # 1: residual stage  block 1
        conv_bn_relu(width, 2 * width, stride=2),                     # 2: downsample      block 2
        nn.Sequential(ResidualUnit(2 * width), ResidualUnit(2 * width)),  # 3: stage 2     block 3
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),  # 4-6: head  block 4
    ]
    return modules, [1, 2, 3, 4]


def build_model(input_shape: tuple[int, int, int], num_classes: int) -> BlockwiseModel:
    modules, cuts = resnet_modules(input_shape[0], num_classes)
    # The head averages stage 2's map before its Linear: stage 2's local loss reads the same average
    # (an override; None lets from_sequential infer the other readouts).
    head_input = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return BlockwiseModel.from_sequential(modules, cuts=cuts, input_shape=input_shape, num_classes=num_classes,
                                          readouts=[None, None, None, head_input])


def train(method: str, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    data = load_dataset("digits")  # (1, 8, 8) images, 10 classes, bundled with scikit-learn
    model = build_model(data.input_shape, data.num_classes)
    if method == "svp":
        for index, readout in enumerate(model.readouts):
            print(f"block {index}: readout {readout}")
    trainer = LayerwiseTrainer(model, method=method, lr=2e-3, p=0.1, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for indices in batch_indices(len(data.train_targets), 64, generator):
            losses = trainer.train_step(data.train_inputs[indices], data.train_targets[indices])
        if epoch % 5 == 4 or epoch == epochs - 1:
            accuracy = trainer.evaluate(data.test_inputs, data.test_targets)
            blocks = " ".join(f"{loss:.3f}" for loss in losses.block_losses.tolist())
            print(f"{method} epoch {epoch + 1:3d}: output CE {losses.output_ce.item():.3f}, block losses [{blocks}], "
                  f"test accuracy {100 * accuracy:.2f}%")
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = {method: train(method, args.epochs, args.seed) for method in ("svp", "bp")}
    print(" | ".join(f"{method.upper()} {100 * accuracy:.2f}%" for method, accuracy in results.items()))


if __name__ == "__main__":
    main()
