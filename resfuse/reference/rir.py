"""Plain-PyTorch ResNet in ResNet (Targ, Almeida & Lyman 2016, arXiv 1603.08029), written the paper's way.

This is the oracle for :mod:`resfuse.nn.rir` and :func:`resfuse.models.rir_cifar`. It keeps the two
streams as two tensors and runs four separate convolutions per layer (paper Eq. 1)::

    r' = σ_r(conv(r, W_rr) + conv(t, W_tr) + shortcut(r))
    t' = σ_t(conv(r, W_rt) + conv(t, W_tt))

σ is BatchNorm then ReLU, once per stream, after the sum. The fused modules hold the same weights as
one convolution over ``[r | t]`` with ``W_cat = [[W_rr, W_tr], [W_rt, W_tt]]`` (output channels are rows);
:func:`split_stream_weight` / :func:`join_stream_weight` convert between the two, and
:func:`load_from_fused` / :func:`load_into_fused` copy a whole layer, block or model across.

Contents:

* :class:`GeneralizedResidualLayerRef` -- one layer of Eq. 1.
* :class:`RiRBlockRef` -- a ResNet block whose layers are generalized residual layers, plus the outer
  shortcut. Like the last layer of a ResNet v1 block, the outer shortcut is added after the last BN
  and before the last ReLU.
* :func:`rir_cifar_ref` -- the paper's "18-layer + wide RiR" for CIFAR.
* :func:`wide_resnet_cifar_ref` -- the "18-layer + wide ResNet" baseline.
* :func:`plain_cnn_cifar_ref` -- the equivalent plain CNN.

Shortcut of a layer (``shortcut=``):

* ``"identity"``.
* ``"projection"``: a 1×1 conv at the layer's stride, added *before* the BN; it has no BN of its own,
  because σ follows the sum.
* ``"zero_pad"``: option A, i.e. strided subsampling plus zero channels appended
  (:class:`~resfuse.reference.cifar.ZeroPadShortcut`).
* ``"none"``: the layer is a plain conv layer over both streams.
* ``"auto"``: identity when the shape is kept, projection otherwise.

Convolutions get He ("MSR") initialisation. The fan-in is that of the summed pre-activation,
``2 · in_channels · 9``, so the four convs of a layer are distributed exactly like the fused ``W_cat``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .cifar import ZeroPadShortcut
from .resnet import BasicBlock, conv1x1, conv3x3

Streams = tuple[Tensor, Tensor]

SHORTCUTS = ("auto", "identity", "projection", "zero_pad", "none")
OUTER_SHORTCUTS = ("residual", "both", "none")


def resolve_shortcut(shortcut: str, in_channels: int, out_channels: int, stride: int) -> str:
    """The concrete layer shortcut for these arguments: ``"identity"``, ``"projection"``,
    ``"zero_pad"`` or ``"none"``. Raises ``ValueError`` when the shortcut cannot map the shapes."""
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    keeps_shape = in_channels == out_channels and stride == 1
    if shortcut == "auto":
        return "identity" if keeps_shape else "projection"
    if shortcut == "identity" and not keeps_shape:
        raise ValueError(f"an identity shortcut needs in_channels == out_channels and stride 1, got "
                         f"{in_channels} -> {out_channels}, stride {stride}; use 'projection' or 'zero_pad'")
    if shortcut == "zero_pad" and out_channels < in_channels:
        raise ValueError(f"a zero_pad shortcut needs out_channels >= in_channels, got {in_channels} -> {out_channels}")
    if shortcut == "zero_pad" and keeps_shape:
        return "identity"
    return shortcut


def split_stream_weight(w: Tensor, in_channels: int, out_channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(W_rr, W_tr, W_rt, W_tt)``: the four views of ``W_cat``, of shape ``[2·out, 2·in, k, k]``.

    ``W_ab`` maps stream ``a`` to stream ``b``, so ``W_tr = W_cat[:out, in:]``, i.e. output channels
    of the residual stream and input channels of the transient stream.
    """
    o, i = out_channels, in_channels
    if w.shape[:2] != (2 * o, 2 * i):
        raise ValueError(f"W_cat must be [2*{o}, 2*{i}, k, k], got {tuple(w.shape)}")
    return w[:o, :i], w[:o, i:], w[o:, :i], w[o:, i:]


