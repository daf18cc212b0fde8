"""BlockwiseModel.from_sequential: a user's network cut into blocks, readouts inferred or given, bad cuts
refused, and a residual stage trained as one block with SVP and with backprop."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from svp_kernels.train import BlockwiseModel, LayerwiseTrainer, batch_indices
from svp_kernels.train.data import synthetic
from svp_kernels.train.trainer import readout_features


class Residual(nn.Module):
    """x + conv-BN-ReLU-conv(x): a residual stage that from_sequential keeps as one block."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def small_resnet(channels: int = 8, num_classes: int = 4) -> list[nn.Module]:
    """(B, 3, 8, 8) -> stem, residual stage, strided conv + ReLU, head (B, num_classes): 6 modules."""
    return [nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()),
            Residual(channels),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * channels * 4 * 4, num_classes)]


def test_blocks_follow_the_cuts_and_the_model_computes_the_sequential():
    torch.manual_seed(0)
    modules = small_resnet()
    model = BlockwiseModel.from_sequential(nn.Sequential(*modules), cuts=[1, 2, 4], input_shape=(3, 8, 8),
                                           num_classes=4)
    assert [len(block) for block in model.blocks] == [1, 1, 2, 2]
    assert model.blocks[1][0] is modules[1] and model.blocks[3][1] is modules[5]
    assert model.input_shape == (3, 8, 8) and model.num_classes == 4 and len(model.readouts) == 3
    x = torch.randn(5, 3, 8, 8)
    model.eval()
    assert torch.equal(model(x), nn.Sequential(*modules).eval()(x))
    assert readout_features(model, "cpu") == [8 * 8 * 8, 8 * 8 * 8, 16 * 4 * 4]


def test_probe_leaves_training_modes_and_batchnorm_statistics_alone():
    modules = small_resnet()
    modules[1].eval()
    statistics = modules[0][1].running_mean.clone()
    model = BlockwiseModel.from_sequential(modules, cuts=[1, 2], input_shape=(3, 8, 8), num_classes=4)
    assert model.blocks[0].training and not modules[1].training and modules[1].body[1].training is False
    assert torch.equal(modules[0][1].running_mean, statistics) and modules[0][1].num_batches_tracked == 0


@pytest.mark.parametrize("shape, max_features, expected", [
    ((2, 50), 4096, (nn.Identity, 50)),                    # (B, D): the features themselves
    ((2, 4, 8, 8), 4096, (nn.Flatten, 256)),               # small map: flattened
    ((2, 4, 3, 5), 60, (nn.Flatten, 60)),                  # exactly max_features: flattened
    ((2, 16, 32, 32), 1024, (nn.AdaptiveAvgPool2d, 1024)),  # 16 · 8² = 1024
    ((2, 16, 32, 32), 1000, (nn.AdaptiveAvgPool2d, 784)),  # 16 · 7² ≤ 1000 < 16 · 8²
    ((2, 64, 4, 4), 32, (nn.AdaptiveAvgPool2d, 64)),       # C > max_features: global average pooling
    ((2, 3, 10, 2), 40, (nn.AdaptiveAvgPool2d, 12)),       # k ≤ min(H, W)
    ((2, 6, 5), 100, (nn.Flatten, 30)),                    # (B, *) small enough: flattened
])
def test_readout_rule(shape, max_features, expected):
    from svp_kernels.train.split import infer_readout

    readout = infer_readout(shape, max_features, 0)
    kind, features = expected
    first = readout[0] if isinstance(readout, nn.Sequential) else readout
    assert isinstance(first, kind)
    assert readout(torch.randn(shape)).shape == (2, features)


def test_large_outputs_that_are_not_maps_need_a_readout():
    modules = [nn.Linear(6, 40), nn.Flatten(), nn.Linear(8 * 40, 3)]  # (B, 8, 6) -> (B, 8, 40) -> (B, 3)
    with pytest.raises(ValueError, match=r"block 0 outputs \(8, 40\) .* pass readouts\[0\]"):
        BlockwiseModel.from_sequential(modules, cuts=[1], input_shape=(8, 6), num_classes=3, max_features=100)
    model = BlockwiseModel.from_sequential(modules, cuts=[1], input_shape=(8, 6), num_classes=3, max_features=100,
                                           readouts=[nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten())])
    assert readout_features(model, "cpu") == [8]


def test_readout_overrides_are_checked():
    kwargs = dict(cuts=[1, 2], input_shape=(3, 8, 8), num_classes=4)
    pooled = BlockwiseModel.from_sequential(small_resnet(), readouts=[None, nn.Sequential(nn.AdaptiveAvgPool2d(2),
                                                                                          nn.Flatten())], **kwargs)
    assert readout_features(pooled, "cpu") == [8 * 8 * 8, 8 * 2 * 2]
    with pytest.raises(ValueError, match="one entry per block but the last"):
        BlockwiseModel.from_sequential(small_resnet(), readouts=[None], **kwargs)
    with pytest.raises(ValueError, match=r"readouts\[1\] must be parameter-free"):
        BlockwiseModel.from_sequential(small_resnet(), readouts=[None, nn.Conv2d(8, 2, 1)], **kwargs)
    with pytest.raises(ValueError, match=r"readouts\[0\] fails on block 0's output"):
        BlockwiseModel.from_sequential(small_resnet(), readouts=[nn.Unflatten(1, (7, 7)), None], **kwargs)
    with pytest.raises(TypeError, match=r"readouts\[0\] must be an nn.Module"):
        BlockwiseModel.from_sequential(small_resnet(), readouts=["flatten", None], **kwargs)


