"""The layer-wise trainer: it learns, blocks stay isolated, every model trains, memory is measured."""

from __future__ import annotations

import pytest
import torch

from svp_kernels.train import LayerwiseTrainer, PeakMemoryMeter, batch_indices, measure_step_memory, mlp, vgg11, vit
from svp_kernels.train.data import synthetic

MIB = 2**20


def fit(trainer: LayerwiseTrainer, dataset, epochs: int, batch_size: int = 64) -> list[float]:
    """Per-epoch mean output cross-entropy."""
    generator = torch.Generator().manual_seed(0)
    curve = []
    for _ in range(epochs):
        losses = [trainer.train_step(dataset.train_inputs[i], dataset.train_targets[i]).output_ce
                  for i in batch_indices(len(dataset.train_targets), batch_size, generator)]
        curve.append(sum(losses) / len(losses))
    return curve


@pytest.fixture(scope="module")
def dataset():
    return synthetic(num_train=512, num_test=256, num_classes=4)


@pytest.mark.parametrize("method, implicit, p", [("svp", False, 0.0), ("svp", False, 0.2), ("svp", True, 0.1),
                                                 ("bp", False, 0.0)])
def test_loss_falls_and_model_learns(dataset, method, implicit, p):
    torch.manual_seed(0)
    trainer = LayerwiseTrainer(mlp(dataset.input_shape, 4, width=64, depth=2), method=method, lr=1e-2,
                               implicit_projection=implicit, p=p)
    curve = fit(trainer, dataset, epochs=4)
    assert curve[-1] < 0.5 * curve[0]
    assert trainer.evaluate(dataset.test_inputs, dataset.test_targets) > 0.9


def test_projections_are_dense_or_implicit(dataset):
    dense = LayerwiseTrainer(mlp(dataset.input_shape, 4, width=32, depth=2), proj_dim=6)
    implicit = LayerwiseTrainer(mlp(dataset.input_shape, 4, width=32, depth=2), implicit_projection=True)
    assert dense.local_losses[0].projection.projection.shape == (6, 32)
    assert dense.input_projection.projection.shape == (6, 64)
    assert not isinstance(implicit.local_losses[0].projection.projection, torch.Tensor)
    assert dense.local_losses[-1].projection is None  # the last block: identity on its logits


def test_a_block_never_receives_gradient_from_a_later_block(dataset):
    """Every parameter gradient arrives while its own block is the one training, and every block input
    is detached. The same probe run on backprop does see cross-block gradients, so it can fail."""

    def gradient_sources(method: str) -> tuple[list[tuple[int, int]], list[bool]]:
        torch.manual_seed(0)
        model = mlp(dataset.input_shape, 4, width=32, depth=3)
        trainer = LayerwiseTrainer(model, method=method)
        training = {"block": None}
        arrivals, input_requires_grad = [], []
        for index, block in enumerate(model.blocks):
            def enter(module, inputs, index=index):
                training["block"] = index
                input_requires_grad.append(inputs[0].requires_grad)
            block.register_forward_pre_hook(enter)
            for parameter in block.parameters():
                parameter.register_hook(lambda grad, index=index: arrivals.append((index, training["block"])))
        trainer.train_step(dataset.train_inputs[:32], dataset.train_targets[:32])
        assert all(parameter.grad is None for parameter in model.parameters())  # zero_grad(set_to_none=True)
        return arrivals, input_requires_grad

    arrivals, input_requires_grad = gradient_sources("svp")
    assert {owner for owner, _ in arrivals} == {0, 1, 2, 3}
    assert all(owner == training for owner, training in arrivals)
    assert not any(input_requires_grad)

    arrivals, _ = gradient_sources("bp")
    assert any(owner != training for owner, training in arrivals)


@pytest.mark.parametrize("make_model", [
    lambda: vgg11((3, 8, 8), 5, width_multiplier=1 / 16),
    lambda: vgg11((3, 8, 8), 5, width_multiplier=1 / 16, pool_size=1),
    lambda: vit((3, 8, 8), 5, patch_size=4, dim=16, depth=4, heads=2, blocks_per_unit=2, token="cls"),
    lambda: vit((3, 8, 8), 5, patch_size=4, dim=16, depth=2, heads=2, blocks_per_unit=1, token="mean"),
], ids=["vgg11", "vgg11-pooled", "vit-cls", "vit-mean"])
@pytest.mark.parametrize("method", ["svp", "bp"])
def test_cnn_and_vit_train(make_model, method):
    data = synthetic(num_train=64, num_test=32, input_shape=(3, 8, 8), num_classes=5)
    torch.manual_seed(0)
    model = make_model()
    trainer = LayerwiseTrainer(model, method=method, implicit_projection=True, p=0.1)
    first = trainer.train_step(data.train_inputs[:32], data.train_targets[:32])
    for _ in range(5):
        last = trainer.train_step(data.train_inputs[:32], data.train_targets[:32])
    assert len(first.block_losses) == (len(model.blocks) if method == "svp" else 1)
    assert last.output_ce < first.output_ce
    assert model(data.test_inputs).shape == (32, 5)


def test_vgg_pooling_shrinks_what_is_projected():
    full = LayerwiseTrainer(vgg11((3, 8, 8), 5, width_multiplier=1 / 16))
    pooled = LayerwiseTrainer(vgg11((3, 8, 8), 5, width_multiplier=1 / 16, pool_size=1))
    assert full.local_losses[0].projection.in_features == 4 * 4 * 4  # 4 channels, 8×8 pooled to 4×4
    assert pooled.local_losses[0].projection.in_features == 4


def test_bad_arguments_are_refused():
    model = mlp((1, 8, 8), 10, width=16, depth=1)
    with pytest.raises(ValueError, match="proj_dim"):
        LayerwiseTrainer(model, proj_dim=5)
    with pytest.raises(ValueError, match="method"):
        LayerwiseTrainer(model, method="dfa")
    with pytest.raises(ValueError, match="optimizer"):
        LayerwiseTrainer(model, optimizer="lbfgs")
    with pytest.raises(ValueError, match="norm"):
        mlp((1, 8, 8), 10, norm="groupnorm")


def test_cpu_meter_counts_live_allocations():
    meter = PeakMemoryMeter("cpu")
    meter.start()
    persistent = torch.ones(MIB // 4)  # 1 MiB
    meter.checkpoint()
    transient = torch.ones(MIB)  # 4 MiB, freed before stop
    del transient
    report = meter.stop()
    assert 5 * MIB <= report.peak_memory_bytes < 5.1 * MIB
    assert 4 * MIB <= report.activation_peak_bytes < 4.1 * MIB
    del persistent


def test_svp_step_memory_is_flat_in_depth_and_backprop_grows():
    inputs, targets = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))

    def activation_peak(method: str, depth: int) -> int:
        def build():
            return LayerwiseTrainer(mlp((1, 16, 16), 10, width=256, depth=depth), method=method)

        return measure_step_memory(build, inputs, targets, "cpu").activation_peak_bytes

    svp_shallow, svp_deep = activation_peak("svp", 2), activation_peak("svp", 8)
    bp_deep = activation_peak("bp", 8)
    assert svp_deep <= 1.2 * svp_shallow
    assert bp_deep > 3 * svp_deep
