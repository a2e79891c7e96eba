"""Triton source of the BatchNorm primitives (docs/architecture.md): statistics, apply(+residual)+ReLU,
and the two backward passes. No torch import (``resfuse.aot`` workers import this).

Layouts: every activation is dense, either NCHW (``CL=0``) or channels_last (``CL=1``). Both are viewed
as ``[NI, C, L]`` "images" of ``L`` rows:

* ``CL=1``: one image of ``L = N*H*W`` pixels; element (i, c) at ``i*C + c`` (channels contiguous);
* ``CL=0``: ``NI = N`` images of ``L = H*W``; element (n, c, i) at ``(n*C + c)*L + i`` (rows contiguous).

Reductions run on a grid ``(G, cdiv(C, BLOCK_C))``: program g covers rows ``[chunk*ROWS, +ROWS)`` of
image ``g // CHUNKS`` and writes one partial per channel (no atomics, fixed order: deterministic).
Each register slot of the ``[BLOCK_R, BLOCK_C]`` tile runs its own Welford over the rows it sees; the
slots are merged at the end with the parallel (Chan) formula; ``stats_merge_kernel`` merges programs.
Elementwise kernels are 1-D over the flat tensor; the channel of element ``o`` is ``o % C`` (CL) or
``(o // L) % C`` (NCHW). All arithmetic in fp32; ReLU is ``where(v < lo, lo, v)`` with a runtime
``lo`` (0 or -inf), which keeps NaN (as ``torch.relu`` does).
"""
import triton.language as tl

from ._jit import kernel


@kernel
def bn_stats_partial_kernel(X, PART, PCOUNT, C, L, ROWS, CHUNKS, G,
                            CL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    g = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = g // CHUNKS
    start = (g % CHUNKS) * ROWS
    end = tl.minimum(start + ROWS, L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    offs_r = tl.arange(0, BLOCK_R)
    cnt = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    mean = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        i = r0 + offs_r
        mask = (i < end)[:, None] & c_ok[None, :]
        if CL:
            off = i[:, None] * C + offs_c[None, :]
        else:
            off = (n * C + offs_c[None, :]) * L + i[:, None]
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        new_cnt = cnt + mask.to(tl.float32)
        delta = x - mean
        mean = tl.where(mask, mean + delta / tl.maximum(new_cnt, 1.0), mean)
        m2 = tl.where(mask, m2 + delta * (x - mean), m2)
        cnt = new_cnt
    # merge the BLOCK_R slots of each channel (Chan): mean = Σ n_r μ_r / N, M2 = Σ M2_r + n_r (μ_r - mean)²
    tot = tl.sum(cnt, axis=0)
    safe = tl.maximum(tot, 1.0)
    mu = tl.sum(cnt * mean, axis=0) / safe
    d = mean - mu[None, :]
    m2t = tl.sum(m2 + cnt * d * d, axis=0)
    tl.store(PART + g * C + offs_c, mu, mask=c_ok)
    tl.store(PART + (G + g) * C + offs_c, m2t, mask=c_ok)
    if pid_c == 0:
        tl.store(PCOUNT + g, (end - start).to(tl.float32))


@kernel
def bn_act_kernel(X, SCALE, SHIFT, R, RSCALE, Y, TOTAL, C, L, lo,
                  CL: tl.constexpr, RES: tl.constexpr, BLOCK: tl.constexpr):
    """``y = act(x*scale[c] + shift[c] + R)``; ``RES``: 0 R=0, 1 R=r, 2 R=r*rscale[c]."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TOTAL
    if CL:
        c = offs % C
    else:
        c = (offs // L) % C
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(SCALE + c, mask=ok, other=0.0)
    t = tl.load(SHIFT + c, mask=ok, other=0.0)
    v = x * s + t
    if RES == 1:
        v = v + tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
    if RES == 2:
        rs = tl.load(RSCALE + c, mask=ok, other=0.0)
        v = v + tl.load(R + offs, mask=ok, other=0.0).to(tl.float32) * rs
    v = tl.where(v < lo, lo, v)
    tl.store(Y + offs, v.to(Y.dtype.element_ty), mask=ok)


@kernel
def bn_bwd_reduce_kernel(GO, OUT, X, MEAN, R, RMEAN, PART, C, L, ROWS, CHUNKS, G,
                         CL: tl.constexpr, RELU: tl.constexpr, HAS_RES: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial per-channel ``Σ dz``, ``Σ dz (x − mean)``, ``Σ dz (r − rmean)`` into ``PART[3, G, C]``."""
    g = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = g // CHUNKS
    start = (g % CHUNKS) * ROWS
    end = tl.minimum(start + ROWS, L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    offs_r = tl.arange(0, BLOCK_R)
    mu = tl.load(MEAN + offs_c, mask=c_ok, other=0.0)
    s_dz = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    s_dx = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    s_dr = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    if HAS_RES:
        rmu = tl.load(RMEAN + offs_c, mask=c_ok, other=0.0)
    for r0 in range(start, end, BLOCK_R):
        i = r0 + offs_r
        mask = (i < end)[:, None] & c_ok[None, :]
        if CL:
            off = i[:, None] * C + offs_c[None, :]
        else:
            off = (n * C + offs_c[None, :]) * L + i[:, None]
        dz = tl.load(GO + off, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            o = tl.load(OUT + off, mask=mask, other=0.0).to(tl.float32)
            dz = tl.where(o <= 0, 0.0, dz)  # ATen threshold_backward: NaN output keeps dz
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        s_dz += dz
        s_dx += tl.where(mask, dz * (x - mu[None, :]), 0.0)
        if HAS_RES:
            r = tl.load(R + off, mask=mask, other=0.0).to(tl.float32)
            s_dr += tl.where(mask, dz * (r - rmu[None, :]), 0.0)
    tl.store(PART + g * C + offs_c, tl.sum(s_dz, axis=0), mask=c_ok)
    tl.store(PART + (G + g) * C + offs_c, tl.sum(s_dx, axis=0), mask=c_ok)
    if HAS_RES:
        tl.store(PART + (2 * G + g) * C + offs_c, tl.sum(s_dr, axis=0), mask=c_ok)


@kernel
def bn_bwd_apply_kernel(GO, OUT, X, A, B, D, R, RA, RB, RD, GX, GR, TOTAL, C, L,
                        CL: tl.constexpr, RELU: tl.constexpr, RES_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """``gx = a*dz + b*x + d``; ``RES_GRAD``: 0 none, 1 ``gr = dz``, 2 ``gr = ra*dz + rb*r + rd``."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TOTAL
    if CL:
        c = offs % C
    else:
        c = (offs // L) % C
    dz = tl.load(GO + offs, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        o = tl.load(OUT + offs, mask=ok, other=0.0).to(tl.float32)
        dz = tl.where(o <= 0, 0.0, dz)  # ATen threshold_backward: NaN output keeps dz
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(A + c, mask=ok, other=0.0)
    b = tl.load(B + c, mask=ok, other=0.0)
    d = tl.load(D + c, mask=ok, other=0.0)
    tl.store(GX + offs, (a * dz + b * x + d).to(GX.dtype.element_ty), mask=ok)
    if RES_GRAD == 1:
        tl.store(GR + offs, dz.to(GR.dtype.element_ty), mask=ok)
    if RES_GRAD == 2:
        r = tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
        ra = tl.load(RA + c, mask=ok, other=0.0)
        rb = tl.load(RB + c, mask=ok, other=0.0)
        rd = tl.load(RD + c, mask=ok, other=0.0)
        tl.store(GR + offs, (ra * dz + rb * r + rd).to(GR.dtype.element_ty), mask=ok)
