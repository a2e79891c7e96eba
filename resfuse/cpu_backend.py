"""The ``cpu`` backend: resfuse's C++ kernels (``csrc/cpu``) for the BN/ReLU/add passes and oneDNN
convolutions through ATen."""
from __future__ import annotations

from typing import Optional

import torch

from . import _extension
from .backends import Backend, register_backend

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self):
        from .ops import bn_act
        self.prims = bn_act

    def available(self) -> Optional[str]:
        if not _extension.LOADED:
            return f"the C++ extension resfuse._C is not built ({_extension.ERROR})"
        return None

    def supports(self, *tensors) -> Optional[str]:
        for t in tensors:
            if t.device.type != "cpu":
                return f"tensor on {t.device}, the cpu backend runs CPU tensors"
            if t.dtype not in _DTYPES:
                return f"dtype {t.dtype} is not one of float32, float64, bfloat16, float16"
        return None


register_backend("cpu", CpuBackend)
