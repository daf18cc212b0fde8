"""Checkpoint and resume: resumed runs end bit-identical, writes are atomic, bad checkpoints are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from svp_kernels.train import LayerwiseTrainer
from svp_kernels.train.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from svp_kernels.train.cli import main
from svp_kernels.train.data import synthetic
from svp_kernels.train.run import TrainConfig, run_training

REPO = Path(__file__).resolve().parent.parent
CONFIG = TrainConfig(dataset="synthetic", width=16, depth=2, epochs=3, batch_size=64, lr=1e-2, p=0.2,
                     lr_schedule="cosine", warmup_epochs=0.5, augment_shift=1, seed=2)
COMPARED = ("final_parameters_sha256", "train_loss_curve", "block_loss_curves", "test_accuracy_curve", "steps")


def dataset():
    return synthetic(num_train=256, num_test=64, num_classes=4)


def train(config=CONFIG, **options) -> dict:
    return run_training(config, dataset(), progress=False, measure_memory=False, **options)


@pytest.fixture(scope="module")
def uninterrupted():
    return {method: train(replace(CONFIG, method=method)) for method in ("svp", "bp")}


@pytest.mark.parametrize("method", ["svp", "bp"])
def test_ctrl_c_writes_a_checkpoint_and_the_resumed_run_is_bit_identical(tmp_path, monkeypatch, uninterrupted,
                                                                         method):
    """SIGINT mid-epoch (step 6 of 12): the loop finishes that step, writes the checkpoint, raises
    KeyboardInterrupt; resuming it reproduces the uninterrupted run exactly."""
    config, path = replace(CONFIG, method=method), tmp_path / "run.ckpt"
    original = LayerwiseTrainer.train_step

    def interrupted_step(self, inputs, targets):
        losses = original(self, inputs, targets)
        if self.step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return losses

    monkeypatch.setattr(LayerwiseTrainer, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train(config, checkpoint=str(path))
    monkeypatch.setattr(LayerwiseTrainer, "train_step", original)
    payload = read_checkpoint(path)
    assert (payload["trainer"]["step"], payload["epoch"], payload["batch_in_epoch"]) == (6, 1, 2)
    resumed = train(config, resume=str(path))
    for key in COMPARED:
        assert resumed[key] == uninterrupted[method][key], key
    # the evaluation log and the example count continue from the checkpoint
    logged = [[(record["step"], record["test_accuracy"]) for record in run["evaluations"]]
              for run in (resumed, uninterrupted[method])]
    assert logged[0] == logged[1] and [step for step, _ in logged[0]] == [4, 8, 12]
    assert resumed["samples"] == uninterrupted[method]["samples"] == 3 * 256


def test_checkpoint_every_n_steps_and_epoch_end(tmp_path, monkeypatch, uninterrupted):
    import svp_kernels.train.run as run_module

    path, saved = tmp_path / "run.ckpt", []
    original = run_module.save_checkpoint

    def recording_save(target, payload):
        saved.append((payload["trainer"]["step"], payload["epoch"], payload["batch_in_epoch"]))
        original(target, payload)

    monkeypatch.setattr(run_module, "save_checkpoint", recording_save)
    result = train(checkpoint=str(path), checkpoint_every=5)
    assert saved == [(4, 1, 0), (5, 1, 1), (8, 2, 0), (10, 2, 2), (12, 3, 0)]  # 4 steps per epoch
    assert result["final_parameters_sha256"] == uninterrupted["svp"]["final_parameters_sha256"]
    assert len(read_checkpoint(path)["progress"]["accuracy_curve"]) == 3
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


CHILD = """
import sys, time, torch
from svp_kernels.train import LayerwiseTrainer
from svp_kernels.train.data import synthetic
from svp_kernels.train.run import TrainConfig, run_training
torch.set_num_threads(int(sys.argv[2]))
original = LayerwiseTrainer.train_step
def slow_step(self, inputs, targets):
    time.sleep(0.05)
    return original(self, inputs, targets)
LayerwiseTrainer.train_step = slow_step
config = TrainConfig(**eval(sys.argv[3]))
run_training(config, synthetic(num_train=256, num_test=64, num_classes=4), progress=False, measure_memory=False,
             checkpoint=sys.argv[1])
