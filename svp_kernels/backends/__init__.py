"""The backend registry: names, availability, and the choice made for backend="auto" and projection_path="auto".

Every backend module has the same interface (docs/backends.md): NAME, is_available(), unavailable_reason(),
supports(device, dtype), projection(...), epilogue(...), cosine_gram(...). Availability is decided once, at import,
so that resolving a backend inside torch.compile touches only these dictionaries.
"""

from __future__ import annotations

import importlib
import os

import torch

from . import auto

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
ENV_OVERRIDE = "SVP_KERNELS_BACKEND"
# Where the measured table (auto_table.py, read by choose) does not decide, "auto" tries these in order and falls
# back to "reference"; the compiled CUDA kernels come first (they need no JIT warm-up, and on an H100 they beat
# triton at every benchmark shape, bench/results/NVIDIA-H100-80GB-HBM3.csv).
AUTO_CUDA_ORDER = ("cuda", "triton")
AUTO_CPU_ORDER = ("cpu",)
# The dtypes' names in the auto table (a dictionary: torch.compile traces a lookup, not str(dtype)).
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
               torch.float16: "float16"}


_MODULES: dict = {}
_AVAILABLE: dict = {}
_REASONS: dict = {}


def load(name: str):
    """The backend module called `name` (one of BACKEND_NAMES), imported once."""
    module = _MODULES.get(name)
    if module is None:
        module = _MODULES[name] = importlib.import_module(f"{__name__}.{name}")
    return module


def is_available(name: str) -> bool:
    """Whether backend `name` can run in this process (decided once: imports and builds do not change)."""
    available = _AVAILABLE.get(name)
    if available is None:
        try:
            module = load(name)
            available = bool(module.is_available())
            _REASONS[name] = None if available else module.unavailable_reason()
        except Exception as error:  # an optional dependency that is missing or broken makes it unavailable
            available = False
            _REASONS[name] = f"importing it failed: {error!r}"
        _AVAILABLE[name] = available
    return available


GRADIENT_INTERFACE = ("projection_value", "epilogue_with_grad", "projection_backward")


def has_gradient_interface(module) -> bool:
    """Whether a backend module defines all of GRADIENT_INTERFACE (docs/backends.md): the fused backends
    do; reference, whose autograd formulation is the oracle, does not."""
    return all(callable(getattr(module, name, None)) for name in GRADIENT_INTERFACE)


NATIVE_NODES = ("fused_local_loss", "dropout_projection")


def has_native_node(module) -> bool:
    """Whether a backend module with the gradient interface also defines NATIVE_NODES, the eager
    fused_local_loss and dropout_projection under one native autograd node each (cpu and cuda:
    csrc/autograd.cpp; docs/backends.md)."""
    return all(callable(getattr(module, name, None)) for name in NATIVE_NODES)


# projection_path= of the public API (svp_kernels.validation.PROJECTION_PATHS). Without a measurement of both
# paths (choose: the auto table), "auto" takes the fused kernels (bench/NOTES.md, "The GEMM projection path").
def gemm_projection(path: str, module) -> bool:
    """Whether a call runs the GEMM projection path (docs/backends.md, "projection paths") on backend `module`.

    A backend module lists the paths it runs in PROJECTION_PATHS (cpu and cuda: "fused" and "gemm"); the reference
    backend's formulation is already the GEMM on a dense R̃, so it takes either; any other backend without "gemm"
    raises ValueError for path="gemm". `path` is one of validation.PROJECTION_PATHS (checked by the API).
    """
    if path != "gemm":
        return False  # "auto" and "fused"
    if "gemm" in getattr(module, "PROJECTION_PATHS", ()):
        return True
    if module.NAME == "reference":
        return False
    raise ValueError(f"projection_path='gemm' is not available on backend {module.NAME!r}: it runs on the 'cpu' "
                     "and 'cuda' backends (and 'reference', whose projection is already a GEMM)")


def unavailable_reason(name: str):
    """None when backend `name` is available, else why not (the import or load error where there is one)."""
    is_available(name)
    return _REASONS[name]


def available_backends() -> list[str]:
    """Names of the backends usable in this process, e.g. ["reference", "cpu", "triton"]."""
    return [name for name in BACKEND_NAMES if is_available(name)]


