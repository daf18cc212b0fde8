"""svp_kernels: fused kernels for the Stochastic Variational Propagation local loss.

    out = svp_kernels.fused_local_loss(h, target, v_prev, projection=R, p=0.1)
    out.loss.backward()       # dL/dh without storing R̃, its mask or any B×B matrix

See docs/design.md §2 for the math and docs/backends.md for the backends.
"""

from . import _ops, nn  # noqa: F401  (loads the extension and registers autograd for its ops)
from .api import (LocalLoss, LocalLossOutput, alignment_loss, available_backends, cosine_gram, dropout_projection,
                  fused_local_loss)
from .predsim import PredSim, predsim_loss, similarity_loss
from .projection import ImplicitProjection

__version__ = "0.1.0"

__all__ = [
    "ImplicitProjection",
    "LocalLoss",  # the first name of LocalLossOutput (docs/design.md §4)
    "LocalLossOutput",
    "PredSim",
    "alignment_loss",
    "available_backends",
    "cosine_gram",
    "dropout_projection",
    "fused_local_loss",
    "nn",
    "predsim_loss",
    "similarity_loss",
    "testing",
    "train",
]


def __getattr__(name):
    # the trainer pulls in optional dependencies (tqdm, matplotlib), and the testing helpers are for tests,
    # benchmarks and tools: both load on first use
    if name in ("train", "testing"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'svp_kernels' has no attribute {name!r}")