def join_stream_weight(w_rr: Tensor, w_tr: Tensor, w_rt: Tensor, w_tt: Tensor) -> Tensor:
    """``W_cat = [[W_rr, W_tr], [W_rt, W_tt]]`` (rows: output streams r, t; columns: input streams r, t)."""
    return torch.cat([torch.cat([w_rr, w_tr], 1), torch.cat([w_rt, w_tt], 1)], 0)


def _he_normal_(w: Tensor, fan_in: int) -> None:
    with torch.no_grad():
        w.normal_(0.0, math.sqrt(2.0 / fan_in))


def _copy_bn_(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, channels: slice) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        d, s = getattr(dst, name), getattr(src, name)
        if d is not None and s is not None:
            d.copy_(s[channels])
    if dst.num_batches_tracked is not None and src.num_batches_tracked is not None:
        dst.num_batches_tracked.copy_(src.num_batches_tracked)


class GeneralizedResidualLayerRef(nn.Module):
    """One generalized residual layer (Eq. 1), computed with four 3×3 convs.

    Children: ``conv_rr``, ``conv_tr``, ``conv_rt`` and ``conv_tt`` (``conv_ab`` maps stream a to stream b;
    each is ``[out, in, 3, 3]``); ``bn_r`` and ``bn_t`` (one BatchNorm per stream); ``shortcut``, which is
    ``nn.Identity``, a 1×1 ``nn.Conv2d`` (projection), :class:`ZeroPadShortcut` or ``None``.

    ``forward((r, t), outer=None)`` takes two ``[N, in_channels, H, W]`` tensors and returns two
    ``[N, out_channels, H', W']`` tensors, with ``H' = ceil(H / stride)``. ``outer = (o_r, o_t)``, where
    either may be ``None``, is added after the BNs and before the ReLUs; :class:`RiRBlockRef` passes its
    outer shortcut this way.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "auto") -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.shortcut_kind = resolve_shortcut(shortcut, in_channels, out_channels, stride)
        self.conv_rr = conv3x3(in_channels, out_channels, stride)
        self.conv_tr = conv3x3(in_channels, out_channels, stride)
        self.conv_rt = conv3x3(in_channels, out_channels, stride)
        self.conv_tt = conv3x3(in_channels, out_channels, stride)
        self.bn_r = nn.BatchNorm2d(out_channels)
        self.bn_t = nn.BatchNorm2d(out_channels)
        self.shortcut = {"identity": nn.Identity(),
                         "projection": conv1x1(in_channels, out_channels, stride),
                         "zero_pad": ZeroPadShortcut(in_channels, out_channels, stride),
                         "none": None}[self.shortcut_kind]
        for conv in (self.conv_rr, self.conv_tr, self.conv_rt, self.conv_tt):
            _he_normal_(conv.weight, 2 * in_channels * 9)
        if self.shortcut_kind == "projection":
            _he_normal_(self.shortcut.weight, in_channels)

    def forward(self, streams: Streams, outer: tuple[Tensor | None, Tensor | None] | None = None) -> Streams:
        r, t = streams
        zr = self.conv_rr(r) + self.conv_tr(t)
        if self.shortcut is not None:
            zr = zr + self.shortcut(r)
        zt = self.conv_rt(r) + self.conv_tt(t)
        zr, zt = self.bn_r(zr), self.bn_t(zt)
        if outer is not None:
            if outer[0] is not None:
                zr = zr + outer[0]
            if outer[1] is not None:
                zt = zt + outer[1]
        return torch.relu(zr), torch.relu(zt)

    @torch.no_grad()
    def _copy_from_fused(self, fused: nn.Module) -> None:
        w = fused.conv.weight
        target = fused.decay_target()
        if target is not None:  # the literal ResNet-Init form keeps the identity inside the parameter
            w = w - target
        for conv, part in zip((self.conv_rr, self.conv_tr, self.conv_rt, self.conv_tt),
                              split_stream_weight(w, self.in_channels, self.out_channels)):
            conv.weight.copy_(part)
        if self.shortcut_kind == "projection":
            self.shortcut.weight.copy_(fused.shortcut.weight)
        o = self.out_channels
        _copy_bn_(self.bn_r, fused.bn, slice(0, o))
        _copy_bn_(self.bn_t, fused.bn, slice(o, 2 * o))

    @torch.no_grad()
    def _copy_into_fused(self, fused: nn.Module) -> None:
        w = join_stream_weight(self.conv_rr.weight, self.conv_tr.weight, self.conv_rt.weight, self.conv_tt.weight)
        target = fused.decay_target()
        fused.conv.weight.copy_(w if target is None else w + target)
        if self.shortcut_kind == "projection":
            fused.shortcut.weight.copy_(self.shortcut.weight)
        for src, part in ((self.bn_r, slice(0, self.out_channels)), (self.bn_t, slice(self.out_channels, None))):
            for name in ("weight", "bias", "running_mean", "running_var"):
                d, s = getattr(fused.bn, name), getattr(src, name)
                if d is not None and s is not None:
                    d[part] = s
            if fused.bn.num_batches_tracked is not None:
                fused.bn.num_batches_tracked.copy_(src.num_batches_tracked)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, shortcut={self.shortcut_kind!r}"


class RiRBlockRef(nn.Module):
    """A ResNet block of ``layers`` generalized residual layers and an outer shortcut (Fig. 1d).

    ``outer_shortcut``:

    * ``"residual"``: the block input's residual stream is added to the residual stream only.
    * ``"both"``: the block input is added to both streams.
    * ``"none"``: no outer shortcut, only the per-layer shortcuts. This gives the paper's "ResNet Init"
      network, i.e. a CNN made of generalized layers.

    The outer shortcut is added to the last layer after its BN and before its ReLU, as in a ResNet v1
    block: ``x_{l+2} = relu(BN(conv(...)) + x_l)``. When the block changes shape, the outer shortcut
    is option A, i.e. strided subsampling and zero channels appended, per stream. It has no
    parameters. The first layer carries ``stride``; the layers get ``shortcut``.

    ``forward((r, t))`` takes two ``[N, in_channels, H, W]`` tensors and returns two
    ``[N, out_channels, H', W']`` tensors.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, layers: int = 2,
                 outer_shortcut: str = "residual", shortcut: str = "auto") -> None:
        super().__init__()
        if outer_shortcut not in OUTER_SHORTCUTS:
            raise ValueError(f"outer_shortcut must be one of {OUTER_SHORTCUTS}, got {outer_shortcut!r}")
        if layers < 1:
            raise ValueError(f"an RiR block needs at least one layer, got layers={layers}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.outer_shortcut = outer_shortcut
        self.layers = nn.ModuleList(
            [GeneralizedResidualLayerRef(in_channels, out_channels, stride, shortcut)]
            + [GeneralizedResidualLayerRef(out_channels, out_channels, 1, shortcut) for _ in range(layers - 1)])
        self.outer = nn.Identity() if in_channels == out_channels and stride == 1 else \
            ZeroPadShortcut(in_channels, out_channels, stride)

    def forward(self, streams: Streams) -> Streams:
        r, t = streams
        outer = None
        if self.outer_shortcut != "none":
            outer = (self.outer(r), self.outer(t) if self.outer_shortcut == "both" else None)
        for layer in self.layers[:-1]:
            streams = layer(streams)
        return self.layers[-1](streams, outer)

    def extra_repr(self) -> str:
        return f"outer_shortcut={self.outer_shortcut!r}"


class RiRStemRef(nn.Module):
    """A 3×3 conv, BN and ReLU per stream, both reading the image. Children: ``conv_r``, ``bn_r``,
    ``conv_t``, ``bn_t``. Maps ``[N, 3, H, W]`` to two ``[N, width, H, W]`` tensors."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.conv_r, self.conv_t = conv3x3(in_channels, width), conv3x3(in_channels, width)
        self.bn_r, self.bn_t = nn.BatchNorm2d(width), nn.BatchNorm2d(width)
        for conv in (self.conv_r, self.conv_t):
            _he_normal_(conv.weight, in_channels * 9)

    def forward(self, x: Tensor) -> Streams:
        return torch.relu(self.bn_r(self.conv_r(x))), torch.relu(self.bn_t(self.conv_t(x)))

    @torch.no_grad()
    def _copy_from_fused(self, fused: nn.Module) -> None:
        w = self.conv_r.out_channels
        self.conv_r.weight.copy_(fused.conv.weight[:w])
        self.conv_t.weight.copy_(fused.conv.weight[w:])
        _copy_bn_(self.bn_r, fused.bn, slice(0, w))
        _copy_bn_(self.bn_t, fused.bn, slice(w, 2 * w))

    @torch.no_grad()
    def _copy_into_fused(self, fused: nn.Module) -> None:
        fused.conv.weight.copy_(torch.cat([self.conv_r.weight, self.conv_t.weight], 0))
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(fused.bn, name).copy_(torch.cat([getattr(self.bn_r, name), getattr(self.bn_t, name)]))
        fused.bn.num_batches_tracked.copy_(self.bn_r.num_batches_tracked)


class ConvBNHead(nn.Module):
    """A 1×1 conv to the classes, then BN and a global average pool, with no activation.
    Children: ``conv``, ``bn``. Takes the two streams, or one tensor that already holds them."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = conv1x1(in_channels, num_classes)
        self.bn = nn.BatchNorm2d(num_classes)
        _he_normal_(self.conv.weight, in_channels)

    def forward(self, x) -> Tensor:
        if isinstance(x, tuple):
            x = torch.cat(x, 1)  # join the streams
        return self.bn(self.conv(x)).mean((2, 3))


class RiRCifarRef(nn.Module):
    """The paper's "18-layer + wide RiR" for CIFAR, with ``width`` filters per stream in stage 1 (48).

    Modules:

    * ``stem``: :class:`RiRStemRef`.
    * ``layer1``: 2 RiR blocks of ``width`` filters per stream.
    * ``layer2``: 3 RiR blocks of ``2·width``; the first layer of the stage has stride 2.
    * ``layer3``: 3 RiR blocks of ``4·width``; the first layer of the stage has stride 2.
    * ``head``: :class:`ConvBNHead`, which joins the streams and applies a 1×1 conv, BN and a global
      average pool.

    Each block has 2 generalized layers. The depth is 1 + 16 + 1 = 18. Maps ``[N, 3, 32, 32]`` to
    ``[N, num_classes]`` logits.
    """

    def __init__(self, num_classes: int = 10, width: int = 48, blocks=(2, 3, 3), layers_per_block: int = 2,
                 shortcut: str = "auto", outer_shortcut: str = "residual", in_channels: int = 3) -> None:
        super().__init__()
        self.stem = RiRStemRef(in_channels, width)
        stages, c = [], width
        for i, n in enumerate(blocks):
            out, stride = width * 2 ** i, 1 if i == 0 else 2
            stages.append(nn.Sequential(*[
                RiRBlockRef(c if j == 0 else out, out, stride if j == 0 else 1, layers_per_block,
                            outer_shortcut, shortcut) for j in range(n)]))
            c = out
        self.layer1, self.layer2, self.layer3 = stages
        self.head = ConvBNHead(2 * c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def rir_cifar_ref(num_classes: int = 10, width: int = 48, shortcut: str = "auto",
                  outer_shortcut: str = "residual") -> RiRCifarRef:
    """The reference "18-layer + wide RiR" (see :class:`RiRCifarRef`).

    It has 9,492,980 parameters for CIFAR-10 with the defaults: projection shortcuts in the two strided
    layers and a parameter-free outer shortcut.
    """
    return RiRCifarRef(num_classes, width, shortcut=shortcut, outer_shortcut=outer_shortcut)


class WideResNetCifarRef(nn.Module):
    """The "18-layer + wide ResNet" baseline, with the RiR network's macro layout but a single stream.

    It has a 3×3 stem of ``2·width`` filters, then 2, 3 and 3 ResNet v1 BasicBlocks of ``2·width``,
    ``4·width`` and ``8·width`` filters, with stride 2 opening stages 2 and 3. It ends with the same 1×1
    conv, BN and average-pool head. The total width and FLOPs equal the RiR network's; only the
    shortcuts differ: one every two layers over all channels, instead of the per-layer residual stream.
    ``shortcut``: "A" (zero-pad) or "B" (1×1 conv + BN).
    """

    def __init__(self, num_classes: int = 10, width: int = 48, shortcut: str = "A") -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f'shortcut must be "A" or "B", got {shortcut!r}')
        c = 2 * width
        self.conv1, self.bn1 = conv3x3(3, c), nn.BatchNorm2d(c)
        stages = []
        for i, n in enumerate((2, 3, 3)):
            planes, stride = 2 * width * 2 ** i, 1 if i == 0 else 2
            down = None
            if stride != 1 or c != planes:
                down = ZeroPadShortcut(c, planes, stride) if shortcut == "A" else \
                    nn.Sequential(conv1x1(c, planes, stride), nn.BatchNorm2d(planes))
            stages.append(nn.Sequential(BasicBlock(c, planes, stride, down),
                                        *[BasicBlock(planes, planes) for _ in range(n - 1)]))
            c = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.head = ConvBNHead(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.head(self.layer3(self.layer2(self.layer1(x))))


def wide_resnet_cifar_ref(num_classes: int = 10, width: int = 48, shortcut: str = "A") -> WideResNetCifarRef:
    """The "18-layer + wide ResNet" baseline (see :class:`WideResNetCifarRef`). It has 9,469,940 parameters
    with option A and 9,563,252 with option B, for CIFAR-10."""
    return WideResNetCifarRef(num_classes, width, shortcut)


class PlainCnnCifarRef(nn.Module):
    """The equivalent plain CNN: the same 18 layers as the RiR network with no shortcut at all.

    ``features`` is an ``nn.Sequential`` of (conv, BN, ReLU) triples: the 3×3 stem of ``2·width``
    filters, then 4, 6 and 6 3×3 layers of ``2·width``, ``4·width`` and ``8·width`` filters, the first
    of stages 2 and 3 with stride 2. ``head`` is a :class:`ConvBNHead`. A generalized residual layer
    without shortcuts is exactly such a conv layer of width ``2·width``, so ``rir_cifar(shortcut="none",
    outer_shortcut="none")`` computes this network's function with the same weights.
    """

    def __init__(self, num_classes: int = 10, width: int = 48) -> None:
        super().__init__()
        plan = [(2 * width, 1)] * 4 + [(4 * width, 2)] + [(4 * width, 1)] * 5 + [(8 * width, 2)] + [(8 * width, 1)] * 5
        mods, c = [conv3x3(3, 2 * width), nn.BatchNorm2d(2 * width), nn.ReLU()], 2 * width
        for out, stride in plan:
            mods += [conv3x3(c, out, stride), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        self.features = nn.Sequential(*mods)
        self.head = ConvBNHead(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def plain_cnn_cifar_ref(num_classes: int = 10, width: int = 48) -> PlainCnnCifarRef:
    """The equivalent plain CNN (see :class:`PlainCnnCifarRef`). It has 9,469,940 parameters for CIFAR-10."""
    return PlainCnnCifarRef(num_classes, width)


def load_from_fused(ref: nn.Module, fused: nn.Module) -> nn.Module:
    """Copy a fused RiR layer, block or model (:mod:`resfuse.nn.rir`, :mod:`resfuse.models.rir`) into
    its reference twin, in place, and return ``ref``.

    The two trees must have the same child names wherever they correspond. Generalized layers and
    stems are translated: ``W_cat`` is split into the four convs, the identity is removed from a
    literal ResNet-Init weight, and each per-stream BN receives its half of the BN parameters and
    running statistics. Every other conv and BN is copied as is.
    """
    copy_ = getattr(ref, "_copy_from_fused", None)
    if copy_ is not None:
        copy_(fused)
    elif isinstance(ref, (nn.Conv2d, nn.BatchNorm2d)):
        ref.load_state_dict(fused.state_dict())
    else:
        for name, child in ref.named_children():
            if _has_state(child):
                load_from_fused(child, getattr(fused, name))
    return ref


def load_into_fused(fused: nn.Module, ref: nn.Module) -> nn.Module:
    """The inverse of :func:`load_from_fused`: copy a reference RiR layer, block or model into its fused
    twin, in place, and return ``fused``."""
    copy_ = getattr(ref, "_copy_into_fused", None)
    if copy_ is not None:
        copy_(fused)
    elif isinstance(ref, (nn.Conv2d, nn.BatchNorm2d)):
        fused.load_state_dict(ref.state_dict())
    else:
        for name, child in ref.named_children():
            if _has_state(child):
                load_into_fused(getattr(fused, name), child)
    return fused


def _has_state(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())
