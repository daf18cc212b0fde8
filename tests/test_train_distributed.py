"""Distributed SVP training: a K-stage pipeline is bit-identical to the sequential trainer, data parallel
matches one process with the global batch, checkpoints resume, and a dead process ends the whole run."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from svp_kernels.train import distributed
from svp_kernels.train.data import synthetic
from svp_kernels.train.distributed import (DistributedTrainingError, Plan, balanced_split, epoch_batches,
                                           epoch_means, launch, plan_from_arguments)
from svp_kernels.train.distributed.backprop import BackpropReplicaStep
from svp_kernels.train.distributed.protocol import Packing
from svp_kernels.train.models import mlp
from svp_kernels.train.run import TrainConfig, augment, build_trainer
from svp_kernels.train.seeds import block_step_seed

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 15.0  # --dist-timeout of the failure tests


def sequential(config: TrainConfig, dataset, eval_every: int | None = None):
    """The single-process trainer after config.epochs epochs on one thread (with run_training's learning-rate
    schedule), its per-epoch curves and its evaluations [(step, accuracy)] at every epoch end and after every
    eval_every-th step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        epochs = list(epoch_batches(config, len(dataset.train_targets)))
        trainer = build_trainer(config, dataset.input_shape, dataset.num_classes, len(epochs[0]))
        loss_curve, accuracy_curve, evaluations = [], [], []
        for batches in epochs:
            steps = []
            for position, indices in enumerate(batches):
                steps.append(trainer.train_step(augment(dataset.train_inputs[indices], config, trainer.step),
                                                dataset.train_targets[indices]))
                if position == len(batches) - 1 or (eval_every and trainer.step % eval_every == 0):
                    evaluations.append((trainer.step, trainer.evaluate(dataset.test_inputs, dataset.test_targets)))
            loss_curve.append(epoch_means([step.output_ce for step in steps])[0])
            accuracy_curve.append(evaluations[-1][1])
    finally:
        torch.set_num_threads(threads)
    if eval_every is None:
        return trainer, loss_curve, accuracy_curve
    return trainer, loss_curve, accuracy_curve, evaluations


def evaluations_of(result: dict) -> list[tuple[int, float]]:
    """[(step, accuracy)] of a run's evaluation log."""
    return [(record["step"], record["test_accuracy"]) for record in result["evaluations"]]


def message_bytes(batches: list[int], h_shape: tuple[int, ...], v_width: int) -> float:
    """Mean bytes of the pipeline's TRAIN messages (the protocol's own layout) over batches of these sizes."""
    return sum(Packing(distributed.TRAIN, rows, h_shape, v_width, torch.float32).nbytes for rows in batches) / \
        len(batches)


def saved_tensors(directory: Path, world: int, epoch: int, first_rank: int = 0) -> dict[str, torch.Tensor]:
    """Every block's parameters, buffers and optimizer state that ranks first_rank … first_rank + world − 1
    checkpointed after `epoch`."""
    tensors = {}
    for rank in range(first_rank, first_rank + world):
        state = torch.load(directory / f"rank-{rank}-epoch-{epoch}.pt", weights_only=False)["trainer"]
        for index, block in state["blocks"].items():
            tensors.update({f"block{index}.{name}": value for name, value in block.items()})
            for key, value in state["optimizers"][index]["state"].items():
                tensors.update({f"optimizer{index}.{key}.{name}": t for name, t in value.items()})
    return tensors


