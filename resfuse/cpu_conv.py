"""Convolutions of the ``cpu`` backend: oneDNN (ATen), one GEMM (by BLAS or by oneDNN's matmul), or
Winograd F(2x2, 3x3) / F(4x4, 3x3), chosen per shape by measurement.

oneDNN's direct convolutions run near this CPU's peak (~115 GFLOP/s fp32 on one core of the 2-core
AMD EPYC here) where the spatial extent is large, and poorly where it is small: measured (torch 2.13,
fp32, 1 thread, batch 8, channels_last) the weight gradient of ResNet-50's 3x3 512->512 conv on a 4x4
map takes 12.3 ms through ATen — most of it a reorder of the blocked weight gradient back to
``[Co, kh, kw, Ci]`` — and 7.2 ms as one GEMM; the 1x1 stride-2 1024->2048 projection takes 11.2 ms
forward / 15.5 ms weight gradient through ATen and 6.8 / 6.0 ms as a GEMM. For 3x3 stride-1 layers,
Winograd F(2x2, 3x3) needs 16/36 of the multiply-adds and F(4x4, 3x3) 9/36 (``csrc/cpu/winograd.cpp``):
with bias and ReLU, 1 thread, 4x128x28x28 takes 8.3 ms through oneDNN's fused convolution, 4.9 ms as
F(2x2) and 3.1 ms as F(4x4); 1x256x14x14 1.91 / 1.36 / 0.90 ms; but 1x512x7x7 2.0 / 1.85 / 2.6 ms
(4 tiles: the 36 GEMMs have 4 rows each, and the transformed weight, 4x the weight, is read per
call). Which one wins
depends on the shape, the batch, the thread count and the CPU, so nothing is hard-coded: the first
call of each shape times every candidate (``min`` of three runs each, after one warm-up run) and the
fastest is kept for the process, like ``torch.backends.cudnn.benchmark`` — checked once more when the
process is warm: the :data:`RECHECK_AFTER`-th call of a training convolution after its first trial
times the candidates again, and that second trial decides (:func:`warm_steps`). (A first trial runs
on the first train step, in a cold process — allocator, page faults, caches: on resnet18 and
resnet50, 2 threads, two processes in four kept F(2x2) for their first 3x3 layer, where F(4x4) takes
1.10-1.63 ms against 1.65-2.52, ~3 % of a resnet18 step.) A candidate must be 5 %
faster than the preferred one to be chosen, so near-ties stay on oneDNN — or, for a weight gradient,
on the per-tap GEMM, which holds far less memory.

The GEMM forms, for channels_last ``x [N, Ci, H, W]`` (an NHWC buffer) and a channels_last weight
``w [Co, Ci, kh, kw]`` (a ``[Co, kh*kw*Ci]`` matrix), with ``cols [N*Ho*Wo, kh*kw*Ci]`` the im2col
gather of ``x`` (a *view* of ``x`` for a 1x1 stride-1 convolution, a copy otherwise):

* forward:       ``y = cols @ w^T``            → ``[N*Ho*Wo, Co]`` = channels_last ``y``
* weight grad:   ``gw = gy^T @ cols``          → ``[Co, kh*kw*Ci]`` = channels_last ``gw``, computed
  one kernel tap (one ``Ci``-column block of ``cols``) at a time, so ``cols`` is never built
* input grad:    ``gx = col2im(gy @ w)``       → the product ``[N*Ho*Wo, kh*kw*Ci]`` is ``gx`` itself
  for a 1x1 stride-1 unpadded layer, else each tap's slice is added into its window of ``gx``

Each GEMM form has two engines, timed as two candidates: ``gemm`` (ATen's ``mm``: the BLAS torch is
built with, MKL on x86; for a weight gradient the per-tap form above) and ``matmul`` (oneDNN's matmul,
:func:`onednn_mm`, float32; for a weight gradient one GEMM over an im2col buffer of at most
:data:`MAX_GRAD_COLS_BYTES`). MKL picks its kernels by CPU vendor: on the AMD EPYC (Zen 5) the CI runs on,
its sgemm runs AVX2 code at less than half of oneDNN's AVX-512 speed.

Winograd (3x3, stride 1, padding 1, one group, float32 channels_last): forward, the input gradient
as the forward convolution of ``gy`` by the rotated, transposed weight, the weight gradient from the
transformed input and output-gradient tiles (:func:`winograd_weight_grad`); in inference (``cpu_backend``)
with the transformed weight cached and prepacked per folded weight. fp32 rounding error against
float64: F(2x2) like the direct convolution's (~4e-7 relative), F(4x4) ~3x that (1-3e-6 measured
over 5-512 channels; its transforms scale by up to 8), inside the 1e-5 single-op bar either way. A
non-finite input makes the output blocks of the tiles that read it non-finite (NaN), a superset of
eager's — ``onednn`` keeps eager's pattern exactly.

Results keep the layouts of their operands (channels_last in, channels_last out), so autograd never
re-lays out a weight gradient. Accumulation is the GEMM's (fp32 for fp32/bf16/fp16, fp64 for fp64).

Where no alternative applies (grouped convolution, NCHW activations or weights, an im2col buffer
above :data:`MAX_COLS_BYTES` or a backward one above :data:`MAX_GRAD_COLS_BYTES`) or while
``torch.compile`` traces, ATen runs without a trial. ``RESFUSE_CPU_CONV=onednn|gemm|matmul|winograd|
winograd4|auto`` (read at import) or :func:`set_algo` force a choice (``gemm``/``matmul``/``winograd``/
``winograd4`` = wherever it applies; the tests run each). :func:`choices` lists what was picked.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _extension
from .backends import ConvGeom

ALGOS = ("auto", "onednn", "gemm", "matmul", "winograd", "winograd4")
#: the GEMM forms' two engines: ``gemm`` = ATen's ``mm`` (the BLAS torch is built with, MKL on x86),
#: ``matmul`` = oneDNN's matmul (see :func:`onednn_mm`)
GEMMS = ("gemm", "matmul")
#: largest im2col buffer the GEMM forward may allocate (bytes; it adds to a train step's peak memory):
#: the measured wins are all below 3 MiB (small maps), the losses above (28x28 maps, up to 14 MiB)
MAX_COLS_BYTES = 8 << 20
#: the same bound for the backward's GEMM forms (the weight gradient's im2col buffer by ``matmul``, the
#: input gradient's product): their scratch comes at the backward's peak, next to the weight gradients.
#: 4 MiB keeps ResNet-18/50's small-map wins at 112x112 (<= 2.4 MiB, batch 8) and leaves the 512-channel
#: 3x3 layers on 7x7 maps (224x224, 7.2 MiB) to the per-tap GEMM / oneDNN: there the buffer raised a
#: ResNet-18 stage block's train-step peak from 0.73x to 0.93x eager's
MAX_GRAD_COLS_BYTES = 4 << 20
_MARGIN = 0.95  # an alternative is chosen only if it takes < 95 % of the preferred one's time
#: the candidate kept on a near-tie: oneDNN, except for weight gradients, where the per-tap GEMM holds
#: far less memory (oneDNN's holds ~2 weight-sized buffers besides its result; see :func:`_scratch`)
_PREFERRED = {"weight_grad": "gemm"}
_TRIALS = 3  # timed runs per candidate at a first call (after one warm-up run); the best counts
#: calls of a training convolution after its first trial at which the trial is repeated once
RECHECK_AFTER = 8
_MIN_TAP_CHANNELS = 32  # input channels below which the per-tap weight gradient is not tried
#: oneDNN's input and weight gradients run as two calls (weight gradient first) only where that lowers
#: the peak by at least this many bytes (see :func:`_pair`)
SPLIT_MIN_BYTES = 1 << 20


def _env_algo() -> str:
    v = os.environ.get("RESFUSE_CPU_CONV", "auto").strip().lower() or "auto"
    if v not in ALGOS:
        raise ValueError(f"RESFUSE_CPU_CONV={v!r}; valid: {', '.join(ALGOS)}")
    return v


_algo = _env_algo()
_choices: Dict[tuple, str] = {}
_memo: Dict[tuple, str] = {}  # (op, *key, threads) -> what ran, forced and single-candidate cases too
_recheck: Dict[tuple, int] = {}  # (op, *key, threads) -> calls left until its second trial
_lock = threading.Lock()


def set_algo(name: Optional[str]) -> None:
    """Force ``"onednn"``, ``"gemm"``, ``"matmul"``, ``"winograd"`` (F(2x2, 3x3)) or ``"winograd4"``
    (F(4x4, 3x3)) (the last four wherever they apply, oneDNN elsewhere), or measure per shape
    (``"auto"``); ``None`` goes back to ``RESFUSE_CPU_CONV``. Clears the per-shape choices. Process-wide."""
    global _algo
    if name is not None and name not in ALGOS:
        raise ValueError(f"unknown CPU convolution algorithm {name!r}; valid: {', '.join(ALGOS)}")
    _algo = _env_algo() if name is None else name
    with _lock:
        _choices.clear()
        _memo.clear()
        _recheck.clear()


def get_algo() -> str:
    return _algo


def warm_steps() -> int:
    """Train steps after which no trial runs any more (what a benchmark runs before timing): every
    convolution of a step runs at least once per step, and its second trial is its
    ``RECHECK_AFTER + 1``-th call."""
    return RECHECK_AFTER + 1


@contextlib.contextmanager
def forced(name: Optional[str]):
    """:func:`set_algo` ``(name)`` for a ``with`` block, the previous setting after it. With
    ``"onednn"`` a model's float32 results stop depending on timing: a measured choice changes the
    rounding, and one pre-activation within rounding of 0 flips a ReLU mask, which moves a whole
    model's float32 gradients by ~1e-3 (in eager PyTorch just as well) — model-level checks pin it."""
    prev = _algo
    set_algo(name)
    try:
        yield
    finally:
        set_algo(prev)


