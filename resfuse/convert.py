"""``resfuse.fuse(model)``: swap the ResNet parts of an existing model for fused modules; ``unfuse`` and
``explain`` (``resfuse.explain(model)``).

Recognition is by structure, never by import: a module is swapped when its class is one of the known
classes of :data:`PATTERNS` — named by ``module.QualName`` (torchvision, timm, ``resfuse.reference``, so
neither torchvision nor timm is imported here) — or a subclass that does not override their ``forward``
(or torchvision's ``_forward_impl``), *and* its children have exactly the names and types of the pattern.
Anything else is left as it is; :func:`explain_model` says why for every candidate and every BatchNorm
that stays unfused.

Swapped modules are new objects of the fused class holding the *same* child modules (so the same
Parameter and buffer objects, and the same ``state_dict`` keys) and the original's other instance
attributes and hooks; the original class is remembered (as a string) for :func:`unfuse`.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
from typing import NamedTuple

import torch
from torch import nn

from . import backends
from . import functional as RF
from . import models as fmodels
from . import nn as fnn
from .testing import rel_error, tolerance

__all__ = ["PATTERNS", "FusedByobBasicBlock", "FusedByobBottleneck", "FusedConvNormAct", "FusedSequential",
           "explain_model", "fuse", "unfuse"]

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)
_ORIGIN = "_resfuse_unfused"  # instance attribute of a swapped module: "module.QualName" of its original class
_CONTAINERS = ("_parameters", "_buffers", "_modules")
_FORWARD_METHODS = ("forward", "_forward_impl")  # _forward_impl: torchvision ResNet.forward's body
_SEQUENTIAL = "torch.nn.modules.container.Sequential"
_ABSORBED_ROLES = ("conv", "bn", "bnact", "relu", "identity")  # children the fused forward runs itself
_BN_ACT = "timm.layers.norm_act.BatchNormAct2d"


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose ``Conv2d → BatchNorm2d (→ activation)`` runs each execute as one fused
    unit (:func:`resfuse.functional.conv_bn_act`); every other child runs as in ``nn.Sequential``.

    It keeps the Sequential's children under their names, so ``state_dict`` keys are unchanged (a
    ``ConvBNAct`` would rename ``0.weight`` to ``conv.weight``). Runs are found on each call from the
    children's exact types (``nn.Conv2d``; ``nn.BatchNorm2d``/``nn.SyncBatchNorm``; ``nn.ReLU``, or an
    activation :func:`resfuse.functional.post_op` maps, e.g. the ``nn.SiLU`` / ``nn.Hardswish`` of
    torchvision's ``Conv2dNormActivation``), so editing the Sequential afterwards stays correct. Hooks on
    the children of a run do not fire (an activation with hooks is not part of a run: it is called).
    """

    def forward(self, x):
        mods = list(self)
        i = 0
        while i < len(mods):
            n = _run_length(mods, i)
            if n:
                x = RF.conv_bn_act(x, mods[i], mods[i + 1], relu=False, act=mods[i + 2] if n == 3 else None)
            else:
                x, n = mods[i](x), 1
            i += n
        return x


class FusedConvNormAct(nn.Module):
    """timm's ``ConvNormAct`` — ``conv`` → ``bn`` (a ``BatchNormAct2d``: BN, ``drop``, ``act``) → optional
    ``aa`` — with the conv and the BN as one fused unit (:func:`resfuse.functional.conv_bn_act`); same
    children and ``state_dict`` keys. The BN's ``act`` and ``drop`` are looked at on every call: a ReLU
    (or ``nn.Identity``) is fused; with an ``nn.Identity`` ``drop`` any other activation is the fused
    unit's ``act`` (SiLU, LeakyReLU, ...: a oneDNN post-op in CPU inference, see
    :func:`resfuse.functional.post_op`); any other ``drop`` runs, then ``act``, as timm runs them."""

    def forward(self, x):
        conv, bn, aa = self.conv, self.bn, self._modules.get("aa")
        act, drop = bn.act, bn.drop
        if type(drop) is not nn.Identity:
            x = act(drop(RF.conv_bn_act(x, conv, bn, relu=False)))
        else:
            x = RF.conv_bn_act(x, conv, bn, act=act)
        return x if aa is None else aa(x)


