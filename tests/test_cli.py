"""`svp-train` end to end on tiny runs: the JSON keys, the plots, the memory-depth subcommand, the errors."""

from __future__ import annotations

import json

import pytest

from svp_kernels.train.cli import main

TINY = ["--dataset", "synthetic", "--epochs", "2", "--width", "32", "--depth", "2", "--lr", "0.01", "--no-progress"]


@pytest.mark.parametrize("method", ["svp", "bp"])
def test_train_writes_json_and_plot(tmp_path, capsys, method):
    result_path, plot_path = tmp_path / "run.json", tmp_path / "run.png"
    assert main(TINY + ["--method", method, "--json", str(result_path), "--plot", str(plot_path),
                        "--eval-every", "20"]) == 0
    result = json.loads(result_path.read_text())
    for key in ("test_accuracy", "train_loss_curve", "peak_memory_bytes", "activation_peak_bytes",
                "wall_seconds", "train_seconds", "samples_per_second", "config"):
        assert key in result
    assert [record["step"] for record in result["evaluations"]] == [20, 32, 40, 60, 64]  # 32 steps per epoch
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


def _one_line_error(capsys, argv, *fragments) -> str:
    """main(argv) exits 2 with one stderr line holding every fragment, and no traceback."""
    code = None
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own refusals
        code = exit_info.code
    error = capsys.readouterr().err
    assert code == 2, error
    assert error.startswith("svp-train: error: ") and error.count("\n") == 1 and "Traceback" not in error
    for fragment in fragments:
        assert fragment in error, (fragment, error)
    return error


@pytest.mark.parametrize("flags, fragments", [
    (["--epochs", "0"], ["--epochs must be ≥ 1, got 0"]),
    (["--epochs", "two"], ["--epochs expects an integer, got 'two'"]),
    (["--batch-size", "5000"], ["--batch-size must be ≤ the 2048 training examples, got 5000"]),
    (["--lr", "-1"], ["--lr must be a finite number > 0"]),
    (["--lr", "nan"], ["--lr must be a finite number > 0"]),
    (["--p", "1.5"], ["--p must be in [0, 1)"]),
    (["--warmup-epochs", "2.5"], ["--warmup-epochs must be in [0, --epochs = 2], got 2.5"]),
    (["--width", "0"], ["--width must be ≥ 1"]),
    (["--optimizer", "lbfgs"], ["--optimizer", "invalid choice"]),
    (["--checkpoint-every", "5"], ["--checkpoint-every", "needs --checkpoint"]),
    (["--threads", "0"], ["--threads must be ≥ 1"]),
    (["--eval-every", "0"], ["--eval-every must be a number of steps ≥ 1, got 0"]),
    (["--eval-every", "-2", "--data-parallel", "2"], ["--eval-every must be a number of steps ≥ 1, got -2"]),
    (["--method", "bp", "--stages", "2"], ["backprop cannot be split into pipeline stages"]),
    (["--method", "bp", "--data-parallel", "2", "--stage-checkpoints", "ckpt"],
     ["--stage-checkpoints: checkpoints of data-parallel backprop are not supported"]),
    (["--json", "/no/such/folder/run.json"], ["--json /no/such/folder/run.json", "does not exist"]),
    (["--resume", "/no/such.ckpt"], ["--resume", "/no/such.ckpt", "cannot be read"]),
])
def test_bad_flags_get_one_line_naming_the_flag(capsys, flags, fragments):
    _one_line_error(capsys, TINY + flags, *fragments)


def test_bad_data_dirs_and_files_get_one_line_naming_the_file(tmp_path, capsys):
    _one_line_error(capsys, ["--dataset", "mnist", "--data-dir", str(tmp_path), "--no-progress"],
                    "--data-dir", "missing train-images-idx3-ubyte", str(tmp_path))
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (tmp_path / name).write_bytes(b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + bytes(4))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    _one_line_error(capsys, ["--dataset", "mnist", "--data-dir", str(tmp_path), "--no-progress"],
                    str(tmp_path / "t10k-labels-idx1-ubyte.gz"), "corrupt gzip")
