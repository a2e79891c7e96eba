"""The ``triton`` backend: the :class:`resfuse.backends.Backend` interface on resfuse's Triton kernels.

What it fuses (everything else is the base class's composition):

* ``conv_stats``: the previous layer's BN-apply + ReLU in the conv's load prologue (the normalised
  tensor is never written) and the per-channel statistics in its epilogue (optionally after adding a
  residual / RiR partial identity) — one conv launch + one tiny merge launch;
* ``conv_bias_act``: inference form ``act(conv(x, w) + bias + residual)`` in one launch;
* ``conv``; the four primitives as Triton kernels;
* ``gate_act`` / ``gate_act_backward``: the end of a squeeze-and-excitation block (gate multiply, shortcut
  add, ReLU) in one pass each way.

``conv_backward`` stays on ATen (cuDNN): no Triton dgrad/wgrad has been measured against it (see
benchmarks/NOTES.md). Grouped convolutions fall back to the base class (ATen conv + Triton primitives).
"""
from __future__ import annotations

import torch

from ..backends import Backend, ConvGeom
from ._jit import interpreting

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_LIMIT = 2 ** 31 - 1


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        from . import ops  # noqa: F401  (registers torch.ops.resfuse.triton_*)
        self._ops = torch.ops.resfuse

    # -- availability ---------------------------------------------------------------------------
    def available(self) -> str | None:
        if interpreting():
            return None
        if not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors)"
        return None

    def supports(self, *tensors: torch.Tensor | None) -> str | None:
        want = "cpu" if interpreting() else "cuda"
        device = None
        for t in tensors:
            if t is None:
                continue
            if t.device.type != want:
                return (f"tensor on {t.device}: the Triton backend runs {want} tensors"
                        + (" (TRITON_INTERPRET=1 is set)" if want == "cpu" else ""))
            if device is None:
                device = t.device
            elif t.device != device:
                return f"tensors on different devices ({device} and {t.device})"
            if t.dim() not in (0, 1, 4):
                return f"{t.dim()}-D tensor: the Triton kernels take 4-D activations and 1-D per-channel vectors"
            if t.dim() == 4 and t.dtype not in _DTYPES:
                return f"dtype {t.dtype} is not supported by the Triton kernels (float32, bfloat16, float16)"
            if t.dim() <= 1 and t.is_floating_point() and t.dtype not in _DTYPES:
                return f"per-channel vector of dtype {t.dtype} (float64 runs on the reference backend)"
            if t.numel() > _INT32_LIMIT:
                return f"tensor of {t.numel()} elements: the Triton kernels index with int32"
        return None

    def supports_conv(self, x: torch.Tensor, w: torch.Tensor, geom: ConvGeom) -> str | None:
        """Reason the Triton conv cannot run this convolution (the methods then fall back), or None."""
        if geom.groups != 1:
            return f"grouped convolution (groups={geom.groups}) is not implemented in the Triton conv"
        if w.dtype != x.dtype:
            return f"weight dtype {w.dtype} differs from input dtype {x.dtype}"
        return self.supports(x, w)

    # -- convolutions -----------------------------------------------------------------------------
    def _conv(self, x, w, geom, pro=None, epi_shift=None, residual=None, relu=False, stats=False):
        ps, pt, pr = pro if pro is not None else (None, None, False)
        return self._ops.triton_conv(x, w, list(geom.stride), list(geom.padding), list(geom.dilation),
                                     ps, pt, bool(pr), None, epi_shift, residual, bool(relu), bool(stats))

    def conv(self, x, w, geom: ConvGeom):
        if self.supports_conv(x, w, geom) is not None:
            return super().conv(x, w, geom)
        return self._conv(x, w, geom)[0]

    def conv_stats(self, x, w, geom: ConvGeom, prologue=None, stats=True, residual=None):
        """``(y, mean, var)``; ``residual`` (extension): ``y = conv + residual[:, :C_res]`` before the
        statistics (the RiR partial identity; a channel slice of a channels_last tensor is read in place)."""
        src = prologue[0] if prologue is not None else x
        if self.supports_conv(src, w, geom) is not None:
            y, mean, var = super().conv_stats(x, w, geom, prologue, stats=False)
            if residual is not None:
                y = y.clone()
                y[:, :residual.shape[1]] += residual
            if not stats:
                return y, None, None
            mean, var = self.bn_stats(y)
            return y, mean, var
        pro = None
        if prologue is not None:
            _, scale, shift, relu = prologue
            pro = (scale, shift, relu)
        y, mean, var = self._conv(src, w, geom, pro=pro, residual=residual, stats=stats)
        if not stats:
            return y, None, None
        return y, mean, var

    def conv_bias_act(self, x, w, bias, geom: ConvGeom, residual=None, relu=True, consume=False):
        if self.supports_conv(x, w, geom) is not None:
            return super().conv_bias_act(x, w, bias, geom, residual, relu)
        return self._conv(x, w, geom, epi_shift=bias, residual=residual, relu=relu)[0]

    # conv_backward: inherited (ATen convolution_backward, i.e. cuDNN on GPU)

    # -- the four primitives ----------------------------------------------------------------------
    def bn_stats(self, x):
        return self._ops.triton_bn_stats(x)

    def bn_act(self, x, scale, shift, residual=None, res_scale=None, relu=True):
        return self._ops.triton_bn_act(x, scale, shift, residual, res_scale, bool(relu))

    def bn_act_backward_reduce(self, grad_out, out, x, mean, residual=None, res_mean=None, relu=True):
        return self._ops.triton_bn_act_backward_reduce(grad_out, out, x, mean, residual, res_mean, bool(relu))

    def bn_act_backward_apply(self, grad_out, out, x, a, b, d, residual=None, res_a=None, res_b=None,
                              res_d=None, relu=True, residual_grad=False):
        return self._ops.triton_bn_act_backward_apply(grad_out, out, x, a, b, d, residual, res_a, res_b, res_d,
                                                      bool(relu), bool(residual_grad))

    # -- the end of a squeeze-and-excitation block -------------------------------------------------
    def gate_act(self, x, gate, residual=None, relu=True):
        return self._ops.triton_gate_act(x, gate, residual, bool(relu))

    def gate_act_backward(self, grad_out, out, x, gate, relu=True, residual_grad=False):
        return self._ops.triton_gate_act_backward(grad_out, out, x, gate, bool(relu), bool(residual_grad))
