"""svp-train --cuda-graph: the whole training step captured as a CUDA graph per batch shape and replayed.

On CUDA (marked cuda; tools/gpu_check.py runs it): replays give the eager step's bits. On CPU, what needs no
GPU: the refusals, the device buffer of per-step values, and the capture plumbing driven by a CPU stand-in for
the graph runner that poisons every host-side per-step value while the "captured" body runs, so a body that
read one (a seed or a learning rate baked into a graph) fails here.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from svp_kernels.train import LayerwiseTrainer, cli, graphs, mlp, trainer as trainer_module
from svp_kernels.train.data import synthetic


@pytest.fixture(scope="module")
def data():
    return synthetic(num_train=96, num_test=16, num_classes=4)


# Batches of 16 rows and a last one of 7: two static shapes, as an epoch with a partial last batch has.
BATCHES = [(0, 16), (16, 32), (32, 48), (48, 55), (55, 71), (71, 87), (87, 94), (0, 16), (16, 32), (32, 39)]
SHAPE = synthetic(num_train=2, num_test=2, num_classes=4).input_shape


def schedule(step: int) -> float:
    return 1e-2 / (1 + step)  # a different learning rate every step


def build(data, method="svp", optimizer="adam", device="cpu", backend="auto", lr_at=schedule,
          **options) -> LayerwiseTrainer:
    torch.manual_seed(0)
    model = mlp(data.input_shape, 4, width=24, depth=2)
    return LayerwiseTrainer(model, method=method, optimizer=optimizer, p=0.2, backend=backend, device=device,
                            seed=5, lr_at=lr_at, **options)


def state(trainer: LayerwiseTrainer) -> list[torch.Tensor]:
    """Every tensor a step changes: parameters, buffers (BatchNorm), optimizer state."""
    tensors = [t.detach().clone() for t in trainer.model.state_dict().values()]
    for optimizer in trainer.optimizers:
        for per_parameter in optimizer.state.values():
            tensors += [t.detach().clone() for t in per_parameter.values() if isinstance(t, torch.Tensor)]
    return tensors


def run(trainer: LayerwiseTrainer, data, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    losses = []
    for start, stop in BATCHES:
        out = trainer.train_step(data.train_inputs[start:stop].to(device), data.train_targets[start:stop].to(device))
        losses.append((out.output_ce.clone(), out.block_losses.clone()))  # replays overwrite the graph's outputs
    return losses


def assert_same_bits(a: LayerwiseTrainer, b: LayerwiseTrainer, losses_a, losses_b) -> None:
    for step, ((ce_a, blocks_a), (ce_b, blocks_b)) in enumerate(zip(losses_a, losses_b)):
        assert torch.equal(ce_a, ce_b) and torch.equal(blocks_a, blocks_b), f"step {step}: {ce_a} {ce_b}"
    state_a, state_b = state(a), state(b)
    assert len(state_a) == len(state_b) > 0
    for index, (x, y) in enumerate(zip(state_a, state_b)):
        assert torch.equal(x, y), f"state tensor {index} differs"


# ----------------------------------------------------------------------------------------------------
# CPU: refusals, the device buffer, the plumbing
# ----------------------------------------------------------------------------------------------------

def test_cli_refuses_graph_capture_on_cpu_in_one_line(capsys):
    for method in ("svp", "bp"):
        code = cli.main(["--cuda-graph", "--device", "cpu", "--method", method, "--epochs", "1", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith("svp-train: error: --cuda-graph needs a CUDA device"), err


def test_cli_refuses_graph_capture_with_distributed_training(capsys, monkeypatch):
    monkeypatch.setattr(cli, "validate_config", lambda config: None)  # past the device check, as on a GPU machine
    monkeypatch.setattr(cli.backends, "resolve", lambda *args: None)
    code = cli.main(["--cuda-graph", "--device", "cuda", "--data-parallel", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "not with --stages, --data-parallel or torchrun" in err and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_trainer_refuses_graph_capture_without_a_gpu(data):
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        build(data, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        build(data, method="bp", device="cuda", cuda_graph=True)


def test_step_scalars_hold_the_seeds_and_the_float32_learning_rate():
    scalars = graphs.StepScalars(3, torch.device("cpu"))
    seeds = [0, 2**63 - 1, 123456789012345]
    scalars.write(seeds, 0.1)
    assert [int(seed) for seed in scalars.seeds] == seeds
    assert all(seed.dim() == 0 and seed.dtype == torch.int64 for seed in scalars.seeds)
    assert scalars.lr.dim() == 0 and scalars.lr.dtype == torch.float32 and scalars.lr.item() == torch.tensor(0.1).item()
    scalars.write([4, 5, 6])  # no learning rate: the last one stays
    assert [int(seed) for seed in scalars.seeds] == [4, 5, 6] and scalars.lr.item() == torch.tensor(0.1).item()
    views = scalars.seeds[0].data_ptr(), scalars.lr.data_ptr()
    scalars.write([7, 8, 9], 2.0)  # written in place: whatever holds the views (a graph) reads the new values
    assert (scalars.seeds[0].data_ptr(), scalars.lr.data_ptr()) == views and scalars.lr.item() == 2.0


class PoisonedRunner:
    """A CPU stand-in for graphs.cuda_runner: warm() runs the step; capture() runs it once and replay() again,
    copying its outputs into the first run's tensors (a graph's static outputs). While a "captured" body runs,
    the trainer's host-side per-step values (block_seed, lr_at, step) raise: a graph would have baked them in."""

    def __init__(self):
        self.trainer, self.inside, self.captures, self.replays = None, False, 0, 0

    def attach(self, trainer: LayerwiseTrainer) -> None:
        self.trainer = trainer
        for name in ("block_seed", "lr_at"):
            original = getattr(trainer, name)

            def guarded(*args, _original=original, _name=name):
                if self.inside:
                    raise AssertionError(f"the captured step read {_name} on the host")
                return _original(*args)

            setattr(trainer, name, guarded)

    @contextlib.contextmanager
    def captured(self):
        step, self.inside = self.trainer.step, True
        self.trainer.step = None  # any arithmetic on it inside the body fails
        try:
            yield
        finally:
            self.inside, self.trainer.step = False, step

    def warm(self, fn):
        return fn()

    def capture(self, fn):
        self.captures += 1
        with self.captured():
            outputs = fn()

        def replay():
            self.replays += 1
            with self.captured():
                fresh = fn()
            for static, value in zip(outputs, fresh):
                static.copy_(value)

        return replay, outputs


