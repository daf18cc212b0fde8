"""Train the digits MLP with SVP and with backprop, using LayerwiseTrainer directly in a plain loop.

    python python/train_digits_mlp.py [--epochs 30] [--implicit-projection]

Each SVP block trains on its own local loss; the last block's logits give the test accuracy.
"""

import argparse

import torch

from svp_kernels.train import LayerwiseTrainer, batch_indices, load_dataset, mlp


def train(method: str, epochs: int, implicit_projection: bool, seed: int) -> float:
    torch.manual_seed(seed)
    data = load_dataset("digits")  # (1, 8, 8) images, 10 classes, bundled with scikit-learn
    model = mlp(data.input_shape, data.num_classes, width=512, depth=3, norm="batchnorm")
    trainer = LayerwiseTrainer(model, method=method, lr=1e-3, p=0.1, alignment_weight=1.0,
                               implicit_projection=implicit_projection)
    for epoch in range(epochs):
        for indices in batch_indices(len(data.train_targets), batch_size=64):
            losses = trainer.train_step(data.train_inputs[indices], data.train_targets[indices])
        if epoch % 10 == 9 or epoch == epochs - 1:
            accuracy = trainer.evaluate(data.test_inputs, data.test_targets)
            blocks = " ".join(f"{loss:.3f}" for loss in losses.block_losses)
            print(f"{method} epoch {epoch + 1:3d}: output CE {losses.output_ce:.3f}, block losses [{blocks}], "
                  f"test accuracy {100 * accuracy:.2f}%")
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--implicit-projection", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = {method: train(method, args.epochs, args.implicit_projection, args.seed) for method in ("svp", "bp")}
    print(" | ".join(f"{method.upper()} {100 * accuracy:.2f}%" for method, accuracy in results.items()))


if __name__ == "__main__":
    main()
