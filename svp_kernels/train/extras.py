"""The packages of the [train] extra (tqdm, scikit-learn, matplotlib, pillow), which the core install lacks.

A run that finds one missing either goes on without it (tqdm: no progress bar) or stops with a
MissingExtraError that names the package, what needed it and the install line (scikit-learn: the digits
dataset; matplotlib: --plot; pillow: image folders); svp-train prints it as one line and exits with status 2.
"""

from __future__ import annotations

import importlib

INSTALL = "pip install 'svp_kernels[train]'"


class MissingExtraError(ImportError):
    """A package of the [train] extra is not installed; the message says which, for what, and INSTALL."""


def require(module: str, package: str, purpose: str):
    """The imported module, or MissingExtraError: `purpose` needs `package` (the pip name of `module`)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(f"{purpose} needs {package} (pip install {package}), which is not installed: "
                                f"{INSTALL}") from error


class _NoBar:
    """What progress_bar returns without tqdm or with disable=True: the calls of a tqdm bar, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(*, disable: bool = False, **options):
    """tqdm.auto.tqdm(**options), or a bar that shows nothing when disabled or when tqdm is not installed."""
    if disable:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(**options)


def iterate(items, **options):
    """items with a progress bar (progress_bar's options) advanced by one per item."""
    bar = progress_bar(total=len(items), **options)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()
