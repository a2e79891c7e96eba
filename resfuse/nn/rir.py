"""ResNet in ResNet (arXiv 1603.08029) as fused units: a generalized residual layer is one convolution.

The two streams are kept in one tensor ``s = [r | t]`` of ``2·C`` channels, with the residual stream in
the first half. Paper Eq. 1 then becomes one conv over ``s`` with

    W_cat = [[W_rr, W_tr],       rows: output streams r, t
             [W_rt, W_tt]]       columns: input streams r, t

plus the residual stream's shortcut on the first half of the output channels, followed by BN over
all ``2·out`` channels and ReLU. Per-channel BN over the joined tensor is exactly BN per stream.

**ResNet Init.** Every layer shortcut is a 1×1 conv at the layer's stride:

* the identity is the unit matrix;
* a projection is its learned weight;
* option A (subsample + zero channels) is a truncated unit matrix.

A 1×1 conv at stride ``s`` is a 3×3 conv (padding 1, stride ``s``) whose only nonzero tap is the
centre. So the shortcut folds into the centre tap of the r→r block of an *effective* weight
``W_eff = W_cat + P``, and the layer, shortcut included, is one ``conv → BN → ReLU`` unit
(:func:`resfuse.functional.conv_bn_chain` with ``weights=[W_eff]``). ``P`` is a constant non-persistent
buffer (``identity``) or, for a projection, the projection weight padded into the centre tap, so the
projection receives its gradient through ``W_eff``.

The learned parameter is ``W_cat``; the identity never enters it. Plain weight decay on
``conv.weight`` therefore acts on ``W_eff − I``, which is the paper's "subtract the identity before
regularisation". The paper's literal form, with the identity inside the parameter
(``identity_in_weight=True`` or :meth:`GeneralizedResidualLayer.set_identity_in_weight`), computes the
same function. It needs :func:`rir_param_groups` and :func:`decay_toward_targets` to decay ``W − I``.

**RiR block.** :class:`RiRBlock` runs all of its layers *and* the outer shortcut as one fused chain,
i.e. one autograd node, like a ResNet BasicBlock:

* layer ``i > 0`` applies layer ``i−1``'s BN + ReLU while it loads its input;
* the outer shortcut is added after the last BN and before the last ReLU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .. import functional as RF
from ..reference.rir import OUTER_SHORTCUTS, resolve_shortcut


def partial_identity(in_channels: int, out_channels: int, dtype=None, device=None) -> torch.Tensor:
    """``P``: ``[2·out, 2·in, 3, 3]`` zeros with ``P[i, i, 1, 1] = 1`` for ``i < min(in, out)``. This is
    the identity (``in == out``) or option A's truncated identity (``out > in``), from the residual
    stream's input channels to its output channels, at the centre tap."""
    p = torch.zeros(2 * out_channels, 2 * in_channels, 3, 3, dtype=dtype, device=device)
    n = torch.arange(min(in_channels, out_channels), device=device)
    p[n, n, 1, 1] = 1
    return p


