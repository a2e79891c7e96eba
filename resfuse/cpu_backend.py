"""The ``cpu`` backend: resfuse's C++ kernels (``csrc/cpu``) for the BN/ReLU/add passes; convolutions
through oneDNN (ATen), one GEMM or Winograd F(2x2, 3x3) / F(4x4, 3x3), chosen per shape by measurement
(:mod:`resfuse.cpu_conv`).

Two paths for the inference form ``conv_bias_act`` (BN already folded into ``w`` and ``bias``):

* **oneDNN fast path** — ``torch.ops.mkldnn._convolution_pointwise`` (conv + bias + an activation
  post-op: SiLU, LeakyReLU, ... given as a :class:`~resfuse.backends.PostOp`; the ReLU runs in place
  after it, see :func:`_onednn_run`) and its ``.binary`` overload (conv + bias, then a binary ``add``
  of the residual): a whole inference layer, shortcut add included, in one oneDNN primitive. The
  folded weight is *prepacked* once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_convolution_weight``, the op Inductor's
  freezing pass uses) and cached on the folded weight tensor itself, per input shape, guarded by the
  weight's version counter. ``resfuse.functional.fold_bn`` already returns a new folded tensor whenever a
  conv weight, BN parameter or buffer changes (version counters, identity, dtype, device), so a changed
  model can never meet a stale packed weight; the pack dies with its folded weight.
  A weight seen for the first time is not packed (a per-call weight, e.g. the RiR layer's
  ``W_cat + I``, would otherwise be repacked on every call); from the second call on it is. For a 3x3
  stride-1 fp32 channels_last layer the first call also times the Winograd forms F(2x2, 3x3) and
  F(4x4, 3x3) (transformed weight packed and cached the same way, bias + residual + ReLU in the
  output transform) and keeps the fastest; the losers' packs are then dropped from the folded weight,
  so each layer holds one packed form per input shape (a Winograd transform is 16/9 or 4x the weight).
* **portable path** — ATen convolution + ``torch.ops.resfuse.bn_act`` (bias + residual + ReLU in one
  pass), i.e. :class:`resfuse.backends.Backend`'s composition. Used when the private ops are missing
  or fail the import-time probe, for dtypes oneDNN does not run here (float64; float16 without
  AVX512-FP16), when ``torch.backends.mkldnn`` is disabled, while ``torch.compile`` traces, when a
  gradient is needed, and whenever it is forced:

  - environment: ``RESFUSE_CPU_PORTABLE=1`` (read at import; tested in a subprocess);
  - process-wide: :func:`set_onednn` ``(False)`` / ``(True)`` / ``(None)`` (back to the environment);
  - per thread: ``with resfuse.cpu_backend.portable():``.

Memory format: as ATen's convolutions choose it — channels_last where the input or the weight suggests
it (a channel slice of a channels_last tensor, or an NCHW input meeting a channels_last 3x3 weight, is
copied to channels_last once, see :func:`_dense`), else NCHW. With a channels_last input (the fast case)
every layer reads and writes NHWC and no reorder happens anywhere. With an NCHW input the weight is not packed
(a packed weight makes oneDNN write NHWC, and the copy back to NCHW per layer costs more than the
pack saves); oneDNN then reorders input and output per layer as eager PyTorch does, so NCHW inference
is only as fast as eager's convolutions. Choose channels_last once at the model's input:
:func:`resfuse.layout.channels_last`.

Threads: the oneDNN primitives run on ATen's intra-op pool, so ``torch.set_num_threads`` applies.
Nothing here is process-global except the optional :func:`set_onednn` switch; caches live on the
folded weight tensors (one per conv module, see ``fold_bn``), so two models, or two threads running one
model, never share mutable state beyond a dict insertion under the GIL.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from . import _extension, cpu_conv
from .backends import Backend, ConvGeom, PostOp, register_backend

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

#: environment variable forcing the portable path (``1``/``true``/``yes``)
ENV_PORTABLE = "RESFUSE_CPU_PORTABLE"
_PACK_ATTR = "_resfuse_onednn_pack"  # attribute of a folded weight tensor: {key: packed weight}
_WINO_ATTR = "_resfuse_winograd"  # attribute of a folded weight tensor: {key: packed Winograd U}
_MAX_PACKS = 4  # packed copies kept per folded weight (one per input shape seen), oldest dropped


def _env_portable() -> bool:
    return os.environ.get(ENV_PORTABLE, "").strip().lower() in ("1", "true", "yes", "on")


_default_onednn: Optional[bool] = None  # None: follow the environment
_local = threading.local()


def set_onednn(enabled: Optional[bool]) -> None:
    """Process-wide: ``False`` forces the portable path, ``True`` allows oneDNN (when it probes OK),
    ``None`` follows ``RESFUSE_CPU_PORTABLE`` again."""
    global _default_onednn
    _default_onednn = enabled


@contextlib.contextmanager
def portable(enabled: bool = True):
    """Context manager: in this thread, force the portable path (``enabled=True``) or allow the
    oneDNN fast path (``enabled=False``) for the enclosed calls."""
    prev = getattr(_local, "onednn", None)
    _local.onednn = not enabled
    try:
        yield
    finally:
        _local.onednn = prev


def onednn_requested() -> bool:
    """Whether the oneDNN fast path is allowed in this thread now (before availability checks)."""
    v = getattr(_local, "onednn", None)
    if v is not None:
        return v
    if _default_onednn is not None:
        return _default_onednn
    return not _ENV_PORTABLE_AT_IMPORT


_ENV_PORTABLE_AT_IMPORT = _env_portable()


# -- detection of the private oneDNN ops --------------------------------------------------------------
class _OneDNN:
    """The private ATen ops, resolved once; ``reason`` is None when they exist and pass a probe."""

    def __init__(self):
        self.conv = self.binary = self.binary_ = self.reorder = None
        self.bf16 = self.fp16 = False
        self.reason = self._resolve()

    def _resolve(self) -> Optional[str]:
        if not torch.backends.mkldnn.is_available():
            return "torch is built without oneDNN (torch.backends.mkldnn.is_available() is False)"
        try:
            mk = torch.ops.mkldnn
            self.conv = mk._convolution_pointwise.default
            self.binary = mk._convolution_pointwise.binary
            self.reorder = mk._reorder_convolution_weight.default
            self.binary_ = mk._convolution_pointwise_.binary
        except (AttributeError, RuntimeError) as e:
            return f"torch.ops.mkldnn fused-convolution ops are missing ({type(e).__name__}: {e})"
        try:
            self.bf16 = bool(mk._is_mkldnn_bf16_supported())
            self.fp16 = bool(mk._is_mkldnn_fp16_supported())
        except (AttributeError, RuntimeError):
            self.bf16 = self.fp16 = False
        return self._probe()

    def _probe(self) -> Optional[str]:
        """Run both ops once on a tiny problem (deterministic data: the global RNG is not touched)
        and compare with ATen; any exception or mismatch disables the fast path."""
        try:
            with torch.no_grad():
                x = (torch.arange(2 * 4 * 5 * 5, dtype=torch.float32).reshape(2, 4, 5, 5).sin()
                     .contiguous(memory_format=torch.channels_last))
                w = torch.arange(6 * 4 * 3 * 3, dtype=torch.float32).reshape(6, 4, 3, 3).cos()
                b = torch.linspace(-1, 1, 6)
                r = torch.linspace(-2, 2, 2 * 6 * 3 * 3).reshape(2, 6, 3, 3).contiguous(
                    memory_format=torch.channels_last)
                pw = self.reorder(w, [1, 1], [2, 2], [1, 1], 1, [2, 4, 5, 5])
                y1 = self.conv(x, pw, b, [1, 1], [2, 2], [1, 1], 1, "relu", [], "")
                y2 = self.binary(x, r, pw, b, [1, 1], [2, 2], [1, 1], 1, "add", 1.0, "relu", [], "")
                y3 = self.binary_(r.clone(memory_format=torch.channels_last), x, pw, b, [1, 1], [2, 2], [1, 1], 1,
                                  "add", 1.0, None, [], "")
                ref = F.conv2d(x, w, b, 2, 1)
                ok = (torch.allclose(y1, ref.relu(), atol=1e-4, rtol=1e-4)
                      and torch.allclose(y2, (ref + r).relu(), atol=1e-4, rtol=1e-4)
                      and torch.allclose(y3, ref + r, atol=1e-4, rtol=1e-4))
            return None if ok else "the oneDNN fused convolution disagrees with ATen on a probe"
        except Exception as e:  # noqa: BLE001 - any failure means: do not use it
            return f"the oneDNN fused convolution failed a probe ({type(e).__name__}: {e})"

    def dtype_ok(self, dtype) -> bool:
        return (dtype == torch.float32 or (dtype == torch.bfloat16 and self.bf16)
                or (dtype == torch.float16 and self.fp16))


_ONEDNN: Optional[_OneDNN] = None
_ONEDNN_LOCK = threading.Lock()


def onednn() -> _OneDNN:
    """The resolved oneDNN ops (probed once per process, lazily)."""
    global _ONEDNN
    if _ONEDNN is None:
        with _ONEDNN_LOCK:
            if _ONEDNN is None:
                _ONEDNN = _OneDNN()
    return _ONEDNN


def onednn_status() -> Optional[str]:
    """``None`` when the fast path can run in this thread, else the reason it cannot."""
    if not onednn_requested():
        return f"forced portable ({ENV_PORTABLE}, set_onednn(False) or portable())"
    if not torch.backends.mkldnn.enabled:
        return "torch.backends.mkldnn.enabled is False"
    return onednn().reason


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last)


def _suggests_cl(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides say channels_last: channels innermost and not NCHW-dense (a dense
    channels_last tensor, or a channel slice of one; not a 1x1 weight, which is both)."""
    return t.stride(1) == 1 and not t.is_contiguous()