def poisoned_graph_trainer(data, monkeypatch, warmup_steps, **options) -> tuple[LayerwiseTrainer, PoisonedRunner]:
    """A cuda_graph trainer on CPU whose graphs are PoisonedRunner's."""
    runner = PoisonedRunner()
    monkeypatch.setattr(trainer_module, "check_graph_device", lambda device: None)
    monkeypatch.setattr(graphs, "cuda_runner", lambda device: pytest.fail("a CUDA runner on CPU"))
    trainer = build(data, cuda_graph=True, graph_warmup_steps=warmup_steps, **options)
    trainer._graphs._runner = runner  # made lazily: replaced before the first step needs it
    runner.attach(trainer)
    return trainer, runner


def shapes(batch: int) -> tuple:
    return (batch, *SHAPE), (batch,)


@pytest.mark.parametrize("method, optimizer", [("svp", "adam"), ("svp", "sgd"), ("bp", "adamw")])
def test_replayed_steps_read_every_per_step_value_on_the_device(data, monkeypatch, method, optimizer):
    """Captured after 2 eager steps per shape, replayed after: the same bits as the same trainer never captured,
    with the seeds and the learning rate changing every step, and both batch shapes captured."""
    graphed, runner = poisoned_graph_trainer(data, monkeypatch, 2, method=method, optimizer=optimizer)
    eager, _ = poisoned_graph_trainer(data, monkeypatch, len(BATCHES) + 1, method=method, optimizer=optimizer)
    losses_graphed, losses_eager = run(graphed, data, "cpu"), run(eager, data, "cpu")
    assert_same_bits(graphed, eager, losses_graphed, losses_eager)
    # 16 rows: steps 0, 1 eager, 2 captured, 4, 5, 7, 8 replayed; 7 rows: 3, 6 eager, 9 captured
    assert runner.captures == 2 and runner.replays == 4
    assert sorted(graphed._graphs.captured_shapes) == [shapes(7), shapes(16)]
    assert graphed.step == len(BATCHES)


def test_graph_trainer_computes_the_plain_trainers_step(data, monkeypatch):
    """With learning rates exact in float32, the graph-ready step (seeds from the device buffer, a device
    learning rate, capturable optimizers), captured or not, is bit for bit the plain trainer's."""
    exact = {"lr_at": lambda step: 2.0**-7 * (1 + step % 3)}
    plain = build(data, **exact)
    graphed, runner = poisoned_graph_trainer(data, monkeypatch, 1, **exact)
    assert_same_bits(plain, graphed, run(plain, data, "cpu"), run(graphed, data, "cpu"))
    assert runner.replays > 0


def test_graph_warmup_must_be_positive(data):
    with pytest.raises(ValueError, match="warmup_steps must be ≥ 1"):
        graphs.StepGraphs(lambda inputs, targets: None, torch.device("cpu"), 0,
                          runner=graphs.GraphRunner(None, None))


# ----------------------------------------------------------------------------------------------------
# CUDA: the real capture
# ----------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("method, optimizer, backend", [("svp", "adam", "cuda"), ("svp", "sgd", "cuda"),
                                                        ("svp", "adamw", "triton"), ("bp", "adam", "auto")])
def test_cuda_graph_replay_equals_the_eager_step_bit_for_bit(data, method, optimizer, backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from svp_kernels import backends

    if backend != "auto" and not backends.is_available(backend):
        pytest.skip(f"backend {backend!r} is not available here")
    options = dict(method=method, optimizer=optimizer, backend=backend, device="cuda", cuda_graph=True)
    graphed = build(data, graph_warmup_steps=2, **options)
    eager = build(data, graph_warmup_steps=len(BATCHES) + 1, **options)
    losses_graphed, losses_eager = run(graphed, data, "cuda"), run(eager, data, "cuda")
    torch.cuda.synchronize()
    assert sorted(graphed._graphs.captured_shapes) == [shapes(7), shapes(16)]
    assert eager._graphs.captured_shapes == []
    assert_same_bits(graphed, eager, losses_graphed, losses_eager)
