"""Without the [train] extra's packages (tqdm, scikit-learn, matplotlib, pillow) every entry point either works
(no progress bar) or ends with one line naming the package and `pip install 'svp_kernels[train]'`, exit
status 2, no traceback. The packages are hidden in a subprocess (sys.modules[name] = None, so importing one
fails as if it were not installed), in the processes it spawns too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXTRA = ("tqdm", "sklearn", "matplotlib", "PIL")
HIDING = """
import importlib, os, sys
for name in os.environ["HIDDEN"].split(","):
    sys.modules[name] = None  # `import name` now fails; spawned children run this file too (as __mp_main__)
if __name__ == "__main__":
    sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2:]))
"""
TINY = ["--dataset", "synthetic", "--epochs", "1", "--width", "8", "--depth", "1", "--backend", "cpu"]
LINE = r"(svp-train|demo): error: .* needs {package} \(pip install {package}\), which is not installed: " \
       r"pip install 'svp_kernels\[train\]'$"


def run_without(tmp_path: Path, hidden: tuple[str, ...], module: str, *flags: str) -> subprocess.CompletedProcess:
    script = tmp_path / "without_extras.py"
    script.write_text(HIDING)
    environment = {**os.environ, "HIDDEN": ",".join(hidden), "OMP_NUM_THREADS": "1", "SVP_KERNELS_CACHE_DIR": "off",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(script), module, *flags], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=300)


def image_folder(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for index in range(2):
                Image.new("L", (4, 4), 40 * index).save(root / split / label / f"{index}.png")
    return root


@pytest.mark.parametrize("hidden, module, flags, package", [
    (EXTRA, "svp_kernels.train.cli", ["--epochs", "1"], "scikit-learn"),  # digits, the default dataset
    (("matplotlib",), "svp_kernels.train.cli", TINY + ["--plot", "curves.png"], "matplotlib"),
    (("PIL",), "svp_kernels.train.cli", ["--dataset", "imagefolder", "--data-dir", "images"], "pillow"),
    (("matplotlib",), "svp_kernels.train.cli", ["memory-depth", "--width", "8", "--depths", "1", "--batch-size", "4",
                                                "--device", "cpu", "--plot", "memory.png"], "matplotlib"),
    (("sklearn",), "svp_kernels.train.demo", [], "scikit-learn"),
], ids=["digits", "plot", "image-folder", "memory-depth-plot", "demo"])
def test_a_missing_extra_ends_with_one_line_naming_it(tmp_path, hidden, module, flags, package):
    image_folder(tmp_path / "images")
    run = run_without(tmp_path, hidden, module, *flags)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert re.match(LINE.format(package=package), run.stderr.strip()), run.stderr
    assert not list(tmp_path.glob("*.png")), "an output was written before the refusal"


@pytest.mark.parametrize("flags", [TINY + ["--json", "run.json"], TINY + ["--stages", "2", "--json", "run.json"],
                                   TINY + ["--data-parallel", "2", "--json", "run.json"],
                                   ["memory-depth", "--width", "8", "--depths", "1", "--batch-size", "4",
                                    "--device", "cpu", "--json", "run.json"]],
                         ids=["single-process", "pipeline", "data-parallel", "memory-depth"])
def test_runs_without_tqdm_scikit_learn_matplotlib_or_pillow(tmp_path, flags):
    run = run_without(tmp_path, EXTRA, "svp_kernels.train.cli", *flags)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run.json").is_file() and "Traceback" not in run.stderr
