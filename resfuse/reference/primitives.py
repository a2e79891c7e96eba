"""The primitive ops of ``docs/architecture.md`` in plain PyTorch.

This is the oracle the kernels are tested against and the portable fallback backend. Each function
computes in float64 and returns what the kernels return: activations in the input's dtype and
memory format, per-channel results as float32 (float64 for float64 input). Argument meanings are
documented once, in :mod:`resfuse.ops.bn_act`.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format


def _param_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel(v: Tensor) -> Tensor:
    """A ``[C]`` vector in float64, shaped to broadcast over ``[N, C, H, W]``."""
    return v.to(torch.float64).view(1, -1, 1, 1)


def _like(value: Tensor, input: Tensor) -> Tensor:
    """``value`` in ``input``'s dtype, dense in the memory format the kernels write."""
    return value.to(input.dtype).contiguous(memory_format=suggest_memory_format(input))


def _relu_grad(grad_out: Tensor, output: Tensor, relu: bool) -> Tensor:
    """dz in float64: ``grad_out`` where ``output > 0`` (0 elsewhere) when ``relu``, else ``grad_out``."""
    g = grad_out.to(torch.float64)
    if not relu:
        return g
    # The select of ATen's threshold_backward: output <= 0 → 0 (so NaN in grad_out is dropped there).
    return torch.where(output <= 0, torch.zeros_like(g), g)


def bn_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over N, H, W (NaN for an empty reduction)."""
    x = input.to(torch.float64)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    if count == 0:
        nan = x.new_full((x.shape[1],), float("nan"))
        return nan.to(_param_dtype(input)), nan.to(_param_dtype(input))
    mean = x.mean(dim=(0, 2, 3))
    var = ((x - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    return mean.to(_param_dtype(input)), var.to(_param_dtype(input))


def bn_act(input: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None = None,
           res_scale: Tensor | None = None, relu: bool = True) -> Tensor:
    """``act(input * scale[c] + shift[c] + R)``, R = ``residual * res_scale[c]`` | ``residual`` | 0."""
    y = input.to(torch.float64) * _channel(scale) + _channel(shift)
    if residual is not None:
        r = residual.to(torch.float64)
        y = y + (r * _channel(res_scale) if res_scale is not None else r)
    if relu:
        y = torch.relu(y)  # NaN stays NaN
    return _like(y, input)


def bn_act_backward_reduce(grad_out: Tensor, output: Tensor, input: Tensor, mean: Tensor,
                           residual: Tensor | None = None, res_mean: Tensor | None = None,
                           relu: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(sum dz, sum dz*(input - mean), sum dz*(residual - res_mean) | [0])``."""
    if (residual is None) != (res_mean is None):
        raise ValueError("bn_act_backward_reduce: residual and res_mean must be given together")
    dz = _relu_grad(grad_out, output, relu)
    dims = (0, 2, 3)
    sum_dz = dz.sum(dims)
    sum_dz_xmu = (dz * (input.to(torch.float64) - _channel(mean))).sum(dims)
    if residual is not None:
        sum_dz_rmu = (dz * (residual.to(torch.float64) - _channel(res_mean))).sum(dims)
    else:
        sum_dz_rmu = dz.new_empty((0,))
    dtype = _param_dtype(input)
    return sum_dz.to(dtype), sum_dz_xmu.to(dtype), sum_dz_rmu.to(dtype)


def bn_act_backward_apply(grad_out: Tensor, output: Tensor, input: Tensor, a: Tensor, b: Tensor, d: Tensor,
                          residual: Tensor | None = None, res_a: Tensor | None = None,
                          res_b: Tensor | None = None, res_d: Tensor | None = None,
                          relu: bool = True, residual_grad: bool = False) -> tuple[Tensor, Tensor]:
    """``(a*dz + b*input + d, res_a*dz + res_b*residual + res_d | dz | [0])`` with per-channel coefficients."""
    dz = _relu_grad(grad_out, output, relu)
    grad_input = _channel(a) * dz + _channel(b) * input.to(torch.float64) + _channel(d)
    if not residual_grad:
        grad_residual = input.new_empty((0,))
    elif res_a is not None:
        if residual is None or res_b is None or res_d is None:
            raise ValueError("bn_act_backward_apply: res_a, res_b, res_d and residual must be given together")
        grad_residual = _like(_channel(res_a) * dz + _channel(res_b) * residual.to(torch.float64)
                              + _channel(res_d), input)
    else:
        grad_residual = _like(dz, input)
    return _like(grad_input, input), grad_residual


