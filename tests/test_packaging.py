"""The package metadata tells the truth: one version (svp_kernels.__version__, read by setuptools), the Python
and torch versions that are built and tested, the same torch bounds for building and running, and the
license text that pyproject.toml names."""

from __future__ import annotations

import re
from pathlib import Path

import svp_kernels

try:
    import tomllib
except ImportError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_version_is_written_once():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "svp_kernels.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", svp_kernels.__version__)
    written = [path for path in REPO.rglob("*.py") if "build" not in path.parts and
               not any(part.startswith(".") for part in path.relative_to(REPO).parts) and
               re.search(r"^__version__\s*=", path.read_text(errors="ignore"), re.MULTILINE)]
    assert written == [REPO / "svp_kernels" / "__init__.py"]


def test_python_and_torch_bounds_are_the_tested_ones():
    project = PYPROJECT["project"]
    assert project["requires-python"] == ">=3.10"  # zip(strict=True); torch 2.11 needs 3.10 as well
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py310"
    torch_requirement = next(dependency for dependency in project["dependencies"] if dependency.startswith("torch"))
    # built and tested: 2.11.0, 2.13.0 (the suite's) and 2.14.1 (CI's CUDA build, tools/build_cuda_extension.sh)
    assert torch_requirement == "torch>=2.11,<2.15"
    assert torch_requirement in PYPROJECT["build-system"]["requires"]
    assert PYPROJECT["project"]["optional-dependencies"]["triton"] == ["triton>=3.5,<3.10"]


def test_the_license_file_is_the_apache_2_0_text():
    assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text) == 11358