def trainer_tensors(trainer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, (block, optimizer) in enumerate(zip(trainer.model.blocks, trainer.optimizers)):
        tensors.update({f"block{index}.{name}": value for name, value in block.state_dict().items()})
        for key, value in optimizer.state_dict()["state"].items():
            tensors.update({f"optimizer{index}.{key}.{name}": t for name, t in value.items()})
    return tensors


def test_pipeline_is_bit_identical_to_the_sequential_trainer_and_resumes(tmp_path):
    """2 stages (3 + 1 blocks), BatchNorm, dropout on R and a 2-step learning-rate warm-up: after 4 and 8
    steps (the second run resumed from the first's checkpoints, with the split left to the run: it keeps
    the checkpoints' 3 + 1, which no timing of these blocks would choose) every parameter, buffer and Adam
    moment equals the sequential trainer's; so do the evaluations after every second step. Stage 0 sends one
    message per step (counted in bytes), the last stage none."""
    dataset = synthetic(num_train=200, num_test=50, num_classes=4)
    config = TrainConfig(dataset="synthetic", epochs=1, batch_size=56, width=24, depth=3, p=0.2, lr=1e-2,
                         warmup_epochs=0.5, backend="cpu", seed=3)  # the same warm-up in 1 and 2 epochs
    plan = Plan("pipeline", 2, (3, 1), timeout=TIMEOUT, checkpoint_dir=str(tmp_path), eval_every=2)
    first = launch(plan, config, dataset, threads=1)
    resumed = launch(dataclasses.replace(plan, stage_split=None), dataclasses.replace(config, epochs=2), dataset,
                     threads=1)
    assert first["stage_blocks"] == resumed["stage_blocks"] == [[0, 3], [3, 4]] and resumed["world_size"] == 2
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) >= 2:  # each stage pinned to its own core
        assert first["cores"] == [cores[:len(cores) // 2], cores[len(cores) // 2:2 * (len(cores) // 2)]]
    for epochs, result in ((1, first), (2, resumed)):
        trainer, loss_curve, accuracy_curve, evaluations = sequential(dataclasses.replace(config, epochs=epochs),
                                                                      dataset, eval_every=2)
        expected, found = trainer_tensors(trainer), saved_tensors(tmp_path, 2, epochs)
        assert found.keys() == expected.keys()
        unequal = [name for name in expected if not torch.equal(found[name], expected[name])]
        assert not unequal, f"after {epochs} epochs these differ from the sequential trainer: {unequal}"
        assert result["train_loss_curve"] == loss_curve and result["test_accuracy_curve"] == accuracy_curve
        assert evaluations_of(result) == evaluations[-2:]  # a resumed run logs the evaluations since it resumed
        assert result["bytes_sent_per_step"] == [message_bytes([56, 56, 56, 32], (24,), 4), 0.0]


def test_data_parallel_matches_one_process_with_the_global_batch(tmp_path):
    """2 ranks × 64 rows of every 128-row batch vs one process with 128 (LayerNorm: BatchNorm's batch
    statistics would be per rank), to float32 rounding, dropout on R and the alignment term included.
    SGD, not Adam, so that a gradient off by a constant factor shows."""
    dataset = synthetic(num_train=256, num_test=64, num_classes=5)
    config = TrainConfig(dataset="synthetic", epochs=2, batch_size=128, width=24, depth=2, norm="layernorm",
                         p=0.2, lr=0.1, optimizer="sgd", backend="cpu", seed=1)
    result = launch(Plan("data_parallel", 2, timeout=TIMEOUT, checkpoint_dir=str(tmp_path), eval_every=1), config,
                    dataset, threads=1)
    trainer, loss_curve, accuracy_curve, evaluations = sequential(config, dataset, eval_every=1)
    expected, found = trainer_tensors(trainer), saved_tensors(tmp_path, 1, 2)  # rank 1's copy
    assert found.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert result["train_loss_curve"] == pytest.approx(loss_curve, rel=1e-5)
    assert result["test_accuracy_curve"] == accuracy_curve
    assert evaluations_of(result) == evaluations and [step for step, _ in evaluations] == [1, 2, 3, 4]
    # per step, each rank all-reduces every block's gradients and all-gathers 5 projections (v_0 … v_3) of 64 × 5
    parameter_bytes = sum(parameter.numel() * 4 for parameter in trainer.model.parameters())
    assert result["bytes_sent_per_step"] == [parameter_bytes + 4 * 64 * 5 * 4] * 2


def two_ranks(worker, *args) -> dict:
    """Run worker(rank, port, *args, queue) in two spawned processes; each puts one (key, value) on the queue.
    Returns {key: value}."""
    context = torch.multiprocessing.get_context("spawn")
    queue, port = context.Queue(), distributed.free_port()
    processes = [context.Process(target=worker, args=(rank, port, *args, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    try:
        return dict(queue.get(timeout=TIMEOUT + 60) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=TIMEOUT)
            if process.is_alive():
                process.kill()


def _backprop_worker(rank: int, port: int, config: TrainConfig, dataset, queue) -> None:
    """Rank `rank` of 2 trains config.epochs epochs of backprop through BackpropReplicaStep (DDP) and puts its
    parameters, as lists, on the queue."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    try:
        epochs = list(epoch_batches(config, len(dataset.train_targets)))
        trainer = build_trainer(config, dataset.input_shape, dataset.num_classes, len(epochs[0]))
        step_of = BackpropReplicaStep(trainer, rank, 2, distributed.Clock(torch.device("cpu")))
        for batches in epochs:
            for indices in batches:
                sizes = distributed.share_sizes(len(indices), 2)
                inputs = augment(dataset.train_inputs[indices], config, trainer.step).tensor_split(2)[rank]
                step_of(inputs, dataset.train_targets[indices], sizes, trainer.step)
                trainer.step += 1
        queue.put((rank, {name: value.tolist() for name, value in trainer.model.state_dict().items()}))
    finally:
        dist.destroy_process_group()


def test_data_parallel_backprop_steps_with_the_one_process_gradient():
    """DDP over 2 ranks, batches of 50 rows shared 25 + 25 and a last one of 37 shared 19 + 18 (the loss
    weights each share by its rows), SGD so that a gradient off by a factor shows,
    LayerNorm (BatchNorm's statistics would be per rank): after 2 epochs both ranks hold the same parameters,
    and they equal one process's to float32 rounding (the sums run in another order: not bit for bit)."""
    dataset = synthetic(num_train=137, num_test=16, num_classes=5)
    config = TrainConfig(dataset="synthetic", method="bp", epochs=2, batch_size=50, width=24, depth=2,
                         norm="layernorm", lr=0.1, optimizer="sgd", lr_schedule="cosine", backend="cpu", seed=1)
    found = two_ranks(_backprop_worker, config, dataset)
    assert found[0] == found[1]
    trainer, _, _ = sequential(config, dataset)
    expected = trainer.model.state_dict()
    assert found[0].keys() == expected.keys()
    moved = 0.0
    initial = build_trainer(config, dataset.input_shape, dataset.num_classes).model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(torch.tensor(found[0][name]), value, rtol=1e-4, atol=1e-6, msg=name)
        moved = max(moved, (value - initial[name]).abs().max().item())
    assert moved > 1e-2  # it trained


def test_data_parallel_backprop_trains_like_one_process_and_counts_its_all_reduce():
    """--method bp over 2 ranks through launch: the loss and accuracy curves of one process (to float32
    rounding), an evaluation after every other step, and per step exactly one all_reduce of every gradient
    (the parameter bytes) from each rank."""
    dataset = synthetic(num_train=256, num_test=64, num_classes=5)
    config = TrainConfig(dataset="synthetic", method="bp", epochs=2, batch_size=64, width=24, depth=2,
                         norm="layernorm", lr=0.1, optimizer="sgd", backend="cpu", seed=1)
    result = launch(Plan("data_parallel", 2, timeout=TIMEOUT, eval_every=2), config, dataset, threads=1)
    trainer, loss_curve, accuracy_curve, evaluations = sequential(config, dataset, eval_every=2)
    assert result["train_loss_curve"] == pytest.approx(loss_curve, rel=1e-4)
    assert result["block_loss_curves"] == [pytest.approx([loss], rel=1e-4) for loss in loss_curve]
    assert result["test_accuracy_curve"] == accuracy_curve and result["test_accuracy"] > 0.8
    assert [step for step, _ in evaluations_of(result)] == [2, 4, 6, 8]
    assert evaluations_of(result) == evaluations
    parameter_bytes = sum(parameter.numel() * 4 for parameter in trainer.model.parameters())
    assert result["bytes_sent_per_step"] == [parameter_bytes] * 2
    assert all(rank["train"].keys() == {"all_reduce"} for rank in result["traffic"])
    if result["os_bytes_written"][0] is not None:  # what the sockets carried: ≥ the payloads
        assert all(written >= 8 * parameter_bytes for written in result["os_bytes_written"])


def test_a_grid_of_stages_and_replicas_is_bit_identical_to_data_parallel_and_resumes(tmp_path):
    """2 stages (3 + 1 blocks) × 2 replicas against 2 data-parallel ranks: BatchNorm (per-replica batch
    statistics, running statistics from replica 0), dropout on R, a learning-rate warm-up, a last batch of
    32 rows split 16 + 16. After 1 epoch and after a second one resumed from the grid's checkpoints, every
    parameter, buffer and Adam moment of each replica equals that data-parallel rank's, and the curves match."""
    dataset = synthetic(num_train=200, num_test=50, num_classes=4)
    config = TrainConfig(dataset="synthetic", epochs=2, batch_size=56, width=24, depth=3, p=0.2, lr=1e-2,
                         warmup_epochs=0.5, backend="cpu", seed=3)
    data_parallel, grid = tmp_path / "data-parallel", tmp_path / "grid"
    expected = launch(Plan("data_parallel", 2, timeout=TIMEOUT, checkpoint_dir=str(data_parallel), eval_every=3),
                      config, dataset, threads=1)
    plan = Plan("pipeline", 4, (3, 1), timeout=TIMEOUT, checkpoint_dir=str(grid), replicas=2, eval_every=3)
    first = launch(plan, dataclasses.replace(config, epochs=1), dataset, threads=1)
    resumed = launch(plan, config, dataset, threads=1)
    assert (resumed["stages"], resumed["replicas"], resumed["world_size"]) == (2, 2, 4)
    assert resumed["stage_blocks"] == [[0, 3], [3, 4]] and len(resumed["busy_seconds"]) == 4
    for epochs, result in ((1, first), (2, resumed)):
        assert result["train_loss_curve"] == expected["train_loss_curve"][:epochs]
        assert result["test_accuracy_curve"] == expected["test_accuracy_curve"][:epochs]
        assert result["block_loss_curves"] == expected["block_loss_curves"][:epochs]
        assert evaluations_of(result) == evaluations_of(expected)[2 * epochs - 2:2 * epochs]  # steps 3, 4 | 6, 8
        for replica in range(2):
            want = saved_tensors(data_parallel, 1, epochs, first_rank=replica)
            found = saved_tensors(grid, 2, epochs, first_rank=2 * replica)
            assert found.keys() == want.keys()
            unequal = [name for name in want if not torch.equal(found[name], want[name])]
            assert not unequal, f"replica {replica} after {epochs} epochs differs from data parallel: {unequal}"


def test_a_batch_too_small_to_share_out_is_skipped_and_a_global_batch_too_small_refused(tmp_path):
    """With BatchNorm a replica's share needs 2 rows: of 35 examples in batches of 16 the last 3 (shares 2 and
    1) are skipped on 2 ranks, where a single process trains them; a --batch-size of 3 is refused."""
    dataset = synthetic(num_train=35, num_test=8, num_classes=3)
    config = TrainConfig(dataset="synthetic", epochs=1, batch_size=16, width=8, depth=1, backend="cpu", seed=4)
    launch(Plan("data_parallel", 2, timeout=TIMEOUT, checkpoint_dir=str(tmp_path)), config, dataset, threads=1)
    assert torch.load(tmp_path / "rank-0-epoch-1.pt", weights_only=False)["step"] == 2
    with pytest.raises(DistributedTrainingError, match=r"--batch-size 3 is the global batch: it must be ≥ 4, 2 "
                                                        r"row\(s\) for each of the 2 data-parallel replicas"):
        launch(Plan("data_parallel", 2, timeout=TIMEOUT), dataclasses.replace(config, batch_size=3), dataset,
               threads=1)


def test_trainable_batch_needs_two_rows_per_replica_with_batch_norm():
    assert distributed.trainable_batch(mlp((1, 4, 4), 3, width=8, depth=1), 3) == 6
    assert distributed.trainable_batch(mlp((1, 4, 4), 3, width=8, depth=1, norm="layernorm"), 3) == 3
    assert distributed.trainable_batch(mlp((1, 4, 4), 3, width=8, depth=1), 1) == 1


def _link_worker(rank: int, port: int, sent_step: int, queue) -> None:
    """Rank 0 sends a TRAIN message of step sent_step (odd shapes: B = 3, h (3, 5, 2), v (3, 3)) and, if it
    is step 4, STOP; rank 1 receives expecting step 4. Each puts what it sent or got (or the error) on the
    queue as Python lists (exact for float32; a tensor would need this process alive to be unpickled)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    cpu = torch.device("cpu")
    clock = distributed.Clock(cpu)
    h, v, targets = torch.randn(3, 5, 2), torch.randn(3, 3), torch.tensor([2, 0, 1])
    try:
        if rank == 0:
            outbound = distributed.Outbound(1, (5, 2), 3, torch.float32, cpu, 2, clock)
            outbound.send(distributed.Message(distributed.TRAIN, sent_step, h, v, targets))
            if sent_step == 4:
                outbound.send(distributed.Message(distributed.STOP))
            outbound.flush()
            queue.put(("sent", (h.tolist(), v.tolist(), targets.tolist())))
        else:
            schedule = [(distributed.TRAIN, 4, range(3)), (distributed.STOP, 0, None)]
            inbound = distributed.Inbound(0, schedule, (5, 2), 3, torch.float32, cpu, clock)
            try:
                received = [(m.kind, m.step, *(t if t is None else t.tolist() for t in (m.h, m.v, m.targets)))
                            for m in inbound]
                queue.put(("received", received))
            except DistributedTrainingError as error:
                queue.put(("error", str(error)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sent_step", [4, 5])
def test_a_link_delivers_packed_messages_exactly_and_checks_them_against_the_schedule(sent_step):
    reports = two_ranks(_link_worker, sent_step)
    if sent_step != 4:
        assert "sent (kind, rows, step) = (0, 3, 5), the schedule expects (0, 3, 4)" in reports["error"]
        return
    (train, stop), (h, v, targets) = reports["received"], reports["sent"]
    assert train[:2] == (distributed.TRAIN, 4) and stop == (distributed.STOP, 0, None, None, None)
    assert train[2:] == (h, v, targets)


def test_a_stage_that_raises_ends_the_run_with_its_name_and_cause():
    dataset = synthetic(num_train=64, num_test=16, num_classes=4)
    config = TrainConfig(dataset="synthetic", epochs=1, width=8, depth=3, backend="cpu")
    with pytest.raises(DistributedTrainingError, match=r"stage \d of 2 \(rank \d\) failed: ValueError: "
                                                        r"stage_split \(1, 1\) covers 2 blocks; the model has 4"):
        launch(Plan("pipeline", 2, (1, 1), timeout=TIMEOUT), config, dataset, threads=1)


def cli_process(*flags: str) -> subprocess.Popen:
    """svp-train with a long run (2 stages unless flags say otherwise) on one thread per process, stderr
    captured."""
    layout = () if "--method" in flags else ("--stages", "2")
    command = [sys.executable, "-m", "svp_kernels.train.cli", "--dataset", "synthetic", "--epochs", "100000",
               "--width", "16", "--depth", "1", "--device", "cpu", "--backend", "cpu", "--no-progress",
               "--dist-timeout", str(TIMEOUT), *layout, *flags]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def children(pid: int) -> dict[str, int]:
    """{name (/proc/<pid>/comm): pid} of the processes whose parent is pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[stat[stat.index("(") + 1:stat.rindex(")")]] = int(entry.name)
    return found


def ranks_of(process: subprocess.Popen, count: int = 2) -> dict[str, int]:
    """Wait until `count` ranks have joined the process group (each names itself svp-rank-<r>)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        ranks = {name: pid for name, pid in children(process.pid).items() if name.startswith("svp-rank-")}
        if len(ranks) == count:
            return ranks
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"the ranks never started: {process.communicate()[1][-2000:]}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process pid so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_training(pid: int, seconds: float = 3.0) -> None:
    """Wait until process pid has computed `seconds` of CPU time more than now: well past its setup (a tiny
    model, built in a fraction of that), so it is training."""
    target, deadline = cpu_seconds(pid) + seconds, time.monotonic() + 120
    while cpu_seconds(pid) < target and time.monotonic() < deadline:
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def survivors(pids, seconds: float) -> list[int]:
    """The pids still alive after `seconds` (killed then, so that a failing test leaves no orphans)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(map(alive, pids)):
        time.sleep(0.1)
    remaining = [pid for pid in pids if alive(pid)]
    for pid in remaining:
        os.kill(pid, signal.SIGKILL)
    return remaining


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")
@pytest.mark.parametrize("flags, victim, name", [
    ((), 1, "stage 1 of 2 (rank 1)"),
    (("--data-parallel", "2"), 3, "stage 1 of 2, replica 1 of 2 (rank 3)"),  # a 2 × 2 grid
    (("--method", "bp", "--data-parallel", "2"), 1, "data-parallel rank 1 of 2"),  # DDP
], ids=["pipeline", "grid", "backprop"])
def test_killing_a_stage_ends_the_run_with_its_name_and_no_orphans(flags, victim, name):
    process = cli_process(*flags)
    ranks = ranks_of(process, 4 if flags == ("--data-parallel", "2") else 2)
    descendants = list(children(process.pid).values())
    wait_until_training(ranks[f"svp-rank-{victim}"])
    os.kill(ranks[f"svp-rank-{victim}"], signal.SIGKILL)
    start = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the run did not end after one of its stages was killed")
    assert time.monotonic() - start < TIMEOUT + 10
    assert process.returncode == 1
    assert f"{name} failed: killed by SIGKILL" in stderr, stderr[-2000:]
    assert not survivors(descendants, 10), "processes outlived the run"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")
def test_stages_die_with_their_parent():
    process = cli_process()
    ranks = ranks_of(process)
    process.kill()
    process.wait()  # not communicate(): surviving stages would hold its pipes open
    process.stdout.close()
    process.stderr.close()
    assert not survivors(list(ranks.values()), 10), "stages outlived their parent"


def test_block_step_seed_is_a_pure_function_of_run_block_and_step():
    seeds = {block_step_seed(7, block, step) for block in range(4) for step in range(50)}
    assert len(seeds) == 200 and all(0 <= seed < 2**63 for seed in seeds)
    assert block_step_seed(7, 2, 9) == block_step_seed(7, 2, 9) != block_step_seed(8, 2, 9)
    for bad in ((-1, 0, 0), (0, -1, 0), (0, 0, 2**32), (2**63, 0, 0)):
        with pytest.raises(ValueError, match="block_step_seed"):
            block_step_seed(*bad)


def test_measured_block_costs_time_every_block_and_leave_the_trainer_and_global_rng_alone():
    dataset = synthetic(num_train=40, num_test=8, num_classes=4)
    config = TrainConfig(dataset="synthetic", batch_size=16, width=12, depth=2, p=0.2, backend="cpu")
    trainer = build_trainer(config, dataset.input_shape, dataset.num_classes)
    before, rng = trainer_tensors(trainer), torch.get_rng_state()
    costs = distributed.measured_block_costs(trainer, dataset.train_inputs[:16], dataset.train_targets[:16],
                                             repeats=2)
    assert len(costs) == 3 and all(0 < cost < 10 for cost in costs)
    assert torch.equal(torch.get_rng_state(), rng)
    after = trainer_tensors(trainer)
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    assert trainer.step == 0 and all(not optimizer.state for optimizer in trainer.optimizers)


def test_balanced_split_minimises_the_largest_stage():
    assert balanced_split([0.77, 1, 1, 1, 1, 1, 1, 1, 0.01], 2) == (4, 5)
    assert balanced_split([5, 1, 1, 1, 1, 1], 2) == (1, 5)
    assert balanced_split([1, 1, 1], 3) == (1, 1, 1)
    with pytest.raises(ValueError, match="stages"):
        balanced_split([1, 1], 3)


def arguments(**values) -> argparse.Namespace:
    defaults = {"stages": None, "stage_split": None, "data_parallel": None, "dist_timeout": 60.0,
                "stage_checkpoints": None, "no_pin_cores": False}
    return argparse.Namespace(**{**defaults, **values})


def test_plans_from_flags_and_torchrun():
    torchrun = {"rank": 0, "world_size": 2, "local_rank": 0}
    assert plan_from_arguments(arguments(), None) is None
    assert plan_from_arguments(arguments(), {**torchrun, "world_size": 1}) is None
    assert plan_from_arguments(arguments(), torchrun) == Plan("data_parallel", 2)
    assert plan_from_arguments(arguments(stages=2, stage_split="3,1"), torchrun) == Plan("pipeline", 2, (3, 1))
    assert plan_from_arguments(arguments(data_parallel=3), None).world_size == 3
    assert plan_from_arguments(arguments(stages=2, no_pin_cores=True), None) == Plan("pipeline", 2, pin_cores=False)
    grid = Plan("pipeline", 6, (1, 2), replicas=3)  # 2 stages × 3 replicas
    assert plan_from_arguments(arguments(stages=2, data_parallel=3, stage_split="1,2"), None) == grid
    assert plan_from_arguments(arguments(stages=2, data_parallel=3, stage_split="1,2"),
                               {**torchrun, "world_size": 6}) == grid
    assert (grid.stages, distributed.grid_position(grid, 4), distributed.role(grid, 4)) == \
        (2, (0, 2), "stage 0 of 2, replica 2 of 3 (rank 4)")
    for flags, environment, match in [({"stages": 2, "data_parallel": 2}, torchrun, "WORLD_SIZE = 4, got 2"),
                                      ({"stages": 0}, None, "--stages must be ≥ 1"),
                                      ({"data_parallel": 0}, None, "--data-parallel must be ≥ 1"),
                                      ({"stages": 2, "data_parallel": 2, "stage_split": "1,1,1"}, None,
                                       "each of the 2 stages"),
                                      ({"stage_split": "2,2"}, None, "needs --stages"),
                                      ({"stages": 2, "stage_split": "2;2"}, None, "comma-separated"),
                                      ({"stages": 2, "stage_split": "4"}, None, "each of the 2 stages"),
                                      ({"stages": 3}, torchrun, "WORLD_SIZE = 3"),
                                      ({"stages": 2, "dist_timeout": 0.0}, None, "timeout")]:
        with pytest.raises(ValueError, match=match):
            plan_from_arguments(arguments(**flags), environment)
    with pytest.raises(ValueError, match="backprop cannot be split into pipeline stages"):
        distributed.validate(Plan("pipeline", 2), TrainConfig(method="bp"))
    with pytest.raises(ValueError, match="--stage-checkpoints: checkpoints of data-parallel backprop are not"):
        distributed.validate(Plan("data_parallel", 2, checkpoint_dir="ckpt"), TrainConfig(method="bp"))
    distributed.validate(Plan("data_parallel", 2), TrainConfig(method="bp"))
    assert plan_from_arguments(arguments(data_parallel=2, eval_every=5), None).eval_every == 5
    with pytest.raises(ValueError, match="--eval-every must be a number of steps ≥ 1, got 0"):
        plan_from_arguments(arguments(data_parallel=2, eval_every=0), None)
    with pytest.raises(ValueError, match="divide world_size = 3"):
        Plan("pipeline", 3, replicas=2)
    with pytest.raises(ValueError, match="pipeline mode only"):
        Plan("data_parallel", 4, replicas=2)