class _FusedByobBlock(nn.Module):
    """timm byobnet's blocks (``resnet33ts``, ``resnext26ts``, ``gernet``, RegNetZ, ...): their conv-BN units
    are fused ``ConvNormAct`` units of their own; here the last one also adds the shortcut and applies the
    block's activation — ``act(bn(conv(h)) + shortcut)`` as one fused unit (a ReLU in its BN pass, SiLU
    & co. as :func:`resfuse.functional.conv_bn_act`'s ``act``), a ``ConvNormAct`` projection shortcut
    fused into it as a projection. Where anything between them computes (``attn_last``, ``drop_path``
    not ``nn.Identity``), the last unit is not a plain fused conv-BN, the block has no shortcut, or hooks
    sit on a module the fused tail would not call, the block runs timm's own sequence with its units."""

    def _attend(self, h):
        """``self.attn(h)``; a timm SE / ECA module as ``h * gate`` with the gate computed as the fused
        ResNet blocks compute it (``resfuse.nn.blocks.channel_gate``: its 1x1 layers as GEMMs)."""
        gate = fnn.blocks.channel_gate(self.attn, h)
        return self.attn(h) if gate is None else h * gate

    def _tail(self, h, x, last):
        sc, act = self.shortcut, self.act
        if (sc is None or type(self.attn_last) is not nn.Identity or type(self.drop_path) is not nn.Identity
                or not _plain_unit(last) or any(RF.hooked(m) for m in (self.attn_last, self.drop_path, act))):
            h = self.drop_path(self.attn_last(last(h)))
            return act(h if sc is None else h + sc(x))
        res = (x, sc.conv, sc.bn) if _plain_unit(sc) else sc(x)
        return RF.conv_bn_act(h, last.conv, last.bn, res, act=act)


def _plain_unit(unit) -> bool:
    """Whether ``unit`` is a fused ``ConvNormAct`` computing just ``bn(conv(x))``: no activation, drop or
    ``aa``, no hooks on it or inside it."""
    if type(unit) is not FusedConvNormAct or unit._modules.get("aa") is not None:
        return False
    bn = unit.bn
    if type(bn._modules.get("act")) is not nn.Identity or type(bn._modules.get("drop")) is not nn.Identity:
        return False
    return not any(RF.hooked(m) for m in unit.modules())


class FusedByobBasicBlock(_FusedByobBlock):
    """timm ``byobnet.BasicBlock``: ``conv1_kxk`` → ``attn`` → ``conv2_kxk`` (+ shortcut, act fused in)."""

    def forward(self, x):
        return self._tail(self._attend(self.conv1_kxk(x)), x, self.conv2_kxk)


class FusedByobBottleneck(_FusedByobBlock):
    """timm ``byobnet.BottleneckBlock``: ``conv1_1x1`` → ``conv2_kxk`` → ``conv2b_kxk`` → ``attn`` →
    ``conv3_1x1`` (+ shortcut, act fused in)."""

    def forward(self, x):
        return self._tail(self._attend(self.conv2b_kxk(self.conv2_kxk(self.conv1_1x1(x)))), x, self.conv3_1x1)


def _run_length(mods, i: int) -> int:
    """Length of the ``Conv2d → BN (→ ReLU or a post-op activation)`` run starting at ``mods[i]``: 0
    (none), 2 or 3."""
    if i + 1 >= len(mods) or type(mods[i]) is not nn.Conv2d or type(mods[i + 1]) not in _BN_TYPES:
        return 0
    if i + 2 < len(mods) and (type(mods[i + 2]) is nn.ReLU or RF.post_op(mods[i + 2]) is not None):
        return 3
    return 2


