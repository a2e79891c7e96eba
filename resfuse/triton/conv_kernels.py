"""Triton source of the fused implicit-GEMM convolution (forward) and the statistics merge.

No torch import here: ``resfuse.aot`` compiles these in worker processes. The launcher is in
``resfuse/triton/conv.py``.

GEMM view of ``y = conv2d(x, w)`` on channels_last tensors::

    M = N*OH*OW  (output pixels, rows)     Ngemm = C_out (columns)     K = KH*KW*C_in
    A[m, k] = x[n, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw, ci]   (0 outside the image)
    B[k, co] = w[co, kh, kw, ci]            (weights packed K-major: [C_out, KH, KW, C_in])

Two main loops (constexpr ``FLAT_K``):

* tap loop (default): one K step = (tap, block of BLOCK_K input channels); the A tile is BLOCK_M rows
  of BLOCK_K *contiguous* channels, so loads vectorise. Needs C_in large enough not to waste the tile.
* flat K (stem and other small-C_in convs): k runs over (kh, kw, ci) jointly; each element is gathered.
  A 7x7x3 stem is K=147, i.e. 5 steps of 32 instead of 49 taps of 16 mostly-masked channels.

Fusions (constexpr flags, one source):

* ``PROLOGUE``: the loaded A element becomes ``max?(a*pscale[ci] + pshift[ci])`` (the previous layer's
  BN-apply + ReLU) *only where the element is inside the image*: padding stays exactly 0.
  The ReLU is a runtime lower bound ``pro_lo`` (0 or -inf) so it costs no extra variant.
* ``EPILOGUE``: 0 none, 1 ``+ shift[co]`` (bias), 2 ``* scale[co] + shift[co]``.
* ``HAS_RES``: ``+ residual[m, co]`` for ``co < c_res`` (whole tensor when c_res == C_out, the leading
  channel range [0, c_res) for the RiR partial identity); added before the statistics.
* ``STATS``: per-tile ``(mean, M2)`` of each output channel over the tile's valid rows, computed on the
  value as stored (rounded to the output dtype), written to ``PART[2, num_m_tiles, C_out]`` with the
  row count in ``PCOUNT[num_m_tiles]``; :func:`stats_merge_kernel` merges them (Chan) in a fixed order.
  No atomics: results are bitwise deterministic run to run.
* ReLU on the output: runtime lower bound ``out_lo`` (NaN propagates: ``where(v < lo, lo, v)``).
"""
import triton.language as tl

from ._jit import kernel


