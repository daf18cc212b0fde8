"""bench/cifar_mlp_sweep.py's table: every row is a valid svp-train configuration, and the Bhattacharyya rows
change only the alignment flags (and λ) from the rows they are compared with."""

import importlib.util
from pathlib import Path

import pytest

from svp_kernels.train.cli import config_from_args, train_parser

SWEEP_PATH = Path(__file__).resolve().parent.parent / "bench" / "cifar_mlp_sweep.py"
_spec = importlib.util.spec_from_file_location("cifar_mlp_sweep", SWEEP_PATH)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)



@pytest.mark.parametrize("name", sorted(sweep.CONFIGS))
def test_every_row_is_an_svp_train_config(name, tmp_path):
    argv = sweep.command(name, "DATA", seed=3, epochs=None, json_path=tmp_path / "run.json")
    config = config_from_args(train_parser().parse_args(argv[3:]))  # after `python -m svp_kernels.train.cli`
    flags = sweep.CONFIGS[name]
    assert config.epochs == int(flags["--epochs"]) and config.seed == 3
    assert config.alignment == flags.get("--alignment", "cosine_gram")
    assert config.first_alignment == flags.get("--first-alignment", "input")


@pytest.mark.parametrize("name, compared_with, weight, first", [
    ("bd-onehot", "base", 1.0, "onehot"), ("bd-onehot-lam0.1", "base", 0.1, "onehot"),
    ("bd-onehot-lam10", "base", 10.0, "onehot"), ("bd-input", "base", 1.0, "input"),
    ("mnist-bd-onehot-lam0.1", "mnist-svp", 0.1, "onehot"), ("mnist-bd-onehot-lam1", "mnist-svp", 1.0, "onehot"),
    ("mnist-bd-onehot-lam10", "mnist-svp", 10.0, "onehot")])
def test_bhattacharyya_rows_change_only_the_alignment(name, compared_with, weight, first):
    row, reference = dict(sweep.CONFIGS[name]), dict(sweep.CONFIGS[compared_with])
    expected = {"--alignment": "bhattacharyya", "--first-alignment": first}
    assert {flag: row.pop(flag) for flag in expected} == expected
    assert row.pop("--alignment-weight") == weight
    reference.pop("--alignment-weight", None)
    assert row == reference
