"""float32 accuracy of the loss epilogue (the last stage of fused_local_loss, on v and v_prev) next to plain
float32 PyTorch, both against the float64 ground truth of svp_kernels.testing.

    python tools/epilogue_accuracy.py                      # cpu, B = 128, the rows of docs/migration.md
    python tools/epilogue_accuracy.py --backends cpu,triton --batch 32

Inputs, per row (seeded): v = relu(N(0, 1)) (B, K) (post-ReLU features: positive row means, the regime
where a float32 sum loses most), labels = arange(B) % classes, and v_prev either the labels' one-hot
(B, classes) ("onehot"), a 3072-wide U[0, 1) input, like image pixels ("input"), or v + 0.01·N(0, 1)
("aligned": C + C' < B takes the feature-space identity, and FA is far below ‖âᵀâ‖²). The alignment term
alone (no target: the loss is λ·FA, the term the float32 row statistics feed), centred, reduction
"mean", λ = 1.

Columns: loss relative error |loss − truth| / |truth| and gradient error max |g − g_truth| / max |g_truth|
(g = dloss/dv), for "plain" (the reference backend in float32: F.normalize of the centred rows and the
B×B Grams, torch's own float32 reductions) and for each backend.
"""

from __future__ import annotations

import argparse
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import svp_kernels as sk  # noqa: E402
from svp_kernels.testing import epilogue_ground_truth  # noqa: E402  (the one float64 oracle)

# (name, K = width of v, width of v_prev, classes)
ROWS = [("onehot", 64, 10, 10), ("onehot", 1024, 100, 100), ("onehot", 32768, 10, 10),
        ("input", 1024, 3072, 10), ("input", 4096, 3072, 10), ("aligned", 10, 10, 10)]


def epilogue_inputs(batch: int, width: int, prev_width: int, classes: int, kind: str, seed: int = 0):
    """(v, target = None, v_prev) in float32, as described in the module docstring."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, width, generator=generator, dtype=torch.float64).relu()
    labels = torch.arange(batch) % classes
    if kind == "onehot":
        v_prev = torch.nn.functional.one_hot(labels, prev_width).double()
    elif kind == "aligned":
        v_prev = v[:, :prev_width] + 0.01 * torch.randn(batch, prev_width, generator=generator, dtype=torch.float64)
    else:
        v_prev = torch.rand(batch, prev_width, generator=generator, dtype=torch.float64)
    return v.float(), None, v_prev.float()


def loss_and_grad(v, target, v_prev, backend: str):
    """(loss, dloss/dv) of the centred epilogue of `backend` (fused_local_loss's last stage)."""
    leaf = v.detach().requires_grad_(True)
    loss, _, _ = sk.backends.load(backend).epilogue(leaf, target, v_prev, 1.0, True, True)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def errors(v, target, v_prev, backends: list[str]) -> dict[str, tuple[float, float]]:
    """{"plain" or backend: (loss relative error, gradient error relative to max |g|)} against float64."""
    truth_loss, _, _, truth_grad = epilogue_ground_truth(v, target, v_prev, 1.0, True, True)
    result = {}
    for name, backend in [("plain", "reference")] + [(b, b) for b in backends]:
        loss, grad = loss_and_grad(v, target, v_prev, backend)
        loss_error = abs(loss.double().item() - truth_loss.item()) / abs(truth_loss.item())
        grad_error = ((grad.double() - truth_grad).abs().max() / truth_grad.abs().max()).item()
        result[name] = (loss_error, grad_error)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="cpu", help="comma-separated fused backends (default: cpu)")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    backends = args.backends.split(",")
    print("| v | v_prev | loss rel. error plain / " + " / ".join(backends)
          + " | grad error (÷ max|g|) plain / " + " / ".join(backends) + " |")
    print("|---|---|---|---|")
    for kind, width, prev_width, classes in ROWS:
        v, target, v_prev = epilogue_inputs(args.batch, width, prev_width, classes, kind)
        result = errors(v, target, v_prev, backends)
        names = ["plain"] + backends
        loss_cells = " / ".join(f"{result[n][0]:.1e}" for n in names)
        grad_cells = " / ".join(f"{result[n][1]:.1e}" for n in names)
        print(f"| {args.batch}×{width} | {kind} {args.batch}×{prev_width} | {loss_cells} | {grad_cells} |", flush=True)


if __name__ == "__main__":
    main()
