"""The ``triton`` backend: fused Triton kernels (kernels.py) behind torch.library ops (ops.py).

Runs on CUDA tensors (float32, float64, bfloat16, float16) and, when TRITON_INTERPRET=1 was set before
Triton was imported, on CPU tensors (float32, float64) in Triton's interpreter — that is how CI tests it.
Importing this module never fails: ``is_available()`` answers False when Triton is missing or older than
MIN_TRITON (``unavailable_reason()`` says which, in one line). Where the
backend is available, importing it also loads the kernels and registers the ops ``svp_kernels::triton_*``
(``load_ops()``), so that torch.compile finds them without tracing an import. Whether the kernels run in
the interpreter is fixed then: set TRITON_INTERPRET=1 before this module (or Triton) is imported.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings

import torch

NAME = "triton"
# The oldest Triton the kernels support: the first release whose tl.dot takes float64 operands (float64 data
# and the float32 path's feature-space Grams, formed in double, use it). tools/gpu_compile_check.py compiles
# every launch variant for sm_90 at this version, at 3.6 and at the suite's version (.ci/run).
MIN_TRITON = (3, 5, 0)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INTERPRETER_DTYPES = (torch.float32, torch.float64)


def version_tuple(version: str) -> tuple:
    """(major, minor, patch) of a version string such as "3.6.0", "3.5.0+git1234abcd" or "3.7.0rc1"; (0, 0, 0)
    for one that does not start with a number."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    return tuple(int(part or 0) for part in match.groups()) if match else (0, 0, 0)


def version_error(version: str):
    """None when Triton `version` is supported, else the one-line reason it is not."""
    if version_tuple(version) >= MIN_TRITON:
        return None
    oldest = ".".join(map(str, MIN_TRITON))
    return (f"triton {version} is older than {oldest}, the oldest this backend supports (its kernels need "
            f"float64 tl.dot); pip install 'triton>={oldest}'")


def _triton_problem():
    """None when a supported Triton imports, else why not, in one line: the import's exception (ImportError,
    or whatever a broken install raises) or version_error's line."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as error:
        return f"triton does not import: {error!r}"
    return version_error(getattr(triton, "__version__", "0"))


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# The gradient interface below (projection_value, epilogue_with_grad, projection_backward) runs eagerly only
# (the API's autograd.Functions, the trainer): its launches skip wrap_triton (ops.direct_launches).

# Why the kernels could not be loaded although Triton imports (an incompatible Triton, say), or None.
LOAD_ERROR = None


def unavailable_reason():
    """None when available, else why not: Triton does not import, the kernels did not load, or nothing runs them."""
    if LOAD_ERROR is not None:
        return f"its kernels failed to load: {LOAD_ERROR!r}"
    problem = _triton_problem()
    if problem is not None:
        return problem
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
_NODES = None


def load_ops():
    """The ops module (kernels are compiled on first launch); registers torch.ops.svp_kernels.triton_*."""
    global _OPS, _NODES
    if _OPS is None:
        _OPS = importlib.import_module(f"{__name__}.ops")
        _NODES = importlib.import_module(f"{__name__}.nodes")
    return _OPS


def projection(h, weight, out_features, proj_seed, proj_std, p, seed):
    """v (B, C) = h R̃ᵀ in the accumulation dtype, differentiable w.r.t. h; R̃ is generated tile by tile."""
    load_ops()
    return torch.ops.svp_kernels.triton_projection_forward(h, weight, out_features, proj_seed, proj_std, p, seed)


def epilogue(v, target, v_prev, alignment_weight, mean, center, alignment="cosine_gram"):
    """(loss, ce, alignment) from v (B, C); autograd keeps only g_v (B, C)."""
    load_ops()
    loss, ce, alignment, _ = torch.ops.svp_kernels.triton_loss_epilogue(v, target, v_prev, alignment_weight,
                                                                         mean, center, alignment)
    return loss, ce, alignment


def projection_value(h, weight, out_features, proj_seed, proj_std, p, seed):
    """v (B, C) = h R̃ᵀ, launched directly: no op dispatch, no autograd node."""
    ops = load_ops()
    with ops.direct_launches():
        return ops.projection_forward(h, weight, out_features, proj_seed, proj_std, p, seed)


def epilogue_with_grad(v, target, v_prev, alignment_weight, mean, center, alignment="cosine_gram"):
    """(loss, ce, alignment, g_v) with g_v = dloss/dv (B, C) from the same pass; no autograd node."""
    ops = load_ops()
    with ops.direct_launches():
        return ops.loss_epilogue(v, target, v_prev, alignment_weight, mean, center, alignment=alignment)


def projection_backward(grad_v, weight, in_features, proj_seed, proj_std, p, seed, dtype):
    """dh (B, D) = grad_v R̃ in `dtype`, the mask regenerated from `seed`; no autograd node."""
    ops = load_ops()
    with ops.direct_launches():
        return ops.projection_backward(grad_v, weight, in_features, proj_seed, proj_std, p, seed, dtype)


def fused_local_loss(h, weight, out_features, proj_seed, proj_std, p, seed, target, v_prev, alignment_weight,
                     mean, center, identity, alignment="cosine_gram"):
    """(loss, ce, alignment, v) of fused_local_loss under one autograd node (nodes.py; v = h when `identity`)."""
    load_ops()
    return _NODES.FusedLocalLoss.apply(h, weight, out_features, proj_seed, proj_std, p, seed, target, v_prev,
                                       alignment_weight, mean, center, identity, alignment)


def dropout_projection(h, weight, out_features, proj_seed, proj_std, p, seed):
    """v (B, C) = h R̃ᵀ under one autograd node (nodes.py)."""
    load_ops()
    return _NODES.DropoutProjection.apply(h, weight, out_features, proj_seed, proj_std, p, seed)


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
