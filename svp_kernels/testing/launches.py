"""Count what a call costs on the device: its Triton kernel launches and the torch ops around them
(tests/test_triton_launch_budget.py; tools/gpu_check.py can count the same on a GPU).

    with LaunchCounter() as counter:
        out = sk.fused_local_loss(h, target, v_prev, projection=R, p=0.1, seed=1, backend="triton")
        out.loss.backward()
    counter.launches   # ["projection_forward_kernel", ...]: every Triton launch, in order
    counter.glue       # ["aten::full", ...]: every ATen op outside a launch that runs on the device
    counter.count      # len(launches) + len(glue)

Triton launches are recorded where every launch passes, the ``run`` of Triton's JIT function (compiled
kernels, also behind ``torch.library.wrap_triton``) and of its interpreter function (TRITON_INTERPRET=1),
so a launcher that bypasses the backend's own helpers is still counted. ATen ops are recorded by a
TorchDispatchMode; those that only allocate or make a view (NON_LAUNCHING) launch nothing on a GPU and
are kept in ``free``, not counted. Ops that run inside a launch (the interpreter's copies of the
arguments) belong to the launch, and so do the higher-order ops that wrap one for torch.compile. Counted
on CPU under the interpreter, the numbers are the GPU's as long as the launchers take the same branches
there (the split of the projection over D is the one branch that depends on the device: see
``sm_count``).
"""

from __future__ import annotations

from typing import List, Tuple

from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that allocate or return a view: no kernel on a CUDA device.
NON_LAUNCHING = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::detach", "aten::alias", "aten::view", "aten::_unsafe_view", "aten::_reshape_alias", "aten::t",
    "aten::transpose", "aten::permute", "aten::expand", "aten::select", "aten::slice", "aten::unsqueeze",
    "aten::squeeze", "aten::unbind", "aten::split", "aten::as_strided", "aten::lift_fresh",
})


def _kernel_classes():
    """The Triton classes whose ``run`` launches a kernel (those this Triton has)."""
    classes = []
    try:
        from triton.runtime.jit import JITFunction
        classes.append(JITFunction)
    except ImportError:  # no Triton: nothing to launch
        pass
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


class LaunchCounter(TorchDispatchMode):
    """Records Triton launches and device-side ATen ops while active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.events: List[Tuple[str, str]] = []  # ("launch" | "op" | "free", name), in call order
        self._depth = 0
        self._saved = []

    def _wrap(self, run):
        counter = self

        def counted_run(kernel, *args, **kwargs):
            if not kwargs.get("warmup", False):
                counter.events.append(("launch", getattr(kernel, "__name__", type(kernel).__name__)))
            counter._depth += 1
            try:
                return run(kernel, *args, **kwargs)
            finally:
                counter._depth -= 1
        return counted_run

    def __enter__(self):
        for cls in _kernel_classes():
            self._saved.append((cls, cls.__dict__["run"]))
            cls.run = self._wrap(cls.__dict__["run"])
        return super().__enter__()

    def __exit__(self, *exc):
        for cls, run in reversed(self._saved):
            cls.run = run
        self._saved.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._depth == 0:
            schema = getattr(func, "_schema", None)
            if schema is None:  # a higher-order op (wrap_triton's): the launch inside it is counted
                self.events.append(("free", str(func)))
            else:
                self.events.append(("free" if schema.name in NON_LAUNCHING else "op", schema.name))
        return func(*args, **(kwargs or {}))

    @property
    def launches(self) -> List[str]:
        return [name for kind, name in self.events if kind == "launch"]

    @property
    def glue(self) -> List[str]:
        return [name for kind, name in self.events if kind == "op"]

    @property
    def free(self) -> List[str]:
        return [name for kind, name in self.events if kind == "free"]

    @property
    def count(self) -> int:
        return len(self.launches) + len(self.glue)

    def report(self) -> str:
        return f"{self.count} = {len(self.launches)} launches {self.launches} + {len(self.glue)} ops {self.glue}"
