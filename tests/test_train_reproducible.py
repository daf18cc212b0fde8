"""Seed streams and reproducibility: a block's dropout seeds depend on (run seed, block, step) alone, and the
same config and seed give bit-identical parameters and loss curves."""

from __future__ import annotations

import copy

import pytest
import torch

from svp_kernels.train import LayerwiseTrainer, mlp
from svp_kernels.train.data import synthetic
from svp_kernels.train.run import TrainConfig, augment, learning_rate_schedule, recipe_config, run_training
from svp_kernels.train.seeds import block_step_seed
from svp_kernels.train.trainer import BlockSeedTable

TINY = dict(dataset="synthetic", width=16, depth=2, epochs=2, batch_size=64, lr=1e-2, p=0.2,
            lr_schedule="cosine", warmup_epochs=0.5, augment_shift=1)


@pytest.fixture(scope="module")
def data():
    return synthetic(num_train=256, num_test=64, num_classes=4)


def test_block_step_seed_is_pinned_and_separates_blocks_and_steps():
    # Pinned: Philox4x32-10, key 0 / 5 / 2**63 − 1, counter block·2³² + step.
    assert block_step_seed(0, 0, 0) == 7361108121267848589
    assert block_step_seed(5, 2, 3) == 458154728191603527
    assert block_step_seed(2**63 - 1, 2**31 - 1, 2**32 - 1) == 6517460858142325120
    seeds = {block_step_seed(7, block, step) for block in range(4) for step in range(64)}
    assert len(seeds) == 4 * 64 and all(0 <= seed < 2**63 for seed in seeds)
    assert block_step_seed(7, 1, 0) != block_step_seed(8, 1, 0)


def test_the_trainer_seed_table_is_block_step_seed():
    table = BlockSeedTable(2**62 + 11)
    for block, step in [(0, 0), (3, 1023), (3, 1024), (0, 5), (2**31 - 1, 2**32 - 1), (1, 2**32 - 1025)]:
        assert table(block, step) == block_step_seed(2**62 + 11, block, step)
    with pytest.raises(ValueError, match="block_step_seed needs"):
        table(0, 2**32)


@pytest.mark.parametrize("args", [(-1, 0, 0), (2**63, 0, 0), (0, -1, 0), (0, 2**31, 0), (0, 0, -1), (0, 0, 2**32)])
def test_block_step_seed_refuses_out_of_range_arguments(args):
    with pytest.raises(ValueError, match="block_step_seed needs"):
        block_step_seed(*args)


def _trainer(data, seed=3, **options) -> LayerwiseTrainer:
    torch.manual_seed(0)
    return LayerwiseTrainer(mlp(data.input_shape, 4, width=16, depth=2), p=0.3, seed=seed, lr=1e-2, **options)


def _params(trainer: LayerwiseTrainer) -> list[torch.Tensor]:
    return [tensor.clone() for tensor in trainer.model.state_dict().values()]


def test_svp_step_draws_block_step_seeds_and_no_global_randomness(data, monkeypatch):
    trainer = _trainer(data)
    inputs, targets = data.train_inputs[:32], data.train_targets[:32]
    trainer.train_step(inputs, targets)
    drawn = []
    original = trainer._local_loss
    monkeypatch.setattr(trainer, "_local_loss", lambda index, *args: drawn.append((index, int(args[3]))) or
                        original(index, *args))  # the seed: a 0-dim int64 tensor on the device, read here
    rng_state = torch.get_rng_state()
    trainer.train_step(inputs, targets)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the step touched no global generator
    assert drawn == [(index, block_step_seed(3, index, 1)) for index in range(3)]


def test_train_block_by_block_equals_train_step(data):
    """The pipeline interface: v_0 from input_alignment, then train_block per block (here on a copy, as
    another process would) gives the step's parameters and losses exactly."""
    whole, split = _trainer(data), _trainer(data)
    for step in range(3):
        inputs, targets = data.train_inputs[32 * step:32 * step + 32], data.train_targets[32 * step:32 * step + 32]
        losses = whole.train_step(inputs, targets)
        h, v = inputs, split.input_alignment(inputs)
        block_losses = []
        for index in range(split.num_blocks):
            before_update = copy.deepcopy(split.model.blocks[index])(h)
            h, v, loss = split.train_block(index, h, v, targets, step)
            assert torch.equal(h, before_update.detach())  # the output of the block's parameters before its step
            assert not (h.requires_grad or v.requires_grad or loss.requires_grad) and loss.dim() == 0
            block_losses.append(loss)
        assert torch.equal(torch.stack(block_losses), losses.block_losses)
    for a, b in zip(_params(whole), _params(split)):
        assert torch.equal(a, b)
    other_seed = _trainer(data, seed=4)
    other_seed.train_step(data.train_inputs[:32], data.train_targets[:32])
    first = _trainer(data)
    first.train_step(data.train_inputs[:32], data.train_targets[:32])
    assert not all(torch.equal(a, b) for a, b in zip(_params(first), _params(other_seed)))


