"""VGG-11 on a local CIFAR-10 trained layer-wise with SVP (or end to end with --method bp).

    python python/train_cifar10_cnn.py --data-dir ~/data   # holds cifar-10-batches-py/
    python python/train_cifar10_cnn.py --data-dir ~/data --pool-size 0   # project whole feature maps

Nothing is downloaded: get cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and
extract it. Each of the 8 conv blocks projects its feature map, average-pooled to pool-size × pool-size
(the paper's ablation), through a fixed random R to 10 local logits; the classifier block is last.
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
    parser.add_argument("--width-multiplier", type=float, default=0.5, help="1.0 is full VGG-11 (64…512 channels)")
    parser.add_argument("--pool-size", type=int, default=2, help="0: no pooling before the projection")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    config = TrainConfig(model="cnn", dataset="cifar10", data_dir=args.data_dir, method=args.method,
                         epochs=args.epochs, batch_size=128, lr=1e-3, p=0.1, device=args.device,
                         cnn_width_multiplier=args.width_multiplier, pool_size=args.pool_size or None)
    result = run_training(config)
    print(f"{args.method} VGG-11 on CIFAR-10: test accuracy {100 * result['test_accuracy']:.2f}%, "
          f"{result['wall_seconds']:.0f} s, peak memory {result['peak_memory_bytes'] / 2**20:.1f} MiB")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
