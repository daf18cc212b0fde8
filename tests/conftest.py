"""Test setup: Triton runs in its CPU interpreter when no CUDA device exists (set before triton loads).

SVP_KERNELS_REQUIRE=cpu,triton (CI sets it) names backends that must load: if one does not, the session
fails at once with the reason (its import or load error) instead of skipping that backend's tests.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))

REQUIRE_ENV = "SVP_KERNELS_REQUIRE"


def required_backends() -> list[str]:
    return [name.strip() for name in os.environ.get(REQUIRE_ENV, "").split(",") if name.strip()]


def pytest_sessionstart(session):
    from svp_kernels import backends

    failures = []
    for name in required_backends():
        if name not in backends.BACKEND_NAMES:
            failures.append(f"{name!r} is not a backend (one of {backends.BACKEND_NAMES})")
        elif not backends.is_available(name):
            failures.append(f"{name}: {backends.unavailable_reason(name)}")
    if failures:
        pytest.exit(f"{REQUIRE_ENV}={os.environ[REQUIRE_ENV]}: required backends are unavailable:\n  "
                    + "\n  ".join(failures), returncode=1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # The cuda marker, or "cuda" in the test's id (its file, name or parameters); not item.keywords, which
        # also holds the names of the folders above the tests (a checkout in a folder called "cuda").
        if item.get_closest_marker("cuda") is not None or "cuda" in item.nodeid:
            item.add_marker(skip_cuda)
