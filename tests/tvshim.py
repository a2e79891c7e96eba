"""Test-only helpers that import torchvision / timm next to a CPU-only torch wheel.

The PyPI torchvision wheel (0.28) ships C++ ops built against the CUDA torch wheel. With the CPU torch
wheel ``torchvision/_C.so`` fails to load, which torchvision tolerates silently (``extension._has_ops()``
is then False, and every other registration is guarded by it) -- except for two unguarded
``@torch.library.register_fake("torchvision::nms")`` / ``("torchvision::qnms")`` decorators in
``torchvision/_meta_registrations.py``. Those raise ``RuntimeError: operator torchvision::nms does not
exist`` and abort ``import torchvision`` (and therefore ``import timm``, which imports torchvision).

:func:`import_torchvision` wraps ``torch.library.register_fake`` for the duration of the import so that a
fake-kernel registration for a ``torchvision::`` operator *that does not exist* is skipped (the decorated
function is returned unchanged); everything else, including registrations for torchvision ops that did
load, goes through untouched. ``torch.library.impl_abstract`` (the deprecated alias) resolves
``register_fake`` through the module global at call time, so it is covered by the same patch. The
original function is restored afterwards. Only the model zoo is needed by the tests; torchvision's
detection ops (nms, roi_align, ...) stay unusable on such an install.

If a package is not installed, the helpers call :func:`pytest.skip` (like :func:`pytest.importorskip`).
Install both next to ``torch==2.13.0`` (CPU) without replacing torch with::

    pip install torchvision==0.28.0 timm==1.0.31
"""

import contextlib
import importlib.util
import sys
from types import ModuleType

import pytest
import torch
import torch.library

_NAMESPACE = "torchvision::"


def _op_exists(qualname: str) -> bool:
    """Whether the operator ``"ns::name"`` is registered with the dispatcher (any overload)."""
    namespace, name = qualname.split("::", 1)
    return hasattr(getattr(torch.ops, namespace), name.split(".", 1)[0])


@contextlib.contextmanager
def _skip_missing_torchvision_fakes():
    """Within the block, ``torch.library.register_fake`` ignores missing ``torchvision::`` operators."""
    original = torch.library.register_fake

    def register_fake(op, func=None, /, *args, **kwargs):
        if isinstance(op, str) and op.startswith(_NAMESPACE) and not _op_exists(op):
            return func if func is not None else (lambda fn: fn)
        return original(op, func, *args, **kwargs)

    torch.library.register_fake = register_fake
    try:
        yield
    finally:
        torch.library.register_fake = original


def _import(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    for required in ("torchvision", name):
        if importlib.util.find_spec(required) is None:
            pytest.skip(
                f"could not import {required!r}: not installed (pip install torchvision==0.28.0 timm==1.0.31)"
            )
    with _skip_missing_torchvision_fakes():
        return importlib.import_module(name)


def import_torchvision() -> ModuleType:
    """Import and return ``torchvision`` (skips the calling test if it is not installed)."""
    return _import("torchvision")


def import_timm() -> ModuleType:
    """Import and return ``timm`` (skips the calling test if timm or torchvision is not installed)."""
    return _import("timm")