class Pattern(NamedTuple):
    """One swappable structure.

    ``sources``: ``"module.QualName"`` of the classes whose forward computes it (the first one is the
    plain class :func:`unfuse` falls back to). ``fused``: the class swapped in. ``children``: child name →
    role, ``"?"`` marking an optional child (absent or None):

    - ``conv`` / ``bn`` / ``relu``: run by the fused forward; exactly ``nn.Conv2d``, ``nn.BatchNorm2d`` or
      ``nn.SyncBatchNorm``, ``nn.ReLU``. The i-th ``conv`` feeds the i-th ``bn``.
    - ``bnact``: a ``bn`` that is timm's ``BatchNormAct2d`` (its ``act`` and ``drop`` run as
      :class:`FusedConvNormAct` says).
    - ``identity``: must be ``nn.Identity`` (or absent/None when optional): timm's ``drop_block``.
    - ``shortcut``: a block's ``downsample``: ``Sequential(Conv2d, BN)`` is fused as a projection, any
      other module is called as it is (e.g. ``ZeroPadShortcut``).
    - ``call``: any module; the fused forward calls it as the original does.
    """

    sources: tuple[str, ...]
    fused: type
    children: dict[str, str]


_TV_BASIC = {"conv1": "conv", "bn1": "bn", "relu": "relu", "conv2": "conv", "bn2": "bn", "downsample": "shortcut?"}
_TV_BOTTLENECK = {"conv1": "conv", "bn1": "bn", "conv2": "conv", "bn2": "bn", "conv3": "conv", "bn3": "bn",
                  "relu": "relu", "downsample": "shortcut?"}
# timm's anti-aliasing, attention and stochastic depth run as modules between fused chains
# (resfuse.nn.blocks._split_forward); drop_block (before a ReLU) must be nn.Identity
_TIMM_EXTRAS = {"aa": "call", "se": "call?", "drop_path": "call?", "downsample": "shortcut?"}
_RESNET_BODY = {"avgpool": "call", "fc": "call"}

PATTERNS: tuple[Pattern, ...] = (
    Pattern(("resfuse.reference.resnet.BasicBlock", "torchvision.models.resnet.BasicBlock"),
            fnn.BasicBlock, _TV_BASIC),
    Pattern(("resfuse.reference.resnet.Bottleneck", "torchvision.models.resnet.Bottleneck"),
            fnn.Bottleneck, _TV_BOTTLENECK),
    Pattern(("timm.models.resnet.BasicBlock",), fnn.BasicBlock,
            {"conv1": "conv", "bn1": "bn", "drop_block": "identity", "act1": "relu", "conv2": "conv", "bn2": "bn",
             "act2": "relu", **_TIMM_EXTRAS}),
    Pattern(("timm.models.resnet.Bottleneck",), fnn.Bottleneck,
            {"conv1": "conv", "bn1": "bn", "act1": "relu", "conv2": "conv", "bn2": "bn", "drop_block": "identity",
             "act2": "relu", "conv3": "conv", "bn3": "bn", "act3": "relu", **_TIMM_EXTRAS}),
    Pattern(("resfuse.reference.preact.PreActBasicBlock",), fnn.PreActBasicBlock,
            {"bn1": "call", "conv1": "conv", "bn2": "bn", "conv2": "call", "relu": "relu", "downsample": "call?"}),
    Pattern(("resfuse.reference.preact.PreActBottleneck",), fnn.PreActBottleneck,
            {"bn1": "call", "conv1": "conv", "bn2": "bn", "conv2": "conv", "bn3": "bn", "conv3": "call",
             "relu": "relu", "downsample": "call?"}),
    Pattern(("timm.layers.conv_bn_act.ConvNormAct",), FusedConvNormAct, {"conv": "conv", "bn": "bnact", "aa": "call?"}),
    # timm byobnet blocks: every child is called (their ConvNormAct units are fused on their own); the
    # fused forward adds the shortcut and the activation inside the last unit (_FusedByobBlock)
    Pattern(("timm.models.byobnet.BasicBlock",), FusedByobBasicBlock,
            {"shortcut": "call?", "conv1_kxk": "call", "attn": "call", "conv2_kxk": "call", "attn_last": "call",
             "drop_path": "call", "act": "call"}),
    Pattern(("timm.models.byobnet.BottleneckBlock",), FusedByobBottleneck,
            {"shortcut": "call?", "conv1_1x1": "call", "conv2_kxk": "call", "conv2b_kxk": "call", "attn": "call",
             "conv3_1x1": "call", "attn_last": "call", "drop_path": "call", "act": "call"}),
    # whole models: the stem conv1 → bn1 → relu is used by the model's own forward, so only the model's
    # class can fuse it; swapped only for these exact forwards (timm's ResNet keeps its stem unfused)
    Pattern(("resfuse.reference.resnet.ResNet", "torchvision.models.resnet.ResNet"), fmodels.ResNet,
            {"conv1": "conv", "bn1": "bn", "relu": "relu", "maxpool": "call", "layer1": "call", "layer2": "call",
             "layer3": "call", "layer4": "call", **_RESNET_BODY}),
    Pattern(("resfuse.reference.cifar.CifarResNet",), fmodels.CifarResNet,
            {"conv1": "conv", "bn1": "bn", "relu": "relu", "layer1": "call", "layer2": "call", "layer3": "call",
             **_RESNET_BODY}),
)
_FUSED_TYPES = {p.fused for p in PATTERNS} | {FusedSequential}