@pytest.mark.parametrize("cuts, error, message", [
    ([2, 1], ValueError, "strictly increasing, got 2 then 1"),
    ([1, 1], ValueError, "strictly increasing"),
    ([0, 2], ValueError, r"cuts must lie in \[1, 5\]"),
    ([2, 6], ValueError, r"cuts must lie in \[1, 5\] .* got 6"),
    ([-1], ValueError, r"cuts must lie in \[1, 5\]"),
    ([1.5], TypeError, "cuts must hold ints"),
    ([True], TypeError, "cuts must hold ints"),
    (3, TypeError, "cuts must be a sequence of ints"),
])
def test_bad_cuts_are_refused(cuts, error, message):
    with pytest.raises(error, match=message):
        BlockwiseModel.from_sequential(small_resnet(), cuts=cuts, input_shape=(3, 8, 8), num_classes=4)


def test_bad_models_are_refused_naming_the_block():
    with pytest.raises(ValueError, match=r"the last block \(modules 2–5\) outputs \(4,\) .* \(B, 5\)"):
        BlockwiseModel.from_sequential(small_resnet(), cuts=[1, 2], input_shape=(3, 8, 8), num_classes=5)
    with pytest.raises(ValueError, match=r"the last block \(module 4\) outputs \(256,\)"):
        BlockwiseModel.from_sequential(small_resnet()[:5], cuts=[1, 2, 4], input_shape=(3, 8, 8), num_classes=4)
    wrong = small_resnet()
    wrong[2] = nn.Conv2d(5, 16, 3)
    with pytest.raises(ValueError, match=r"block 2 \(modules 2–5\) fails on input of shape \(2, 8, 8, 8\)"):
        BlockwiseModel.from_sequential(wrong, cuts=[1, 2], input_shape=(3, 8, 8), num_classes=4)
    with pytest.raises(TypeError, match=r"modules\[1\] must be an nn.Module"):
        BlockwiseModel.from_sequential([nn.Flatten(), torch.relu], cuts=[1], input_shape=(3,), num_classes=3)
    with pytest.raises(ValueError, match="input_shape"):
        BlockwiseModel.from_sequential(small_resnet(), cuts=[1], input_shape=(3, 0, 8), num_classes=4)
    with pytest.raises(ValueError, match="num_classes"):
        BlockwiseModel.from_sequential(small_resnet(), cuts=[1], input_shape=(3, 8, 8), num_classes=0)


@pytest.mark.parametrize("method", ["svp", "bp"])
def test_a_residual_stage_trains_as_one_block(method):
    data = synthetic(num_train=256, num_test=128, input_shape=(3, 8, 8), num_classes=4, noise=1.5)
    torch.manual_seed(0)
    model = BlockwiseModel.from_sequential(small_resnet(), cuts=[1, 2, 4], input_shape=(3, 8, 8), num_classes=4)
    residual_before = [parameter.detach().clone() for parameter in model.blocks[1].parameters()]
    trainer = LayerwiseTrainer(model, method=method, lr=1e-2, p=0.1)
    curves = []
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        losses = [trainer.train_step(data.train_inputs[i], data.train_targets[i])
                  for i in batch_indices(len(data.train_targets), 32, generator)]
        curves.append(torch.stack([loss.block_losses for loss in losses]).mean(dim=0))
    assert len(curves[0]) == (4 if method == "svp" else 1)
    if method == "svp":
        assert curves[-1][1] < 0.5 * curves[0][1]  # the residual block's own local loss falls
    assert curves[-1][-1] < 0.5 * curves[0][-1]
    assert all(not torch.equal(before, after.detach())
               for before, after in zip(residual_before, model.blocks[1].parameters()))
    assert trainer.evaluate(data.test_inputs, data.test_targets) > 0.9


def test_the_example_builds_and_takes_a_step():
    path = Path(__file__).resolve().parents[1] / "python" / "train_own_resnet.py"
    spec = importlib.util.spec_from_file_location("train_own_resnet", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    model = example.build_model((1, 8, 8), 10)
    assert len(model.blocks) == 5 and readout_features(model, "cpu") == [16 * 64, 16 * 64, 32 * 16, 32]
    trainer = LayerwiseTrainer(model, method="svp", p=0.1)
    losses = trainer.train_step(torch.randn(16, 1, 8, 8), torch.arange(16) % 10)
    assert losses.block_losses.shape == (5,) and torch.isfinite(losses.block_losses).all()
