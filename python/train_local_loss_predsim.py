"""Train a local-loss-style network (Conv and Linear blocks, predsim loss) on digits, twice: with the plain
formulation of the loss and with sk.predsim_loss, printing test accuracy and training time of each.

    python python/train_local_loss_predsim.py [--epochs 8] [--batch-size 128] [--beta 0.99] [--threads N]

Every block trains on its own loss (its input detached): (1 − β)·CE of a learned decoder on the
average-pooled block output + β·MSE between the similarity matrix of a learned 3×3 conv (Linear for the
Linear block) of the output and that of the one-hot labels (docs/migration.md). The output layer trains
on (1 − β)·CE of the detached features. Both runs start from the same weights and see the same batches.
"""

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import svp_kernels as sk
from svp_kernels.similarity import reference as similarity_reference
from svp_kernels.train import batch_indices, load_dataset


class Block(nn.Module):
    """encoder → BatchNorm → ReLU, with the predsim heads: `similarity` (3×3 conv or Linear, no bias) and
    `decoder` (Linear with bias, zero-initialised, on the average-pooled output)."""

    def __init__(self, encoder, channels, pooled_features, classes, conv, pool):
        super().__init__()
        self.encoder = encoder
        self.norm = nn.BatchNorm2d(channels) if conv else nn.BatchNorm1d(channels)
        self.similarity = (nn.Conv2d(channels, channels, 3, padding=1, bias=False) if conv
                           else nn.Linear(channels, channels, bias=False))
        self.decoder = nn.Linear(pooled_features, classes)
        nn.init.zeros_(self.decoder.weight)
        self.pool = pool

    def forward(self, x):
        h = F.relu(self.norm(self.encoder(x)))
        pooled = F.avg_pool2d(h, self.pool) if self.pool > 1 else h
        return h, pooled.flatten(1), self.similarity(h)


def make_model(classes):
    return nn.ModuleList([
        Block(nn.Conv2d(1, 32, 3, padding=1), 32, 32 * 4 * 4, classes, conv=True, pool=2),   # 8×8 → decoder 512
        Block(nn.Conv2d(32, 64, 3, padding=1), 64, 64 * 4 * 4, classes, conv=True, pool=1),  # after a 2×2 max-pool
        Block(nn.Linear(64 * 4 * 4, 256), 256, 256, classes, conv=False, pool=1),
    ]), nn.Linear(256, classes)


def block_loss(formulation, pooled, similarity, target, block, beta, classes):
    if formulation == "svp_kernels":
        out = sk.predsim_loss(pooled, similarity, target, block.decoder.weight, block.decoder.bias, beta=beta)
        return out.loss, out.logits
    # The plain formulation, as local-learning code writes it (materialises the one-hot and both B×B matrices).
    logits = block.decoder(pooled)
    onehot = F.one_hot(target, classes).to(similarity.dtype)
    s_h = similarity_reference.similarity_matrix(similarity, "std")
    s_y = similarity_reference.similarity_matrix(onehot, "std").detach()
    return (1 - beta) * F.cross_entropy(logits, target) + beta * F.mse_loss(s_h, s_y), logits


def forward_blocks(blocks, x):
    for index, block in enumerate(blocks):
        h, pooled, similarity = block(x)
        yield block, h, pooled, similarity
        x = F.max_pool2d(h, 2) if index == 0 else h
        x = x.flatten(1) if index == 1 else x
        x = x.detach()


def train(formulation, args, data):
    torch.manual_seed(args.seed)
    blocks, output = make_model(data.num_classes)
    optimizers = [torch.optim.Adam(module.parameters(), lr=args.lr) for module in (*blocks, output)]
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for _ in range(args.epochs):
        blocks.train()
        for indices in batch_indices(len(data.train_targets), args.batch_size, generator):
            x, target = data.train_inputs[indices], data.train_targets[indices]
            for block, h, pooled, similarity in forward_blocks(blocks, x):
                loss, _ = block_loss(formulation, pooled, similarity, target, block, args.beta, data.num_classes)
                loss.backward()
            features = h.detach()
            ((1 - args.beta) * F.cross_entropy(output(features), target)).backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
    seconds = time.perf_counter() - start
    blocks.eval()
    with torch.no_grad():
        for _, h, _, _ in forward_blocks(blocks, data.test_inputs):
            pass
        accuracy = (output(h).argmax(1) == data.test_targets).float().mean().item()
    return accuracy, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("digits")
    results = {}
    for formulation in ("plain", "svp_kernels"):
        accuracy, seconds = train(formulation, args, data)
        results[formulation] = (accuracy, seconds)
        print(f"{formulation:12s} test accuracy {100 * accuracy:.2f}%, training {seconds:.1f} s")
    ratio = results["plain"][1] / results["svp_kernels"][1]
    print(f"svp_kernels trains {ratio:.2f}× as fast as the plain formulation "
          f"(accuracy {100 * results['svp_kernels'][0]:.2f}% vs {100 * results['plain'][0]:.2f}%)")


if __name__ == "__main__":
    main()
