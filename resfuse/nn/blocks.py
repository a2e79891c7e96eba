"""Fused ResNet blocks, drop-in for torchvision's (same constructor, attributes and state_dict keys).

Each class subclasses its ``resfuse.reference`` twin and only replaces ``forward``: a BasicBlock is one
fused chain of two conv-BN layers plus the shortcut; a Bottleneck a chain of three. A ``downsample``
that is ``Sequential(Conv2d, BatchNorm2d)`` becomes a fused projection shortcut (its BN-apply runs in
the same pass as the main branch's BN-apply, add and ReLU); any other ``downsample`` (e.g. the CIFAR
option-A ``ZeroPadShortcut``) is called as is and its output added.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as RF
from ..reference import preact as ref_preact
from ..reference import resnet as ref_resnet

Shortcut = Union[None, torch.Tensor, tuple]


def shortcut_of(downsample, x: torch.Tensor) -> Shortcut:
    """The fused-chain shortcut for a block's ``downsample`` applied to ``x``."""
    if downsample is None:
        return x
    if (isinstance(downsample, nn.Sequential) and len(downsample) == 2
            and type(downsample[0]) is nn.Conv2d
            and isinstance(downsample[1], (nn.BatchNorm2d, nn.SyncBatchNorm))):
        return (x, downsample[0], downsample[1])
    return downsample(x)