class _WholeBatch:
    """A SharedBatch whose one process holds every row: gathering and reducing change nothing."""

    def __init__(self, batch: int):
        self.batch_size, self.rows, self.reductions = batch, slice(0, batch), 0

    def gather(self, v):
        return v

    def reduce_gradients(self, parameters):
        self.reductions += 1


def test_a_shared_batch_step_is_the_block_step(data):
    """train_block with a SharedBatch (the data-parallel hook), here holding the whole batch, takes the same
    arithmetic as without one, on its first call (the public ops) and after it (the lean path), bit for bit."""
    plain, shared = _trainer(data), _trainer(data)
    for step in range(3):
        inputs, targets = data.train_inputs[32 * step:32 * step + 32], data.train_targets[32 * step:32 * step + 32]
        h, v, h_shared, v_shared = inputs, plain.input_alignment(inputs), inputs, shared.input_alignment(inputs)
        for index in range(plain.num_blocks):
            share = _WholeBatch(len(targets))
            h, v, loss = plain.train_block(index, h, v, targets, step)
            h_shared, v_shared, loss_shared = shared.train_block(index, h_shared, v_shared, targets, step, share)
            assert share.reductions == 1
            assert torch.equal(loss, loss_shared) and torch.equal(v, v_shared) and torch.equal(h, h_shared)
    assert all(call is not None for call in shared._loss_calls)  # the lean path ran
    for a, b in zip(_params(plain), _params(shared)):
        assert torch.equal(a, b)


def test_train_block_refuses_bad_index_and_method(data):
    trainer = _trainer(data)
    v = trainer.input_alignment(data.train_inputs[:8])
    with pytest.raises(ValueError, match="index"):
        trainer.train_block(3, data.train_inputs[:8], v, data.train_targets[:8], 0)
    torch.manual_seed(0)
    bp = LayerwiseTrainer(mlp(data.input_shape, 4, width=16, depth=2), method="bp")
    with pytest.raises(ValueError, match="method"):
        bp.train_block(0, data.train_inputs[:8], v, data.train_targets[:8], 0)


def test_lean_path_is_the_public_op_exactly(data, monkeypatch):
    lean = _trainer(data)
    public = _trainer(data)
    monkeypatch.setattr(public, "_validated_call", lambda *args: None)  # every call through fused_local_loss
    for step in range(3):
        batch = slice(32 * step, 32 * step + 32)
        assert torch.equal(lean.train_step(data.train_inputs[batch], data.train_targets[batch]).block_losses,
                           public.train_step(data.train_inputs[batch], data.train_targets[batch]).block_losses)
    assert lean._loss_calls[0] is not None and public._loss_calls[0] is None
    for a, b in zip(_params(lean), _params(public)):
        assert torch.equal(a, b)


def test_lean_path_still_refuses_out_of_range_targets(data):
    trainer = _trainer(data)
    trainer.train_step(data.train_inputs[:32], data.train_targets[:32])
    with pytest.raises(ValueError, match=r"target values must be in \[0, 4\)"):
        trainer.train_step(data.train_inputs[:32], torch.full((32,), 4))


def test_same_config_and_seed_give_bit_identical_runs(data):
    config = TrainConfig(**TINY, seed=5)
    first = run_training(config, data, progress=False, measure_memory=False)
    second = run_training(copy.deepcopy(config), data, progress=False, measure_memory=False)
    for key in ("final_parameters_sha256", "train_loss_curve", "block_loss_curves", "test_accuracy_curve"):
        assert first[key] == second[key], key
    other = run_training(TrainConfig(**TINY, seed=6), data, progress=False, measure_memory=False)
    assert other["final_parameters_sha256"] != first["final_parameters_sha256"]
    assert other["train_loss_curve"] != first["train_loss_curve"]


def test_recipes_pick_defaults_by_dataset_and_every_field_overrides():
    mnist = recipe_config("mnist")
    assert (mnist.width, mnist.depth, mnist.batch_size, mnist.lr_schedule) == (1024, 3, 128, "cosine")
    assert mnist.augment_shift == 2 and recipe_config("digits") == TrainConfig()
    assert recipe_config("mnist", epochs=3, lr_schedule="step").epochs == 3
    assert recipe_config("mnist", method="bp").lr == mnist.lr  # backprop trains with the same recipe
    with pytest.raises(ValueError, match="dataset"):
        recipe_config("imagenet")