def choices() -> Dict[tuple, str]:
    """``{(op, x shape, w shape, geometry, dtype, ..., threads): algorithm}`` decided so far under
    ``auto``; ``op`` is ``forward``, ``input_grad``, ``weight_grad`` (then ``...`` = whether x, w and
    the output gradient are channels_last) or ``inference`` (``...`` = residual given, relu)."""
    with _lock:
        return dict(_choices)


# -- the GEMM forms ----------------------------------------------------------------------------------
def _out_hw(x, w, geom: ConvGeom) -> Tuple[int, int]:
    return tuple((x.shape[2 + i] + 2 * geom.padding[i] - geom.dilation[i] * (w.shape[2 + i] - 1) - 1)
                 // geom.stride[i] + 1 for i in range(2))


def _is_cl(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last)


def _cols(x, w, geom: ConvGeom):
    """im2col of channels_last ``x`` as a ``[N*Ho*Wo, kh*kw*Ci]`` matrix (tap-major, channel-minor,
    matching a channels_last weight), plus ``(Ho, Wo)``."""
    n, c = x.shape[:2]
    kh, kw = w.shape[2:]
    ho, wo = _out_hw(x, w, geom)
    xh = x.permute(0, 2, 3, 1)  # the NHWC buffer, as a view
    ph, pw = geom.padding
    if ph or pw:
        xh = F.pad(xh, (0, 0, pw, pw, ph, ph))
    s_n, s_h, s_w, s_c = xh.stride()
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    win = xh.as_strided((n, ho, wo, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))
    return win.reshape(n * ho * wo, kh * kw * c), ho, wo


def _view_gemm(w, geom: ConvGeom) -> bool:
    """A 1x1, stride-1, unpadded convolution: its im2col matrix is a view of ``x`` (one GEMM, no copy)."""
    return tuple(w.shape[2:]) == (1, 1) and geom.stride == (1, 1) and geom.padding == (0, 0)


def _w_mat(w):
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # a view for a channels_last weight


def _g_mat(gy):
    return gy.permute(0, 2, 3, 1).reshape(-1, gy.shape[1])  # a view for a channels_last gradient


def onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D, float32) by oneDNN's matmul: ``mkldnn::_linear_pointwise(a, b^T)``, the weight
    ``b^T`` passed as the strided view it is (oneDNN reads it in place; ``a`` is made contiguous).
    Where BLAS is slow this is the fast GEMM: on the AMD EPYC (Zen 5) CI machine MKL's sgemm runs its
    AVX2 kernels at ~200 GFLOP/s on 2 threads, oneDNN's AVX-512 ones at ~470 (6272x256 @ 256x64: 1.05
    vs 0.45 ms); on CPUs where MKL runs at full width both are near the machine's peak. Each use is
    timed against the others like any candidate, so nothing assumes either."""
    return torch.ops.mkldnn._linear_pointwise(a.contiguous(), b.t(), None, "none", [], "")


#: ``mm(a, b)`` of each GEMM engine (:data:`GEMMS`)
_MM: Dict[str, Callable] = {"gemm": torch.mm, "matmul": onednn_mm}


def gemm_forward(x, w, geom: ConvGeom, engine: str = "gemm"):
    cols, ho, wo = _cols(x, w, geom)
    y = _MM[engine](cols, _w_mat(w).t())
    return y.view(x.shape[0], ho, wo, w.shape[0]).permute(0, 3, 1, 2)


def gemm_weight_grad(gy, x, w, geom: ConvGeom, engine: str = "gemm"):
    """``gw = gy^T @ cols``. A 1x1 stride-1 unpadded convolution is one GEMM on views. Otherwise,
    ``engine="gemm"``: without materialising ``cols``, by ``resfuse::conv_weight_grad``
    (csrc/cpu/conv_weight_grad.cpp): one GEMM per kernel tap, ``gw[:, :, i, j] = gy[valid]^T @
    x[shifted]``, the taps in parallel, written into their slices of the channels_last ``gw``, each
    tap's positions gathered a few images or rows at a time — small per-thread pieces instead of the
    ``kh*kw``-times larger im2col buffer (and instead of the ~2 weight-sized buffers oneDNN's weight
    gradient holds besides its result); ``engine="matmul"``: one oneDNN GEMM over the im2col buffer
    (at most :data:`MAX_GRAD_COLS_BYTES`, see :func:`_matmul_applies`) — on small maps with many channels
    (ResNet-50's last stage at 112x112 input, 2 threads: 512->512 3x3 on 4x4 maps 1.8 ms against 2.3
    per tap and 2.7 through oneDNN's convolution; 1x1 1024->2048 stride 2: 1.4 against 2.7 and 5.4)."""
    co, ci, kh, kw = w.shape
    if engine == "gemm" and not _view_gemm(w, geom):
        return torch.ops.resfuse.conv_weight_grad(gy, x, [kh, kw], list(geom.stride), list(geom.padding),
                                                  list(geom.dilation))
    return _MM[engine](_g_mat(gy).t(), _cols(x, w, geom)[0]).view(co, kh, kw, ci).permute(0, 3, 1, 2)


def gemm_input_grad(gy, x, w, geom: ConvGeom, engine: str = "gemm"):
    """``gx = col2im(gy @ w)``: row ``(n, oh, ow)`` of the product ``[N*Ho*Wo, kh*kw*Ci]`` is what
    that output position sends back to each tap of the window it read. A 1x1 stride-1 unpadded
    convolution's product is ``gx`` itself; otherwise each tap's ``[N, Ho, Wo, Ci]`` slice is added
    into its shifted, strided window of a zero-padded gradient, and the padding cropped. On small
    maps with many channels this beats oneDNN's input gradient with oneDNN's matmul (2 threads,
    batch 8: 512->512 3x3 on 4x4 maps 1.7 against 2.3 ms; 512->512 stride 2 from 7x7 1.7 against 2.6);
    on larger maps the kh*kw adds cost more than the GEMM saves."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[2:]
    ho, wo = gy.shape[2:]
    g = _MM[engine](_g_mat(gy), _w_mat(w))
    if _view_gemm(w, geom):
        return g.view(n, h, wd, c).permute(0, 3, 1, 2)
    (sh, sw), (ph, pw), (dh, dw) = geom.stride, geom.padding, geom.dilation
    g = g.view(n, ho, wo, kh, kw, c)
    gx = x.new_zeros((n, h + 2 * ph, wd + 2 * pw, c))
    for i in range(kh):
        for j in range(kw):
            rows, cols = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh), slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            gx[:, rows, cols].add_(g[:, :, :, i, j])
    if ph or pw:
        gx = gx[:, ph:ph + h, pw:pw + wd].contiguous()
    return gx.permute(0, 3, 1, 2)


def gemm_input_grad_add_(acc, gy, x, w, geom: ConvGeom) -> bool:
    """``acc += dL/dx`` for a 1x1 unpadded channels_last convolution (a projection shortcut's input
    gradient, added into the block's), by the algorithm measured for this convolution's input
    gradient: a GEMM engine adds its product straight into the (strided) positions it reaches — no
    input-sized gradient, no pass adding it; oneDNN's gradient is added. False (nothing done) where
    that does not apply or oneDNN / Winograd is forced."""
    if (_algo not in ("auto", *GEMMS) or tuple(w.shape[2:]) != (1, 1) or geom.padding != (0, 0)
            or geom.groups != 1 or not (_is_cl(acc) and _is_cl(gy) and _is_cl(w))
            or torch.compiler.is_compiling()):
        return False
    key = _key(x, w, geom, gy)
    name = _settled("input_grad", key)
    if name in GEMMS:
        n, c = acc.shape[:2]
        sh, sw = geom.stride
        g = _MM[name](_g_mat(gy), _w_mat(w)).view(n, gy.shape[2], gy.shape[3], c)
        acc.permute(0, 2, 3, 1)[:, ::sh, ::sw, :].add_(g)
    else:
        acc.add_(_run_settled("input_grad", name, gy, x, w, geom, key))
    return True


# -- ATen --------------------------------------------------------------------------------------------
def aten_forward(x, w, geom: ConvGeom):
    return F.conv2d(x, w, None, geom.stride, geom.padding, geom.dilation, geom.groups)


def _aten_backward(gy, x, w, geom: ConvGeom, need_input, need_weight):
    gx, gw, _ = torch.ops.aten.convolution_backward(
        gy, x, w, None, list(geom.stride), list(geom.padding), list(geom.dilation), False, [0, 0],
        geom.groups, [need_input, need_weight, False])
    return gx, gw


# -- selection ----------------------------------------------------------------------------------------
def _gemm_applies(op: str, x, w, geom: ConvGeom) -> bool:
    if geom.groups != 1 or not (_is_cl(x) and _is_cl(w)):
        return False
    if op == "weight_grad":  # per tap: no im2col buffer; each tap's GEMM has K = Ci columns, so a
        # few input channels make it hopeless (the 3-channel 7x7 stem: ~200 ms against oneDNN's 3 ms)
        if _view_gemm(w, geom):
            return True
        return _extension.LOADED and (w.shape[1] >= _MIN_TAP_CHANNELS or tuple(w.shape[2:]) == (1, 1))
    if _view_gemm(w, geom):
        return True
    if op == "input_grad" and w.shape[2] * w.shape[3] > 1 and x.dtype not in (torch.float32, torch.float64):
        return False  # col2im sums the taps' products in the activation dtype: bf16/fp16 would round each add
    return _cols_bytes(x, w, geom) <= (MAX_GRAD_COLS_BYTES if op == "input_grad" else MAX_COLS_BYTES)


def _cols_bytes(x, w, geom: ConvGeom) -> int:
    ho, wo = _out_hw(x, w, geom)
    return x.shape[0] * ho * wo * w.shape[1] * w.shape[2] * w.shape[3] * x.element_size()


def _matmul_applies(op: str, x, w, geom: ConvGeom) -> bool:
    """The GEMM forms by oneDNN's matmul: float32, where oneDNN's matmul passed its probe and is not
    switched off (``torch.backends.mkldnn.enabled``), and — the weight gradient too — with an im2col
    buffer of at most :data:`MAX_GRAD_COLS_BYTES`."""
    if (x.dtype != torch.float32 or not torch.backends.mkldnn.enabled or not _gemm_applies(op, x, w, geom)
            or _matmul_probe() is not None):
        return False
    return op != "weight_grad" or _view_gemm(w, geom) or _cols_bytes(x, w, geom) <= MAX_GRAD_COLS_BYTES


@functools.cache
def _matmul_probe() -> Optional[str]:
    """None when ``mkldnn::_linear_pointwise`` exists and computes ``a @ b`` with a strided ``b`` on a
    tiny problem (deterministic data), else why not (then the ``matmul`` candidates are not offered)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return "torch.ops.mkldnn._linear_pointwise is missing"
    try:
        a = torch.arange(35, dtype=torch.float32).reshape(5, 7).sin()
        b = torch.arange(42, dtype=torch.float32).reshape(6, 7).cos().t()  # [7, 6], strided
        if torch.allclose(onednn_mm(a, b), a.double().mm(b.double()).float(), atol=1e-5, rtol=1e-5):
            return None
        return "oneDNN's matmul disagrees with float64 on a probe"
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        return f"oneDNN's matmul failed a probe ({type(e).__name__}: {e})"


def _timed(fn: Callable[[], torch.Tensor]):
    t = time.perf_counter()
    r = fn()
    return time.perf_counter() - t, r


def pick(op: str, key: tuple, candidates: Dict[str, Callable[[], torch.Tensor]], again: bool = False):
    """Run ``op`` with the algorithm in force among ``candidates`` (``{"onednn": fn, ...}``, oneDNN
    always present): the forced one where it is a candidate, else — under ``auto`` — the fastest,
    measured on the first call of each ``key`` (one warm-up run, then the best of three per
    candidate, run round-robin; any other candidate must beat the preferred one — oneDNN, the per-tap
    GEMM for weight gradients — by 5 %). ``again``: the second trial of a training convolution
    (:data:`RECHECK_AFTER`; no warm-up), which replaces the first one's choice."""
    choice = None if again else decided(op, key, candidates)
    remember = op in _RUN and not torch.compiler.is_compiling()
    if choice is not None:
        if remember:
            _memo[(op, *key, torch.get_num_threads())] = choice
        return candidates[choice]()
    key = (op, *key, torch.get_num_threads())
    if not again:
        for fn in candidates.values():  # warm-up: primitive creation, weight packs, first touch
            fn()
    best, results = {}, {}
    for _ in range(_TRIALS):  # round-robin, so a disturbance hits every candidate alike
        for name, fn in candidates.items():
            t, results[name] = _timed(fn)
            best[name] = min(t, best.get(name, float("inf")))
    prefer = _PREFERRED.get(op, "onednn")
    choice = min(results, key=lambda n: best[n] / (1.0 if n == prefer else _MARGIN))
    with _lock:
        _choices[key] = choice
        if remember:
            _memo[key] = choice
            if not again:
                _recheck[key] = RECHECK_AFTER
    return results[choice]


def _due(op: str, key: tuple) -> bool:
    """Counts a run of ``op`` on ``key`` by its measured choice; True once when its second trial is due."""
    full = (op, *key, torch.get_num_threads())
    left = _recheck.get(full)
    if left is None:
        return False
    if left > 1:
        _recheck[full] = left - 1
        return False
    _recheck.pop(full, None)
    return True


def decided(op: str, key: tuple, candidates) -> Optional[str]:
    """The algorithm :func:`pick` runs for ``op`` (with ``key`` as given to it) among ``candidates``,
    or None while it is still to be measured."""
    if len(candidates) == 1 or _algo == "onednn":
        return "onednn"
    if _algo != "auto":
        return _algo if _algo in candidates else "onednn"
    return _choices.get((op, *key, torch.get_num_threads()))


def _key(x, w, geom: ConvGeom, gy=None) -> tuple:
    """What a choice depends on: shapes, geometry, dtype and the operands' layouts (which decide
    the candidates: GEMM and Winograd need channels_last)."""
    return (tuple(x.shape), tuple(w.shape), geom, x.dtype, _is_cl(x), _is_cl(w), gy is None or _is_cl(gy))


def _candidates(op: str, gy, x, w, geom: ConvGeom) -> Dict[str, Callable[[], torch.Tensor]]:
    """The algorithms of :data:`_RUN` that can run ``op`` here (oneDNN only while torch.compile
    traces), each bound to its operands."""
    names = ["onednn"]
    if not torch.compiler.is_compiling():
        if _gemm_applies(op, x, w, geom):
            names.append("gemm")
            if _matmul_applies(op, x, w, geom):
                names.append("matmul")
        # Winograd transforms x (forward, weight gradient: with a channels_last gy) or gy
        wino_input = gy if op == "input_grad" else x if op == "forward" or _is_cl(gy) else None
        if wino_input is not None and winograd_applies(wino_input, w, geom):
            names += WINOGRAD.values()
    return {n: functools.partial(_RUN[op][n], gy, x, w, geom) for n in names}


def _memoised(op: str, key: tuple) -> Optional[str]:
    """The algorithm an earlier call of ``op`` on ``key`` ran (at this thread count), if any."""
    return None if torch.compiler.is_compiling() else _memo.get((op, *key, torch.get_num_threads()))


def _settled(op: str, key: tuple) -> Optional[str]:
    """The algorithm an earlier call of ``op`` on ``key`` ran, to run again now — a dictionary lookup
    where building and checking the candidates costs ~10 us a call — or None when a trial is due (the
    first one, or the second, counted by :func:`_due`)."""
    name = _memoised(op, key)
    return None if name is None or (_recheck and _due(op, key)) else name


def _run_settled(op: str, name: Optional[str], gy, x, w, geom: ConvGeom, key: tuple):
    """``op`` by ``name`` (:func:`_settled`'s answer), or, where that is None, chosen by :func:`pick`."""
    if name is not None:
        return _RUN[op][name](gy, x, w, geom)
    return pick(op, key, _candidates(op, gy, x, w, geom), again=_memoised(op, key) is not None)


def _run(op: str, gy, x, w, geom: ConvGeom, key: tuple):
    """``op`` by the algorithm it ran before on ``key``, else chosen by :func:`pick`."""
    return _run_settled(op, _settled(op, key), gy, x, w, geom, key)


def forward(x, w, geom: ConvGeom):
    """``conv2d(x, w)`` without bias; output in ``x``'s memory format."""
    return _run("forward", None, x, w, geom, _key(x, w, geom))


def backward(gy, x, w, geom: ConvGeom, need_input=True, need_weight=True):
    """``(grad_input | None, grad_weight | None)`` of ``conv2d(x, w)``; each in its operand's layout.

    When both are needed, the weight gradient's algorithm is chosen for the pair (:func:`_pair`): its
    trial times each candidate together with the chosen input gradient, so oneDNN computing both in
    one call (~60 us less than two calls on small layers) competes as what it costs in the step."""
    key = _key(x, w, geom, gy)
    if not (need_input and need_weight):
        return (_run("input_grad", gy, x, w, geom, key) if need_input else None,
                _run("weight_grad", gy, x, w, geom, key) if need_weight else None)
    ni, nw = _memoised("input_grad", key), _memoised("weight_grad", key)
    again_i = bool(ni is not None and _recheck and _due("input_grad", key))
    again_w = bool(nw is not None and _recheck and _due("weight_grad", key))
    if ni is not None and nw is not None and not (again_i or again_w):
        return _pair(ni, nw, gy, x, w, geom)
    ci = _candidates("input_grad", gy, x, w, geom)
    ni = None if again_i else decided("input_grad", key, ci)
    if ni is None:  # the input gradient's own trial (its result is recomputed below)
        pick("input_grad", key, ci, again=again_i)
        ni = decided("input_grad", key, ci)
    pairs = {n: functools.partial(_pair, ni, n, gy, x, w, geom) for n in _candidates("weight_grad", gy, x, w, geom)}
    return pick("weight_grad", key, pairs, again=again_w)


def _pair(ni: str, nw: str, gy, x, w, geom: ConvGeom):
    """Both gradients, by algorithms ``ni`` and ``nw``: as two calls, the one whose algorithm holds
    more scratch memory first, so its scratch is gone before the other's result exists — oneDNN's
    weight gradient holds ~2 weight-sized buffers, its input gradient ~1, so for a 256-channel 3x3
    layer on a 14x14 map (batch 8) the pair peaks 6.6 MiB above its inputs instead of 8.1 MiB in
    ATen's order (see :func:`_scratch`). Two oneDNN calls take the time of ATen's one for both within
    +-1 % on ResNet shapes, but ~60 us more on tiny ones, so where that order would save less than
    :data:`SPLIT_MIN_BYTES` (it saves min(input, weight) bytes) oneDNN's pair stays one ATen call."""
    if (ni, nw) == ("onednn", "onednn") and min(x.numel(), w.numel()) * x.element_size() < SPLIT_MIN_BYTES:
        return _aten_backward(gy, x, w, geom, True, True)
    if _scratch("weight_grad", nw, x, w, gy, geom) > _scratch("input_grad", ni, x, w, gy, geom):
        gw = _RUN["weight_grad"][nw](gy, x, w, geom)
        return _RUN["input_grad"][ni](gy, x, w, geom), gw
    return _RUN["input_grad"][ni](gy, x, w, geom), _RUN["weight_grad"][nw](gy, x, w, geom)


def _scratch(op: str, algo: str, x, w, gy, geom: ConvGeom) -> int:
    """Bytes of scratch memory (beyond its result) that ``algo`` holds while it computes ``op``,
    as measured at batch 8 on ResNet shapes: oneDNN ~2 weights for a weight gradient, ~1 for an
    input gradient (its reorders); the per-tap GEMM weight gradient a few small per-thread pieces
    (0); a GEMM input gradient its product (for a 1x1 stride-1 layer the result itself, counted:
    an overestimate that can put it first) and, padded, the gradient before cropping; oneDNN's
    matmul the same, and for a weight gradient ``gy^T`` and the im2col buffer (unless a view of
    ``x``); Winograd its transformed weight (P/9 weights), twice for an input gradient (dense, then
    packed)."""
    wb = w.numel() * w.element_size()
    if algo == "onednn":
        return 2 * wb if op == "weight_grad" else wb
    if op != "weight_grad" and algo in GEMMS:  # the product, and a padded gradient to crop
        return _cols_bytes(x, w, geom) + (x.numel() * x.element_size() if any(geom.padding) else 0)
    if algo == "gemm":
        return 0
    if algo == "matmul":
        return gy.numel() * gy.element_size() + (0 if _view_gemm(w, geom) else _cols_bytes(x, w, geom))
    return (1 if op == "weight_grad" else 2) * points(winograd_tile(algo)) * wb // 9


# -- Winograd F(m x m, 3x3), m = 2 or 4: 3x3, stride 1, padding 1 (csrc/cpu/winograd.cpp) -------------
#: the transform G of F(m x m, 3x3) per output tile size m (B^T and A^T are in csrc/cpu/winograd.cpp)
_G = {
    2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
    4: ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0)),
}
#: the algorithm name of each tile size (what :func:`pick` and :func:`choices` call them)
WINOGRAD = {2: "winograd", 4: "winograd4"}
_WINO_GEOM = ConvGeom((1, 1), (1, 1), (1, 1), 1)
# the GEMMs run as oneDNN grouped convolutions (private ATen ops, probed by name only: the oneDNN
# fast path of cpu_backend probes them for correctness; Winograd itself is checked by the tests)
_HAS_MKLDNN = all(hasattr(torch.ops.mkldnn, n) for n in ("_convolution_pointwise", "_reorder_convolution_weight"))


