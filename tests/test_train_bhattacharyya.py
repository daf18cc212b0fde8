"""The trainer with the Bhattacharyya alignment term (LayerwiseTrainer(alignment=..., first_alignment=...),
svp-train --alignment / --first-alignment): block 0's target, the lean path against the public op, data
parallel against one process, the flags and their errors."""

from __future__ import annotations

import pytest
import torch

import svp_kernels as sk
from svp_kernels.train import LayerwiseTrainer
from svp_kernels.train.cli import config_from_args, train_parser
from svp_kernels.train.data import synthetic
from svp_kernels.train.distributed import Plan, launch
from svp_kernels.train.models import mlp
from svp_kernels.train.run import TrainConfig, validate_config

from test_train_distributed import TIMEOUT, saved_tensors, sequential, trainer_tensors


def batch(seed=0, B=12):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 8, 8, generator=generator), torch.randint(0, 10, (B,), generator=generator)


def test_onehot_first_alignment_is_the_target_and_half_the_cross_entropy():
    """first_alignment="onehot": v_0 is log onehot(y) (0 at y, −inf elsewhere) for bhattacharyya, onehot(y) for
    cosine_gram; BD(v, onehot(y)) = −log sqrt(softmax(v)_y) = ½ CE_b, so block 0's term is half its CE."""
    inputs, targets = batch()
    trainer = LayerwiseTrainer(mlp((1, 8, 8), 10), alignment="bhattacharyya", first_alignment="onehot", backend="cpu")
    v0 = trainer.input_alignment(inputs, targets)
    expected = torch.full((12, 10), float("-inf")).scatter_(1, targets[:, None], 0.0)
    assert torch.equal(v0, expected)
    cosine = LayerwiseTrainer(mlp((1, 8, 8), 10), first_alignment="onehot")
    assert torch.equal(cosine.input_alignment(inputs, targets), torch.nn.functional.one_hot(targets, 10).float())
    with pytest.raises(ValueError, match="pass targets"):
        trainer.input_alignment(inputs)
    features = trainer.model.blocks[0](inputs).detach()
    for backend in ("reference", "cpu"):
        out = sk.fused_local_loss(features, targets, v0, projection=trainer.local_losses[0].projection.projection,
                                  backend=backend, alignment="bhattacharyya")
        assert out.alignment.item() == pytest.approx(0.5 * out.ce.item(), rel=1e-5), backend


@pytest.mark.parametrize("first_alignment", ["input", "onehot"])
def test_lean_path_steps_like_the_public_op(first_alignment):
    """From its second step the trainer runs the backend's gradient interface with the arguments validated at
    the first (the lean path); the reference backend always takes the public op. Three steps of each, both with
    the Bhattacharyya term, give the same parameters to float32 rounding, and not those of the cosine-Gram term."""
    def trained(backend, alignment="bhattacharyya"):
        torch.manual_seed(0)
        trainer = LayerwiseTrainer(mlp((1, 8, 8), 10, width=16), alignment=alignment,
                                   first_alignment=first_alignment, backend=backend, p=0.2, seed=3,
                                   alignment_weight=2.0, optimizer="sgd", lr=0.5)
        for step in range(3):
            losses = trainer.train_step(*batch(step))
            assert torch.isfinite(losses.block_losses).all()
        return trainer_tensors(trainer)

    lean, public, cosine = trained("cpu"), trained("reference"), trained("cpu", "cosine_gram")
    for name in lean:
        torch.testing.assert_close(lean[name], public[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any((lean[name] - cosine[name]).abs().max() > 1e-3 for name in lean)


def test_data_parallel_matches_one_process_with_the_global_batch(tmp_path):
    """2 ranks with the one-hot first target (built from the global batch's targets, no gather): the parameters of
    one process with the global batch, to float32 rounding."""
    dataset = synthetic(num_train=128, num_test=32, num_classes=5)
    config = TrainConfig(dataset="synthetic", epochs=1, batch_size=64, width=16, depth=2, norm="layernorm",
                         p=0.2, lr=0.1, optimizer="sgd", backend="cpu", seed=1, alignment="bhattacharyya",
                         first_alignment="onehot")
    launch(Plan("data_parallel", 2, timeout=TIMEOUT, checkpoint_dir=str(tmp_path)), config, dataset, threads=1)
    trainer = sequential(config, dataset)[0]
    expected, found = trainer_tensors(trainer), saved_tensors(tmp_path, 1, 1)
    assert found.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_flags_reach_the_config_and_bad_values_are_refused():
    args = train_parser().parse_args(["--alignment", "bhattacharyya", "--first-alignment", "onehot"])
    config = config_from_args(args)
    assert (config.alignment, config.first_alignment) == ("bhattacharyya", "onehot")
    assert (TrainConfig().alignment, TrainConfig().first_alignment) == ("cosine_gram", "input")
    with pytest.raises(SystemExit):
        train_parser().parse_args(["--alignment", "kl"])
    with pytest.raises(ValueError, match="--first-alignment must be one of"):
        validate_config(TrainConfig(first_alignment="label"))
    with pytest.raises(ValueError, match="proj_dim must equal num_classes = 10 with alignment='bhattacharyya'"):
        LayerwiseTrainer(mlp((1, 8, 8), 10), alignment="bhattacharyya", proj_dim=12)
    with pytest.raises(ValueError, match="first_alignment must be"):
        LayerwiseTrainer(mlp((1, 8, 8), 10), first_alignment="target")