def requested(backend) -> tuple[str, str]:
    """(name, source): the backend a call asks for, "auto" or one of BACKEND_NAMES, with "auto" replaced by
    SVP_KERNELS_BACKEND when that is set, and where the name came from ("backend" or the environment
    variable), for the messages. TypeError/ValueError for anything else. Every op resolves its backend
    argument here (resolve below; the similarity losses of svp_kernels/predsim.py)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of 'auto' or {BACKEND_NAMES}, got {type(backend).__name__}")
    source = "backend"
    if backend == "auto":
        backend = os.environ.get(ENV_OVERRIDE, "auto") or "auto"
        source = f"the environment variable {ENV_OVERRIDE}"
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"{source} must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    return backend, source


def resolve(backend: str, device: torch.device, dtype: torch.dtype):
    """The backend module to run on (device, dtype); ValueError if `backend` cannot run there."""
    backend, _ = requested(backend)
    if backend == "auto":
        order = AUTO_CUDA_ORDER if device.type == "cuda" else AUTO_CPU_ORDER
        for name in order:
            if is_available(name) and load(name).supports(device, dtype):
                return load(name)
        return load("reference")
    if not is_available(backend):
        raise ValueError(f"backend {backend!r} is not available here; available: {available_backends()}")
    module = load(backend)
    if not module.supports(device, dtype):
        raise ValueError(f"backend {backend!r} does not support {dtype} tensors on {device.type}")
    return module


def choose(backend: str, path: str, device: torch.device, dtype: torch.dtype, shape: tuple | None = None,
           implicit: bool = False) -> tuple:
    """(module, gemm): the backend module and whether the GEMM projection path runs, for one call of a projection
    of `shape` (B, D, C) (None: no projection, e.g. the identity) with a dense or an `implicit` R. The one place
    both are decided.

    On CUDA, when the backend or the path is "auto": the candidate (backend with path) measured fastest at the
    nearest measured shape of this dtype and R (svp_kernels.backends.auto, the table auto_table.py), among those
    the request allows and that run here. Where the table does not decide (another dtype, no shape, nothing
    measured that is allowed), resolve's fixed order and gemm_projection's path. `path` is one of
    validation.PROJECTION_PATHS (checked by the API); errors as resolve and gemm_projection.
    """
    name, _ = requested(backend)
    if device.type == "cuda" and shape is not None and "auto" in (name, path):
        candidate = _table_choice(name, path, device, dtype, shape, implicit)
        if candidate is not None:
            candidate_backend, _, candidate_path = candidate.partition("-")
            return load(candidate_backend), candidate_path == "gemm"
    module = resolve(backend, device, dtype)
    return module, gemm_projection(path, module)


_TABLE_CHOICES: dict = {}  # (request, device, dtype, shape, implicit) -> candidate or None, outside torch.compile
_TABLE_CHOICES_LIMIT = 4096


def _table_choice(name: str, path: str, device: torch.device, dtype: torch.dtype, shape: tuple, implicit: bool):
    """auto.measured_choice for choose's request, remembered per request and shape outside torch.compile (the
    lookup costs tens of µs of Python; a remembered one a dictionary read). Traced afresh when compiling."""
    def allowed(candidate: str) -> bool:
        candidate_backend, _, candidate_path = candidate.partition("-")
        return (name in ("auto", candidate_backend) and path in ("auto", candidate_path or "fused")
                and is_available(candidate_backend) and load(candidate_backend).supports(device, dtype))

    def lookup():
        return auto.measured_choice(DTYPE_NAMES.get(dtype, ""), "implicit" if implicit else "dense", shape, allowed)

    if torch.compiler.is_compiling():
        return lookup()
    key = (name, path, device, dtype, tuple(shape), implicit)
    if key not in _TABLE_CHOICES:
        if len(_TABLE_CHOICES) >= _TABLE_CHOICES_LIMIT:
            _TABLE_CHOICES.clear()
        _TABLE_CHOICES[key] = lookup()
    return _TABLE_CHOICES[key]


for _name in BACKEND_NAMES:
    is_available(_name)