def winograd_tile(name: str) -> Optional[int]:
    """The tile size of Winograd algorithm ``name`` (:data:`WINOGRAD`), None for a non-Winograd name."""
    return next((t for t, n in WINOGRAD.items() if n == name), None)


def points(tile: int) -> int:
    """Transform points ``P = (tile + 2)^2`` of F(tile x tile, 3x3): the number of GEMMs."""
    return (tile + 2) ** 2


def winograd_applies(x, w, geom: ConvGeom) -> bool:
    """3x3, stride 1, padding 1, one group, channels_last float32 (float64 too when forced, for
    the tests; bfloat16/float16 are left to oneDNN: the transforms would round in them)."""
    dtypes = (torch.float32,) if _algo == "auto" else (torch.float32, torch.float64)
    return (_extension.LOADED and _HAS_MKLDNN and geom == _WINO_GEOM and tuple(w.shape[2:]) == (3, 3)
            and x.dtype in dtypes and w.dtype == x.dtype and _is_cl(x) and x.device.type == "cpu")


@functools.cache
def _kron_g(dtype: torch.dtype, tile: int) -> torch.Tensor:
    """``K = G (x) G``, ``[P, 9]``: ``vec(G g G^T) = K vec(g)`` (built once per dtype and tile)."""
    g = torch.tensor(_G[tile], dtype=torch.float64)
    return torch.kron(g, g).to(dtype)


