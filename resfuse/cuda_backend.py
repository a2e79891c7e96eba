"""The ``cuda`` backend: resfuse's hand-written CUDA kernels (``csrc/cuda``).

* The four primitives (``bn_stats`` ... ``bn_act_backward_apply``) run as ``torch.ops.resfuse.*``,
  whose CUDA kernels are registered by the compiled extension (the dispatcher picks them for CUDA
  tensors): float32, float64, bfloat16, float16, NCHW and channels_last.
* ``conv_bias_act`` (inference: BN folded into ``w`` and ``bias``) and ``conv_stats`` (training: the
  per-channel statistics computed in the conv's epilogue) run the fused implicit-GEMM convolution
  ``torch.ops.resfuse.cuda_conv_bias_act`` / ``cuda_conv_stats`` — one launch instead of a conv and a
  pass over its output — for bfloat16 / float16 channels_last tensors on sm_80+ with ``groups=1``
  (tensor cores). Everything else (float32 / float64, NCHW, grouped convs, older GPUs) falls back to
  the base class's composition: ATen's convolution (cuDNN) followed by the primitives above. The CUDA
  conv also runs float32 / float64 (exact products on CUDA cores, no TF32), reachable through the ops,
  but cuDNN is the faster choice for those.
* A ``conv_stats`` prologue (the previous layer's BN-apply + ReLU) is materialised with ``bn_act``
  before the conv (the CUDA conv does not fuse it into its loads yet).
* ``conv`` and ``conv_backward`` stay on ATen (cuDNN).

The backend is available when the extension was built with its CUDA kernels
(``resfuse._extension.has_cuda_kernels()``) and a CUDA device is present; ``available()`` says why not.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _extension
from .backends import Backend, ConvGeom, register_backend

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: activation dtypes whose convolutions run on resfuse's fused CUDA conv (tensor cores)
FUSED_CONV_DTYPES = (torch.bfloat16, torch.float16)


def _conv_out_hw(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation):
    h, wd = x.shape[2], x.shape[3]
    r, s = w.shape[2], w.shape[3]
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (wd + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self):
        from .ops import bn_act
        self.prims = bn_act
        self._ops = torch.ops.resfuse

    # -- availability ---------------------------------------------------------------------------
    def available(self) -> Optional[str]:
        if not _extension.has_cuda_kernels():
            return "the C++ extension resfuse._C was built without its CUDA kernels"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def supports(self, *tensors: Optional[torch.Tensor]) -> Optional[str]:
        device = None
        for t in tensors:
            if t is None:
                continue
            if t.device.type != "cuda":
                return f"tensor on {t.device}, the cuda backend runs CUDA tensors"
            if device is None:
                device = t.device
            elif t.device != device:
                return f"tensors on different devices ({device} and {t.device})"
            if t.dtype not in _DTYPES:
                return f"dtype {t.dtype} is not one of float32, float64, bfloat16, float16"
        return None

    def supports_fused_conv(self, x: torch.Tensor, w: torch.Tensor, geom: ConvGeom) -> Optional[str]:
        """Reason the fused CUDA conv does not run this convolution (the methods fall back), or None."""
        if geom.groups != 1:
            return f"grouped convolution (groups={geom.groups})"
        if x.dtype not in FUSED_CONV_DTYPES:
            return f"dtype {x.dtype}: the fused conv runs {FUSED_CONV_DTYPES} (cuDNN is faster otherwise)"
        if w.dtype != x.dtype:
            return f"weight dtype {w.dtype} differs from input dtype {x.dtype}"
        if not x.is_contiguous(memory_format=torch.channels_last):
            return "input is not channels_last (the fused conv computes in NHWC)"
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return "the fused conv needs compute capability 8.0+"
        return self.supports(x, w)

    # -- convolutions -----------------------------------------------------------------------------
    def conv_stats(self, x, w, geom: ConvGeom, prologue=None, stats=True):
        if prologue is not None:
            x = self.prologue_input(prologue)
        if not stats or self.supports_fused_conv(x, w, geom) is not None:
            return super().conv_stats(x, w, geom, None, stats)
        return tuple(self._ops.cuda_conv_stats(x, w, list(geom.stride), list(geom.padding), list(geom.dilation)))

    def conv_bias_act(self, x, w, bias, geom: ConvGeom, residual=None, relu=True, consume=False):
        if self.supports_fused_conv(x, w, geom) is not None:
            return super().conv_bias_act(x, w, bias, geom, residual, relu)
        return self._ops.cuda_conv_bias_act(x, w, None, bias, list(geom.stride), list(geom.padding),
                                            list(geom.dilation), residual, bool(relu))


# ---- fake kernels of the CUDA-only ops (output metadata, for torch.compile) ----------------------------

if _extension.has_cuda_kernels():
    def _conv_out(x, w, stride, padding, dilation):
        p, q = _conv_out_hw(x, w, stride, padding, dilation)
        return torch.empty((x.shape[0], w.shape[0], p, q), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    def _per_channel(x, k):
        return x.new_empty((k,), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)

    @torch.library.register_fake("resfuse::cuda_conv_bias_act")
    def _cuda_conv_bias_act_fake(x, w, scale, bias, stride, padding, dilation, residual, relu):
        return _conv_out(x, w, stride, padding, dilation)

    @torch.library.register_fake("resfuse::cuda_conv_stats")
    def _cuda_conv_stats_fake(x, w, stride, padding, dilation):
        return _conv_out(x, w, stride, padding, dilation), _per_channel(x, w.shape[0]), _per_channel(x, w.shape[0])


register_backend("cuda", CudaBackend)