"""


def test_sigkill_mid_run_then_resume_from_the_epoch_checkpoint_is_bit_identical(tmp_path):
    config = replace(CONFIG, epochs=8)
    path = tmp_path / "run.ckpt"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(torch.get_num_threads()),
                              repr(vars(config))], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not path.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    payload = read_checkpoint(path)
    assert payload["batch_in_epoch"] == 0 and 1 <= payload["epoch"] < config.epochs
    resumed = train(config, resume=str(path))
    uninterrupted = train(config)
    for key in COMPARED:
        assert resumed[key] == uninterrupted[key], key


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    save_checkpoint(path, {"format": 1, "value": torch.ones(3)})

    def failing_fsync(descriptor):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"format": 1, "value": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["value"], torch.ones(3))
    assert [entry.name for entry in tmp_path.iterdir()] == ["run.ckpt"]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / "good.ckpt"
    train(replace(CONFIG, epochs=1), checkpoint=str(path))
    return path


def _damaged(tmp_path: Path, good: Path, damage) -> Path:
    path = tmp_path / "damaged.ckpt"
    path.write_bytes(damage(good.read_bytes()))
    return path


@pytest.mark.parametrize("damage, field", [
    (lambda raw: raw[:len(raw) // 2], "field payload: .* truncated"),
    (lambda raw: raw[:20], "field header: .* truncated"),
    (lambda raw: raw[:-100] + bytes([raw[-100] ^ 1]) + raw[-99:], "field payload: SHA-256 mismatch"),
    (lambda raw: b"PK\x03\x04" + raw[4:], "field magic"),
], ids=["truncated", "truncated-header", "corrupt", "foreign"])
def test_damaged_checkpoints_are_refused_naming_file_and_field(tmp_path, good_checkpoint, damage, field):
    path = _damaged(tmp_path, good_checkpoint, damage)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: {field}"):
        train(replace(CONFIG, epochs=1), resume=str(path))


@pytest.mark.parametrize("change, field", [
    (dict(width=24), "config.width is 16, this run has 24"),
    (dict(method="bp"), "config.method is 'svp', this run has 'bp'"),
    (dict(depth=3), "config.depth"),
    (dict(epochs=2), "config.epochs"),
])
def test_mismatched_checkpoints_are_refused_naming_the_field(good_checkpoint, change, field):
    with pytest.raises(CheckpointError, match=f"checkpoint {good_checkpoint}: field {field}"):
        train(replace(CONFIG, **{"epochs": 1, **change}), resume=str(good_checkpoint))


def test_a_checkpoint_older_than_a_config_field_resumes_while_the_field_keeps_its_default(tmp_path,
                                                                                           good_checkpoint):
    payload = read_checkpoint(good_checkpoint)
    del payload["config"]["image_size"]  # written before TrainConfig had the field
    path = tmp_path / "older.ckpt"
    save_checkpoint(path, payload)
    assert train(replace(CONFIG, epochs=1), resume=str(path))["steps"] == 4
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: field config.image_size is missing"):
        train(replace(CONFIG, epochs=1, image_size=8), resume=str(path))


def test_a_model_of_another_shape_is_refused_even_with_the_same_config(tmp_path, good_checkpoint):
    payload = read_checkpoint(good_checkpoint)
    weight = payload["trainer"]["model"]["blocks.1.0.weight"]
    payload["trainer"]["model"]["blocks.1.0.weight"] = weight[:, :-1].clone()
    path = tmp_path / "reshaped.ckpt"
    save_checkpoint(path, payload)
    with pytest.raises(CheckpointError, match=r"field trainer.model.blocks.1.0.weight has shape \(16, 15\), "
                                              r"this model needs \(16, 16\)"):
        train(replace(CONFIG, epochs=1), resume=str(path))


def test_cli_refuses_a_bad_checkpoint_in_one_line(tmp_path, good_checkpoint, capsys):
    path = _damaged(tmp_path, good_checkpoint, lambda raw: raw[:100])
    flags = ["--dataset", "synthetic", "--width", "16", "--depth", "2", "--epochs", "1", "--no-progress"]
    assert main(flags + ["--resume", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(path) in error and "Traceback" not in error
