"""Loads the compiled extension and attaches fake (meta) and autograd rules to its torch.library ops.

The op schemas are defined once in csrc/bindings.cpp (namespace ``svp_kernels``); the Triton backend
registers the same schemas as ``svp_kernels::triton_<name>`` and reuses the helpers below. Autograd keeps
only what docs/design.md §2 allows: ``g_v`` for the epilogue, the scalars (and a reference to a dense R) for
the projection, whose backward regenerates the mask.
"""

from __future__ import annotations

import warnings

import torch

try:
    from . import _C  # noqa: F401  (loading it registers the ops)

    EXTENSION_ERROR: Exception | None = None
except ImportError as error:  # pure-Python install, SVP_KERNELS_SKIP_EXT=1, or a failed build
    _C = None
    EXTENSION_ERROR = error
    warnings.warn(
        "svp_kernels._C (the compiled CPU/CUDA kernels) could not be loaded, so only the 'reference' and "
        "'triton' backends are available. Build it from the source tree with "
        f"`pip install --no-build-isolation -e .` (import error: {error})",
        stacklevel=2,
    )


def extension_loaded() -> bool:
    return _C is not None


def extension_has_cuda() -> bool:
    return _C is not None and bool(getattr(_C, "has_cuda", lambda: False)())


def index_bounds(index: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty 1-D integer tensor as Python ints: one C++ pass for an int64 CPU tensor when
    the extension is loaded, else torch.aminmax, read back at one synchronisation on a device."""
    if _C is not None and index.device.type == "cpu" and index.dtype == torch.int64:
        return _C.index_bounds(index)
    low, high = torch.stack(torch.aminmax(index)).tolist()
    return low, high


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend accumulates and returns v, g_v and the losses in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_fakes(prefix: str) -> None:
    """Shape/dtype rules for torch.compile and meta tensors of the four ops named ``prefix + name``."""

    @torch.library.register_fake(prefix + "projection_forward")
    def _projection_forward(h, weight, out_features, proj_seed, proj_std, p, seed):
        return h.new_empty((h.shape[0], out_features), dtype=accumulation_dtype(h.dtype))

    @torch.library.register_fake(prefix + "projection_backward")
    def _projection_backward(grad_v, weight, in_features, proj_seed, proj_std, p, seed, dtype, grad_scale=None):
        return grad_v.new_empty((grad_v.shape[0], in_features), dtype=dtype)

    @torch.library.register_fake(prefix + "loss_epilogue")
    def _loss_epilogue(v, target, v_prev, alignment_weight, mean, center, alignment="cosine_gram"):
        dtype = accumulation_dtype(v.dtype)
        scalar = v.new_empty((), dtype=dtype)
        return scalar, scalar.clone(), scalar.clone(), v.new_empty(v.shape, dtype=dtype)

    @torch.library.register_fake(prefix + "cosine_gram")
    def _cosine_gram(v, center):
        return v.new_empty((v.shape[0], v.shape[0]), dtype=accumulation_dtype(v.dtype))


def register_projection_autograd(forward_name: str, backward_op) -> None:
    """dh = grad_v · R̃ through ``backward_op``; saves no activation, only the seeds and a dense R.

    The dropout seed tensor is saved as it is (the same device memory, checked against in-place changes by
    autograd's version counter), so the backward regenerates the forward's mask under torch.compile and in a
    replayed CUDA graph too."""

    def setup_context(ctx, inputs, output):
        h, weight, _, proj_seed, proj_std, p, seed = inputs
        ctx.save_for_backward(weight, seed)
        ctx.in_features, ctx.h_dtype = h.shape[1], h.dtype
        ctx.proj_seed, ctx.proj_std, ctx.p = proj_seed, proj_std, p

    def backward(ctx, grad_v):
        weight, seed = ctx.saved_tensors
        grad_h = backward_op(grad_v.contiguous(), weight, ctx.in_features, ctx.proj_seed, ctx.proj_std,
                             ctx.p, seed, ctx.h_dtype)
        return grad_h, None, None, None, None, None, None

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


def register_epilogue_autograd(epilogue_name: str) -> None:
    """dv = grad_loss · g_v, with g_v computed by the forward; ce, alignment and g_v carry no gradient."""

    def setup_context(ctx, inputs, output):
        _, ce, alignment, grad_v = output
        ctx.mark_non_differentiable(ce, alignment, grad_v)
        ctx.save_for_backward(grad_v)

    def backward(ctx, grad_loss, grad_ce, grad_alignment, grad_grad_v):
        (grad_v,) = ctx.saved_tensors
        return grad_loss * grad_v, None, None, None, None, None, None

    torch.library.register_autograd(epilogue_name, backward, setup_context=setup_context)


def register_gemm_path() -> None:
    """Fake and autograd rules of the GEMM projection path's ops (csrc/projection_gemm.cpp): the R̃ writer and
    the projection through the device's GEMM, whose schemas are projection_forward's and projection_backward's."""

    @torch.library.register_fake("svp_kernels::dropped_projection")
    def _dropped_projection(weight, out_features, in_features, proj_seed, proj_std, p, seed, dtype):
        return seed.new_empty((out_features, in_features), dtype=dtype)

    @torch.library.register_fake("svp_kernels::projection_forward_gemm")
    def _projection_forward_gemm(h, weight, out_features, proj_seed, proj_std, p, seed):
        return h.new_empty((h.shape[0], out_features), dtype=accumulation_dtype(h.dtype))

    @torch.library.register_fake("svp_kernels::projection_backward_gemm")
    def _projection_backward_gemm(grad_v, weight, in_features, proj_seed, proj_std, p, seed, dtype,
                                  grad_scale=None):
        return grad_v.new_empty((grad_v.shape[0], in_features), dtype=dtype)

    register_projection_autograd("svp_kernels::projection_forward_gemm", torch.ops.svp_kernels.projection_backward_gemm)


if _C is not None:
    register_fakes("svp_kernels::")
    register_gemm_path()
    register_projection_autograd("svp_kernels::projection_forward", torch.ops.svp_kernels.projection_backward)
    register_epilogue_autograd("svp_kernels::loss_epilogue")