@kernel
def conv2d_fwd_kernel(
    X, WP, Y, PRO_SCALE, PRO_SHIFT, EPI_SCALE, EPI_SHIFT, RES, PART, PCOUNT,
    H, W, C_IN, OH, OW, C_OUT, M, K_TOT, KW, NUM_CB, K_STEPS,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    res_ps, c_res, pro_lo, out_lo,
    PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr, HAS_RES: tl.constexpr, STATS: tl.constexpr,
    FLAT_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---- tile of the output this program computes (grouped order for L2 reuse of A rows) ----
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(C_OUT, BLOCK_N)
    in_group = GROUP_M * num_n
    group_id = pid // in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_OUT

    ohw = OH * OW
    img = offs_m // ohw
    pix = offs_m % ohw
    oh = pix // OW
    ow = pix % OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    # element offset of (img, ih0, iw0, 0); may be "negative" for padded rows (then masked)
    base_m = ((img * H + ih0) * W + iw0) * C_IN

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        for k0 in range(0, K_TOT, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K_TOT
            tap = kk // C_IN
            ci = kk % C_IN
            kh = tap // KW
            kw = tap % KW
            ih = ih0[:, None] + (kh * dil_h)[None, :]
            iw = iw0[:, None] + (kw * dil_w)[None, :]
            a_mask = (m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            a_off = base_m[:, None] + ((kh * dil_h * W + kw * dil_w) * C_IN + ci)[None, :]
            a = tl.load(X + a_off, mask=a_mask, other=0.0)
            if PROLOGUE:
                ps = tl.load(PRO_SCALE + ci, mask=k_ok, other=0.0)
                pt = tl.load(PRO_SHIFT + ci, mask=k_ok, other=0.0)
                af = a.to(tl.float32) * ps[None, :] + pt[None, :]
                af = tl.where(af < pro_lo, pro_lo, af)
                a = tl.where(a_mask, af, 0.0).to(X.dtype.element_ty)
            b_mask = k_ok[:, None] & n_ok[None, :]
            b = tl.load(WP + offs_n[None, :] * K_TOT + kk[:, None], mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        for step in range(K_STEPS):
            tap = step // NUM_CB
            cb = step - tap * NUM_CB
            kh = tap // KW
            kw = tap - kh * KW
            ci = cb * BLOCK_K + offs_k
            c_ok = ci < C_IN
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_mask = row_ok[:, None] & c_ok[None, :]
            tap_off = (kh * dil_h * W + kw * dil_w) * C_IN
            a = tl.load(X + (base_m + tap_off)[:, None] + ci[None, :], mask=a_mask, other=0.0)
            if PROLOGUE:
                ps = tl.load(PRO_SCALE + ci, mask=c_ok, other=0.0)
                pt = tl.load(PRO_SHIFT + ci, mask=c_ok, other=0.0)
                af = a.to(tl.float32) * ps[None, :] + pt[None, :]
                af = tl.where(af < pro_lo, pro_lo, af)
                a = tl.where(a_mask, af, 0.0).to(X.dtype.element_ty)
            b_mask = c_ok[:, None] & n_ok[None, :]
            b = tl.load(WP + offs_n[None, :] * K_TOT + (tap * C_IN + ci)[:, None], mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # ---- epilogue ----
    if EPILOGUE == 2:
        es = tl.load(EPI_SCALE + offs_n, mask=n_ok, other=0.0)
        acc = acc * es[None, :]
    if EPILOGUE >= 1:
        et = tl.load(EPI_SHIFT + offs_n, mask=n_ok, other=0.0)
        acc = acc + et[None, :]
    if HAS_RES:
        r_mask = m_ok[:, None] & (offs_n < c_res)[None, :]
        r = tl.load(RES + offs_m[:, None] * res_ps + offs_n[None, :], mask=r_mask, other=0.0)
        acc = acc + r.to(tl.float32)
    out = acc.to(Y.dtype.element_ty)
    if STATS:
        v = out.to(tl.float32)
        cnt = tl.sum(m_ok.to(tl.float32), axis=0)
        valid = m_ok[:, None]
        mean = tl.sum(tl.where(valid, v, 0.0), axis=0) / cnt
        dev = tl.where(valid, v - mean[None, :], 0.0)
        m2 = tl.sum(dev * dev, axis=0)
        tl.store(PART + pid_m * C_OUT + offs_n, mean, mask=n_ok)
        tl.store(PART + (num_m + pid_m) * C_OUT + offs_n, m2, mask=n_ok)
        if pid_n == 0:
            tl.store(PCOUNT + pid_m, cnt)
    outf = out.to(tl.float32)
    outf = tl.where(outf < out_lo, out_lo, outf)
    y_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(Y + offs_m[:, None] * C_OUT + offs_n[None, :], outf.to(Y.dtype.element_ty), mask=y_mask)


@kernel
def stats_merge_kernel(PART, PCOUNT, MEAN, VAR, T, C,
                       BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge ``T`` partial ``(count, mean, M2)`` per channel into mean and biased variance.

    ``PART`` is ``[2, T, C]`` (means then M2), ``PCOUNT`` is ``[T]``. Two passes in a fixed order:
    ``mean = Σ n_t μ_t / Σ n_t``, ``M2 = Σ (M2_t + n_t (μ_t − mean)²)`` (Chan et al.): no cancellation.
    """
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    offs_t = tl.arange(0, BLOCK_T)
    tot = tl.zeros((BLOCK_T,), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        t_ok = t < T
        cnt = tl.load(PCOUNT + t, mask=t_ok, other=0.0)
        mu = tl.load(PART + t[:, None] * C + offs_c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        tot += cnt
        wsum += cnt[:, None] * mu
    total = tl.sum(tot, axis=0)
    mean = tl.sum(wsum, axis=0) / total
    m2acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        t_ok = t < T
        mask = t_ok[:, None] & c_ok[None, :]
        cnt = tl.load(PCOUNT + t, mask=t_ok, other=0.0)
        mu = tl.load(PART + t[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        m2 = tl.load(PART + (T + t[:, None]) * C + offs_c[None, :], mask=mask, other=0.0)
        d = mu - mean[None, :]
        m2acc += tl.where(mask, m2 + cnt[:, None] * d * d, 0.0)
    var = tl.sum(m2acc, axis=0) / total
    tl.store(MEAN + offs_c, mean, mask=c_ok)
    tl.store(VAR + offs_c, var, mask=c_ok)
