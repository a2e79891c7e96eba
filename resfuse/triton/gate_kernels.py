"""Triton source of the end of a squeeze-and-excitation block (``gate_act``, docs/architecture.md):
``y = act(x * gate[n, c] + r)`` and its backward. No torch import (``resfuse.aot`` workers import this).

Layouts as in ``bn_kernels.py``: dense NCHW (``CL=0``, element (n, c, i) at ``(n*C + c)*HW + i``) or
channels_last (``CL=1``, element (n, i, c) at ``(n*HW + i)*C + c``); ``GATE`` is ``[N, C]`` fp32.

The backward runs on a grid ``(N * CHUNKS, cdiv(C, BLOCK_C))``: program g covers rows ``[chunk*ROWS,
+ROWS)`` of image ``g // CHUNKS``, writes ``dz * gate`` (and ``dz``) for its tile and one partial of
``sum dz * x`` per channel into ``PART[g, C]`` (no atomics; the launcher sums the partials in a fixed
order). All arithmetic in fp32; the ReLU is ``where(v < lo, lo, v)`` with a runtime ``lo`` (0 or -inf),
which keeps NaN; its mask is ATen's threshold_backward (``out <= 0``: a NaN output keeps dz).
"""
import triton.language as tl

from ._jit import kernel


@kernel
def gate_act_kernel(X, GATE, R, Y, TOTAL, C, HW, lo, CL: tl.constexpr, HAS_RES: tl.constexpr,
                    BLOCK: tl.constexpr):
    """``y = act(x * gate[n, c] (+ r))``, 1-D over the flat tensor."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TOTAL
    if CL:
        gi = (offs // (HW * C)) * C + offs % C
    else:
        gi = offs // HW
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    v = x * tl.load(GATE + gi, mask=ok, other=0.0)
    if HAS_RES:
        v = v + tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
    v = tl.where(v < lo, lo, v)
    tl.store(Y + offs, v.to(Y.dtype.element_ty), mask=ok)


@kernel
def gate_bwd_kernel(GO, OUT, X, GATE, GX, GR, PART, C, HW, ROWS, CHUNKS,
                    CL: tl.constexpr, RELU: tl.constexpr, RES_GRAD: tl.constexpr, GATE_GRAD: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``gx = dz * gate[n, c]``, ``gr = dz`` (``RES_GRAD``), partial ``sum dz * x`` per (image, channel)
    (``GATE_GRAD``; ``X`` is not read otherwise)."""
    g = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = g // CHUNKS
    start = (g % CHUNKS) * ROWS
    end = tl.minimum(start + ROWS, HW)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    offs_r = tl.arange(0, BLOCK_R)
    s = tl.load(GATE + n * C + offs_c, mask=c_ok, other=0.0)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        i = r0 + offs_r
        mask = (i < end)[:, None] & c_ok[None, :]
        if CL:
            off = (n * HW + i)[:, None] * C + offs_c[None, :]
        else:
            off = (n * C + offs_c[None, :]) * HW + i[:, None]
        dz = tl.load(GO + off, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            o = tl.load(OUT + off, mask=mask, other=0.0).to(tl.float32)
            dz = tl.where(o <= 0, 0.0, dz)
        if GATE_GRAD:
            x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
            acc += tl.where(mask, dz * x, 0.0)
        tl.store(GX + off, (dz * s[None, :]).to(GX.dtype.element_ty), mask=mask)
        if RES_GRAD:
            tl.store(GR + off, dz.to(GR.dtype.element_ty), mask=mask)
    if GATE_GRAD:
        tl.store(PART + g * C + offs_c, tl.sum(acc, axis=0), mask=c_ok)