class _Verdict(NamedTuple):
    """What resfuse makes of one module. ``status``: "fused" (already a fused module), "fusable", "left"
    (a candidate that cannot be fused, see ``reason``) or None (not a candidate). ``absorbed``: the
    children the fused forward runs itself (not called as modules, so not fused separately)."""

    status: str | None
    fused: type | None = None
    reason: str = ""
    absorbed: frozenset = frozenset()
    note: str = ""


# -- recognition ------------------------------------------------------------------------------------------
def _known_base(cls: type, sources) -> type | None:
    return next((k for k in cls.__mro__ if RF.qualname(k) in sources), None)


def _overridden(cls: type, known: type) -> str | None:
    for meth in _FORWARD_METHODS:
        f = vars(known).get(meth)
        if inspect.isfunction(f) and getattr(cls, meth) is not f:
            return meth
    return None


def _is_projection(ds) -> bool:
    """Whether ``resfuse.nn.shortcut_of`` fuses ``ds`` as a projection (keep in step with it)."""
    return (isinstance(ds, nn.Sequential) and len(ds) == 2 and type(ds[0]) is nn.Conv2d
            and isinstance(ds[1], (nn.BatchNorm2d, nn.SyncBatchNorm)))


def _check_pairs(pairs) -> str:
    """Reason the ``(label, conv, bn)`` layers cannot run as one fused chain, or ""."""
    for label, conv, bn in pairs:
        if conv.out_channels != bn.num_features:
            return f"{label}: BN has {bn.num_features} features but the conv gives {conv.out_channels} channels"
        why = RF._unfusable([(conv, bn)], None)
        if why:
            return f"{label}: {why} (the fused path would fall back to plain PyTorch)"
    syncs = {type(bn) is nn.SyncBatchNorm for _, _, bn in pairs}
    if len(syncs) > 1:
        return "mixes nn.SyncBatchNorm and nn.BatchNorm2d in one chain"
    if syncs == {True} and len({id(bn.process_group) for _, _, bn in pairs}) > 1:
        return "its SyncBatchNorms use different process groups"
    return ""


def _child_reason(name: str, role: str, child) -> str:
    kind = type(child).__name__
    if not isinstance(child, nn.Module):
        return f"{name} is {kind}, not a module"
    if role == "conv" and type(child) is not nn.Conv2d:
        return f"{name} is {kind}, not nn.Conv2d"
    if role == "bn" and type(child) not in _BN_TYPES:
        return f"{name} is {kind}, not nn.BatchNorm2d or nn.SyncBatchNorm"
    if role == "bnact":
        if RF.qualname(type(child)) != _BN_ACT:
            return f"{name} is {kind}, not timm's BatchNormAct2d"
        if any(RF.hooked(sub) for sub in child.modules()):
            return f"{name} has hooks (the fused forward would skip them)"
    if role == "relu" and type(child) is not nn.ReLU:
        return f"{name} is {kind}, not nn.ReLU"
    if role == "identity" and type(child) is not nn.Identity:
        return f"{name} is {kind} (only None or nn.Identity can be fused)"
    if role in _ABSORBED_ROLES and RF.hooked(child):
        return f"{name} has hooks (the fused forward would skip them)"
    if role == "shortcut" and _is_projection(child):
        if type(child[1]) not in _BN_TYPES or _overridden(type(child), nn.Sequential):
            return (f"{name} is {type(child).__name__}(Conv2d, {type(child[1]).__name__}), which the fused "
                    "block would run as a plain projection")
        if any(RF.hooked(x) for x in child.modules()):
            return f"{name} has hooks (the fused forward would skip them)"
    return ""


