"""Fused units as functions of existing ``nn.Conv2d`` / ``nn.BatchNorm2d`` modules.

The modules of ``resfuse.nn`` are thin shells around these functions; they take the *modules* (not
bare tensors) so that BatchNorm's running statistics, ``momentum``, ``num_batches_tracked``,
``track_running_stats`` and ``affine`` behave exactly like ``nn.BatchNorm2d``, and so that folded
inference weights can be cached per module.

Shapes: ``x`` is ``[N, C_in, H, W]`` (NCHW or channels_last, float32/float64/bfloat16/float16); the
output has the conv's output shape and ``x``'s memory format. Under ``torch.autocast`` activations and
conv weights run in the autocast dtype while BN parameters and statistics stay float32.

Three paths, chosen per call:

* **reference** (backend ``reference``, or a case the fused path does not cover — e.g. a conv with a
  bias or string padding): the modules themselves, i.e. plain PyTorch.
* **inference** (every BN uses running statistics and no gradient is needed): BN folded into the conv
  weight and a bias, then ``backend.conv_bias_act`` — conv + bias + residual + ReLU in one call (or
  another activation, as a post-op where the backend takes one: :func:`post_op`).
* **training** (anything else): ``ConvBNChainFunction`` (``resfuse/ops/chain.py``), one autograd node.
"""
from __future__ import annotations

import functools
import weakref
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends
from .backends import PostOp
from .ops import bn_act as prim
from .ops.chain import ChainSpec, ConvBNChainFunction, LayerSpec, as_dtype
from .ops.gate_act import ChannelMeanFunction, GateActFunction, gate_matrix

Shortcut = Union[None, torch.Tensor, Tuple[torch.Tensor, nn.Conv2d, nn.BatchNorm2d]]

def conv_bn_act(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: Shortcut = None,
                relu: bool = True, act: Optional[nn.Module] = None) -> torch.Tensor:
    """``act(bn(conv(x)) + residual)``; ``residual`` is None, a tensor of the output's shape, or a
    projection ``(x_s, conv_s, bn_s)`` meaning ``bn_s(conv_s(x_s))``. ``act`` is a ReLU (``relu=True``),
    none (``relu=False``) or, when given, the module ``act`` (``relu`` is then not used) — any module
    of one tensor, e.g. the ``nn.SiLU`` or ``nn.LeakyReLU`` of timm's ``ConvNormAct`` units; an
    ``nn.ReLU`` / ``nn.Identity`` is the unit's own fused ReLU / none. For another module the fused
    unit computes ``bn(conv(x)) + residual`` and calls ``act`` on it, except in inference on the
    ``cpu`` backend's oneDNN path, where an activation :func:`post_op` maps is the convolution's
    post-op (no pass of its own)."""
    if act is not None:
        if not isinstance(act, nn.Module):
            raise TypeError(f"resfuse: act must be an nn.Module (e.g. nn.SiLU()), got {type(act).__name__}")
        relu = type(act) is nn.ReLU
        if relu or type(act) is nn.Identity:
            act = None
    return _chain(x, ((conv, bn),), residual, relu and act is None, None, act=act)


def _silu_(t):
    return F.silu(t, inplace=True)


def _hardswish_(t):
    return F.hardswish(t, inplace=True)


def post_op(act: nn.Module) -> Optional[PostOp]:
    """The oneDNN post-op computing the activation module ``act`` (no hooks, exact type), or None.

    Mapped: ``nn.SiLU`` (oneDNN's ``swish``), ``nn.LeakyReLU``, ``nn.Hardswish``, ``nn.GELU(approximate=
    "tanh")``, ``nn.Sigmoid``, ``nn.Tanh`` — the post-ops whose results were checked equal to
    PyTorch's, NaN and infinities included (tests/test_activations.py). Not mapped (the module runs
    after the convolution): ``nn.ReLU6``/``nn.Hardtanh`` and ``nn.Hardsigmoid`` (oneDNN's clamps map NaN
    to a number, as its ReLU does), the exact ``nn.GELU`` (oneDNN's maps +inf to NaN), anything else.
    """
    t = type(act)
    if hooked(act):
        return None
    if t is nn.SiLU:
        return PostOp("swish", (), "", _silu_)
    if t is nn.LeakyReLU:
        slope = float(act.negative_slope)
        return PostOp("leaky_relu", (slope,), "", functools.partial(F.leaky_relu, negative_slope=slope, inplace=True))
    if t is nn.Hardswish:
        return PostOp("hardswish", (), "", _hardswish_)
    if t is nn.GELU and act.approximate == "tanh":
        return PostOp("gelu", (), "tanh", functools.partial(F.gelu, approximate="tanh"))
    if t is nn.Sigmoid:
        return PostOp("sigmoid", (), "", torch.sigmoid_)
    if t is nn.Tanh:
        return PostOp("tanh", (), "", torch.tanh_)
    return None


