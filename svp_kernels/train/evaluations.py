"""The training clock of a run and the record of its evaluations (what time-to-accuracy is read from).

Every run evaluates the test set at each epoch end and, with ``--eval-every N``, after every N-th step.
Evaluations never change training (the model is put in eval mode and back, no random numbers are drawn),
and their time is kept off the training clock: for evaluation e,

    train_seconds  the wall time since the start when the model it evaluates was trained, minus the
                   time of evaluations 0 … e − 1
    wall_seconds   the wall time since the start when evaluation e ended (evaluations included)
    eval_seconds   wall_seconds − the time its training ended: the evaluation, and any wait for it

so that time to an accuracy is the train_seconds of the first evaluation reaching it. One process keeps
the log: the single process, data-parallel rank 0, or a pipeline's last stage (whose wait for the evaluation
slices to come through the stages is counted as evaluation).
"""

from __future__ import annotations

import time

import torch

def check_eval_every(eval_every: int | None) -> None:
    """ValueError naming --eval-every unless it is None or ≥ 1."""
    if eval_every is not None and (isinstance(eval_every, bool) or not isinstance(eval_every, int)
                                   or eval_every < 1):
        raise ValueError(f"--eval-every must be a number of steps ≥ 1, got {eval_every!r}")


class EvaluationLog:
    """The training clock and the evaluations of one run (see the module docstring).

    start() starts (or, resumed with `elapsed` wall seconds and `records`, continues) the clock;
    trained() marks the end of the latest training work; record(step, accuracy) appends the evaluation that
    ended now. On CUDA both marks synchronise the device first, so queued kernels are charged to their phase.
    """

    def __init__(self, device: torch.device | str = "cpu", elapsed: float = 0.0, records: list[dict] | None = None):
        self.device = torch.device(device)
        self.records: list[dict] = [dict(record) for record in records or []]
        self.eval_seconds = sum(record["eval_seconds"] for record in self.records)
        self._origin = time.perf_counter() - elapsed
        self._mark: float | None = None

    def start(self, elapsed: float = 0.0) -> None:
        self._origin = time.perf_counter() - elapsed
        self._mark = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def trained(self) -> None:
        self._mark = self._now()

    def record(self, step: int, test_accuracy: float) -> dict:
        now = self._now()
        mark = now if self._mark is None else self._mark
        record = {"step": step, "test_accuracy": test_accuracy,
                  "train_seconds": mark - self._origin - self.eval_seconds,
                  "wall_seconds": now - self._origin, "eval_seconds": now - mark}
        self.eval_seconds += record["eval_seconds"]
        self.records.append(record)
        self._mark = None
        return record

    def wall_seconds(self) -> float:
        return time.perf_counter() - self._origin

    def train_seconds(self) -> float:
        """The training clock now: wall seconds minus evaluation seconds."""
        return self.wall_seconds() - self.eval_seconds
