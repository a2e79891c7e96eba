"""Helpers shared by the Triton tests (tests/test_triton_*.py, tests/test_aot.py); not a test module."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from resfuse.testing import assert_close_ref, tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@contextlib.contextmanager
def poison():
    """Launchers allocate NaN-filled outputs: an element a kernel forgets to write fails the comparison."""
    from resfuse.triton import _common
    prev = _common.POISON
    _common.POISON = True
    try:
        yield
    finally:
        _common.POISON = prev


def same_format(out: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether ``out`` is dense in the memory format the launchers give ``like``'s outputs."""
    cl = (not like.is_contiguous()) and like.is_contiguous(memory_format=torch.channels_last)
    return out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@contextlib.contextmanager
def tf32(enabled: bool):
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = prev


def ch(v):
    return v.to(torch.float64).view(1, -1, 1, 1)


def ref_conv(x, w, stride, padding, dilation, pro=None, epi_scale=None, epi_shift=None, residual=None,
             relu=False):
    """Float64 reference of ``conv.conv2d``; the prologue output is rounded to x's dtype first (what an
    unfused model materialises), the conv itself is exact."""
    a = x.to(torch.float64)
    if pro is not None:
        ps, pt, prelu = pro
        a = a * ch(ps) + ch(pt)
        if prelu:
            a = torch.relu(a)
        a = a.to(x.dtype).to(torch.float64)
    y = F.conv2d(a, w.to(torch.float64), None, stride, padding, dilation)
    if epi_scale is not None:
        y = y * ch(epi_scale)
    if epi_shift is not None:
        y = y + ch(epi_shift)
    if residual is not None:
        c = residual.shape[1]
        y = torch.cat([y[:, :c] + residual.to(torch.float64), y[:, c:]], dim=1)
    if relu:
        y = torch.relu(y)
    return y


def assert_stats(mean, var, y, ref_y, dtype, name="stats"):
    """Statistics of the stored output: exact to fp32 against float64 stats of the kernel's own output,
    and within the dtype's tolerance of the statistics of the float64 reference output. Mean errors are
    measured against the channel's standard deviation (a mean can be ~0)."""
    # var is quadratic in y: its relative error against the reference is about twice y's
    for target, tol in ((y.to(torch.float64), 2e-5), (ref_y, 2 * tolerance(dtype))):
        m = target.mean(dim=(0, 2, 3))
        v = target.var(dim=(0, 2, 3), unbiased=False)
        scale = v.sqrt().max().item() + 1e-30
        err_m = (mean.double() - m).abs().max().item() / scale
        assert err_m <= tol, f"{name}: mean error {err_m:.3e} (x std) > {tol}"
        assert_close_ref(var, v, dtype=torch.float32, rtol=max(tol, 2e-5), name=f"{name} var")
