"""Test helpers shared by resfuse's tests and its users' tests.

Every kernel is judged against a float64 run of the pure-PyTorch reference:

* ``tolerance(dtype)`` gives the relative tolerance of a single op in that dtype
  (fp32 1e-5, tf32 3e-4, bf16/fp16 1e-2, float64 1e-10);
* ``assert_close_ref(actual, expected, dtype=...)`` compares with a norm-relative error
  ``max|a - e| / max(max|e|, tiny)`` (elementwise relative error is meaningless next to zeros),
  and prints the worst index on failure;
* ``assert_error_ratio(actual, candidate_ref, truth64, k)`` is the model-level rule: our error against
  float64 must be at most ``k`` times plain PyTorch's own error in the same dtype;
* ``rand_activation`` makes fresh random inputs (never zeros) in NCHW or channels_last;
* ``poisoned`` returns a NaN-filled tensor so that a kernel that forgets to write an element is caught;
* ``randomize_bn`` gives a model's BatchNorms non-trivial affine parameters and running statistics;
* ``median_seconds`` times a callable, ``median_seconds_each`` several round-robin (CUDA events on a GPU,
  ``time.perf_counter`` on CPU).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}
TF32_TOL = 3e-4


def tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    """Relative tolerance of one fused op in ``dtype`` (``tf32=True`` for TF32 convolutions)."""
    if dtype == torch.float32 and tf32:
        return TF32_TOL
    try:
        return _TOL[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype}") from None


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - e| / max|e|`` computed in float64; NaN if either side has a NaN where the other has not."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs expected {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        return float("nan")
    a, e = torch.nan_to_num(a), torch.nan_to_num(e)
    denom = max(e.abs().max().item(), 1e-30)
    return (a - e).abs().max().item() / denom


def rel_error_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||a - e|| / ||e||`` in float64: the error measure for low-precision gradients, where a ReLU
    mask flipped by rounding makes single elements (and so the max-norm error) meaningless."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs expected {tuple(e.shape)}")
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close_ref(actual, expected, dtype=None, *, rtol=None, name="output", tf32=False):
    """Assert ``actual`` matches the float64 ``expected`` within the tolerance of ``dtype``."""
    dtype = dtype or actual.dtype
    rtol = tolerance(dtype, tf32) if rtol is None else rtol
    err = rel_error(actual, expected)
    if not err <= rtol:  # also catches NaN
        a = actual.detach().to(torch.float64)
        e = expected.detach().to(torch.float64)
        diff = torch.nan_to_num((a - e).abs(), nan=float("inf"))
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {rtol:.1e} ({dtype}); worst at {idx}: "
            f"got {a[idx].item():.6g}, expected {e[idx].item():.6g}")
    return err


def assert_error_ratio(actual, plain, truth, k: float = 2.0, *, name="output", floor=None, l2=False):
    """Model-level rule: ``err(actual) <= k * err(plain) + floor`` where err is relative to ``truth``.

    ``plain`` is plain PyTorch's result in the same dtype as ``actual``; ``truth`` is float64.
    ``floor`` (default: the single-op tolerance of actual's dtype / 10) keeps the rule meaningful when
    plain PyTorch happens to be almost exact. ``l2=True`` measures with :func:`rel_error_l2`.
    """
    err = rel_error_l2 if l2 else rel_error
    ours, theirs = err(actual, truth), err(plain, truth)
    floor = tolerance(actual.dtype) / 10 if floor is None else floor
    if not ours <= k * theirs + floor:
        raise AssertionError(f"{name}: error {ours:.3e} > {k} x plain PyTorch's {theirs:.3e} + {floor:.1e}")
    return ours, theirs


def rand_activation(shape, dtype=torch.float32, channels_last=False, device="cpu", generator=None,
                    scale=1.0, offset=0.0):
    """Fresh normal random ``[N, C, H, W]`` activation (never zeros) in the requested memory format."""
    t = torch.randn(shape, dtype=torch.float64, device=device, generator=generator) * scale + offset
    t = t.to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def poisoned(like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped, strided and typed like ``like`` and filled with NaN."""
    return torch.full_like(like, float("nan"))


def to64(*tensors):
    """Detached float64 copies that require grad where the original did (leaf tensors for a reference run)."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        c = t.detach().to(torch.float64)
        out.append(c.requires_grad_(t.requires_grad))
    return out


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm of ``model`` non-trivial affine parameters and running statistics, in place.

    A fresh BN is the identity in eval mode (weight 1, bias 0, mean 0, variance 1), which hides mistakes in
    BN folding and in the use of each tensor; after this, each BN's ``weight`` and ``running_var`` lie in
    [0.5, 1.5) and its ``bias`` and ``running_mean`` in [-0.3, 0.3). Applies to every
    ``torch.nn.modules.batchnorm._BatchNorm`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``), skipping the
    tensors a BN does not have (``affine=False``, ``track_running_stats=False``); ``num_batches_tracked`` is
    left as it is. The values come from a generator seeded with ``seed`` (the global RNG is not used), are
    drawn in float64 and copied into each tensor's dtype and device, so the same model gets the same
    values wherever it lives. Returns ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            for t, lo, hi in ((m.weight, 0.5, 1.5), (m.bias, -0.3, 0.3), (m.running_mean, -0.3, 0.3),
                              (m.running_var, 0.5, 1.5)):
                if t is not None:
                    t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * (hi - lo) + lo)
    return model


def median_seconds(fn: Callable[[], object], n: int, device: torch.device | str = "cpu", warmup: int = 0) -> float:
    """Median wall time in seconds of ``n`` calls of ``fn()``, after ``warmup`` untimed calls (see
    :func:`median_seconds_each`)."""
    return median_seconds_each([fn], n, device, warmup)[0]


def median_seconds_each(fns: Sequence[Callable[[], object]], n: int, device: torch.device | str = "cpu",
                        warmup: int = 0) -> list[float]:
    """Median wall time in seconds of a call of each of ``fns``, timed round-robin: ``warmup`` untimed
    calls of each, then ``n`` rounds of one timed call of each — so that a machine whose speed drifts
    (a shared VM: its step times move by 20 % within seconds) slows all of them alike, and their ratio
    holds where back-to-back runs of each would compare two different machine states.

    On a CUDA ``device`` each call is timed by CUDA events on the current stream (the device time of the
    work it queues; each call ends with an event synchronize); elsewhere by ``time.perf_counter``.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    cuda = torch.device(device).type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(n):
        for fn, ts in zip(fns, times):
            if cuda:
                start.record()
                fn()
                end.record()
                end.synchronize()
                ts.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]