def _match_pattern(m: nn.Module, p: Pattern, known: type) -> _Verdict:
    def left(reason):
        return _Verdict("left", p.fused, reason)

    meth = _overridden(type(m), known)
    if meth:
        return left(f"{RF.qualname(type(m))} overrides {known.__qualname__}.{meth}")
    unexpected = sorted(k for k, v in m._modules.items() if v is not None and k not in p.children)
    if unexpected:
        return left(f"unexpected children {unexpected}")
    absorbed, convs, bns, projection = set(), [], [], []
    for name, spec in p.children.items():
        role = spec.rstrip("?")
        child = getattr(m, name, None)
        if child is None:
            if spec.endswith("?"):
                continue
            return left(f"has no {name}")
        why = _child_reason(name, role, child)
        if why:
            return left(why)
        if role in _ABSORBED_ROLES:
            absorbed.add(name)
        if role == "conv":
            convs.append((name, child))
        elif role in ("bn", "bnact"):
            bns.append((name, child))
        elif role == "shortcut" and _is_projection(child):
            absorbed.add(name)
            projection.append((name, child[0], child[1]))
    why = _check_pairs([(f"{c}/{b}", conv, bn) for (c, conv), (b, bn) in zip(convs, bns)] + projection)
    if why:
        return left(why)
    return _Verdict("fusable", p.fused, absorbed=frozenset(absorbed), note=_se_note(m))


def _se_note(m: nn.Module) -> str:
    """How a timm block's ``se`` and ``drop_path`` run in the fused block (``resfuse.nn.blocks._split_forward``)."""
    se, dp = (None if type(c) is nn.Identity else c for c in map(m._modules.get, ("se", "drop_path")))
    named = [f"{n} ({type(c).__name__})" for n, c in (("se", se), ("drop_path", dp)) if c is not None]
    if not named:
        return ""
    if fnn.blocks.tail_fusable(se, dp):
        if se is None:  # DropPath alone: the identity in eval
            return (f"{named[0]}: in training its mask, the shortcut add and the ReLU run as one op (gate_act); "
                    "in eval the block is one fused chain")
        return f"{' and '.join(named)}, the shortcut add and the ReLU run as one op (gate_act)"
    return f"{' and '.join(named)} run as modules"


def _match_sequential(m: nn.Module) -> _Verdict:
    names, mods = list(m._modules), list(m._modules.values())
    absorbed, notes, i = set(), [], 0
    while i < len(mods):
        n = _run_length(mods, i)
        if not n:
            i += 1
            continue
        label = f"run {names[i]}-{names[i + n - 1]}"
        if any(RF.hooked(x) for x in mods[i:i + n]):
            return _Verdict("left", FusedSequential, f"{label} has hooks (the fused forward would skip them)")
        why = _check_pairs([(label, mods[i], mods[i + 1])])
        notes += [why] if why else []
        absorbed.update(names[i:i + n])
        i += n
    if not absorbed:
        return _Verdict(None)
    return _Verdict("fusable", FusedSequential, absorbed=frozenset(absorbed), note="; ".join(notes))


def _classify(m: nn.Module) -> _Verdict:
    if type(m) is FusedSequential:
        return _match_sequential(m)._replace(status="fused", fused=FusedSequential)
    if type(m) in _FUSED_TYPES:  # its children as in the first pattern they match (tv/ref, timm, ...)
        verdicts = [_match_pattern(m, p, type(m)) for p in PATTERNS if p.fused is type(m)]
        v = next((v for v in verdicts if v.status == "fusable"), verdicts[0])
        return v._replace(status="fused", fused=type(m))
    for p in PATTERNS:
        known = _known_base(type(m), p.sources)
        if known is not None:
            return _match_pattern(m, p, known)
    known = _known_base(type(m), (_SEQUENTIAL,))
    if known is not None:
        meth = _overridden(type(m), known)
        v = _match_sequential(m)
        if meth and v.status:
            return _Verdict("left", FusedSequential, f"{RF.qualname(type(m))} overrides Sequential.{meth}")
        return v
    return _Verdict(None)