def conv_bn_chain(x: torch.Tensor, layers: Sequence[Tuple[nn.Conv2d, nn.BatchNorm2d]],
                  shortcut: Shortcut = None, relu: bool = True,
                  weights: Optional[Sequence[torch.Tensor]] = None, consume: bool = False) -> torch.Tensor:
    """``act(bn_k(conv_k(relu(bn_{k-1}(...relu(bn_0(conv_0(x))))))) + shortcut)``.

    ``layers``: ``(conv, bn)`` pairs (k ≥ 1); ReLU after every BN but the last; the shortcut (see
    :func:`conv_bn_act`) is added after the last BN and before the final activation (``relu``).
    ``weights``: optional per-layer tensors used instead of ``conv.weight`` (same shape; e.g. the RiR
    layer's ``W_cat + I_partial``); gradients flow to them.
    ``consume``: the caller gives a tensor ``shortcut`` up — nothing reads it afterwards, nothing else
    holds it — so inference may write the result into its memory instead of a new buffer (the
    result of a projection shortcut, which resfuse makes itself, is always used so).
    Returns ``[N, C_out, H_out, W_out]`` in ``x``'s memory format.
    """
    return _chain(x, layers, shortcut, relu, weights, None, consume)


def conv_bn_act_pool(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, pool: nn.Module) -> torch.Tensor:
    """``pool(relu(bn(conv(x))))``: a ResNet stem.

    ``pool`` is called as the module it is, except a plain ``nn.MaxPool2d`` (dilation 1, floor mode,
    no indices, no hooks, at most 255 window elements) on the training path of a backend with a fused
    ``bn_act_max_pool`` (``cpu``): BN-apply, ReLU and max-pool are then one pass inside the one
    autograd node, which keeps only ``x`` and a uint8 window argmax for backward and recomputes the
    conv output there, where eager keeps the conv output, the ReLU output and int64 indices. Returns
    ``[N, C_out, H_pool, W_pool]`` in ``x``'s memory format.
    """
    geom = _pool_geom(pool)
    if geom is None:
        return pool(conv_bn_act(x, conv, bn))
    return _chain(x, ((conv, bn),), None, True, None, (pool, geom))


def _pool_geom(pool: nn.Module):
    """``(kernel_size, stride, padding)`` pairs of a max-pool the fused stem can run, else None."""
    if type(pool) is not nn.MaxPool2d or hooked(pool) or pool.ceil_mode or pool.return_indices:
        return None
    k, s, p, d = (nn.modules.utils._pair(v) for v in (pool.kernel_size, pool.stride or pool.kernel_size,
                                                      pool.padding, pool.dilation))
    if d != (1, 1) or k[0] * k[1] > 255:
        return None
    return k, s, p


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """``x.mean((2, 3), keepdim=True)``, ``[N, C, 1, 1]`` (the squeeze of a squeeze-and-excitation
    block): the same values, but its gradient reaches ``x`` as a broadcast view that autograd adds into
    ``x``'s other gradient in place, where ATen's mean writes a full tensor first
    (``resfuse.ops.gate_act.ChannelMeanFunction``)."""
    if not torch.is_grad_enabled() or not x.requires_grad or x.dim() != 4:
        return x.mean((2, 3), keepdim=True)
    return ChannelMeanFunction.apply(x)


