"""The compiled extension ``resfuse._C``, loaded once.

Importing ``resfuse._C`` loads the C++ library, whose static initialisers register the ``resfuse``
operator schemas (``csrc/ops.cpp``) and their CPU/CUDA kernels with the PyTorch dispatcher, so the
ops appear as ``torch.ops.resfuse.*``. The package imports without it (the reference and Triton
backends do not need it); ``LOADED`` and ``ERROR`` say whether it is there and why not.
"""
from __future__ import annotations

import importlib

import torch

LOADED: bool
ERROR: str | None

try:
    importlib.import_module(f"{__package__}._C")  # loading the library registers torch.ops.resfuse.*
except ImportError as exc:  # not built, or built against another torch (undefined symbols)
    LOADED = False
    ERROR = (f"resfuse._C could not be imported ({exc}); build it against the installed torch with "
             "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`)")
else:
    LOADED, ERROR = True, None


def has_cuda_kernels() -> bool:
    """Whether the extension is loaded and was built with the CUDA kernels."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("resfuse::bn_act", "CUDA")
