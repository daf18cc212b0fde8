"""A small ViT on a local CIFAR-10 trained in units of transformer blocks with SVP (the paper's SVP+).

    python python/train_cifar10_vit.py --data-dir ~/data   # holds cifar-10-batches-py/
    python python/train_cifar10_vit.py --data-dir ~/data --token mean --blocks-per-unit 1

Nothing is downloaded. 4×4 patches of the 32×32 images become 64 tokens plus a class token; every unit of
blocks-per-unit transformer blocks projects its class token (or mean token) to 10 local logits, and the
last unit ends in the classifier head.
"""

import argparse
import json

import torch

from svp_kernels.train.run import TrainConfig, run_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--method", choices=("svp", "bp"), default="svp")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=6, help="transformer blocks")
    parser.add_argument("--blocks-per-unit", type=int, default=2)
    parser.add_argument("--token", choices=("cls", "mean"), default="cls")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    config = TrainConfig(model="vit", dataset="cifar10", data_dir=args.data_dir, method=args.method,
                         epochs=args.epochs, batch_size=128, lr=5e-4, optimizer="adamw", weight_decay=0.05,
                         p=0.1, device=args.device, width=args.dim, depth=args.depth, vit_patch_size=4,
                         vit_blocks_per_unit=args.blocks_per_unit, vit_token=args.token)
    result = run_training(config)
    print(f"{args.method} ViT on CIFAR-10: test accuracy {100 * result['test_accuracy']:.2f}%, "
          f"{result['wall_seconds']:.0f} s, peak memory {result['peak_memory_bytes'] / 2**20:.1f} MiB")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
