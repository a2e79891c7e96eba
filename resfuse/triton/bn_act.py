"""Launchers of the BatchNorm primitives (``bn_kernels.py``): plain functions on tensors.

Semantics are those of docs/architecture.md; every output keeps the input's memory format (NCHW or
channels_last). The ``torch.library`` wrappers that make these traceable are in ``ops.py``.
"""
from __future__ import annotations

import torch

from . import registry
from ._common import DTYPE_KEY, arch_and_sms, cdiv, dense, dummy_f32, layout_of, new_f32, new_like, reduction_grid, vec
from .bn_kernels import bn_act_kernel, bn_bwd_apply_kernel, bn_bwd_reduce_kernel, bn_stats_partial_kernel
from .conv_kernels import stats_merge_kernel

_NEG_INF = float("-inf")


def merge_stats(part: torch.Tensor, pcount: torch.Tensor):
    """Merge ``part [2, T, C]`` + ``pcount [T]`` partials into ``(mean, biased var)`` (Chan, fixed order)."""
    _, T, C = part.shape
    mean = new_f32((C,), part.device)
    var = new_f32((C,), part.device)
    arch, _ = arch_and_sms(part)
    c = registry.pick("stats_merge", arch, {}, "fp32")
    stats_merge_kernel[(cdiv(C, c["BLOCK_C"]),)](part, pcount, mean, var, T, C, num_warps=c.num_warps,
                                                 **c.kwargs())
    return mean, var


def _geometry(x: torch.Tensor, cl: bool):
    n, _, h, w = x.shape
    return (1, n * h * w) if cl else (n, h * w)


def bn_stats(x: torch.Tensor):
    """Per-channel mean and biased variance over N, H, W (float32)."""
    xd, cl = layout_of(x)
    c = x.shape[1]
    if xd.numel() == 0:
        nan = torch.full((c,), float("nan"), dtype=torch.float32, device=x.device)
        return nan, nan.clone()
    ni, length = _geometry(xd, cl)
    arch, sms = arch_and_sms(x)
    cfg = registry.pick("bn_stats_partial", arch, {"CL": int(cl)}, DTYPE_KEY[x.dtype])
    br, bc = cfg["BLOCK_R"], cfg["BLOCK_C"]
    rows, chunks, g = reduction_grid(ni, length, c, br, bc, sms)
    part = new_f32((2, g, c), x.device)
    pcount = new_f32((g,), x.device)
    bn_stats_partial_kernel[(g, cdiv(c, bc))](xd, part, pcount, c, length, rows, chunks, g, CL=int(cl),
                                              num_warps=cfg.num_warps, **cfg.kwargs())
    return merge_stats(part, pcount)


def bn_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None = None,
           res_scale: torch.Tensor | None = None, relu: bool = True) -> torch.Tensor:
    """``act(x*scale[c] + shift[c] + R)`` with ``R = residual*res_scale[c] | residual | 0``."""
    xd, cl = layout_of(x)
    _, c, h, w = x.shape
    y = new_like(xd)
    if xd.numel() == 0:
        return y
    mode = 0 if residual is None else (2 if res_scale is not None else 1)
    r = dense(residual, cl) if residual is not None else xd
    rs = vec(res_scale, x) if mode == 2 else dummy_f32(x)
    arch, _ = arch_and_sms(x)
    cfg = registry.pick("bn_act", arch, {"CL": int(cl), "RES": mode}, DTYPE_KEY[x.dtype])
    total = xd.numel()
    bn_act_kernel[(cdiv(total, cfg["BLOCK"]),)](
        xd, vec(scale, x), vec(shift, x), r, rs, y, total, c, h * w, 0.0 if relu else _NEG_INF,
        CL=int(cl), RES=mode, num_warps=cfg.num_warps, **cfg.kwargs())
    return y


def bn_act_backward_reduce(grad_out, output, x, mean, residual=None, res_mean=None, relu=True):
    """``(Σ dz, Σ dz (x − mean), Σ dz (r − res_mean))`` per channel; the last is ``[0]`` without residual."""
    xd, cl = layout_of(x)
    c = x.shape[1]
    f32 = dict(dtype=torch.float32, device=x.device)
    has_res = residual is not None
    if has_res != (res_mean is not None):
        raise ValueError("bn_act_backward_reduce: residual and res_mean must be given together")
    if xd.numel() == 0:
        z = torch.zeros(c, **f32)
        return z, z.clone(), (z.clone() if has_res else torch.empty(0, **f32))
    go = dense(grad_out, cl)
    out = dense(output, cl) if relu else xd
    r = dense(residual, cl) if has_res else xd
    rmean = vec(res_mean, x) if has_res else dummy_f32(x)
    ni, length = _geometry(xd, cl)
    arch, sms = arch_and_sms(x)
    variant = {"CL": int(cl), "RELU": int(bool(relu)), "HAS_RES": int(has_res)}
    cfg = registry.pick("bn_act_bwd_reduce", arch, variant, DTYPE_KEY[x.dtype])
    br, bc = cfg["BLOCK_R"], cfg["BLOCK_C"]
    rows, chunks, g = reduction_grid(ni, length, c, br, bc, sms)
    part = new_f32((3 if has_res else 2, g, c), x.device)
    bn_bwd_reduce_kernel[(g, cdiv(c, bc))](
        go, out, xd, vec(mean, x), r, rmean, part, c, length, rows, chunks, g,
        CL=int(cl), RELU=int(bool(relu)), HAS_RES=int(has_res), num_warps=cfg.num_warps, **cfg.kwargs())
    # fixed-shape reductions over the G partials: deterministic; separate (non-aliasing) outputs
    return part[0].sum(0), part[1].sum(0), (part[2].sum(0) if has_res else torch.empty(0, **f32))


def bn_act_backward_apply(grad_out, output, x, a, b, d, residual=None, res_a=None, res_b=None, res_d=None,
                          relu=True, residual_grad=False):
    """``grad_input = a*dz + b*x + d``; ``grad_residual = res_a*dz + res_b*r + res_d`` | ``dz`` | ``[0]``."""
    xd, cl = layout_of(x)
    _, c, h, w = x.shape
    go = dense(grad_out, cl)
    out = dense(output, cl) if relu else xd
    mode = 0
    if residual_grad:
        mode = 2 if res_a is not None else 1
    if mode == 2 and (residual is None or res_b is None or res_d is None):
        raise ValueError("bn_act_backward_apply: res_a, res_b, res_d and residual must be given together")
    gx = new_like(xd)
    gr = x.new_empty((0,)) if mode == 0 else new_like(xd)
    if xd.numel() == 0:
        return gx, gr
    r = dense(residual, cl) if mode == 2 else xd
    dmy = dummy_f32(x)
    ra, rb, rd = (vec(res_a, x), vec(res_b, x), vec(res_d, x)) if mode == 2 else (dmy, dmy, dmy)
    arch, _ = arch_and_sms(x)
    variant = {"CL": int(cl), "RELU": int(bool(relu)), "RES_GRAD": mode}
    cfg = registry.pick("bn_act_bwd_apply", arch, variant, DTYPE_KEY[x.dtype])
    total = xd.numel()
    bn_bwd_apply_kernel[(cdiv(total, cfg["BLOCK"]),)](
        go, out, xd, vec(a, x), vec(b, x), vec(d, x), r, ra, rb, rd, gx, gr if mode else gx, total, c, h * w,
        CL=int(cl), RELU=int(bool(relu)), RES_GRAD=mode, num_warps=cfg.num_warps, **cfg.kwargs())
    return gx, gr