def bn_act_backward_apply_(grad_input: Tensor, grad_out: Tensor, output: Tensor, input: Tensor | None,
                           a: Tensor, b: Tensor, d: Tensor, relu: bool = True, accumulate: bool = False) -> None:
    """In place: ``grad_input (+)= a*dz [+ b*input] + d`` (the composite every backend can use)."""
    if accumulate and grad_input is grad_out:
        raise ValueError("bn_act_backward_apply_: grad_input is grad_out; accumulate must be false")
    value = _channel(a) * _relu_grad(grad_out, output, relu) + _channel(d)
    if input is not None:
        value = value + _channel(b) * input.to(torch.float64)
    if accumulate:
        value = value + grad_input.to(torch.float64)
    grad_input.copy_(value)


# -- CPU-kernel ops with a portable composite (the non-CPU backends run these) -----------------------
def _window_origins(pooled: Tensor, stride, padding) -> tuple[Tensor, Tensor]:
    """``(top, left)``: the unclipped top row and left column of each max-pool window of ``pooled``
    ``[N, C, Ho, Wo]``, shaped to broadcast over it."""
    ho, wo = pooled.shape[2], pooled.shape[3]
    top = (torch.arange(ho, device=pooled.device) * stride[0] - padding[0]).view(1, 1, -1, 1)
    left = (torch.arange(wo, device=pooled.device) * stride[1] - padding[1]).view(1, 1, 1, -1)
    return top, left


def _window_local(flat: Tensor, width: int, pooled: Tensor, kernel_size, stride, padding) -> Tensor:
    """ATen's flat (h * W + w) max-pool indices as window-local ``r * kW + s`` indices."""
    top, left = _window_origins(pooled, stride, padding)
    return (flat // width - top) * kernel_size[1] + (flat % width - left)


def bn_act_max_pool(input: Tensor, scale: Tensor, shift: Tensor, kernel_size, stride, padding) -> tuple[Tensor, Tensor]:
    """``(max_pool2d(relu(input*scale[c] + shift[c])), argmax)``: ATen's max-pool on :func:`bn_act`'s
    output; ``argmax`` the uint8 window-local index of each maximum, 255 where it is <= 0."""
    out = bn_act(input, scale, shift, None, None, True)
    pooled, flat = torch.nn.functional.max_pool2d(out, kernel_size, stride, padding, return_indices=True)
    local = _window_local(flat, out.shape[3], pooled, kernel_size, stride, padding)
    argmax = torch.where(pooled <= 0, torch.full_like(local, 255), local).to(torch.uint8)
    fmt = suggest_memory_format(input)
    return pooled.contiguous(memory_format=fmt), argmax.contiguous(memory_format=fmt)


def max_pool_act_backward(grad_output: Tensor, argmax: Tensor, input: Tensor, kernel_size, stride, padding) -> Tensor:
    """``grad_output`` summed into the argmax element of each window (0 where argmax is 255)."""
    n, c, h, w = input.shape
    local = argmax.to(torch.int64)
    top, left = _window_origins(grad_output, stride, padding)
    flat = (top + local // kernel_size[1]) * w + left + local % kernel_size[1]
    g = torch.where(argmax == 255, torch.zeros_like(grad_output, dtype=torch.float64), grad_output.to(torch.float64))
    flat = torch.where(argmax == 255, torch.zeros_like(flat), flat)
    grad = torch.zeros(n, c, h * w, dtype=torch.float64, device=input.device)
    grad.scatter_add_(2, flat.reshape(n, c, -1), g.reshape(n, c, -1))
    return _like(grad.view(n, c, h, w), input)


def gate_act(input: Tensor, gate: Tensor, residual: Tensor | None = None, relu: bool = True) -> Tensor:
    """``act(input * gate[n, c] + residual)`` for a ``[N, C]`` gate."""
    y = input.to(torch.float64) * gate.to(torch.float64)[:, :, None, None]
    if residual is not None:
        y = y + residual.to(torch.float64)
    if relu:
        y = torch.relu(y)  # NaN stays NaN
    return _like(y, input)


def gate_act_backward(grad_out: Tensor, output: Tensor, input: Tensor | None, gate: Tensor, relu: bool = True,
                      residual_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(dz * gate[n, c], sum over H, W of dz * input | [0] without input, dz | [0])``."""
    dz = _relu_grad(grad_out, output, relu)
    like = grad_out if input is None else input
    grad_input = _like(dz * gate.to(torch.float64)[:, :, None, None], like)
    if input is None:
        grad_gate = gate.new_empty((0,))
    else:
        grad_gate = (dz * input.to(torch.float64)).sum((2, 3)).to(gate.dtype)
    grad_residual = _like(dz, like) if residual_grad else like.new_empty((0,))
    return grad_input, grad_gate, grad_residual