# -- rebuilding modules ------------------------------------------------------------------------------------
def _rebuild(old: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance with ``old``'s children (same objects), instance attributes and hooks."""
    if hasattr(cls, "from_module"):
        new = cls.from_module(old)
    else:
        new = cls.__new__(cls)
        for k in _CONTAINERS:
            vars(new)[k] = copy.copy(vars(old)[k])
    for k, v in vars(old).items():
        if k not in _CONTAINERS:
            vars(new)[k] = v
    return new


def _share_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose Parameters and buffers are the original objects."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _transform(m: nn.Module, swap, memo: dict) -> nn.Module:
    """Apply ``swap(module, verdict) -> module`` bottom-up; absorbed children are not visited."""
    if id(m) in memo:
        return memo[id(m)]
    verdict = _classify(m)
    for name, child in list(m._modules.items()):
        if child is not None and name not in verdict.absorbed:
            new = _transform(child, swap, memo)
            if new is not child:
                setattr(m, name, new)
    out = swap(m, verdict)
    memo[id(m)] = out
    return out


def _swap_in(m: nn.Module, v: _Verdict) -> nn.Module:
    if v.status != "fusable":
        return m
    new = _rebuild(m, v.fused)
    vars(new)[_ORIGIN] = RF.qualname(type(m))
    return new


def _swap_out(m: nn.Module, v: _Verdict) -> nn.Module:
    if v.status != "fused":
        return m
    origin = vars(m).get(_ORIGIN)
    if origin is None:  # built fused (resfuse.models, resfuse.nn): back to its plain twin
        origin = _SEQUENTIAL if type(m) is FusedSequential else next(
            p.sources[0] for p in PATTERNS if p.fused is type(m))
    new = _rebuild(m, _resolve(origin))
    vars(new).pop(_ORIGIN, None)
    return new


def _resolve(qualified: str) -> type:
    """The class named ``"module.Name"`` (every swapped class is a module-level class)."""
    module, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module), name)


