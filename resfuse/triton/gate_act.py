"""Launchers of ``gate_act`` / ``gate_act_backward`` (``gate_kernels.py``): plain functions on tensors.

Semantics are those of docs/architecture.md (and of the CPU ops ``torch.ops.resfuse.gate_act*``): ``x``
``[N, C, H, W]`` float32/bfloat16/float16, NCHW or channels_last (outputs keep the layout), ``gate``
``[N, C]`` float32. The ``torch.library`` wrappers that make these traceable are in ``ops.py``.
"""
from __future__ import annotations

import torch

from . import registry
from ._common import DTYPE_KEY, arch_and_sms, cdiv, dense, layout_of, new_f32, new_like, reduction_grid
from .gate_kernels import gate_act_kernel, gate_bwd_kernel

_NEG_INF = float("-inf")


def _gate(gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return gate.to(device=x.device, dtype=torch.float32).contiguous()


def gate_act(x: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor | None = None,
             relu: bool = True) -> torch.Tensor:
    """``act(x * gate[n, c] + residual)``."""
    xd, cl = layout_of(x)
    n, c, h, w = x.shape
    y = new_like(xd)
    if xd.numel() == 0:
        return y
    has_res = residual is not None
    arch, _ = arch_and_sms(x)
    cfg = registry.pick("gate_act", arch, {"CL": int(cl), "HAS_RES": int(has_res)}, DTYPE_KEY[x.dtype])
    total = xd.numel()
    gate_act_kernel[(cdiv(total, cfg["BLOCK"]),)](
        xd, _gate(gate, x), dense(residual, cl) if has_res else xd, y, total, c, h * w,
        0.0 if relu else _NEG_INF, CL=int(cl), HAS_RES=int(has_res), num_warps=cfg.num_warps, **cfg.kwargs())
    return y


def gate_act_backward(grad_out, output, x, gate, relu=True, residual_grad=False):
    """``(dz * gate[n, c], sum_hw dz * x as [N, C] fp32 | [0] without x, dz | [0])``."""
    like = grad_out if x is None else x
    ld, cl = layout_of(like)
    n, c, h, w = like.shape
    gx = new_like(ld)
    gr = new_like(ld) if residual_grad else like.new_empty((0,))
    want_gate = x is not None
    if ld.numel() == 0:
        return gx, (torch.zeros(n, c, dtype=torch.float32, device=like.device) if want_gate else gate.new_empty((0,))), gr
    go = dense(grad_out, cl)
    out = dense(output, cl) if relu else go
    arch, sms = arch_and_sms(like)
    variant = {"CL": int(cl), "RELU": int(bool(relu)), "RES_GRAD": int(bool(residual_grad)), "GATE_GRAD": int(want_gate)}
    cfg = registry.pick("gate_act_bwd", arch, variant, DTYPE_KEY[like.dtype])
    br, bc = cfg["BLOCK_R"], cfg["BLOCK_C"]
    rows, chunks, g = reduction_grid(n, h * w, c, br, bc, sms)
    part = new_f32((g, c) if want_gate else (1,), like.device)
    gate_bwd_kernel[(g, cdiv(c, bc))](
        go, out, ld, _gate(gate, like), gx, gr if residual_grad else gx, part, c, h * w, rows, chunks,
        num_warps=cfg.num_warps, **variant, **cfg.kwargs())
    # the chunks of each image summed in a fixed order: deterministic
    return gx, (part.view(n, chunks, c).sum(1) if want_gate else gate.new_empty((0,))), gr