def gate_act(x: torch.Tensor, gate: torch.Tensor, residual: Optional[torch.Tensor] = None,
             relu: bool = True) -> torch.Tensor:
    """``act(x * gate + residual)``: the end of a squeeze-and-excitation block. ``x`` ``[N, C, H, W]``
    (NCHW or channels_last, float32/float64/bfloat16/float16), ``gate`` ``[N, C, 1, 1]`` (one value per
    image and channel, any float dtype), ``residual`` None or like ``x`` (cast to ``x``'s dtype, as
    ``x += residual`` does); ``act`` a ReLU when ``relu``. On a backend with a fused ``gate_act`` (``cpu``)
    one pass forward and one backward, one autograd node; elsewhere (or for another ``gate`` shape)
    PyTorch ops in timm's order: ``y = x * gate; y += residual; relu_(y)``. Returns a tensor like ``x``
    in its memory format."""
    be = backends.select("gate_act", x)
    fused = (be.gate_act is not None and x.dim() == 4 and tuple(gate.shape) == (*x.shape[:2], 1, 1)
             and gate.dtype.is_floating_point and (residual is None or residual.shape == x.shape))
    if not fused:
        backends.note_used("gate_act", "reference")
        y = x * gate
        if residual is not None:
            y += residual
        return torch.relu_(y) if relu else y
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or gate.requires_grad
                                    or (residual is not None and residual.requires_grad)):
        return GateActFunction.apply(be.name, x, gate, residual, bool(relu))
    return be.gate_act(x, gate_matrix(gate, x), residual, bool(relu))  # inference: no autograd node


def qualname(cls: type) -> str:
    """``module.QualName`` of a class: how resfuse recognises classes it does not import (timm's, torchvision's)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def hooked(m: nn.Module) -> bool:
    """Whether ``m`` has hooks of its own (a fused forward that does not call ``m`` would skip them)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _pooled(h: torch.Tensor, pool) -> torch.Tensor:
    return h if pool is None else pool[0](h)


def _chain(x, layers, shortcut, relu, weights, pool=None, consume=False, act=None):
    """:func:`conv_bn_chain` with an optional ``pool = (max-pool module, geometry)`` after the final
    ReLU (no shortcut), or an activation module ``act`` instead of the final ReLU (``relu`` False; see
    :func:`conv_bn_act`)."""
    post = None if act is None else post_op(act)
    # (a chain whose first BN is in training mode never runs the inference path: no plan to look for)
    sig = _plan_sig(x, layers, shortcut, relu, pool, act, post) \
        if weights is None and not layers[0][1].training else None
    if sig is not None:
        y = _run_plan(sig, x, layers, shortcut, pool, consume)
        if y is not None:
            return y
    _check(x, layers, shortcut)
    if weights is not None:
        weights = tuple(weights)
        for i, ((conv, _), w) in enumerate(zip(layers, weights)):
            if w.shape != conv.weight.shape:
                raise ValueError(f"resfuse: weights[{i}] has shape {tuple(w.shape)}, layers[{i}].conv expects "
                                 f"{tuple(conv.weight.shape)}")
        if len(weights) != len(layers):
            raise ValueError(f"resfuse: {len(weights)} weights for {len(layers)} layers")
    why = _unfusable(layers, shortcut)
    be = backends.select("conv_bn_chain", x) if why is None else backends.instance("reference")[0]
    if be.name == "reference":
        y = _pooled(_plain(x, layers, shortcut, relu, weights), pool)
        return y if act is None else act(y)

    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return _dispatch(be, x.to(dt), layers, shortcut, relu, dt, weights, pool, consume, None, act, post)
    return _dispatch(be, x, layers, shortcut, relu, None, weights, pool, consume, sig, act, post)


