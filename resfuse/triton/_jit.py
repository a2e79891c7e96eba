"""Lazy ``triton.jit``: one kernel source, decorated for the mode in force when it is first launched.

``triton.jit`` decides at *decoration* time whether a kernel runs compiled (``JITFunction``) or in the
interpreter (``InterpretedFunction``, ``TRITON_INTERPRET=1``). Decorating at import would freeze that
choice for the whole process, so a test that sets ``TRITON_INTERPRET=1`` after something else imported
this package would get GPU kernels on CPU tensors. :class:`LazyKernel` keeps the plain Python function
and builds the right wrapper on first use in each mode. :meth:`LazyKernel.jit` always returns the
compiled-mode ``JITFunction`` (what ``resfuse.aot`` hands to ``triton.compile``).

Kernel bodies must not call other Python-level helpers (``triton.jit`` would need those decorated in the
same mode); everything a kernel needs is written inline.
"""
from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``) in this process."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


class LazyKernel:
    """A Triton kernel source that is decorated lazily, separately for compiled and interpreted mode."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._cache = {}

    def jit(self):
        """The compiled-mode ``triton.runtime.jit.JITFunction`` (for launching on a GPU or for AOT)."""
        k = self._cache.get(False)
        if k is None:
            from triton.runtime.jit import JITFunction
            k = self._cache[False] = JITFunction(self.fn)
        return k

    def interpreted(self):
        k = self._cache.get(True)
        if k is None:
            from triton.runtime.interpreter import InterpretedFunction
            _patch_interpreter_bf16_dot()
            k = self._cache[True] = InterpretedFunction(self.fn)
        return k

    def get(self):
        return self.interpreted() if interpreting() else self.jit()

    def __getitem__(self, grid):
        return self.get()[grid]

    @property
    def arg_names(self):
        import inspect
        return list(inspect.signature(self.fn).parameters)

    def __repr__(self):
        return f"LazyKernel({self.fn.__module__}.{self.fn.__name__})"


_PATCHED = False


def _patch_interpreter_bf16_dot():
    """Triton's interpreter (3.6 and 3.9) stores bfloat16 as raw uint16 bits and feeds those bits to
    ``np.matmul`` in ``tl.dot`` (garbage results). Widen bf16 operands to fp32 first — exact, since
    bf16 is the top half of an fp32 and the GPU accumulates bf16 products in fp32 too. Interpreter
    only; compiled kernels are untouched."""
    global _PATCHED
    if _PATCHED:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as _interp

    builder = getattr(_interp, "InterpreterBuilder", None)
    orig = getattr(builder, "create_dot", None)
    if orig is None:
        return

    def widen(h):
        if h.dtype.scalar == tl.bfloat16 or getattr(h.dtype, "name", "") == "bf16":
            data = (h.data.astype(np.uint32) << np.uint32(16)).view(np.float32)
            return _interp.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    _PATCHED = True


def kernel(fn) -> LazyKernel:
    """Decorator: mark ``fn`` as a Triton kernel source (see :class:`LazyKernel`)."""
    return LazyKernel(fn)
