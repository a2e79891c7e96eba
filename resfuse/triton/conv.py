"""Launcher of the fused implicit-GEMM convolution (``conv_kernels.conv2d_fwd_kernel``).

:func:`conv2d` computes, in one launch::

    y = act( conv2d(pro(x), w) [* epi_scale[co]] [+ epi_shift[co]] [+ residual[:, :C_res]] )
    pro(x) = max?(x * pro_scale[ci] + pro_shift[ci])  inside the image, 0 in the padding
    stats  = per-channel (mean, biased var) of the pre-activation y as stored      (if ``stats``)

The kernel works on channels_last: an NCHW ``x`` is transposed once on the way in and ``y`` back on the
way out (the output keeps the input's memory format). Run channels_last models for speed.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import registry
from ._common import DTYPE_KEY, arch_and_sms, cdiv, dummy_f32, is_cl, new_f32, new_output, vec
from ._jit import interpreting
from .bn_act import merge_stats
from .conv_kernels import conv2d_fwd_kernel

_NEG_INF = float("-inf")
_AUTOTUNE_CACHE = {}


def compute_dtype(x: torch.Tensor) -> str:
    """Registry dtype key: fp32 runs its dot in TF32 iff ``torch.backends.cudnn.allow_tf32`` (PyTorch's
    own switch for fp32 convolutions; default True, like cuDNN convs)."""
    if x.dtype == torch.float32:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return DTYPE_KEY[x.dtype]


def out_size(h: int, k: int, s: int, p: int, d: int) -> int:
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


def _residual_view(res: torch.Tensor, n, c_res, oh, ow) -> tuple[torch.Tensor, int]:
    """``(tensor, pixel stride)`` so that residual element (m, c) is at ``m*ps + c``; copies to
    channels_last unless it already has that form (e.g. a channel slice ``s[:, :C]`` of a channels_last
    tensor, the RiR partial identity)."""
    sn, sc, sh, sw = res.stride()
    ps = sw if ow > 1 else (sh if oh > 1 else (sn if n > 1 else c_res))
    ok = (sc == 1 or c_res == 1) and (ow == 1 or sw == ps) and (oh == 1 or sh == ow * ps) \
        and (n == 1 or sn == oh * ow * ps) and ps >= c_res
    if ok:
        return res, ps
    return res.contiguous(memory_format=torch.channels_last), c_res


def conv2d(x: torch.Tensor, w: torch.Tensor, stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
           dilation: Sequence[int] = (1, 1), *, pro_scale: torch.Tensor | None = None,
           pro_shift: torch.Tensor | None = None, pro_relu: bool = False,
           epi_scale: torch.Tensor | None = None, epi_shift: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, relu: bool = False, stats: bool = False,
           config: registry.Config | None = None):
    """Fused conv (groups=1). Returns ``(y, mean, var)``; mean/var are ``None`` unless ``stats``.

    Rules (enforced; the AOT registry enumerates exactly these combinations): a prologue needs both
    ``pro_scale`` and ``pro_shift``; ``epi_scale`` needs ``epi_shift``; an epilogue affine (inference
    form, BN folded) excludes the prologue and the statistics.
    """
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"conv2d: expected 4-D input and weight, got {x.dim()}-D and {w.dim()}-D")
    n, c_in, h, wd = x.shape
    c_out, c_in_w, kh, kw = w.shape
    if c_in_w != c_in:
        raise ValueError(f"conv2d: weight has {c_in_w} input channels, input has {c_in} (groups must be 1)")
    if w.dtype != x.dtype:
        raise TypeError(f"conv2d: weight dtype {w.dtype} != input dtype {x.dtype}")
    prologue = pro_scale is not None or pro_shift is not None
    if prologue and (pro_scale is None or pro_shift is None):
        raise ValueError("conv2d: the prologue needs both pro_scale and pro_shift")
    if epi_scale is not None and epi_shift is None:
        raise ValueError("conv2d: epi_scale needs epi_shift")
    epilogue = 2 if epi_scale is not None else (1 if epi_shift is not None else 0)
    if epilogue and (prologue or stats):
        raise ValueError("conv2d: the bias/affine epilogue (inference form) excludes prologue and stats")
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    oh, ow = out_size(h, kh, sh, ph, dh), out_size(wd, kw, sw, pw, dw)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"conv2d: output size {oh}x{ow} is not positive")

    out_cl = is_cl(x)
    xd = x.contiguous(memory_format=torch.channels_last)
    wp = w.permute(0, 2, 3, 1).contiguous()  # [C_out, KH, KW, C_in]: K-major B operand
    y = new_output((n, c_out, oh, ow), x.dtype, x.device, channels_last=True)
    M = n * oh * ow
    K = kh * kw * c_in
    mean = var = None
    if M == 0 or c_out == 0:
        if stats:
            mean = torch.full((c_out,), float("nan"), dtype=torch.float32, device=x.device)
            var = mean.clone()
        return (y if out_cl else y.contiguous()), mean, var

    dmy = dummy_f32(x)
    if residual is not None:
        rn, c_res, rh, rw = residual.shape
        if rn != n or rh != oh or rw != ow or c_res > c_out:
            raise ValueError(f"conv2d: residual shape {tuple(residual.shape)} does not fit the output "
                             f"{(n, c_out, oh, ow)} (needs N, H, W equal and C_res <= C_out)")
        if residual.dtype != x.dtype:
            residual = residual.to(x.dtype)
        res, res_ps = _residual_view(residual, n, c_res, oh, ow)
    else:
        res, res_ps, c_res = y, 0, 0

    variant = dict(PROLOGUE=int(prologue), EPILOGUE=epilogue, HAS_RES=int(residual is not None),
                   STATS=int(bool(stats)), FLAT_K=int(c_in < registry.FLAT_K_MAX_CIN))
    dkey = compute_dtype(x)
    arch, sms = arch_and_sms(x)

    def launch(cfg, part, pcount):
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        num_cb = cdiv(c_in, bk)
        grid = (cdiv(M, bm) * cdiv(c_out, bn),)
        conv2d_fwd_kernel[grid](
            xd, wp, y,
            vec(pro_scale, x) if prologue else dmy, vec(pro_shift, x) if prologue else dmy,
            vec(epi_scale, x) if epilogue == 2 else dmy, vec(epi_shift, x) if epilogue else dmy,
            res, part, pcount,
            h, wd, c_in, oh, ow, c_out, M, K, kw, num_cb, kh * kw * num_cb,
            sh, sw, ph, pw, dh, dw, res_ps, c_res,
            0.0 if pro_relu else _NEG_INF, 0.0 if relu else _NEG_INF,
            PRECISION="tf32" if dkey == "tf32" else "ieee", num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **variant, **cfg.kwargs())

    if config is None:
        if registry.autotune_enabled() and not interpreting() and x.is_cuda:
            config = _autotune(arch, variant, dkey, x, w, (sh, sw, ph, pw, dh, dw), M, c_out, launch)
        else:
            config = registry.pick_conv(arch, variant, dkey, M, c_out, sms)
    elif not config.applies(variant, dkey):
        raise ValueError(f"conv2d: config {config.name} does not apply to {dkey} {variant}")
    num_m = cdiv(M, config["BLOCK_M"])
    if stats:
        part = new_f32((2, num_m, c_out), x.device)
        pcount = new_f32((num_m,), x.device)
    else:
        part, pcount = dmy, dmy
    launch(config, part, pcount)
    if stats:
        mean, var = merge_stats(part, pcount)
    return (y if out_cl else y.contiguous()), mean, var


def _autotune(arch, variant, dkey, x, w, geo, M, c_out, launch):
    """Opt-in (``RESFUSE_TRITON_AUTOTUNE=1``): time each registry config of this shape once, keep the best."""
    key = (arch, tuple(sorted(variant.items())), dkey, tuple(x.shape), tuple(w.shape), geo, str(x.device))
    best = _AUTOTUNE_CACHE.get(key)
    if best is None:
        from triton.testing import do_bench
        times = []
        for cfg in registry.CONV.configs_for(arch, variant, dkey):
            nm = cdiv(M, cfg["BLOCK_M"])
            part = torch.empty((2, nm, c_out), dtype=torch.float32, device=x.device)
            pcount = torch.empty((nm,), dtype=torch.float32, device=x.device)
            try:
                ms = do_bench(lambda c=cfg, p=part, k=pcount: launch(c, p, k), warmup=5, rep=20)
                times.append((ms, cfg.name, cfg))
            except Exception:  # a config that does not fit this GPU is simply not a candidate
                continue
        best = min(times, key=lambda t: (t[0], t[1]))[2]
        _AUTOTUNE_CACHE[key] = best
    return best
