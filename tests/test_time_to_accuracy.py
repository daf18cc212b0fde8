"""bench/time_to_accuracy.py end to end at tiny scale (synthetic data, one repetition, every kind of configuration),
so that the benchmark cannot rot: each run's row, the medians, the threshold, the bytes counted against the
model's prediction, the files it writes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["bp-1", "bp-ddp-2", "svp-1", "svp-stages-2", "svp-dp-2", "svp-grid-2x2"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts bytes through /proc (Linux)")
def test_time_to_accuracy_runs_every_configuration_and_writes_its_rows(tmp_path):
    command = [sys.executable, "bench/time_to_accuracy.py", "--synthetic", "--repetitions", "1", "--eval-every", "8",
               "--threshold", "15", "--threads", "1", "--configs", ",".join(CONFIGS),
               "--extra", "--epochs 1 --lr 0.01", "--svp-extra", "--p 0.2", "--results", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (table,) = tmp_path.glob("time_to_accuracy-*.csv")
    rows = list(csv.DictReader(table.open()))
    assert [(row["config"], row["repetition"]) for row in rows] == \
        [(name, "0") for name in CONFIGS] + [(name, "median") for name in CONFIGS]
    for row in rows:
        assert float(row["threshold"]) == 0.15 and row["epochs"] == "1" and row["eval_every"] == "8"
        assert float(row["time_to_threshold_s"]) <= float(row["train_seconds"]) <= float(row["wall_seconds"])
        assert float(row["samples_per_second"]) > 0 and 0.15 <= float(row["final_accuracy"]) <= 1
        # counted bytes are what bench/comm_model.py predicts, to the byte: one process sends nothing
        assert float(row["bytes_per_step"]) == pytest.approx(float(row["predicted_bytes_per_step"]), abs=0.5)
        assert (float(row["bytes_per_step"]) > 0) == (row["processes"] != "1")
        if row["processes"] != "1":  # what the sockets carried covers the payloads
            assert float(row["os_bytes_per_step"]) >= float(row["bytes_per_step"])
        assert row["cpu_model"] and int(row["cores"]) >= 1 and row["timestamp"]
    assert rows[3]["stage_split"] and rows[5]["stage_split"]
    (report_path,) = tmp_path.glob("time_to_accuracy-synthetic-*.json")
    report = json.loads(report_path.read_text())
    assert [run["config"] for run in report["runs"]] == CONFIGS
    assert all(run["result"]["evaluations"] for run in report["runs"])
    assert [run["result"]["config"]["p"] for run in report["runs"]] == [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]  # svp's own
    verdict = report["verdict"]
    assert verdict["best_svp"].startswith("svp-") and verdict["best_bp"].startswith("bp-")
    assert verdict["best_svp_over_best_bp"] > 0
    assert "best SVP" in done.stdout


UNMEASURED = ("train_seconds", "wall_seconds", "startup_seconds", "samples_per_second", "bytes_per_step",
              "bytes_per_step_max_process", "predicted_bytes_per_step", "os_bytes_per_step", "foreign_cpus")


def _report(tmp_path, repetitions=(0, 1), name="report.json", dataset="synthetic") -> Path:
    """A report as measure() writes it: two configurations, some of two repetitions, hand-made evaluations."""
    curves = {"bp-1": [[0.80, 0.90, 0.95], [0.85, 0.92, 0.95]], "svp-1": [[0.70, 0.88, 0.93], [0.72, 0.91, 0.94]]}
    rows, runs = [], []
    for number, repetition in enumerate(repetitions):
        for config, per_repetition in curves.items():
            accuracies = per_repetition[repetition]
            evaluations = [{"step": 10 * (i + 1), "test_accuracy": a, "train_seconds": 1.0 * (i + 1),
                            "wall_seconds": 1.5 * (i + 1)} for i, a in enumerate(accuracies)]
            rows.append({"config": config, "repetition": number, "method": config.split("-")[0],
                         "final_accuracy": accuracies[-1], **dict.fromkeys(UNMEASURED)})
            runs.append({"config": config, "repetition": number, "result": {"evaluations": evaluations}})
    path = tmp_path / name
    path.write_text(json.dumps({"rows": rows, "runs": runs, "repetitions": len(repetitions),
                                "verdict": {"dataset": dataset, "threshold": 0.99}}))
    return path


@pytest.mark.parametrize("threshold, steps, ratio", [
    (["--threshold", "90"], {"bp-1": 20, "svp-1": 25}, 1.25),  # svp: steps 30 and 20, median 25
    ([], {"bp-1": 30, "svp-1": None}, None),  # BP's final 95 % − 0.3: svp never gets there in repetition 0
    (["--threshold", "94", "--drop", "9"], {"bp-1": 30, "svp-1": None}, None),  # --threshold wins over --drop
])
def test_summarise_reads_an_earlier_report_at_another_threshold(tmp_path, threshold, steps, ratio):
    command = [sys.executable, "bench/time_to_accuracy.py", "--summarise", str(_report(tmp_path)), *threshold]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, step in steps.items():
        row = next(line for line in done.stdout.splitlines() if line.startswith(f"| {name} |"))
        assert row.split(" | ")[3] == ("—" if step is None else str(step))
    verdict = next(line for line in done.stdout.splitlines() if line.startswith("best SVP"))
    assert verdict.endswith("—" + " (target ≤ 0.85×)") if ratio is None else f"{ratio:.3f}×" in verdict
    assert list(tmp_path.iterdir()) == [tmp_path / "report.json"]  # runs and writes nothing


def test_summarise_pools_the_repetitions_of_several_reports(tmp_path):
    def summary(*paths):
        command = [sys.executable, "bench/time_to_accuracy.py", "--summarise", *map(str, paths), "--threshold", "90"]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)

    whole = summary(_report(tmp_path))
    pooled = summary(_report(tmp_path, (0,), "first.json"), _report(tmp_path, (1,), "second.json"))
    assert whole.returncode == pooled.returncode == 0, pooled.stderr[-3000:]
    assert pooled.stdout == whole.stdout and "medians of 2 repetition(s)" in pooled.stdout
    alone = summary(tmp_path / "first.json")  # repetition 0 alone: svp reaches 90 % at step 30
    assert "| svp-1 | 3.0 |" in alone.stdout and "1.500×" in alone.stdout
    mixed = summary(tmp_path / "first.json", _report(tmp_path, (1,), "other.json", dataset="mnist"))
    assert mixed.returncode != 0 and "different datasets" in mixed.stderr