def test_learning_rate_schedules():
    config = TrainConfig(epochs=4, lr=1.0, warmup_epochs=1.0, lr_schedule="cosine")
    lr_at = learning_rate_schedule(config, steps_per_epoch=10)
    assert [lr_at(step) for step in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear warm-up over 10 steps
    assert lr_at(10) == 1.0 and abs(lr_at(25) - 0.5) < 1e-12 and 0 < lr_at(39) < 0.01
    step_decay = learning_rate_schedule(TrainConfig(epochs=4, lr=1.0, lr_schedule="step"), 10)
    assert [step_decay(step) for step in (0, 19, 20, 29, 30, 39)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert learning_rate_schedule(TrainConfig(epochs=2, lr=0.5), 10)(13) == 0.5
    whole_run_warmup = learning_rate_schedule(TrainConfig(epochs=1, lr=1.0, warmup_epochs=1.0), 10)
    assert [whole_run_warmup(step) for step in (0, 8, 9)] == pytest.approx([1 / 9, 1.0, 1.0])


def test_augmentation_shifts_flips_and_is_a_function_of_seed_and_step():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    assert augment(images, TrainConfig(), 0) is images  # no augmentation
    shifted = TrainConfig(augment_shift=2, seed=1)
    out = augment(images, shifted, 7)
    assert out.shape == images.shape and torch.equal(out, augment(images, shifted, 7))
    assert not torch.equal(out, augment(images, shifted, 8))
    assert set(out.unique().tolist()) <= set(images.unique().tolist())  # translated pixels, edges replicated
    moved = [original[:, (torch.arange(5) + dy).clamp(0, 4)][:, :, (torch.arange(5) + dx).clamp(0, 4)]
             for original in images for dy in range(-2, 3) for dx in range(-2, 3)]
    for index, result in enumerate(out):  # each image translated by one (dy, dx) in [-2, 2]², edges replicated
        assert any(torch.equal(result, candidate) for candidate in moved[25 * index:25 * index + 25])
    flipped = augment(images, TrainConfig(augment_flip=True, seed=0), 0)
    for original, result in zip(images, flipped):
        assert torch.equal(result, original) or torch.equal(result, original.flip(-1))
    draws = {torch.equal(augment(images, TrainConfig(augment_flip=True, seed=0), step)[0], images[0])
             for step in range(16)}
    assert draws == {True, False}


@pytest.mark.parametrize("method", ["svp", "bp"])
def test_evaluating_every_n_steps_leaves_training_bit_identical_and_logs_each_evaluation(data, method):
    """4 steps per epoch, 2 epochs, an evaluation after every 3rd step: after steps 3, 4 (epoch end), 6 and 8
    (epoch end); the parameters and curves are those of a run that evaluates at the epoch ends only."""
    config = TrainConfig(**TINY, method=method, seed=2)
    plain = run_training(config, data, progress=False, measure_memory=False)
    logged = run_training(config, data, progress=False, measure_memory=False, eval_every=3)
    for key in ("final_parameters_sha256", "train_loss_curve", "block_loss_curves", "test_accuracy_curve"):
        assert logged[key] == plain[key], key
    evaluations = logged["evaluations"]
    assert [record["step"] for record in evaluations] == [3, 4, 6, 8]
    assert [record["step"] for record in plain["evaluations"]] == [4, 8]
    assert [evaluations[1]["test_accuracy"], evaluations[3]["test_accuracy"]] == logged["test_accuracy_curve"]
    for earlier, later in zip(evaluations, evaluations[1:]):
        assert earlier["train_seconds"] <= later["train_seconds"] and earlier["wall_seconds"] < later["wall_seconds"]
    for record in evaluations:  # the training clock stops while evaluating
        assert 0 < record["eval_seconds"] and record["train_seconds"] + record["eval_seconds"] <= record["wall_seconds"]
    eval_seconds = sum(record["eval_seconds"] for record in evaluations)
    assert logged["train_seconds"] == pytest.approx(logged["wall_seconds"] - eval_seconds)
    assert logged["samples"] == 2 * 256 and logged["eval_every"] == 3
    with pytest.raises(ValueError, match="--eval-every must be a number of steps ≥ 1, got 0"):
        run_training(config, data, progress=False, measure_memory=False, eval_every=0)
