"""The end of a squeeze-and-excitation block, ``act(z * s[n, c] + shortcut)``, as one op and one
autograd node: :func:`gate_act` / :func:`gate_act_backward` (``torch.ops.resfuse.*``, CPU kernel in
``csrc/cpu/gate_act.cpp``, oracle in :mod:`resfuse.reference.primitives`), their fake kernels, and
the autograd Functions :class:`GateActFunction` and :class:`ChannelMeanFunction` that
``resfuse.functional.gate_act`` / ``channel_mean`` run.

An SE-ResNet block (timm ``seresnet*``, ``ecaresnet*``) ends ``relu(z * s + shortcut)`` with
``z = bn3(conv3(.))`` and ``s = gate(mlp(mean_hw(z)))`` one value per image and channel. Eager PyTorch
runs the gate's multiply, the add and the ReLU as three passes over the block's output, and in backward
threshold_backward, the multiply's two gradients (one of them a full product and a sum), the mean's
gradient (a full tensor) and the accumulation of z's two gradients. Here the forward is one pass
(``gate_act``), the backward one (``gate_act_backward``: dz, ``dz * s`` for z, ``dz`` for the shortcut,
``sum_hw dz * z`` for ``s``) plus the accumulation, into which :class:`ChannelMeanFunction` hands the
mean's gradient as a broadcast view instead of a full tensor.

Shapes: ``input`` / ``residual`` / ``grad_out`` / ``output`` ``[N, C, H, W]`` of one dtype (float32,
float64, bfloat16, float16), NCHW or channels_last (outputs in ``input``'s memory format); ``gate`` and
``grad_gate`` ``[N, C]`` float32 (float64 for float64 activations), the per-image gate of the op.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension
from ..backends import instance
from .bn_act import _like_input, _op
from .chain import _stat_dtype

__all__ = ["ChannelMeanFunction", "GateActFunction", "gate_act", "gate_act_backward", "gate_matrix"]


def gate_act(input: Tensor, gate: Tensor, residual: Tensor | None = None, relu: bool = True) -> Tensor:
    """``act(input * gate[n, c] + residual)`` in one pass; ``act`` is ReLU when ``relu`` (NaN
    propagates), else the identity; ``residual`` (optional) has the shape and dtype of ``input``."""
    return _op("gate_act")(input, gate, residual, relu)


def gate_act_backward(grad_out: Tensor, output: Tensor, input: Tensor | None, gate: Tensor, relu: bool = True,
                      residual_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_input, grad_gate, grad_residual)`` of :func:`gate_act` in one pass: with ``dz`` =
    ``grad_out`` where ``output > 0`` (``relu``; ``output`` is not read otherwise), ``grad_input = dz *
    gate[n, c]``, ``grad_gate[n, c]`` = the sum over H, W of ``dz * input`` (accumulated in float32 lanes
    flushed into float64; an empty ``[0]`` tensor without ``input``, which is then not read: a gate that
    needs no gradient, e.g. a stochastic-depth mask), ``grad_residual = dz`` when ``residual_grad``, else
    an empty ``[0]`` tensor."""
    return _op("gate_act_backward")(grad_out, output, input, gate, relu, residual_grad)


if _extension.LOADED:
    @torch.library.register_fake("resfuse::gate_act")
    def _gate_act_fake(input, gate, residual, relu):
        return _like_input(input)

    @torch.library.register_fake("resfuse::gate_act_backward")
    def _gate_act_backward_fake(grad_out, output, input, gate, relu, residual_grad):
        like = grad_out if input is None else input
        grad_residual = _like_input(like) if residual_grad else like.new_empty((0,))
        grad_gate = gate.new_empty((0,)) if input is None else torch.empty_like(gate, memory_format=torch.contiguous_format)
        return _like_input(like), grad_gate, grad_residual


def gate_matrix(s: Tensor, x: Tensor) -> Tensor:
    """The ``[N, C, 1, 1]`` gate ``s`` of activations ``x`` as the ops' ``[N, C]`` gate: float32 (float64
    for float64 ``x``), contiguous (a view of ``s`` where it already is)."""
    return s.reshape(x.shape[0], x.shape[1]).to(_stat_dtype(x)).contiguous()


class GateActFunction(torch.autograd.Function):
    """``act(x * s + residual)`` for ``s`` ``[N, C, 1, 1]`` (any float dtype; the op runs on it as a
    ``[N, C]`` float32 / float64 gate) by backend ``backend_name``'s ``gate_act`` /
    ``gate_act_backward``. Saves the gate, ``x`` where ``s`` needs a gradient (as eager's multiply
    does) and, with the ReLU, ``out`` (for its mask; a ResNet's next block keeps it anyway, as its
    input)."""

    @staticmethod
    def forward(ctx, backend_name: str, x: Tensor, s: Tensor, residual, relu: bool):
        be = instance(backend_name)[0]
        gate = gate_matrix(s, x)
        out = be.gate_act(x, gate, residual, relu)
        ctx.backend_name, ctx.relu, ctx.s_dtype = backend_name, relu, s.dtype
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, gate, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate, out = ctx.saved_tensors
        _, need_x, need_s, need_r, _ = ctx.needs_input_grad
        be = instance(ctx.backend_name)[0]
        # without the ReLU the shortcut's gradient is grad_out itself
        gx, gg, gr = be.gate_act_backward(grad_out, out if ctx.relu else grad_out, x if need_s else None, gate,
                                          ctx.relu, need_r and ctx.relu)
        gs = gg.view(*gg.shape, 1, 1).to(ctx.s_dtype) if need_s else None
        gr = (gr if ctx.relu else grad_out) if need_r else None
        return None, gx if need_x else None, gs, gr, None


class ChannelMeanFunction(torch.autograd.Function):
    """``x.mean((2, 3), keepdim=True)`` whose gradient is ``grad / (H * W)`` *expanded* to ``x``'s shape
    (a broadcast view; ATen's mean backward writes a full tensor): autograd then adds it into ``x``'s
    other gradient in place. Same values as ATen's."""

    @staticmethod
    def forward(ctx, x: Tensor):
        ctx.shape = x.shape
        return x.mean((2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        return (grad / (ctx.shape[2] * ctx.shape[3])).expand(ctx.shape)