def _dispatch(be, x, layers, shortcut, relu, cast, weights=None, pool=None, consume=False, plan=None, act=None,
              post=None):
    override = {id(conv): w for (conv, _), w in zip(layers, weights)} if weights is not None else {}

    def w_of(conv):
        w = override.get(id(conv), conv.weight)
        return w if cast is None else w.to(cast)

    proj = isinstance(shortcut, tuple)
    all_bns = [bn for _, bn in _pairs(layers, shortcut)]
    if isinstance(shortcut, torch.Tensor) and shortcut.dtype != x.dtype:
        shortcut = shortcut.to(x.dtype)
    if proj and cast is not None:
        shortcut = (shortcut[0].to(cast), shortcut[1], shortcut[2])

    batch_stats = [_uses_batch_stats(bn) for bn in all_bns]
    if not any(batch_stats) and not _needs_grad(x, layers, shortcut, weights):
        return _pooled(_inference(be, x, layers, shortcut, relu, cast, override, consume, plan, act, post), pool)

    specs = tuple(_layer_spec(conv, bn) for conv, bn in layers)
    flat = []
    for (conv, bn) in layers:
        flat += [w_of(conv), bn.weight, bn.bias, *_running(bn)]
    on_x = False
    if proj:
        xs, conv_s, bn_s = shortcut
        on_x = xs is x
        flat += ([] if on_x else [xs]) + [w_of(conv_s), bn_s.weight, bn_s.bias, *_running(bn_s)]
        kind, spec_s = "projection", _layer_spec(conv_s, bn_s)
    elif shortcut is x:
        kind, spec_s = "identity", None
    elif shortcut is not None:
        flat.append(shortcut)
        kind, spec_s = "tensor", None
    else:
        kind, spec_s = "none", None
    sync, group = _sync_of(all_bns)
    fuse_pool = pool is not None and be.bn_act_max_pool is not None
    spec = ChainSpec(specs, kind, spec_s, on_x, bool(relu), sync, group, pool[1] if fuse_pool else None)
    out, *stats = ConvBNChainFunction.apply(spec, be.name, x, *flat)
    with torch.no_grad():
        for j, bn in enumerate(all_bns):
            if batch_stats[j]:
                _update_running(bn, stats[2 * j], stats[2 * j + 1])
    out = out if fuse_pool else _pooled(out, pool)
    return out if act is None else act(out)


