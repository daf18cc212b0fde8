"""bench/train_step.py --cuda-graph's captured loss-free floor (CapturedFloor) steps as the eager floor does,
learning rate schedule included, when its step is captured once and replayed (a CPU stand-in for the graph
runner: capture runs the body once, replay runs it again)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from svp_kernels.train import LayerwiseTrainer, graphs, mlp
from svp_kernels.train import trainer as trainer_module

ROOT = Path(__file__).resolve().parents[1]


class ReplayingRunner:
    def __init__(self):
        self.captures = self.replays = 0

    def warm(self, fn):
        return fn()

    def capture(self, fn):
        self.captures += 1
        outputs = fn()

        def replay():
            self.replays += 1
            fn()

        return replay, outputs


def test_captured_floor_steps_as_the_eager_floor(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import train_step  # bench/train_step.py

    monkeypatch.setattr(trainer_module, "check_graph_device", lambda device: None)
    inputs, targets = torch.randn(6, 1, 4, 4), torch.randint(0, 10, (6,))

    def make():
        torch.manual_seed(0)
        return LayerwiseTrainer(mlp((1, 4, 4), 10, width=8, depth=2), p=0.1, cuda_graph=True,
                                lr_at=lambda step: 2.0**-6 * (1 + step % 3))

    runner = ReplayingRunner()
    captured = train_step.CapturedFloor(make(), inputs, runner=runner)
    eager_trainer = make()
    eager = train_step.LossFreeStep(eager_trainer, inputs)
    for step in range(6):
        captured.train_step(inputs, targets)
        eager_trainer._begin_step(step)  # the learning rate of this step into the device buffer
        eager.train_step(inputs, targets)
    assert runner.captures == 1 and runner.replays == 3  # 2 warm-up steps, the capture, 3 replays
    assert captured.trainer.step == 6
    for a, b in zip(captured.trainer.model.parameters(), eager_trainer.model.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(make().model.parameters()), next(captured.trainer.model.parameters()))
    assert isinstance(captured.graphs, graphs.StepGraphs) and "train_step" in sys.modules
