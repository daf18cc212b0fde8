"""tools/emulate_cuda/run_emulation.py imports the accuracy rule through this module (with tests/ on its path);
the tests import it from svp_kernels.testing."""

from svp_kernels.testing import assert_no_less_accurate_to_rounding  # noqa: F401