# -- public API -----------------------------------------------------------------------------------------
def fuse(model: nn.Module, backend: str = "auto", inplace: bool = False,
         verify: bool | torch.Tensor = False) -> nn.Module:
    """Swap the ResNet parts of ``model`` for fused modules; returns the fused model.

    Swapped (see :data:`PATTERNS`; ``resfuse.explain(model)`` lists what was and was not swapped):

    - torchvision / ``resfuse.reference`` ``BasicBlock`` and ``Bottleneck`` (ResNet, ResNeXt, wide ResNet),
      timm's ``BasicBlock``/``Bottleneck`` when ``drop_block`` is ``nn.Identity`` and the activations
      ``nn.ReLU`` (an ``aa``, ``se`` or ``drop_path`` module runs as it is between fused chains, see
      ``resfuse.nn.blocks``), and the reference pre-activation blocks;
      a ``downsample = Sequential(Conv2d, BN)`` becomes a fused projection shortcut, any other (CIFAR
      option A ``ZeroPadShortcut``, timm's avg-pool downsample) is called as it is;
    - ``nn.Sequential`` (and subclasses that keep its forward, e.g. torchvision's ``Conv2dNormActivation``)
      holding ``Conv2d → BatchNorm2d (→ ReLU or a post-op activation)`` runs → :class:`FusedSequential`
      (same children and keys);
    - timm's ``ConvNormAct`` (a conv and a ``BatchNormAct2d``: RegNet, byobnet ResNets, CSPNets) →
      :class:`FusedConvNormAct`, any activation (ReLU fused; SiLU, LeakyReLU, ... a oneDNN post-op in CPU
      inference, see ``resfuse.functional.post_op``); timm byobnet's ``BasicBlock`` / ``BottleneckBlock`` →
      :class:`FusedByobBasicBlock` / :class:`FusedByobBottleneck` (their units as above, the shortcut add
      and the block's activation inside the last unit);
    - a torchvision / reference ``ResNet`` and the reference ``CifarResNet`` (wherever they sit in the
      tree) → ``resfuse.models.ResNet`` / ``CifarResNet``, whose forward also fuses the stem
      ``conv1 → bn1 → relu``. Other models' stems (timm's) stay plain: their own forward calls them.

    BN may be ``nn.BatchNorm2d`` or ``nn.SyncBatchNorm`` (synchronised through ``resfuse.distributed``).
    A module is left as it is when its class overrides the known ``forward``, its children differ
    (other names, other types such as ``FrozenBatchNorm2d`` or ``SiLU``), a conv that the fused path
    cannot run (bias, non-zero padding mode), or hooks on a child the fused forward would bypass.

    Sharing: every swapped module holds the original child modules, so Parameter and buffer objects —
    and ``state_dict`` keys — are unchanged; an optimizer built on ``model.parameters()`` before ``fuse``
    keeps training the fused model. Instance attributes and hooks of a swapped module are carried over;
    methods its class adds beyond the forward path (timm's ``zero_init_last``, a Sequential subclass's
    helpers) are not — ``unfuse`` gives the original class back.

    Args:
        backend: ``"auto"`` leaves the backend choice alone; any other name (``"reference"``, ``"cpu"``,
            ``"cuda"``, ``"triton"``) is checked to be available (else ``BackendUnavailable``) and set
            *process-wide*, as ``resfuse.set_backend(name)`` — the choice is global, not per model; use
            ``resfuse.use_backend`` around calls to mix backends.
        inplace: ``False`` (default): ``model`` is untouched and a new module tree is returned; every
            module object in it is new (own ``training`` flag, own children dicts), but its Parameters and
            buffers *are* ``model``'s (training one updates the other's weights and running statistics;
            ``.to()``/``.half()`` on one of them replaces that one's buffers only). ``True``: submodules
            of ``model`` are replaced in place; when ``model`` itself is swapped (a ResNet) the returned
            object is a new one: always use the return value.
        verify: ``True`` or an example input: run a batch (``[2, C_in, 64, 64]`` random, with the first
            conv's ``C_in``, dtype and device, unless given) through copies of the original and the fused
            model in eval mode (the user's modules, modes and statistics are untouched) and raise
            ``AssertionError`` with the worst relative error when they differ by more than
            ``min(100 × resfuse.testing.tolerance(dtype), 0.1)`` (a whole-model tolerance).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"resfuse.fuse: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in backends.NAMES:
        raise ValueError(f"resfuse.fuse: unknown backend {backend!r}; valid: {', '.join(backends.NAMES)}")
    if backend != "auto":
        be, reason = backends.instance(backend)
        if be is None:
            raise backends.BackendUnavailable(f"resfuse.fuse: backend {backend!r} is not available: {reason}")
    if verify is not False:  # on a copy first, so that a failed check leaves the model as it was
        with backends.use_backend(backend) if backend != "auto" else contextlib.nullcontext():
            _verify(model, _transform(_share_copy(model), _swap_in, {}), None if verify is True else verify)
    fused = _transform(model if inplace else _share_copy(model), _swap_in, {})
    if backend != "auto":
        backends.set_backend(backend)
    return fused


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inverse of :func:`fuse`: every fused module (also those of ``resfuse.models``) back to its
    original plain class — the one ``fuse`` swapped out, else its ``resfuse.reference`` twin (or
    ``nn.Sequential``) — with the same children, Parameters and buffers. For export (ONNX,
    ``torch.export``) or to compare with plain PyTorch. ``inplace`` as in :func:`fuse`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"resfuse.unfuse: model must be a torch.nn.Module, got {type(model).__name__}")
    return _transform(model if inplace else _share_copy(model), _swap_out, {})


def explain_model(model: nn.Module) -> str:
    """What :func:`fuse` swapped in ``model`` (or would swap), what it leaves and why.

    Computed from the model as it is (nothing is recorded by ``fuse``): fused modules, modules that
    ``fuse`` would swap, candidates it leaves with the reason, and every BatchNorm that no fused unit
    runs, with the reason (usually: its parent's forward is not one resfuse knows).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"resfuse.explain: model must be a torch.nn.Module, got {type(model).__name__}")
    rows = {"fused": [], "fusable": [], "left": []}
    seen = set()

    def walk(m, path):
        if id(m) in seen:
            return
        seen.add(id(m))
        v = _classify(m)
        where = path or "(model)"
        if v.status == "fused":
            origin = vars(m).get(_ORIGIN)
            rows["fused"].append((where, f"{RF.qualname(type(m))}" + (f"  (was {origin})" if origin else ""), v.note))
        elif v.status == "fusable":
            rows["fusable"].append((where, f"{RF.qualname(type(m))} -> {RF.qualname(v.fused)}", v.note))
        elif v.status == "left":
            rows["left"].append((where, RF.qualname(type(m)), v.reason))
        for name, child in m._modules.items():
            if child is None or name in v.absorbed:
                continue
            cpath = f"{path}.{name}" if path else name
            if v.status != "left" and _is_norm(child):  # a left parent's reason covers its BNs
                rows["left"].append((cpath, RF.qualname(type(child)), _norm_reason(m, v, child, where)))
            walk(child, cpath)

    walk(model, "")
    titles = {"fused": "fused", "fusable": "fusable (resfuse.fuse would swap)", "left": "left as is"}
    lines = [f"resfuse.explain: {type(model).__name__}"]
    for key, title in titles.items():
        lines.append(f"{title} ({len(rows[key])}):")
        for path, what, why in rows[key]:
            lines.append(f"  {path:<24} {what}" + (f": {why}" if why else ""))
    return "\n".join(lines)


def _is_norm(m) -> bool:
    return isinstance(m, nn.modules.batchnorm._NormBase) or "BatchNorm" in type(m).__name__


def _norm_reason(parent: nn.Module, v: _Verdict, bn: nn.Module, where: str) -> str:
    """Why the norm layer ``bn``, a child of ``parent`` not absorbed by any fused unit, stays plain."""
    if type(bn) not in _BN_TYPES:
        return f"{type(bn).__name__} is not nn.BatchNorm2d or nn.SyncBatchNorm"
    if v.status is not None or _known_base(type(parent), (_SEQUENTIAL,)):
        return "not directly after a Conv2d"
    return f"run by {where} ({RF.qualname(type(parent))}), whose forward resfuse does not know"


def _verify(model: nn.Module, fused: nn.Module, example: torch.Tensor | None) -> None:
    """Eval-mode outputs of ``model`` and ``fused`` on ``example`` agree (run on copies: modes untouched)."""
    if example is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise ValueError("resfuse.fuse(verify=True): the model has no Conv2d to size a random input by; "
                             "pass an example input as verify=tensor")
        example = torch.randn(2, conv.in_channels, 64, 64, dtype=conv.weight.dtype, device=conv.weight.device)
    plain, fast = _share_copy(model).eval(), _share_copy(fused).eval()
    with torch.no_grad():
        try:
            want = plain(example)
        except Exception as e:
            raise ValueError(f"resfuse.fuse(verify=...): the original model fails on an input of shape "
                             f"{tuple(example.shape)} ({type(e).__name__}: {e}); pass an example input as "
                             "verify=tensor") from e
        got = fast(example)
    want_l, want_spec = torch.utils._pytree.tree_flatten(want)
    got_l, got_spec = torch.utils._pytree.tree_flatten(got)
    if want_spec != got_spec:
        raise AssertionError(f"resfuse.fuse(verify=True): the fused model returns {got_spec}, the original "
                             f"{want_spec}")
    for w, g in zip(want_l, got_l):
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            err, tol = rel_error(g, w), min(100 * tolerance(w.dtype), 0.1)
            if not err <= tol:
                raise AssertionError(f"resfuse.fuse(verify=True): fused and original outputs differ: worst "
                                     f"relative error {err:.3e} > {tol:.1e} ({w.dtype}, eval mode, input "
                                     f"{tuple(example.shape)})")
