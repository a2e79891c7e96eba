"""``torch.library`` custom ops around the Triton launchers, so ``torch.compile`` traces through them
(each op is one opaque node with a fake implementation giving output shapes, dtypes and strides).

``torch.library.custom_op`` + ``register_fake`` is used rather than ``triton_op``: it behaves the same
with compiled kernels and under ``TRITON_INTERPRET=1`` (where kernels are not ``JITFunction`` objects
and ``triton_op`` cannot trace them), and on torch 2.11 as well as 2.13.

Ops (namespace ``resfuse``): ``triton_conv``, ``triton_bn_stats``, ``triton_bn_act``,
``triton_bn_act_backward_reduce``, ``triton_bn_act_backward_apply``, ``triton_gate_act``,
``triton_gate_act_backward``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import bn_act as _bn
from . import conv as _conv
from . import gate_act as _gate

_LIB = "resfuse"


def _like_format(shape, x: Tensor, dtype=None) -> Tensor:
    cl = (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


# ---- convolution --------------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::triton_conv", mutates_args=())
def triton_conv(x: Tensor, w: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                pro_scale: Optional[Tensor], pro_shift: Optional[Tensor], pro_relu: bool,
                epi_scale: Optional[Tensor], epi_shift: Optional[Tensor], residual: Optional[Tensor],
                relu: bool, stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
    y, mean, var = _conv.conv2d(x, w, stride, padding, dilation, pro_scale=pro_scale, pro_shift=pro_shift,
                                pro_relu=pro_relu, epi_scale=epi_scale, epi_shift=epi_shift,
                                residual=residual, relu=relu, stats=stats)
    if mean is None:
        mean = torch.empty(0, dtype=torch.float32, device=x.device)
        var = torch.empty(0, dtype=torch.float32, device=x.device)
    return y, mean, var


@triton_conv.register_fake
def _(x, w, stride, padding, dilation, pro_scale, pro_shift, pro_relu, epi_scale, epi_shift, residual, relu,
      stats):
    n, _, h, wd = x.shape
    c_out, _, kh, kw = w.shape
    oh = _conv.out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _conv.out_size(wd, kw, stride[1], padding[1], dilation[1])
    y = _like_format((n, c_out, oh, ow), x)
    k = c_out if stats else 0
    return y, x.new_empty((k,), dtype=torch.float32), x.new_empty((k,), dtype=torch.float32)


# ---- BatchNorm primitives -----------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::triton_bn_stats", mutates_args=())
def triton_bn_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    return _bn.bn_stats(x)


@triton_bn_stats.register_fake
def _(x):
    c = x.shape[1]
    return x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::triton_bn_act", mutates_args=())
def triton_bn_act(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                  res_scale: Optional[Tensor], relu: bool) -> Tensor:
    return _bn.bn_act(x, scale, shift, residual, res_scale, relu)


@triton_bn_act.register_fake
def _(x, scale, shift, residual, res_scale, relu):
    return _like_format(x.shape, x)


@torch.library.custom_op(f"{_LIB}::triton_bn_act_backward_reduce", mutates_args=())
def triton_bn_act_backward_reduce(grad_out: Tensor, output: Tensor, x: Tensor, mean: Tensor,
                                  residual: Optional[Tensor], res_mean: Optional[Tensor],
                                  relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _bn.bn_act_backward_reduce(grad_out, output, x, mean, residual, res_mean, relu)


@triton_bn_act_backward_reduce.register_fake
def _(grad_out, output, x, mean, residual, res_mean, relu):
    c = x.shape[1]
    f = dict(dtype=torch.float32)
    return x.new_empty((c,), **f), x.new_empty((c,), **f), x.new_empty((c if residual is not None else 0,), **f)


@torch.library.custom_op(f"{_LIB}::triton_bn_act_backward_apply", mutates_args=())
def triton_bn_act_backward_apply(grad_out: Tensor, output: Tensor, x: Tensor, a: Tensor, b: Tensor, d: Tensor,
                                 residual: Optional[Tensor], res_a: Optional[Tensor], res_b: Optional[Tensor],
                                 res_d: Optional[Tensor], relu: bool,
                                 residual_grad: bool) -> Tuple[Tensor, Tensor]:
    return _bn.bn_act_backward_apply(grad_out, output, x, a, b, d, residual, res_a, res_b, res_d, relu,
                                     residual_grad)


@triton_bn_act_backward_apply.register_fake
def _(grad_out, output, x, a, b, d, residual, res_a, res_b, res_d, relu, residual_grad):
    gx = _like_format(x.shape, x)
    if not residual_grad:
        return gx, x.new_empty((0,))
    return gx, _like_format(x.shape, x)


# ---- the end of a squeeze-and-excitation block -----------------------------------------------------
@torch.library.custom_op(f"{_LIB}::triton_gate_act", mutates_args=())
def triton_gate_act(x: Tensor, gate: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    return _gate.gate_act(x, gate, residual, relu)


@triton_gate_act.register_fake
def _(x, gate, residual, relu):
    return _like_format(x.shape, x)


@torch.library.custom_op(f"{_LIB}::triton_gate_act_backward", mutates_args=())
def triton_gate_act_backward(grad_out: Tensor, output: Tensor, x: Optional[Tensor], gate: Tensor, relu: bool,
                             residual_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _gate.gate_act_backward(grad_out, output, x, gate, relu, residual_grad)


@triton_gate_act_backward.register_fake
def _(grad_out, output, x, gate, relu, residual_grad):
    like = grad_out if x is None else x
    gr = _like_format(like.shape, like) if residual_grad else like.new_empty((0,))
    gg = gate.new_empty((0,)) if x is None else like.new_empty(tuple(gate.shape), dtype=torch.float32)
    return _like_format(like.shape, like), gg, gr