class _FromModule:
    @classmethod
    def from_module(cls, block: nn.Module):
        """A fused block sharing ``block``'s submodules, parameters and buffers (nothing copied)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        for name, child in block.named_children():
            setattr(self, name, child)
        for name in ("stride", "training", "downsample"):
            if name not in self._modules:
                setattr(self, name, getattr(block, name))
        return self


_INERT = (type(None), nn.Identity)
#: children of timm's blocks that the fused forward calls as modules where they compute something:
#: ``aa`` (anti-aliasing, e.g. a blur pool, after the ReLU of layer ``aa_after``), then after the last
#: BN ``se`` (channel attention: SE, ECA, ...) and ``drop_path`` (stochastic depth)
_CALLED = ("aa", "se", "drop_path")


def _split_forward(block, x: torch.Tensor, layers, aa_after: int) -> Optional[torch.Tensor]:
    """The block's output where some of :data:`_CALLED` compute something, else None (the caller's
    one-chain forward): the conv-BN layers run as fused chains around those modules — up to ``aa``,
    after it, and, with ``se`` / ``drop_path``, the rest without its final ReLU. A timm SE / ECA ``se``
    and a timm ``DropPath`` then end the block as one :func:`resfuse.functional.gate_act` (the gate
    computed by the SE module's own layers, :func:`channel_gate`, and masked by the ``DropPath``:
    :func:`_tail_gate`); other such modules, the shortcut add and the ReLU run as the original forward
    runs them."""
    aa, se, dp = (None if type(m) in _INERT else m for m in map(block._modules.get, _CALLED))
    if dp is not None and _is_drop_path(dp) and (not dp.training or not dp.drop_prob):
        dp = None  # timm's DropPath returns its input then (and draws nothing)
    if aa is None and se is None and dp is None:
        return None
    h, rest = x, layers
    if aa is not None:
        h, rest = aa(RF.conv_bn_chain(x, layers[:aa_after], None, True)), layers[aa_after:]
    shortcut = shortcut_of(block.downsample, x)
    tail = [m for m in (se, dp) if m is not None]
    if not tail:
        return RF.conv_bn_chain(h, rest, shortcut, True)
    z = RF.conv_bn_chain(h, rest, None, False)
    gate = _tail_gate(se, dp, z)
    if gate is None:
        for m in tail:
            z = m(z)
    if isinstance(shortcut, tuple):  # a projection (x_s, conv_s, bn_s)
        shortcut = RF.conv_bn_act(*shortcut, relu=False)
    if gate is not None:  # dp(se(z)) = z * gate: the multiply, the add and the ReLU in one pass
        return RF.gate_act(z, gate, shortcut, True)
    return torch.relu_(z + shortcut)  # (in place on the fresh sum, as timm's act(inplace=True))


def tail_fusable(se: Optional[nn.Module], dp: Optional[nn.Module]) -> bool:
    """Whether a timm block's ``se`` and ``drop_path`` (None where absent or ``nn.Identity``) end the
    fused block as one ``gate_act``: ``se`` None or a module :func:`gate_fn` knows, ``dp`` None or a
    timm ``DropPath`` without hooks (what ``resfuse.explain`` reports, too)."""
    return (se is None or gate_fn(se) is not None) and (dp is None or _is_drop_path(dp))


def _tail_gate(se, dp, z: torch.Tensor) -> Optional[torch.Tensor]:
    """The ``[N, C, 1, 1]`` gate ``g`` with ``dp(se(z)) == z * g`` where :func:`tail_fusable`, else None
    (then the modules run themselves). ``dp`` is called on the gate (``se``'s, or ones): its per-image
    mask has the shape ``[N, 1, 1, 1]`` either way, so it draws the same random numbers as on ``se(z)``."""
    if not tail_fusable(se, dp):
        return None
    gate = channel_gate(se, z) if se is not None else z.new_ones(z.shape[0], 1, 1, 1)
    return gate if dp is None else dp(gate).expand(z.shape[0], z.shape[1], 1, 1)


def _is_drop_path(m: nn.Module) -> bool:
    """timm's ``DropPath`` (exact class: its forward is ``x * mask[n]``, the mask drawn per image)."""
    return RF.qualname(type(m)) == "timm.layers.drop.DropPath" and not RF.hooked(m)


def _pointwise(conv: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``conv(t)`` for a ``[N, C, 1, 1]`` ``t``: a linear layer where ``conv`` is a plain 1x1 ``nn.Conv2d``
    without hooks — the same function, at a fraction of a convolution's cost on a 1x1 map (an SE MLP
    layer, batch 8, fp32, 2 threads, forward + backward: 2048 -> 128 -> 2048 0.63 ms as GEMMs, 3.0 ms
    as oneDNN convolutions; 256 channels 0.15 vs 0.54 ms) — else the module."""
    if (type(conv) is nn.Conv2d and t.shape[2:] == (1, 1) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and not RF.hooked(conv)):
        return F.linear(t.flatten(1), conv.weight.flatten(1), conv.bias).view(t.shape[0], -1, 1, 1)
    return conv(t)


def _se_gate(m, zm):
    return m.gate(_pointwise(m.fc2, m.act(m.bn(_pointwise(m.fc1, zm)))))


def _ese_gate(m, zm):
    return m.gate(_pointwise(m.fc, zm))


def _along_channels(conv: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``conv(y)`` for ECA's ``[N, 1, C]`` channel descriptor: where ``conv`` is a plain one-channel
    ``nn.Conv1d`` without hooks, its k taps as one product of the padded descriptor's sliding windows
    with the kernel — the same cross-correlation, at a fraction of a convolution's cost on one channel
    (batch 8, fp32, 2 threads, forward + backward with the gate's sigmoid: 256 channels 154 vs 318 us,
    2048 channels 348 vs 1390 us) — else the module."""
    k = conv.kernel_size[0] if type(conv) is nn.Conv1d else 0
    if not (k and conv.in_channels == conv.out_channels == 1 and conv.stride == (1,) and conv.dilation == (1,)
            and isinstance(conv.padding, tuple) and conv.padding_mode == "zeros" and not RF.hooked(conv)):
        return conv(y)
    p = conv.padding[0]
    out = F.pad(y.flatten(1), (p, p)).unfold(1, k, 1) @ conv.weight.view(k)
    return (out if conv.bias is None else out + conv.bias).unsqueeze(1)


def _eca_gate(m, zm):
    y = zm.view(zm.shape[0], 1, -1)
    if m.conv2 is None:
        y = _along_channels(m.conv, y)
    else:
        y = m.conv2(m.act(m.conv(y)))
    return m.gate(y).view(zm.shape[0], -1, 1, 1)


#: timm's channel-attention modules whose forward is ``x * gate(f(x.mean((2, 3))))``, by class (exact
#: class: a subclass may override forward): the gate's computation from the mean, through the module's
#: own layers (``add_maxpool`` modules are not among them: see :func:`channel_gate`)
_GATES = {
    "timm.layers.squeeze_excite.SEModule": (_se_gate, ("fc1", "bn", "act", "fc2", "gate")),
    "timm.layers.squeeze_excite.EffectiveSEModule": (_ese_gate, ("fc", "gate")),
    "timm.layers.eca.EcaModule": (_eca_gate, ("conv", "act", "conv2", "gate")),
}


def gate_fn(module: Optional[nn.Module]):
    """``fn(module, mean)`` computing the gate of a timm SE / effective-SE / ECA module (:data:`_GATES`)
    without hooks of its own and without ``add_maxpool`` from the channel mean of its input; None for
    any other module."""
    entry = _GATES.get(RF.qualname(type(module)))
    if (entry is None or RF.hooked(module) or getattr(module, "add_maxpool", False)
            or not all(hasattr(module, a) for a in entry[1])):
        return None
    return entry[0]


def channel_gate(module: Optional[nn.Module], z: torch.Tensor) -> Optional[torch.Tensor]:
    """``[N, C, 1, 1]`` gate ``s`` with ``module(z) == z * s``, computed by the module's own layers from
    ``RF.channel_mean(z)``, for a module :func:`gate_fn` knows; None for any other module (the caller
    then calls it)."""
    fn = gate_fn(module)
    return None if fn is None else fn(module, RF.channel_mean(z))


class BasicBlock(_FromModule, ref_resnet.BasicBlock):
    """Fused ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; see ``resfuse.reference.BasicBlock``.
    ``consume=True``: the caller gives ``x`` up, so that inference may write the output into it when the
    shortcut is the identity (see :func:`run_stages`); a ``downsample`` module's output is never
    written into (what it returns, e.g. a view, is not known to be free).

    From a timm ``BasicBlock`` with an ``aa`` after the first ReLU, or ``se`` / ``drop_path`` after
    ``bn2``: those run between fused chains, an SE / ECA gate fused with the add and the ReLU
    (:func:`_split_forward`)."""

    def forward(self, x: torch.Tensor, consume: bool = False) -> torch.Tensor:
        layers = ((self.conv1, self.bn1), (self.conv2, self.bn2))
        y = _split_forward(self, x, layers, 1)
        if y is not None:
            return y
        return RF.conv_bn_chain(x, layers, shortcut_of(self.downsample, x), True, None,
                                consume and self.downsample is None)


class Bottleneck(_FromModule, ref_resnet.Bottleneck):
    """Fused 1×1 → 3×3 → 1×1 bottleneck (v1.5: stride on the 3×3); see ``resfuse.reference.Bottleneck``.
    ``consume`` as for :class:`BasicBlock`. From a timm ``Bottleneck`` with an ``aa`` after the second
    ReLU, or ``se`` / ``drop_path`` after ``bn3`` (SE-/ECA-ResNets, stochastic depth): those run
    between fused chains, an SE / ECA gate fused with the add and the ReLU (:func:`_split_forward`)."""

    def forward(self, x: torch.Tensor, consume: bool = False) -> torch.Tensor:
        layers = ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3))
        y = _split_forward(self, x, layers, 2)
        if y is not None:
            return y
        return RF.conv_bn_chain(x, layers, shortcut_of(self.downsample, x), True, None,
                                consume and self.downsample is None)


