"""`svp-train`: train a model layer-wise with SVP (or end to end with BP), or run the memory-vs-depth sweep.

    svp-train --model mlp --dataset digits --method svp --json run.json --plot run.png
    svp-train memory-depth --width 1024 --depths 2,4,8,16,32 --batch-size 128 --json mem.json --plot mem.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch

from .. import backends
from ..validation import ALIGNMENTS
from . import distributed
from .checkpoint import CheckpointError
from .data import DATASETS, load_dataset
from .models import NORMS
from .extras import MissingExtraError
from .outputs import MIB, plot_memory_depth, pyplot, write_outputs
from .run import LR_SCHEDULES, MODELS, TrainConfig, memory_depth_rows, recipe_config, run_training, validate_config
from .trainer import FIRST_ALIGNMENTS, METHODS, OPTIMIZERS


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class _Parser(argparse.ArgumentParser):
    """Bad flags end with one line, `svp-train: error: …`, and exit status 2 (no usage dump, no traceback)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag_type(kind, flag_name: str):
    """An argparse type whose error names the flag and the expected kind of value."""
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag_name} expects {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
    convert.__name__ = kind.__name__
    return convert


def train_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="svp-train", description="Train with the fused SVP local loss (or backprop) and report accuracy, "
        "wall time and peak memory. Every training flag left out takes the --dataset recipe's value "
        "(svp_kernels.train.run.RECIPES; docs/training.md). Subcommand: `svp-train memory-depth --help`.")

    def add(flag: str, kind=None, **options):
        if kind in (int, float):
            options["type"] = _flag_type(kind, flag)
        parser.add_argument(flag, default=None, **options)

    add("--model", choices=MODELS)
    add("--dataset", choices=DATASETS, help="also picks the recipe (default digits)")
    add("--data-dir", help="folder holding the MNIST/Fashion-MNIST IDX files, the CIFAR python batches, or images "
        "as train/<class>/*.jpg|png with test/ or val/ (imagefolder; cifar10 too)")
    add("--image-size", int, metavar="N", help="image folders: resize each image's shorter side to N, then "
        "centre-crop N×N (needed when the images differ in size)")
    add("--method", choices=METHODS, help="svp: layer-wise local losses; bp: end to end (default svp)")
    add("--epochs", int)
    add("--batch-size", int)
    add("--lr", float, help="peak learning rate")
    add("--lr-schedule", choices=LR_SCHEDULES, help="after the warm-up: constant, cosine to 0, or ×0.1 at 50 %% "
        "and 75 %% of the steps")
    add("--warmup-epochs", float, help="linear learning-rate warm-up (epochs, may be fractional)")
    add("--optimizer", choices=OPTIMIZERS)
    add("--weight-decay", float)
    add("--augment-shift", int, help="random translation of training images by up to N pixels (0: none)")
    add("--augment-flip", choices=("on", "off"), help="random horizontal flips of training images")
    add("--p", float, help="dropout probability on R's elements (svp)")
    add("--alignment-weight", float, help="λ of the alignment term (svp)")
    add("--alignment", choices=ALIGNMENTS, help="the local losses' alignment term (svp): cosine_gram, the batch "
        "cosine-Gram matching (default), or bhattacharyya, the Bhattacharyya distance between each sample's softmax "
        "and the previous block's (needs --proj-dim = number of classes, the default)")
    add("--first-alignment", choices=FIRST_ALIGNMENTS, help="what the first block aligns to (svp): input, a fixed "
        "random projection of the input (default), or onehot, the one-hot target")
    add("--proj-dim", int, help="rows of each R (svp; default: number of classes)")
    add("--implicit-projection", action="store_const", const=True,
        help="regenerate R from a seed instead of storing it (svp)")
    add("--backend", choices=("auto",) + backends.BACKEND_NAMES)
    add("--device", help=f"default {_default_device()}")
    add("--seed", int)
    add("--width", int, help="MLP width / ViT embedding dim")
    add("--depth", int, help="MLP hidden blocks / ViT transformer blocks")
    add("--norm", choices=NORMS, help="MLP normalisation")
    add("--cnn-width-multiplier", float, help="VGG-11 channels (64…512) times this")
    add("--pool-size", int, help="CNN: adaptive average pooling to this size before each projection")
    add("--vit-patch-size", int)
    add("--vit-blocks-per-unit", int, help="transformer blocks trained together by one local loss")
    add("--vit-token", choices=("cls", "mean"), help="token each ViT unit projects")
    add("--cuda-graph", action="store_const", const=True,
        help="capture each training step (every block: forward, loss, backward, optimizer) as a CUDA graph per "
        "batch shape and replay it (CUDA only; svp and bp; the learning rate then reaches the optimizer as a "
        "float32 device value)")
    add("--threads", int, help="torch CPU threads (default: torch's choice)")
    add("--checkpoint", metavar="PATH", help="write a checkpoint here at every epoch end (and on Ctrl-C)")
    add("--checkpoint-every", int, metavar="N", help="also write the checkpoint every N steps")
    add("--resume", metavar="PATH", help="continue the run saved in this checkpoint (same flags)")
    add("--eval-every", int, metavar="N", help="also evaluate the test set after every N steps (training is "
        "unchanged; evaluation time is kept off the training clock; every evaluation is in the --json file)")
    add("--json", metavar="PATH", help="write the results as JSON")
    add("--plot", metavar="PATH", help="write the training curves as a PNG")
    add("--no-progress", action="store_true", help="no progress bar")
    # distributed: pipeline stages or data parallel, spawned here or run under torchrun
    add("--stages", type=int, help="train the blocks as K pipeline stages, one process (one GPU) each")
    add("--stage-split", help="blocks per stage, e.g. 3,2 (default: rank 0 times every block's training step "
        "over 5 steps of a copy of the model on the first batch and splits the blocks so that the slowest stage "
        "is as fast as it can be; a resumed run keeps its checkpoints' split)")
    add("--data-parallel", type=int, metavar="N", help="N processes each train 1/N of every --batch-size batch; "
        "with --stages K, a K × N grid: every stage runs as N data-parallel replicas (K · N processes)")
    parser.add_argument(
        "--dist-timeout", type=float, default=60.0, metavar="SECONDS",
        help="a process waiting longer than this on a peer, or surviving a failed peer, gives up")
    add("--stage-checkpoints", metavar="DIR", help="each process checkpoints every epoch here and resumes from it")
    add("--no-pin-cores", action="store_true",
        help="do not restrict each spawned process to its own share of the cores (pinned by default when there "
        "are at least as many cores as processes; processes started by torchrun are never pinned)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The --dataset recipe with every flag given on the command line applied on top."""
    given = {field.name: getattr(args, field.name) for field in fields(TrainConfig)
             if getattr(args, field.name, None) is not None}
    if "augment_flip" in given:
        given["augment_flip"] = given["augment_flip"] == "on"
    given.setdefault("device", _default_device())
    return recipe_config(given.pop("dataset", "digits"), **given)


def memory_depth_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="svp-train memory-depth", description="Peak training memory vs depth of a wide MLP, SVP vs BP "
        "(the paper's Fig. 2a), measured at the allocator on one random MNIST-shaped batch.")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depths", default="2,4,8,16,32", help="comma-separated numbers of hidden blocks")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default=_default_device())
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["memory-depth"]:
        return memory_depth_main(argv[1:])
    return train_main(argv)