def winograd_weight(w, transpose: bool = False, tile: int = 2):
    """``U = G w G^T`` as the weight of a ``P``-group 1x1 convolution, ``[P*Co, Ci, 1, 1]``.

    ``transpose=True``: ``U`` of the input-gradient convolution (``w`` with its taps rotated by
    180 degrees and ``Ci``/``Co`` swapped), ``[P*Ci, Co, 1, 1]``."""
    k = _kron_g(w.dtype, tile)
    if transpose:  # rotating the 3x3 taps by 180 degrees reverses their order
        k, taps = k.flip(1), w.permute(2, 3, 1, 0)
    else:
        taps = w.permute(2, 3, 0, 1)
    rows, cols = taps.shape[2:]
    return torch.mm(k, taps.reshape(9, rows * cols)).view(points(tile) * rows, cols, 1, 1)


def winograd_chunk(x, tile: int = 2) -> int:
    """Tiles per chunk of :func:`winograd_forward`: the tiles split into equal chunks of at most 128
    (more than 64 channels, one thread) or 256 tiles, so that a chunk's transformed input and GEMM
    output stay in cache, and no chunk is mostly padding (the last chunk's missing tiles are computed
    as zeros). Measured (fp32, bias + ReLU, chunk targets 16-512 swept at 1 and 2 threads):
    F(2x2): 8x256x14x14 (392 tiles), 1 thread: 9.0 ms in 4 chunks of 98 against 11.8 ms in chunks of
    128 (the last one 8/128 full); 1x64x56x56 (784 tiles): 1.26 ms in 4 of 196, 1.43 in one chunk;
    2 threads prefer the larger chunks (8x128x28x28: 4.57 ms at 224, 5.04 at 121). F(4x4) (36 points
    per tile, so 2.25x the bytes per tile) wants the same tile counts: 2 threads, 8x64x28x28: 0.93 ms
    in chunks of 196 against 1.71 in chunks of 98; 8x64x56x56: 3.9 ms at 224 against 6.5 at 121;
    1 thread, 4x128x28x28: 2.65 ms at 98, 2.9 at 40-66."""
    n, c, h, w = x.shape
    tiles = n * -(-h // tile) * -(-w // tile)
    target = 128 if c > 64 and torch.get_num_threads() == 1 else 256
    return -(-tiles // -(-tiles // target))


def _packed(x, u, chunk: int, tile: int):
    """A dense float32 ``u`` prepacked (oneDNN) for the ``[1, P*Ci, chunk, 1]`` GEMM input, once for
    all chunks; ``u`` itself when already packed or not float32."""
    if x.dtype == torch.float32 and not u.is_mkldnn:
        p = points(tile)
        return torch.ops.mkldnn._reorder_convolution_weight(u, [0, 0], [1, 1], [1, 1], p,
                                                            [1, p * x.shape[1], chunk, 1])
    return u


def winograd_forward(x, u, bias=None, residual=None, relu=False, chunk=None, tile: int = 2):
    """``act(conv3x3(x) + bias + residual)`` (stride 1, padding 1) from ``u = winograd_weight(w,
    tile=tile)`` (dense, or prepacked for the ``[1, P*Ci, chunk, 1]`` GEMM input as the inference path
    caches it); channels_last in and out."""
    chunk = chunk or winograd_chunk(x, tile)
    return torch.ops.resfuse.winograd_conv(x, _packed(x, u, chunk, tile), bias, residual, relu, chunk, tile)


def winograd_weight_grad(gy, x, tile: int = 2):
    """The weight gradient ``[Co, Ci, 3, 3]`` (channels_last) of a 3x3 stride-1 convolution as
    ``G^T (dL/dU) G``, with ``dL/dU = sum_t V_t^T M_t`` over the Winograd tiles from
    ``resfuse::winograd_weight_grad`` — for F(2x2), 16 GEMMs over the tiles where the direct gradient
    does 9 over 4x as many output positions (1 thread, batch 8: 128@28² 13.4 vs 17.9 ms through oneDNN,
    256@14² 13.7 vs 18.1 ms; slower on 7x7 and smaller maps, where the tiles are mostly padding)."""
    co, ci = gy.shape[1], x.shape[1]
    # tiles per chunk: the chunk's transformed tiles within 2 MiB (32-256 tiles; measured within ~10 %
    # of the best chunk at 1 and 2 threads for 64-256 channels) — they add to a train step's peak
    chunk = max(32, min(256, (2 << 20) // (points(tile) * (ci + co) * x.element_size())))
    du = torch.ops.resfuse.winograd_weight_grad(gy, x, chunk, tile)  # [P, Co, Ci]
    # G^T dU G for every (co, ci) as one batched GEMM whose [Co, 9, Ci] result is the channels_last gw
    return torch.matmul(_kron_g(x.dtype, tile).t(), du.permute(1, 0, 2)).view(co, 3, 3, ci).permute(0, 3, 1, 2)


def _winograd_training(x, w, transpose: bool, tile: int):
    """Winograd with a weight that changes every step: the dense transform (P/9 of the weight) is
    freed once packed, before the convolution runs, so a train step's peak sees one copy."""
    chunk = winograd_chunk(x, tile)
    u = _packed(x, winograd_weight(w, transpose, tile), chunk, tile)
    return torch.ops.resfuse.winograd_conv(x, u, None, None, False, chunk, tile)


#: the training-time algorithms of each op, called as ``fn(gy, x, w, geom)`` (``gy`` None for forward)
_RUN: Dict[str, Dict[str, Callable]] = {
    "forward": {"onednn": lambda gy, x, w, g: aten_forward(x, w, g),
                **{e: functools.partial(lambda e, gy, x, w, g: gemm_forward(x, w, g, e), e) for e in GEMMS},
                **{n: functools.partial(lambda t, gy, x, w, g: _winograd_training(x, w, False, t), t)
                   for t, n in WINOGRAD.items()}},
    "input_grad": {"onednn": lambda gy, x, w, g: _aten_backward(gy, x, w, g, True, False)[0],
                   **{e: functools.partial(lambda e, gy, x, w, g: gemm_input_grad(gy, x, w, g, e), e)
                      for e in GEMMS},
                   **{n: functools.partial(lambda t, gy, x, w, g: _winograd_training(gy, w, True, t), t)
                      for t, n in WINOGRAD.items()}},
    "weight_grad": {"onednn": lambda gy, x, w, g: _aten_backward(gy, x, w, g, False, True)[1],
                    **{e: functools.partial(lambda e, gy, x, w, g: gemm_weight_grad(gy, x, w, g, e), e)
                       for e in GEMMS},
                    **{n: functools.partial(lambda t, gy, x, w, g: winograd_weight_grad(gy, x, t), t)
                       for t, n in WINOGRAD.items()}},
}


if _extension.LOADED:
    @torch.library.register_fake("resfuse::conv_weight_grad")
    def _conv_weight_grad_fake(grad_output, input, kernel_size, stride, padding, dilation):
        shape = (grad_output.shape[1], input.shape[1], *kernel_size)
        return input.new_empty(shape).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("resfuse::winograd_weight_grad")
    def _winograd_weight_grad_fake(grad_output, input, chunk, tile):
        return input.new_empty((points(tile), grad_output.shape[1], input.shape[1]))

    @torch.library.register_fake("resfuse::winograd_conv")
    def _winograd_conv_fake(input, weight, bias, residual, relu, chunk, tile):
        n, _, h, w = input.shape
        return input.new_empty((n, weight.shape[0] // points(tile), h, w)).contiguous(
            memory_format=torch.channels_last)