class GeneralizedResidualLayer(nn.Module):
    """One generalized residual layer (paper Eq. 1) as one fused conv + BN + ReLU.

    Args:
        in_channels, out_channels: filters *per stream*. The input is ``[N, 2·in_channels, H, W]``
            ``= [r | t]``; the output is ``[N, 2·out_channels, ceil(H/stride), ceil(W/stride)]``.
        shortcut: the residual stream's shortcut.

            * ``"identity"``.
            * ``"projection"``: a 1×1 conv at ``stride``, added before the BN.
            * ``"zero_pad"``: option A, i.e. strided subsampling plus zero channels.
            * ``"none"``: the layer is a plain conv layer of width ``2·out``.
            * ``"auto"``: identity when the shape is kept, projection otherwise.

        identity_in_weight: the paper's literal ResNet-Init form, where ``conv.weight`` holds
            ``W_cat + P``. See :meth:`set_identity_in_weight`.

    Children and buffers:

    * ``conv``: ``nn.Conv2d(2·in, 2·out, 3, stride, padding=1, bias=False)``, holding ``W_cat``.
    * ``bn``: ``nn.BatchNorm2d(2·out)``.
    * ``shortcut``: ``nn.Conv2d(in, out, 1, stride, bias=False)`` for a projection, else ``None``.
    * ``identity``: the non-persistent buffer ``P`` of :func:`partial_identity` for identity and
      option A, else ``None``.

    ``forward(x, residual=None)``: ``residual`` (optional, ``[N, 2·out, H', W']``) is added after the BN
    and before the ReLU.

    Initialisation: He normal on ``W_cat`` (fan-in ``2·in·9``, the fan-in of the summed
    pre-activation) and on the projection; BN weight 1 and bias 0.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "auto",
                 identity_in_weight: bool = False, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.shortcut_kind = resolve_shortcut(shortcut, in_channels, out_channels, stride)
        self.conv = nn.Conv2d(2 * in_channels, 2 * out_channels, 3, stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2 * out_channels, eps=eps, momentum=momentum)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        self.shortcut = None
        if self.shortcut_kind == "projection":
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
            nn.init.kaiming_normal_(self.shortcut.weight, nonlinearity="relu")
        p = partial_identity(in_channels, out_channels) if self.shortcut_kind in ("identity", "zero_pad") else None
        self.register_buffer("identity", p, persistent=False)
        self.identity_in_weight = False
        self._w_eff_cache = None  # (w, version, extra, version, W_eff) of the last inference call
        if identity_in_weight:
            self.set_identity_in_weight(True)

    def effective_weight(self) -> torch.Tensor:
        """``W_eff = conv.weight + P``: the weight of the one conv that computes the layer, shortcut
        included. Differentiable in ``conv.weight`` and in the projection weight.

        Without autograd (inference), the sum is cached until either term changes (in place, by an
        optimizer step or ``load_state_dict``, or by ``.to()``), so repeated eval calls reuse one tensor.
        """
        w = self.conv.weight
        if self.shortcut is not None:
            extra = self.shortcut.weight
        elif self.identity is not None and not self.identity_in_weight:
            extra = self.identity
        else:
            return w
        if (torch.is_grad_enabled() and (w.requires_grad or extra.requires_grad)) or torch.compiler.is_compiling():
            return self._compose(w, extra)
        hit = self._w_eff_cache
        if (hit is not None and hit[0] is w and hit[1] == w._version and hit[2] is extra
                and hit[3] == extra._version):
            return hit[4]
        with torch.no_grad():
            w_eff = self._compose(w, extra)
        self._w_eff_cache = (w, w._version, extra, extra._version, w_eff)
        return w_eff

    def _compose(self, w: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        if self.shortcut is not None:  # the projection weight, padded into the centre tap of the r->r block
            i, o = self.in_channels, self.out_channels
            extra = F.pad(extra, (1, 1, 1, 1, 0, i, 0, o))
        return w + extra

    def decay_target(self) -> torch.Tensor | None:
        """The constant that ``conv.weight`` should decay toward: ``P`` in the literal form (the
        parameter holds ``W_cat + P``), ``None`` (i.e. zero) otherwise."""
        return self.identity if self.identity_in_weight else None

    @torch.no_grad()
    def set_identity_in_weight(self, enabled: bool = True) -> GeneralizedResidualLayer:
        """Switch between the two forms in place, without changing the function.

        * ``enabled=True``: the literal form, where ``conv.weight += P``.
        * ``enabled=False``: the fused form, where ``conv.weight -= P``.

        A projection shortcut is a separate learned parameter in both forms and is never folded into
        ``conv.weight``, so for projection and ``"none"`` layers only the flag changes. Returns ``self``.
        """
        enabled = bool(enabled)
        if enabled != self.identity_in_weight and self.identity is not None:
            self.conv.weight.add_(self.identity.to(self.conv.weight.dtype), alpha=1.0 if enabled else -1.0)
        self.identity_in_weight = enabled
        return self

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return RF.conv_bn_chain(x, ((self.conv, self.bn),), residual, True, weights=_overrides([self]))

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, stride={self.stride}, shortcut={self.shortcut_kind!r}"
        return s + (", identity_in_weight=True" if self.identity_in_weight else "")


class RiRBlock(nn.Module):
    """A ResNet block of ``layers`` generalized residual layers with an outer shortcut (paper Fig. 1d),
    run as one fused chain.

    Args:
        in_channels, out_channels: filters per stream. The input is ``[N, 2·in, H, W] = [r | t]``.
        stride: on the first layer.
        layers: generalized residual layers in the block (the paper uses 2).
        outer_shortcut: what the block shortcut covers.

            * ``"residual"`` (default): the residual stream only.
            * ``"both"``: both streams.
            * ``"none"``: no block shortcut, only the per-layer ones. This gives the paper's
              "ResNet Init" network.

        shortcut, identity_in_weight: passed to every :class:`GeneralizedResidualLayer`.

    **Why** ``"residual"`` **is the default.** The paper defines the transient stream as the stream
    without shortcut connections, the one that can discard information. An RiR block "replaces each of
    the convolutional layers within a residual block from the original ResNet with a generalized
    residual block", so the ResNet block's shortcut keeps its role of carrying the residual
    representation, on the residual stream. A block shortcut over ``t`` would re-inject the block
    input into the stream that is meant to be able to forget it. This is also the choice of the
    public reproduction that follows the paper's architecture (nutszebra/resnet_in_resnet). The paper
    does not show code, and other implementations differ: one covers both streams (Keras) and one has
    none (osmr). Those variants are ``"both"`` and ``"none"``.

    **Where the outer shortcut goes.** After the last layer's BN and before its ReLU, exactly where a
    ResNet v1 block (the block that RiR generalises) adds its shortcut::

        out = relu(BN(conv([r|t]_{l+1}, W_eff)) + outer)

    When the block changes shape, the outer shortcut is option A (strided subsampling, zero channels
    appended per stream), which has no parameters. The block output is
    ``[N, 2·out, ceil(H/stride), ceil(W/stride)]``.

    **What is fused.** The outer shortcut comes from the block input, not from the last layer's input,
    so it cannot fold into a weight. It is the post-BN shortcut of the fused chain. The whole block
    therefore runs as one :func:`resfuse.functional.conv_bn_chain`: ``layers`` convs, each with its layer
    shortcut folded into ``W_eff``, and each BN + ReLU applied while the next conv loads its input. The
    last BN + outer shortcut + ReLU is one pass. For ``"both"`` at unchanged shape the shortcut is the
    input tensor itself. Otherwise it is first materialised: ``[r | 0]`` for ``"residual"``, or the
    option-A padding, one extra write.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, layers: int = 2,
                 outer_shortcut: str = "residual", shortcut: str = "auto", identity_in_weight: bool = False) -> None:
        super().__init__()
        if outer_shortcut not in OUTER_SHORTCUTS:
            raise ValueError(f"outer_shortcut must be one of {OUTER_SHORTCUTS}, got {outer_shortcut!r}")
        if layers < 1:
            raise ValueError(f"an RiR block needs at least one layer, got layers={layers}")
        if outer_shortcut != "none" and out_channels < in_channels:
            raise ValueError(f"the outer shortcut needs out_channels >= in_channels, got {in_channels} -> {out_channels}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.outer_shortcut = outer_shortcut
        self.layers = nn.ModuleList(
            [GeneralizedResidualLayer(in_channels, out_channels, stride, shortcut, identity_in_weight)]
            + [GeneralizedResidualLayer(out_channels, out_channels, 1, shortcut, identity_in_weight)
               for _ in range(layers - 1)])

    def outer(self, x: torch.Tensor) -> torch.Tensor | None:
        """The outer shortcut of the block input ``x``: ``None``, or a tensor of the block output's shape."""
        if self.outer_shortcut == "none":
            return None
        i, o, s = self.in_channels, self.out_channels, self.stride
        if self.outer_shortcut == "both":
            if i == o and s == 1:
                return x
            y = F.pad(x.unflatten(1, (2, i))[..., ::s, ::s], (0, 0, 0, 0, 0, o - i)).flatten(1, 2)
        else:
            y = F.pad(x[:, :i, ::s, ::s], (0, 0, 0, 0, 0, 2 * o - i))
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RF.conv_bn_chain(x, [(layer.conv, layer.bn) for layer in self.layers], self.outer(x), True,
                                weights=_overrides(self.layers))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, outer_shortcut={self.outer_shortcut!r}"


def _overrides(layers) -> list[torch.Tensor] | None:
    """The ``weights=`` of a fused chain over ``layers``. ``None`` when every effective weight is the
    parameter itself (literal form, or no shortcut); then inference reuses the functional's cached
    BN-folded weights."""
    ws = [layer.effective_weight() for layer in layers]
    return None if all(w is layer.conv.weight for w, layer in zip(ws, layers)) else ws


def rir_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups that give L2 weight decay ``weight_decay`` to ``W_cat`` in both
    ResNet-Init forms.

    * Every parameter except literal-form RiR conv weights goes in a group with
      ``weight_decay=weight_decay``. In the fused form that already decays ``W_cat``: the identity is
      not in the parameter.
    * The conv weights of layers with ``identity_in_weight=True`` (which hold ``W_cat + P``) go in a
      second group with ``weight_decay=0`` and ``"decay_toward_target": weight_decay``. Call
      :func:`decay_toward_targets` on the optimizer to decay them toward ``P``: each step adds
      ``weight_decay · (W − P)`` to their gradient, i.e. L2 on ``W − I``.

    Usage::

        opt = torch.optim.SGD(rir_param_groups(model, 1e-4), lr=0.1, momentum=0.9)
        decay_toward_targets(opt, model)   # only needed for identity_in_weight=True layers
    """
    literal = {id(m.conv.weight): m.conv.weight for m in _literal_layers(model)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in literal], "weight_decay": weight_decay}]
    if literal:
        groups.append({"params": list(literal.values()), "weight_decay": 0.0, "decay_toward_target": weight_decay})
    return groups


def decay_toward_targets(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """Make ``optimizer`` decay every literal-form RiR conv weight of ``model`` toward its identity.

    This registers an optimizer step pre-hook. Before each ``optimizer.step()``, it adds
    ``group["decay_toward_target"] · (W − P)`` to ``W.grad`` for each such weight in a group made by
    :func:`rir_param_groups`. That is coupled L2 regularisation of ``W − P``, applied exactly as
    SGD's ``weight_decay`` applies it to ``W``. Returns the hook's handle.
    """
    targets = {id(m.conv.weight): m for m in _literal_layers(model)}

    def hook(opt, args, kwargs):
        with torch.no_grad():
            for group in opt.param_groups:
                wd = group.get("decay_toward_target")
                if not wd:
                    continue
                for p in group["params"]:
                    layer = targets.get(id(p))
                    if layer is not None and p.grad is not None:
                        p.grad.add_(p - layer.decay_target().to(p.dtype), alpha=wd)

    return optimizer.register_step_pre_hook(hook)


def _literal_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, GeneralizedResidualLayer) and m.decay_target() is not None]