def _fail(message: str, status: int = 2) -> int:
    print(f"svp-train: error: {message}", file=sys.stderr)
    return status


def _output_problem(args: argparse.Namespace, flags: tuple[str, ...]) -> str | None:
    """Why the output files of `flags` could not be written, checked before any work: a missing folder, or
    --plot without matplotlib. None when they can."""
    for flag in flags:
        path = getattr(args, flag[2:])
        if path is not None and not Path(path).resolve().parent.is_dir():
            return f"{flag} {path}: the folder {Path(path).resolve().parent} does not exist"
    if args.plot is not None:
        try:
            pyplot()
        except MissingExtraError as error:
            return str(error)
    return None


def train_main(argv: list[str]) -> int:
    args = train_parser().parse_args(argv)
    config = config_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            return _fail(f"--threads must be ≥ 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.checkpoint_every is not None and (args.checkpoint_every < 1 or args.checkpoint is None):
        return _fail(f"--checkpoint-every must be ≥ 1 and needs --checkpoint, got {args.checkpoint_every}"
                     + ("" if args.checkpoint else " without --checkpoint"))
    try:
        validate_config(config)
        backends.resolve(config.backend, torch.device(config.device), torch.float32)
    except (RuntimeError, ValueError) as error:
        return _fail(str(error))
    problem = _output_problem(args, ("--json", "--plot", "--checkpoint"))
    if problem:
        return _fail(problem)
    try:
        dataset = load_dataset(config.dataset, config.data_dir, image_size=config.image_size,
                               progress=not args.no_progress)
    except MissingExtraError as error:  # scikit-learn for digits, Pillow for image folders
        return _fail(str(error))
    except (FileNotFoundError, ValueError) as error:
        return _fail(f"--data-dir: {error}" if "data_dir" in str(error) or config.data_dir else str(error))
    if config.cuda_graph and (args.stages is not None or args.data_parallel is not None or "WORLD_SIZE" in os.environ):
        return _fail("--cuda-graph captures one process's whole step: not with --stages, --data-parallel or torchrun")
    code = distributed.train_main(args, config, dataset)  # --stages, --data-parallel or torchrun
    if code is not None:
        return code
    try:
        result = run_training(config, dataset, progress=not args.no_progress, checkpoint=args.checkpoint,
                              checkpoint_every=args.checkpoint_every, resume=args.resume,
                              eval_every=args.eval_every)
    except CheckpointError as error:
        return _fail(f"--resume: {error}")
    except ValueError as error:  # validate_config against the dataset (e.g. --batch-size larger than it)
        return _fail(str(error))
    except KeyboardInterrupt:
        saved = f"; checkpoint written to {args.checkpoint}" if args.checkpoint else ""
        print(f"svp-train: interrupted{saved}", file=sys.stderr)
        return 130
    result["backend"] = backends.resolve(config.backend, torch.device(config.device), torch.float32).NAME
    print(f"{config.method} {config.model} on {config.dataset}: test accuracy {100 * result['test_accuracy']:.2f}% | "
          f"wall {result['wall_seconds']:.1f} s | peak memory {result['peak_memory_bytes'] / MIB:.2f} MiB "
          f"(step transient {result['activation_peak_bytes'] / MIB:.2f} MiB) | {result['device']}, "
          f"{result['backend']} kernels")
    write_outputs(result, args)
    return 0


def memory_depth_main(argv: list[str]) -> int:
    args = memory_depth_parser().parse_args(argv)
    problem = _output_problem(args, ("--json", "--plot"))
    if problem:
        return _fail(problem)
    depths = tuple(int(depth) for depth in args.depths.split(","))
    rows = memory_depth_rows(args.width, depths, args.batch_size, args.device, progress=not args.no_progress)
    print(f"{'method':<6} {'depth':>5} {'peak MiB':>10} {'activation MiB':>15}")
    for row in rows:
        print(f"{row['method']:<6} {row['depth']:>5} {row['peak_memory_bytes'] / MIB:>10.2f} "
              f"{row['activation_peak_bytes'] / MIB:>15.2f}")
    summary = memory_depth_summary(rows)
    if summary:
        print(f"SVP activation peak, depth {summary['deepest']} / depth {summary['shallowest']}: "
              f"{summary['svp_depth_ratio']:.2f}x (target ≤ 1.2x); BP / SVP at depth {summary['deepest']}: "
              f"{summary['bp_over_svp']:.1f}x (target ≥ 8x)")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"rows": rows, "summary": summary, "device": args.device,
                       "torch_version": torch.__version__}, file, indent=2)
    if args.plot:
        plot_memory_depth(rows, args.plot)
    return 0


def memory_depth_summary(rows: list[dict]) -> dict:
    """SVP activation peak at the deepest over the shallowest depth, and BP over SVP at the deepest."""
    activation = {(row["method"], row["depth"]): row["activation_peak_bytes"] for row in rows}
    depths = sorted({row["depth"] for row in rows})
    shallowest, deepest = depths[0], depths[-1]
    if ("svp", deepest) not in activation or ("bp", deepest) not in activation:
        return {}
    return {"shallowest": shallowest, "deepest": deepest,
            "svp_depth_ratio": activation["svp", deepest] / activation["svp", shallowest],
            "bp_over_svp": activation["bp", deepest] / activation["svp", deepest]}


if __name__ == "__main__":
    sys.exit(main())
