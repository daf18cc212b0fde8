"""The ``triton`` backend: fused Triton kernels (kernels.py) behind torch.library ops (ops.py).

Runs on CUDA tensors (float32, float64, bfloat16, float16) and, when TRITON_INTERPRET=1 was set before
Triton was imported, on CPU tensors (float32, float64) in Triton's interpreter — that is how CI tests it.
Importing this module never fails: ``is_available()`` answers False when Triton is missing. Where the
backend is available, importing it also loads the kernels and registers the ops ``svp_kernels::triton_*``
(``load_ops()``), so that torch.compile finds them without tracing an import. Whether the kernels run in
the interpreter is fixed then: set TRITON_INTERPRET=1 before this module (or Triton) is imported.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

NAME = "triton"
_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INTERPRETER_DTYPES = (torch.float32, torch.float64)


def _triton_import_error():
    """None when Triton imports, else the exception (ImportError, or whatever a broken install raises)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as error:
        return error
    return None


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Why the kernels could not be loaded although Triton imports (an incompatible Triton, say), or None.
LOAD_ERROR = None


def unavailable_reason():
    """None when available, else why not: Triton does not import, the kernels did not load, or nothing runs them."""
    if LOAD_ERROR is not None:
        return f"its kernels failed to load: {LOAD_ERROR!r}"
    error = _triton_import_error()
    if error is not None:
        return f"triton does not import: {error!r}"
    if not (interpreting() or torch.cuda.is_available()):
        return "needs a CUDA device or TRITON_INTERPRET=1"
    return None


def is_available() -> bool:
    """Triton is importable, the kernels load, and something can run them: CUDA, or the interpreter."""
    return unavailable_reason() is None


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    device = torch.device(device)
    if not is_available():
        return False
    if device.type == "cuda":
        return dtype in _CUDA_DTYPES
    if device.type == "cpu":  # only if the kernels were built as interpreter functions
        interpreted = _OPS.INTERPRETED if _OPS is not None else interpreting()
        return interpreting() and interpreted and dtype in _INTERPRETER_DTYPES
    return False


_OPS = None


def load_ops():
    """The ops module (kernels are compiled on first launch); registers torch.ops.svp_kernels.triton_*."""
    global _OPS
    if _OPS is None:
        _OPS = importlib.import_module(f"{__name__}.ops")
    return _OPS


def projection(h, weight, out_features, proj_seed, proj_std, p, seed):
    """v (B, C) = h R̃ᵀ in the accumulation dtype, differentiable w.r.t. h; R̃ is generated tile by tile."""
    load_ops()
    return torch.ops.svp_kernels.triton_projection_forward(h, weight, out_features, proj_seed, proj_std, p, seed)


def epilogue(v, target, v_prev, alignment_weight, mean, center):
    """(loss, ce, alignment) from v (B, C); autograd keeps only g_v (B, C)."""
    load_ops()
    loss, ce, alignment, _ = torch.ops.svp_kernels.triton_loss_epilogue(v, target, v_prev, alignment_weight,
                                                                         mean, center)
    return loss, ce, alignment


def projection_value(h, weight, out_features, proj_seed, proj_std, p, seed):
    """v (B, C) = h R̃ᵀ, launched directly: no op dispatch, no autograd node."""
    return load_ops().projection_forward(h, weight, out_features, proj_seed, proj_std, p, seed)


def epilogue_with_grad(v, target, v_prev, alignment_weight, mean, center):
    """(loss, ce, alignment, g_v) with g_v = dloss/dv (B, C) from the same pass; no autograd node."""
    return load_ops().loss_epilogue(v, target, v_prev, alignment_weight, mean, center)


def projection_backward(grad_v, weight, in_features, proj_seed, proj_std, p, seed, dtype):
    """dh (B, D) = grad_v R̃ in `dtype`, the mask regenerated from `seed`; no autograd node."""
    return load_ops().projection_backward(grad_v, weight, in_features, proj_seed, proj_std, p, seed, dtype)


def cosine_gram(v, center):
    """S (B, B) = â âᵀ (inspection only)."""
    load_ops()
    return torch.ops.svp_kernels.triton_cosine_gram(v, center)


if is_available():
    try:
        load_ops()
    except Exception as error:  # never fail the import: report, and stay unavailable
        LOAD_ERROR = error
        warnings.warn(f"the triton backend is unavailable: its kernels failed to load ({error!r})", stacklevel=2)