def _out_hw(h, w, conv):
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    return ((h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1,
            (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1)


# -- inference: BN folded into the conv --------------------------------------------------------------
_FOLD_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: Optional[torch.dtype] = None,
            weight: Optional[torch.Tensor] = None):
    """``(w', b')`` with ``conv(x, w') + b' == bn(conv(x))`` for ``bn`` in eval mode.

    ``w'`` has the conv weight's dtype (or ``dtype``), ``b'`` is float32 (float64 for float64 weights).
    Cached per conv module and invalidated when any of the tensors involved changes (their version
    counters, identities, storage (``param.data = ...``), dtype or device) — so an optimizer step, ``load_state_dict``, ``.to()`` or
    a manual in-place edit is seen by the next call. ``weight`` replaces ``conv.weight`` (cached too,
    by identity: a layer that passes the same override tensor again gets the same folded weight, and
    so the same oneDNN pack and Winograd transform).
    """
    w = conv.weight if weight is None else weight
    dtype = dtype or w.dtype
    tensors = (w, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    # The entry keeps the weight it was made from alive and must find that very object again: an
    # override weight (e.g. the RiR layer's cached W_cat + P) may be a fresh tensor whose id and
    # storage address repeat those of a freed one.
    cache = not torch.compiler.is_compiling()
    key = None
    if cache:
        key = (dtype, bn.eps) + tuple((id(t), t._version, t.data_ptr(), t.device, t.dtype) if t is not None
                                      else None for t in tensors)
        hit = _FOLD_CACHE.get(conv)
        if hit is not None and hit[0] == key and hit[3] is w:
            return hit[1], hit[2]
    with torch.no_grad():
        sd = torch.float64 if w.dtype == torch.float64 else torch.float32
        scale = torch.rsqrt(bn.running_var.to(sd) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(sd)
        bias = -bn.running_mean.to(sd) * scale
        if bn.bias is not None:
            bias = bias + bn.bias.to(sd)
        wf = (w.to(sd) * scale.view(-1, 1, 1, 1)).to(dtype)
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            wf = wf.contiguous(memory_format=torch.channels_last)
    if cache:
        _FOLD_CACHE[conv] = (key, wf, bias, w)
    return wf, bias


def _inference(be, x, layers, shortcut, relu, cast, override, consume=False, plan=None, act=None, post=None):
    """The folded layers through ``be.conv_bias_act``; with ``plan`` (a :func:`_plan_sig`), each
    layer's :meth:`~resfuse.backends.Backend.conv_bias_act_step` is collected as well and, when every
    layer has one, stored as the chain's inference plan (:func:`_run_plan`). A final activation module
    ``act`` goes to the last layer as its ``post`` op where the backend takes post-ops, else it is
    called on the result."""
    final = post if post is not None and be.post_ops else relu
    after = act if act is not None and final is not post else None
    steps = [] if plan is not None else None
    res = shortcut
    if isinstance(shortcut, tuple):
        xs, conv_s, bn_s = shortcut
        ws, bs = fold_bn(conv_s, bn_s, cast)
        g = backends.ConvGeom.of(conv_s)
        res = be.conv_bias_act(xs, ws, bs, g, None, False)
        if steps is not None:
            steps.append(be.conv_bias_act_step(xs, ws, bs, g, None, False))
        consume = True  # made here: nobody else holds it
    h = x
    last = len(layers) - 1
    for i, (conv, bn) in enumerate(layers):
        wf, bf = fold_bn(conv, bn, cast, override.get(id(conv)))
        g = backends.ConvGeom.of(conv)
        r, a = (res, final) if i == last else (None, True)
        y = be.conv_bias_act(h, wf, bf, g, r, a, consume and i == last)
        if steps is not None:  # after the call: it settles the algorithm and the packed weight
            steps.append(be.conv_bias_act_step(h, wf, bf, g, r, a))
        h = y
    if steps is not None and all(st is not None for st in steps):
        _store_plan(plan, be, layers, shortcut, steps, after)
    return h if after is None else after(h)


# -- inference plans: a chain's settled layer calls, replayed while nothing they depend on changes --
# A fused block's inference path makes ~20 Python-level decisions per call (backend, folding, fast
# path, algorithm, pack; ~140 us per resnet50 bottleneck on top of its kernels). Once they are settled
# for an input signature, the backend's bound calls are kept per chain and replayed, guarded by the
# identity, version counter and storage of every parameter and buffer they were made from (as
# fold_bn's cache) and by the backend's own state (e.g. oneDNN on or off, threads).
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_MAX_PLANS = 4  # input signatures kept per chain (the oldest dropped)


class _Plan:
    __slots__ = ("backend", "token", "refs", "state", "proj", "steps", "after")

    def run(self, x, shortcut, pool, consume):
        res = shortcut
        steps = self.steps
        if self.proj:
            res = steps[0](shortcut[0], None, False)
            consume = True
            steps = steps[1:]
        h = x
        for st in steps[:-1]:
            h = st(h, None, False)
        h = steps[-1](h, res, consume)
        backends.note_used("conv_bn_chain", self.backend.name)
        if self.after is not None:
            h = self.after(h)
        return h if pool is None else pool[0](h)


def _plan_sig(x, layers, shortcut, relu, pool, act=None, post=None):
    """What a plan is made for: the input's shape, strides and dtype, the chain's modules and their
    settings, the shortcut's kind (and a tensor shortcut's layout), grad mode, the backend choice and
    threads; None where no plan applies (autocast, torch.compile, tensor subclasses, parametrized
    weights, an input or shortcut that requires grad while grad mode is on). With grad mode on (e.g. a
    frozen backbone inside a training loop) a plan exists only if no parameter required grad when it
    was made, and replays only while none does (:func:`_tensor_state`)."""
    if type(x) is not torch.Tensor or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return None
    grad = torch.is_grad_enabled()
    if isinstance(shortcut, tuple):
        xs = shortcut[0]
        sc = (1, None if xs is x else (xs.shape, xs.stride(), xs.dtype, xs.device))
        if grad and xs.requires_grad:
            return None
    elif shortcut is None:
        sc = None
    elif type(shortcut) is torch.Tensor:
        sc = (2, shortcut.shape, shortcut.stride(), shortcut.dtype, shortcut.device)
        if grad and shortcut.requires_grad:
            return None
    else:
        return None
    if grad and x.requires_grad:
        return None
    mods = []
    for c, b in _pairs(layers, shortcut):
        if "weight" not in c._parameters or type(c).forward is not nn.Conv2d.forward:
            return None
        mods += (id(c), id(b), c.stride, c.padding, c.dilation, c.groups, c.padding_mode, b.eps, b.training)
    return (x.shape, x.stride(), x.dtype, x.device, sc, bool(relu), None if pool is None else (id(pool[0]), pool[1]),
            None if act is None else (id(act), post), grad, backends.get_backend_name(), torch.get_num_threads(),
            tuple(mods))


def _pairs(layers, shortcut) -> list:
    """The chain's ``(conv, bn)`` pairs, the projection's last."""
    return list(layers) + ([shortcut[1:]] if isinstance(shortcut, tuple) else [])


def _plan_tensors(layers, shortcut) -> list:
    ts = []
    for c, b in _pairs(layers, shortcut):
        cp, bp, bb = c._parameters, b._parameters, b._buffers
        ts += (cp.get("weight"), cp.get("bias"), bp.get("weight"), bp.get("bias"), bb.get("running_mean"),
               bb.get("running_var"))
    return ts


def _tensor_state(ts) -> tuple:
    return tuple(None if t is None else (t._version, t.data_ptr(), t.requires_grad) for t in ts)


def _store_plan(sig, be, layers, shortcut, steps, after=None) -> None:
    plan = _Plan()
    plan.after = after
    plan.backend, plan.token = be, be.plan_token()
    plan.refs = _plan_tensors(layers, shortcut)
    plan.state = _tensor_state(plan.refs)
    plan.proj = isinstance(shortcut, tuple)
    plan.steps = tuple(steps)
    plans = _PLANS.setdefault(layers[0][0], {})
    if sig not in plans and len(plans) >= _MAX_PLANS:
        for oldest in list(plans)[:1]:  # (a copy and pop: another thread may change the dict meanwhile)
            plans.pop(oldest, None)
    plans[sig] = plan


def _run_plan(sig, x, layers, shortcut, pool, consume):
    """The chain's output through its stored plan for ``sig``, or None (no plan, or a stale one,
    which is dropped: the caller's regular path then runs and may store a new one)."""
    plans = _PLANS.get(layers[0][0])
    plan = None if plans is None else plans.get(sig)
    if plan is None:
        return None
    ts = _plan_tensors(layers, shortcut)
    if (plan.backend.plan_token() != plan.token or any(a is not b for a, b in zip(ts, plan.refs))
            or _tensor_state(ts) != plan.state):
        plans.pop(sig, None)
        return None
    return plan.run(x, shortcut, pool, consume)


# -- helpers -------------------------------------------------------------------------------------------
def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or bn.running_mean is None


def _running(bn):
    if _uses_batch_stats(bn):
        return [None, None]
    return [bn.running_mean, bn.running_var]


def _layer_spec(conv, bn) -> LayerSpec:
    return LayerSpec(backends.ConvGeom.of(conv), float(bn.eps), _uses_batch_stats(bn), bn.weight is not None)


def _needs_grad(x, layers, shortcut, weights=None) -> bool:
    if not torch.is_grad_enabled():
        return False
    ts = [x, *(weights or ())]
    for conv, bn in layers:
        ts += [conv.weight, bn.weight, bn.bias]
    if isinstance(shortcut, tuple):
        ts += [shortcut[0], shortcut[1].weight, shortcut[2].weight, shortcut[2].bias]
    elif shortcut is not None:
        ts.append(shortcut)
    return any(t is not None and t.requires_grad for t in ts)


def _sync_of(bns):
    syncs = [isinstance(bn, nn.SyncBatchNorm) for bn in bns]
    if not any(syncs) or not any(bn.training for bn in bns):
        return False, None  # nn.SyncBatchNorm syncs only in training mode
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return False, None  # like nn.SyncBatchNorm outside a process group: plain BN
    groups = {id(bn.process_group) for bn in bns if isinstance(bn, nn.SyncBatchNorm)}
    if not all(syncs) or len(groups) != 1:
        raise ValueError("resfuse: a fused chain must use SyncBatchNorm with one process group in every "
                         "layer or in none")
    return True, bns[0].process_group


def _update_running(bn: nn.BatchNorm2d, mean: torch.Tensor, unbiased: torch.Tensor) -> None:
    """Running-statistics update exactly as ``nn.BatchNorm2d`` does it (``unbiased`` batch variance,
    ``momentum=None`` → cumulative average, ``num_batches_tracked``)."""
    if not (bn.training and bn.track_running_stats):
        return
    rm, rv = bn.running_mean, bn.running_var
    if (bn.momentum is not None and prim.params_in_cpp(rm) and rm.dtype == rv.dtype == mean.dtype
            and rm.is_contiguous() and rv.is_contiguous()):
        prim.bn_running_update_(rm, rv, bn.num_batches_tracked, mean, unbiased, bn.momentum)
        return
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        factor = 1.0 / bn.num_batches_tracked.to(torch.float64)
        rm.add_(((mean.to(torch.float64) - rm) * factor).to(rm.dtype))
        rv.add_(((unbiased.to(torch.float64) - rv) * factor).to(rv.dtype))
    else:
        m = bn.momentum
        rm.mul_(1 - m).add_(as_dtype(mean, rm.dtype), alpha=m)
        rv.mul_(1 - m).add_(as_dtype(unbiased, rv.dtype), alpha=m)


def _unfusable(layers, shortcut) -> Optional[str]:
    pairs = _pairs(layers, shortcut)
    convs, bns = [c for c, _ in pairs], [b for _, b in pairs]
    for c in convs:
        if c.bias is not None:
            return "conv has a bias"
        if isinstance(c.padding, str) or c.padding_mode != "zeros":
            return "conv padding is not explicit zero padding"
    for b in bns:
        if b.training and b.track_running_stats and b.momentum is not None and not isinstance(b.momentum, float):
            return "BN momentum is not a float"
    return None


def _plain(x, layers, shortcut, relu, weights=None):
    h = x
    last = len(layers) - 1
    for i, (conv, bn) in enumerate(layers):
        h = bn(conv(h) if weights is None else conv._conv_forward(h, weights[i], None))
        if i < last:
            h = torch.relu(h)
    if isinstance(shortcut, tuple):
        xs, conv_s, bn_s = shortcut
        h = h + bn_s(conv_s(xs))
    elif shortcut is not None:
        h = h + shortcut
    return torch.relu(h) if relu else h


def _check(x, layers, shortcut) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"resfuse: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"resfuse: x must be a 4-D [N, C, H, W] tensor, got {x.dim()}-D shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"resfuse: x must be a floating-point tensor, got {x.dtype}")
    if len(layers) == 0:
        raise ValueError("resfuse: layers must hold at least one (conv, bn) pair")
    h, w = x.shape[2], x.shape[3]
    c = x.shape[1]
    for i, (conv, bn) in enumerate(layers):
        _check_pair(conv, bn, c, f"layers[{i}]", x)
        h2, w2 = _out_hw(h, w, conv) if not isinstance(conv.padding, str) else (h, w)
        if h2 <= 0 or w2 <= 0:
            raise ValueError(f"resfuse: layers[{i}].conv kernel {tuple(conv.kernel_size)} (dilation "
                             f"{tuple(conv.dilation)}) is larger than its padded input {h}x{w}")
        h, w, c = h2, w2, conv.out_channels
    out_shape = (x.shape[0], c, h, w)
    if isinstance(shortcut, tuple):
        if len(shortcut) != 3:
            raise ValueError("resfuse: a projection shortcut is (x_s, conv_s, bn_s)")
        xs, conv_s, bn_s = shortcut
        if xs.dim() != 4:
            raise ValueError(f"resfuse: shortcut input must be 4-D, got shape {tuple(xs.shape)}")
        _check_pair(conv_s, bn_s, xs.shape[1], "shortcut", xs)
        hs, ws = _out_hw(xs.shape[2], xs.shape[3], conv_s)
        if (xs.shape[0], conv_s.out_channels, hs, ws) != out_shape:
            raise ValueError(f"resfuse: shortcut output shape {(xs.shape[0], conv_s.out_channels, hs, ws)} "
                             f"differs from the main branch's {out_shape}")
    elif shortcut is not None:
        if not isinstance(shortcut, torch.Tensor):
            raise TypeError(f"resfuse: residual must be a Tensor or (x_s, conv_s, bn_s), got {type(shortcut).__name__}")
        if tuple(shortcut.shape) != out_shape:
            raise ValueError(f"resfuse: residual must have the output's shape {list(out_shape)}, "
                             f"got {list(shortcut.shape)}")
        if shortcut.device != x.device:
            raise ValueError(f"resfuse: residual is on {shortcut.device} but x is on {x.device}")


def _check_pair(conv, bn, in_channels, where, x):
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"resfuse: {where}.conv must be nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"resfuse: {where}.bn must be a BatchNorm2d, got {type(bn).__name__}")
    if in_channels != conv.in_channels:
        raise ValueError(f"resfuse: {where}.conv expects {conv.in_channels} input channels, got {in_channels} "
                         f"(input shape {tuple(x.shape)})")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"resfuse: {where}.bn has {bn.num_features} features but the conv gives "
                         f"{conv.out_channels} channels")
    if conv.weight.device != x.device:
        raise ValueError(f"resfuse: {where}.conv weight is on {conv.weight.device} but the input is on {x.device}")
    if conv.weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"resfuse: {where}.conv weight is {conv.weight.dtype} but the input is {x.dtype} "
                        "(use the same dtype, or torch.autocast)")