def _dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x`` dense in the layout a convolution of ``x`` by ``w`` computes in — channels_last where either
    suggests it, as ATen's convolutions choose — copied only where it is not already: an NCHW tensor
    that meets a channels_last weight (timm's CSPNets call ``.contiguous()`` inside a stage) or a channel
    slice of a channels_last tensor (their ``x.split(c, dim=1)``) then stays on the channels_last path
    (packed weight, channels_last output) instead of taking every later layer to NCHW (timm
    cspresnet50, batch 1: ~9 ms of per-layer copies in a 60 ms forward before)."""
    fmt = torch.channels_last if _suggests_cl(x) or _suggests_cl(w) else torch.contiguous_format
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)


class CpuBackend(Backend):
    name = "cpu"
    post_ops = True  # SiLU, LeakyReLU, ... as oneDNN post-ops of inference convolutions (conv_bias_act)

    def __init__(self):
        from .ops import bn_act, gate_act
        self.prims = bn_act
        self.bn_act_backward_apply_ = bn_act.bn_act_backward_apply_
        self.bn_act_max_pool = bn_act.bn_act_max_pool
        self.max_pool_act_backward = bn_act.max_pool_act_backward
        self.gate_act = gate_act.gate_act
        self.gate_act_backward = gate_act.gate_act_backward

    def available(self) -> Optional[str]:
        if not _extension.LOADED:
            return f"the C++ extension resfuse._C is not built ({_extension.ERROR})"
        return None

    def supports(self, *tensors) -> Optional[str]:
        for t in tensors:
            if t.device.type != "cpu":
                return f"tensor on {t.device}, the cpu backend runs CPU tensors"
            if t.dtype not in _DTYPES:
                return f"dtype {t.dtype} is not one of float32, float64, bfloat16, float16"
        return None

    # -- convolutions: oneDNN, one GEMM or Winograd per shape, by measurement (resfuse/cpu_conv.py) --
    def conv(self, x, w, geom: ConvGeom):
        return cpu_conv.forward(x, w, geom)

    def conv_backward(self, grad_y, x, w, geom: ConvGeom, need_input=True, need_weight=True):
        return cpu_conv.backward(grad_y, x, w, geom, need_input, need_weight)

    def conv_input_grad_add_(self, acc, grad_y, x, w, geom: ConvGeom):
        if cpu_conv.gemm_input_grad_add_(acc, grad_y, x, w, geom):
            return
        super().conv_input_grad_add_(acc, grad_y, x, w, geom)

    # -- inference: conv + bias + residual + ReLU ----------------------------------------------------
    def conv_bias_act(self, x, w, bias, geom: ConvGeom, residual=None, relu=True, consume=False):
        """``act(conv(x, w) + bias[c] + residual)``: one oneDNN call when the fast path applies, or
        — for a 3x3 stride-1 fp32 channels_last layer where it measured faster on the first call —
        a Winograd F(2x2, 3x3) or F(4x4, 3x3) convolution with bias, residual and ReLU in its output
        transform. ``relu``: True (ReLU), False (none) or a :class:`~resfuse.backends.PostOp` (another
        activation: oneDNN's post-op on the fast path; its ``fn`` in place after a Winograd convolution
        and off the fast path). ``consume``: the caller gives ``residual`` up, and oneDNN may
        write the result into it (its in-place form: no new output buffer, see :func:`_onednn_run`)."""
        if not self._fast(x, w, bias, residual):
            return _post(relu, super().conv_bias_act(x, w, bias, geom, residual, relu is True))
        x = _dense(x, w)
        key, names = self._inference_key(x, w, bias, geom, residual, relu)
        trial = cpu_conv.decided("inference", key, names) is None
        consume = consume and not trial  # a trial runs every candidate several times on the residual
        cands = {"onednn": lambda: self._onednn_bias_act(x, w, bias, geom, residual, relu, consume)}
        for tile, name in cpu_conv.WINOGRAD.items():
            if name in names:
                cands[name] = functools.partial(self._winograd_bias_act, x, w, bias, residual, relu, tile)
        y = cpu_conv.pick("inference", key, cands)
        if trial:  # every candidate ran: drop what the losers cached on w
            _forget_losers(w, keep=cpu_conv.decided("inference", key, cands))
        return y

    def plan_token(self):
        return onednn_status() is None, cpu_conv.get_algo()

    def conv_bias_act_step(self, x, w, bias, geom: ConvGeom, residual=None, relu=True):
        """``step(x, residual, consume) -> y``: what :meth:`conv_bias_act` runs for these operands, bound
        to its settled algorithm and packed weight and without its per-call checks — for the inference
        plans of :mod:`resfuse.functional`, which guard what the checks depend on. None while anything
        is unsettled (the first call of a shape times the algorithms; a weight seen once is not
        packed) or off the fast path."""
        if not self._fast(x, w, bias, residual):
            return None
        x = _dense(x, w)  # (the step makes the same copy: _onednn_run, _winograd_run)
        key, names = self._inference_key(x, w, bias, geom, residual, relu)
        name = cpu_conv.decided("inference", key, names)
        if name == "onednn":
            cl = _is_channels_last(x)
            pw = _peek_pack(w, _PACK_ATTR, _pack_key(geom, x)) if cl else w
            return None if pw is None else _onednn_step(pw, bias, geom, relu, cl, x.dtype)
        tile = cpu_conv.winograd_tile(name)
        if tile is None:
            return None
        chunk = cpu_conv.winograd_chunk(x, tile)
        u = _peek_pack(w, _WINO_ATTR, (tile, chunk))
        return None if u is None else functools.partial(_winograd_run, u, bias, relu, chunk, tile)

    @staticmethod
    def _inference_key(x, w, bias, geom: ConvGeom, residual, relu):
        """The trial key of an inference layer and the names of its candidate algorithms."""
        names = ["onednn"]
        if cpu_conv.winograd_applies(x, w, geom) and bias.dtype == x.dtype:
            names += cpu_conv.WINOGRAD.values()
        return (tuple(x.shape), tuple(w.shape), geom, x.dtype, residual is not None, relu), names

    def _onednn_bias_act(self, x, w, bias, geom: ConvGeom, residual, relu, consume=False):
        cl = _is_channels_last(x)
        pw = self._packed(w, geom, x) if cl else w
        return _onednn_step(pw, bias, geom, relu, cl, x.dtype)(x, residual, consume)

    def _winograd_bias_act(self, x, w, bias, residual, relu, tile):
        """Winograd F(tile x tile, 3x3) with the transformed weight prepacked for oneDNN (the GEMMs:
        one P-group 1x1 convolution) and cached on ``w``."""
        chunk = cpu_conv.winograd_chunk(x, tile)
        return _post(relu, cpu_conv.winograd_forward(x, _winograd_packed(w, x, tile, chunk), bias, residual,
                                                     relu is True, chunk, tile))

    def _fast(self, x, w, bias, residual) -> bool:
        if onednn_status() is not None or torch.compiler.is_compiling():
            return False
        ops = _ONEDNN
        if x.dim() != 4 or w.dtype != x.dtype or not ops.dtype_ok(x.dtype):
            return False
        if residual is not None and (residual.dtype != x.dtype or residual.shape[0] != x.shape[0]):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or bias.requires_grad
                                        or (residual is not None and residual.requires_grad)):
            return False  # the private ops have no autograd formula
        return True

    @staticmethod
    def _packed(w: torch.Tensor, geom: ConvGeom, x: torch.Tensor):
        """``w`` prepacked for a channels_last input of ``x``'s shape and dtype (cached on ``w``,
        :func:`_cached_pack`); ``w`` itself on first sight, where oneDNN reorders it internally. (NCHW
        inputs get no packed weight: it makes oneDNN write NHWC, which would then cost a copy back to
        NCHW per layer: measured 1.08x / 1.28x slower on resnet18 / resnet50.)"""
        return _cached_pack(w, _PACK_ATTR, _pack_key(geom, x), lambda: w, lambda d: _ONEDNN.reorder(
            d.contiguous(), list(geom.padding), list(geom.stride), list(geom.dilation), geom.groups,
            list(x.shape)))


def _pack_key(geom: ConvGeom, x: torch.Tensor) -> tuple:
    return tuple(x.shape), x.dtype, geom


def _onednn_step(pw, bias, geom: ConvGeom, relu, cl: bool, dtype):
    """:func:`_onednn_run` bound to a layer's weight (packed or dense), bias and geometry: the
    ``step(x, residual, consume)`` both the regular call and an inference plan run."""
    if bias.dtype != dtype:  # bf16/fp16: oneDNN wants the bias in the activation dtype
        bias = bias.to(dtype)
    return functools.partial(_onednn_run, pw, bias, list(geom.padding), list(geom.stride), list(geom.dilation),
                             geom.groups, relu, cl)


def _onednn_run(pw, bias, pad, stride, dil, groups, relu, cl, x, residual, consume):
    """One oneDNN inference layer: ``act(conv(x, pw) + bias + residual)``, ``act`` a ReLU (``relu``
    True), none (False) or the unary post-op of a :class:`~resfuse.backends.PostOp`. With ``consume`` and a
    residual that may take the result (channels_last, ``x``'s dtype, not sharing ``x``'s memory), the
    in-place form writes into the residual: no output buffer is allocated (resnet50, batch 4, 1 thread:
    the 64->256 1x1 at 56x56 with a fresh output buffer 5.9-11 ms, in place 5.4 ms — a fresh
    12.8 MB buffer is new pages or cold cache)."""
    ops = _ONEDNN
    if cl and not _is_channels_last(x):
        x = x.contiguous(memory_format=torch.channels_last)  # as conv_bias_act did when it made the step
    # oneDNN's fused ReLU post-op maps NaN to 0 (a max instruction); resfuse keeps PyTorch's
    # NaN-in, NaN-out, so the ReLU runs as an in-place pass of its own (a few % of the conv's time).
    # A PostOp's activation is the unary post-op of a convolution without residual (those functional.post_op
    # maps keep NaN and infinities as PyTorch does); after a residual add (the binary op takes no unary
    # post-op but ReLU) it runs in place, as the ReLU does.
    in_conv = residual is None and isinstance(relu, PostOp)  # the activation as the conv's post-op
    if residual is None:
        attr, scalars, algorithm = (relu.attr, list(relu.scalars), relu.algorithm) if in_conv else ("none", [], "")
        y = ops.conv(x, pw, bias, pad, stride, dil, groups, attr, scalars, algorithm)
    elif (consume and cl and residual.dtype == x.dtype and _is_channels_last(residual)
          and residual.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()):
        y = ops.binary_(residual, x, pw, bias, pad, stride, dil, groups, "add", 1.0, None, [], "")
    else:
        y = ops.binary(x, residual, pw, bias, pad, stride, dil, groups, "add", 1.0, None, [], "")
    if relu is True:
        y.relu_()
    elif not in_conv:
        y = _post(relu, y)
    if not cl and not y.is_contiguous():
        y = y.contiguous()  # NCHW in, NCHW out (the packed primitive computes in NHWC/blocked)
    return y


def _winograd_run(u, bias, relu, chunk, tile, x, residual, consume):
    """One Winograd inference layer from its packed transformed weight ``u`` (``consume`` unused)."""
    return _post(relu, torch.ops.resfuse.winograd_conv(x.contiguous(memory_format=torch.channels_last), u, bias,
                                                       residual, relu is True, chunk, tile))


def _post(relu, y: torch.Tensor) -> torch.Tensor:
    """``y`` — a convolution's result with bias, residual and, for ``relu is True``, the ReLU applied —
    with a :class:`~resfuse.backends.PostOp`'s activation applied too, in place: where the
    convolution did not apply it (Winograd's output transform knows the ReLU only, the layer's trial
    then weighs this pass against oneDNN's fused post-op; the portable path)."""
    return relu.fn(y) if isinstance(relu, PostOp) else y


def _peek_pack(w: torch.Tensor, attr: str, key: tuple):
    """The pack :func:`_cached_pack` holds on ``w`` under ``key`` for ``w``'s current version, or None."""
    cache = getattr(w, attr, None)
    if cache is None or cache.get("version") != w._version:
        return None
    return cache.get(key)


def _cached_pack(w: torch.Tensor, attr: str, key: tuple, dense, pack):
    """``pack(dense())`` cached on the (folded, inference) weight ``w`` in its attribute ``attr`` under
    ``key``: guarded by ``w``'s version counter (an in-place change starts over), at most
    :data:`_MAX_PACKS` per attribute (the oldest dropped). At ``w``'s first sight ``dense()`` itself,
    nothing cached: a per-call weight (e.g. the RiR layer's ``W_cat + I``) would otherwise be packed on
    every call and leave its packs behind."""
    cache = getattr(w, attr, None)
    with torch.no_grad():
        if cache is None or cache.get("version") != w._version:
            try:
                setattr(w, attr, {"version": w._version})
            except (AttributeError, RuntimeError):
                pass
            return dense()
        packed = cache.get(key)
        if packed is None:
            packed = pack(dense())
            packs = [k for k in cache if k != "version"]
            if len(packs) >= _MAX_PACKS:
                del cache[packs[0]]
            cache[key] = packed
    return packed


def _forget_losers(w: torch.Tensor, keep: str) -> None:
    """Drop the packed weights of the forms that lost the trial on ``w`` (``keep`` won): a Winograd
    transform is P/9 of the weight (4x for F(4x4)), oneDNN's pack 1x — for resnet50 every 3x3 layer
    would otherwise keep all three (resnet50, batch 1, RSS growth over warm-up: +412 MiB when every
    form's dense and packed transform stayed cached, +239 MiB with only the winners' packs). A later
    shape that chooses a dropped form packs it again, once."""
    for attr in (_WINO_ATTR, _PACK_ATTR):
        cache = getattr(w, attr, None)
        if cache is None:
            continue
        for k in [k for k in cache if k != "version"]:
            name = cpu_conv.WINOGRAD[k[0]] if attr == _WINO_ATTR else "onednn"
            if name != keep:
                del cache[k]


def _winograd_packed(w: torch.Tensor, x: torch.Tensor, tile: int, chunk: int) -> torch.Tensor:
    """``cpu_conv.winograd_weight(w, tile=tile)`` prepacked for ``x``'s GEMM input of ``chunk`` tiles,
    cached on ``w`` like the oneDNN packs (:func:`_cached_pack`, keyed by ``(tile, chunk)``). Only
    packs are kept, not the dense transform: it is recomputed for a new shape (one small GEMM)."""
    return _cached_pack(w, _WINO_ATTR, (tile, chunk), lambda: cpu_conv.winograd_weight(w, tile=tile),
                        lambda u: cpu_conv._packed(x, u, chunk, tile))


register_backend("cpu", CpuBackend)
