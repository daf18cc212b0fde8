"""Where one SVP training step's time goes, part by part, against one BP step (CPU time of this thread).

    python bench/step_parts.py                          # the MNIST recipe's MLP, batch 128, 1 thread
    python bench/step_parts.py --width 1024 --depth 8 --threads 2 --repeats 50

Per step of the trainer's own block step (LayerwiseTrainer.train_block) on one random MNIST-shaped batch: the
augmentation (run.augment, the recipe's shifts), the input projection v_0, each block (forward, local loss,
backward, optimizer step); then one BP step (train_step of the same model with method "bp"). Medians of
`time.thread_time()` after --warmup steps: on one thread that is the CPU the part costs, whatever else the
machine runs (other work still slows it through shared caches). The SVP step is the input projection and the
blocks, as the BP step, the augmentation apart. These costs decide how the blocks balance
over pipeline stages (bench/NOTES.md, "Time to accuracy against backprop").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from svp_kernels.train.run import augment, build_trainer, recipe_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = recipe_config("mnist", width=args.width, depth=args.depth, batch_size=args.batch_size, backend="cpu")
    svp = build_trainer(config, (1, 28, 28), 10, 469)
    bp = build_trainer(recipe_config("mnist", width=args.width, depth=args.depth, method="bp"), (1, 28, 28), 10, 469)
    inputs, targets = torch.randn(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))
    names = ["augmentation", "input projection"] + [f"block {i}" for i in range(svp.num_blocks)] + ["BP step"]
    samples = {name: [] for name in names}
    for step in range(args.warmup + args.repeats):
        marks = [time.thread_time()]
        images = augment(inputs, config, step)
        marks.append(time.thread_time())
        h, v = images, svp.input_alignment(images)
        marks.append(time.thread_time())
        for index in range(svp.num_blocks):
            h, v, _ = svp.train_block(index, h, v, targets, step)
            marks.append(time.thread_time())
        bp.train_step(images, targets)
        marks.append(time.thread_time())
        if step >= args.warmup:
            for name, start, end in zip(names, marks, marks[1:]):
                samples[name].append(end - start)
    medians = {name: 1e3 * statistics.median(values) for name, values in samples.items()}
    svp_step = sum(value for name, value in medians.items() if name not in ("augmentation", "BP step"))
    print(f"MLP 784→{args.width}×{args.depth}→10, batch {args.batch_size}, {args.threads} thread(s), "
          f"median CPU ms of {args.repeats} steps")
    print("| " + " | ".join(names) + " | SVP step | SVP / BP |")
    print("|" + "---|" * (len(names) + 2))
    print("| " + " | ".join(f"{value:.2f}" for value in medians.values())
          + f" | {svp_step:.2f} | {svp_step / medians['BP step']:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
