"""The paper's "18-layer + wide RiR" for CIFAR (Targ, Almeida & Lyman 2016), built from fused units.

The two streams travel as one ``[r | t]`` tensor from the stem to the head, so "joining the streams"
before the head costs nothing. The model has 10 fused units:

* the stem conv-BN-ReLU;
* 8 RiR blocks, each one chain of 2 convs with its shortcuts;
* the head conv-BN.

The reference twin is :func:`resfuse.reference.rir.rir_cifar_ref` (four convs per layer, two
tensors); :func:`resfuse.reference.rir.load_from_fused` copies this model into it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn.conv_bn_act import ConvBNAct
from ..nn.rir import RiRBlock


class RiRCifar(nn.Module):
    """The "18-layer + wide RiR" with ``width`` filters per stream in stage 1 (48 in the paper).

    Modules:

    * ``stem``: a :class:`~resfuse.nn.ConvBNAct` 3×3 conv ``in_channels → 2·width`` (one 3×3 conv of
      ``width`` filters per stream, both reading the image).
    * ``layer1``: ``blocks[0]`` :class:`~resfuse.nn.RiRBlock` of ``width`` filters per stream, at 32×32.
    * ``layer2``: ``blocks[1]`` blocks of ``2·width`` at 16×16; stride 2 on the stage's first layer.
    * ``layer3``: ``blocks[2]`` blocks of ``4·width`` at 8×8; stride 2 on the stage's first layer.
    * ``head``: a :class:`~resfuse.nn.ConvBNAct` 1×1 conv ``8·width → num_classes`` with BN and no
      activation.

    The output is the global average pool of the head, ``[N, num_classes]`` logits for
    ``[N, in_channels, H, W]`` images.
    """

    def __init__(self, num_classes: int = 10, width: int = 48, blocks: Sequence[int] = (2, 3, 3),
                 layers_per_block: int = 2, shortcut: str = "auto", outer_shortcut: str = "residual",
                 identity_in_weight: bool = False, in_channels: int = 3) -> None:
        super().__init__()
        if len(blocks) != 3:
            raise ValueError(f"blocks must give the number of RiR blocks of each of the 3 stages, got {blocks}")
        self.stem = ConvBNAct(in_channels, 2 * width, 3)
        stages, c = [], width
        for i, n in enumerate(blocks):
            out, stride = width * 2 ** i, 1 if i == 0 else 2
            stages.append(nn.Sequential(*[
                RiRBlock(c if j == 0 else out, out, stride if j == 0 else 1, layers_per_block, outer_shortcut,
                         shortcut, identity_in_weight) for j in range(n)]))
            c = out
        self.layer1, self.layer2, self.layer3 = stages
        self.head = ConvBNAct(2 * c, num_classes, 1, activation=None)
        for conv in (self.stem.conv, self.head.conv):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(x).mean((2, 3))


def rir_cifar(num_classes: int = 10, width: int = 48, shortcut: str = "auto", outer_shortcut: str = "residual",
              identity_in_weight: bool = False) -> RiRCifar:
    """The fused "18-layer + wide RiR" (see :class:`RiRCifar`).

    It has 9,492,980 parameters for CIFAR-10 and 9,527,720 for CIFAR-100, as the public four-conv
    implementations count:

    * ``W_cat`` holds exactly the four convs' weights;
    * each layer has the same ``2·out`` BN channels;
    * the two strided layers have 1×1 projections without BN (``shortcut="auto"``);
    * the outer shortcuts have no parameters;
    * the head is a 1×1 conv plus BN.

    ``shortcut="zero_pad"`` drops the two projections (-23,040, 9,469,940 in total, the same as the
    equivalent plain CNN). ``width`` gives small models for tests.
    """
    return RiRCifar(num_classes, width, shortcut=shortcut, outer_shortcut=outer_shortcut,
                    identity_in_weight=identity_in_weight)
