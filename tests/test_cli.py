"""`svp-train` end to end on tiny runs: the JSON keys, the plots, the memory-depth subcommand, the errors."""

from __future__ import annotations

import json

import pytest

from svp_kernels.train.cli import main

TINY = ["--dataset", "synthetic", "--epochs", "2", "--width", "32", "--depth", "2", "--lr", "0.01", "--no-progress"]


@pytest.mark.parametrize("method", ["svp", "bp"])
def test_train_writes_json_and_plot(tmp_path, capsys, method):
    result_path, plot_path = tmp_path / "run.json", tmp_path / "run.png"
    assert main(TINY + ["--method", method, "--json", str(result_path), "--plot", str(plot_path)]) == 0
    result = json.loads(result_path.read_text())
    for key in ("test_accuracy", "train_loss_curve", "peak_memory_bytes", "activation_peak_bytes",
                "wall_seconds", "config"):
        assert key in result
    assert 0.5 < result["test_accuracy"] <= 1.0
    assert len(result["train_loss_curve"]) == 2 and result["train_loss_curve"][1] < result["train_loss_curve"][0]
    assert 0 < result["activation_peak_bytes"] < result["peak_memory_bytes"]
    assert result["config"]["method"] == method and result["config"]["dataset"] == "synthetic"
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test accuracy" in capsys.readouterr().out


def test_implicit_projection_flag_reaches_the_trainer(tmp_path):
    result_path = tmp_path / "run.json"
    main(TINY + ["--implicit-projection", "--p", "0.2", "--proj-dim", "16", "--json", str(result_path)])
    config = json.loads(result_path.read_text())["config"]
    assert config["implicit_projection"] and config["p"] == 0.2 and config["proj_dim"] == 16


def test_memory_depth_writes_rows_and_plot(tmp_path):
    result_path, plot_path = tmp_path / "memory.json", tmp_path / "memory.png"
    assert main(["memory-depth", "--width", "64", "--depths", "2,4", "--batch-size", "16", "--device", "cpu",
                 "--json", str(result_path), "--plot", str(plot_path), "--no-progress"]) == 0
    rows = json.loads(result_path.read_text())["rows"]
    assert {(row["method"], row["depth"]) for row in rows} == {("svp", 2), ("svp", 4), ("bp", 2), ("bp", 4)}
    for row in rows:
        assert set(row) >= {"method", "depth", "batch_size", "peak_memory_bytes", "activation_peak_bytes"}
        assert row["batch_size"] == 16 and 0 < row["activation_peak_bytes"] < row["peak_memory_bytes"]
    assert plot_path.read_bytes()[:4] == b"\x89PNG"


def test_missing_data_dir_is_a_usage_error(capsys):
    assert main(["--dataset", "mnist", "--no-progress"]) == 2
    assert "data_dir" in capsys.readouterr().err