def _global_hooks() -> bool:
    m = nn.modules.module
    return any(getattr(m, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                   "_global_backward_hooks", "_global_backward_pre_hooks"))


def run_stages(stages, x: torch.Tensor) -> torch.Tensor:
    """``stages[-1](...stages[0](x))`` for a ResNet's stages, with one saving in inference: inside an
    ``nn.Sequential`` stage, a fused :class:`BasicBlock` / :class:`Bottleneck` that follows another gets
    its input with ``consume=True`` — that input is the previous block's fresh output, which nothing
    else can see (neither block nor the stage has hooks, no global module hooks, no tracing) — so its
    identity-shortcut add writes into that tensor instead of a new buffer. Blocks with hooks, other
    modules and every call with gradients enabled run as plain module calls."""
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling() or _global_hooks():
        for stage in stages:
            x = stage(x)
        return x
    for stage in stages:
        if type(stage) is not nn.Sequential or RF.hooked(stage):
            x = stage(x)
            continue
        owned = False  # the stage's input is the caller's (or seen by a hook on the previous stage)
        for blk in stage:
            if type(blk) in (BasicBlock, Bottleneck) and not RF.hooked(blk):
                x, owned = blk.forward(x, owned), True  # no hooks to run: __call__ is skipped
            else:
                x, owned = blk(x), False
    return x


class PreActBasicBlock(_FromModule, ref_preact.PreActBasicBlock):
    """Pre-activation basic block: ``conv1 → bn2 → relu`` runs as one fused unit; the leading
    ``relu(bn1(x))`` and the final ``conv2 + shortcut`` are plain PyTorch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = RF.conv_bn_act(out, self.conv1, self.bn2)
        return self.conv2(out) + shortcut


class PreActBottleneck(_FromModule, ref_preact.PreActBottleneck):
    """Pre-activation bottleneck: ``conv1 → bn2 → relu → conv2 → bn3 → relu`` runs as one fused chain."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = RF.conv_bn_chain(out, ((self.conv1, self.bn2), (self.conv2, self.bn3)), None, relu=True)
        return self.conv3(out) + shortcut
