"""Fused ResNets: the ``resfuse.reference`` models' exact module trees (so reference and torchvision
state_dicts load with ``strict=True``) built from ``resfuse.nn`` blocks, with a fused stem."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import functional as RF
from .. import layout
from .. import nn as fnn
from ..reference import cifar as ref_cifar
from ..reference import preact as ref_preact
from ..reference import resnet as ref_resnet


class ResNet(ref_resnet.ResNet):
    """ImageNet ResNet (see ``resfuse.reference.ResNet``) whose stem conv-BN-ReLU(-max-pool) is one
    fused unit (:func:`resfuse.functional.conv_bn_act_pool`). In CPU inference an NCHW input is
    converted to channels_last once here (:func:`resfuse.layout.inference_input`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = RF.conv_bn_act_pool(layout.inference_input(x), self.conv1, self.bn1, self.maxpool)
        x = fnn.run_stages((self.layer1, self.layer2, self.layer3, self.layer4), x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(**kwargs: Any) -> ResNet:
    return ResNet(fnn.BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
    return ResNet(fnn.BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
    return ResNet(fnn.Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs: Any) -> ResNet:
    return ResNet(fnn.Bottleneck, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs: Any) -> ResNet:
    return ResNet(fnn.Bottleneck, [3, 8, 36, 3], **kwargs)


def resnext50_32x4d(**kwargs: Any) -> ResNet:
    return ResNet(fnn.Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, **kwargs)


def wide_resnet50_2(**kwargs: Any) -> ResNet:
    return ResNet(fnn.Bottleneck, [3, 4, 6, 3], width_per_group=128, **kwargs)


class CifarResNet(ref_cifar.CifarResNet):
    """CIFAR ResNet (see ``resfuse.reference.CifarResNet``) built from fused BasicBlocks; an NCHW input
    is converted to channels_last once in CPU inference, as in :class:`ResNet`."""

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*(fnn.BasicBlock.from_module(b) for b in super()._make_layer(planes, blocks, stride)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = RF.conv_bn_act(layout.inference_input(x), self.conv1, self.bn1)
        x = fnn.run_stages((self.layer1, self.layer2, self.layer3), x)
        return self.fc(self.avgpool(x).flatten(1))


def cifar_resnet(depth: int, num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """Fused CIFAR ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56, 110, 1202, ...)."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, shortcut=shortcut)


_PREACT_BLOCKS = {ref_preact.PreActBasicBlock: fnn.PreActBasicBlock, ref_preact.PreActBottleneck: fnn.PreActBottleneck}


def preact_resnet(depth: int, num_classes: int = 1000) -> ref_preact.PreActResNet:
    """Fused ImageNet pre-activation ResNet-18/34/50/101/152."""
    ref = {18: ref_preact.preact_resnet18, 34: ref_preact.preact_resnet34, 50: ref_preact.preact_resnet50,
           101: ref_preact.preact_resnet101, 152: ref_preact.preact_resnet152}
    if depth not in ref:
        raise ValueError(f"preact_resnet depth must be one of {sorted(ref)}, got {depth}")
    return _fuse_preact(ref[depth](num_classes=num_classes))


def cifar_preact_resnet(depth: int, num_classes: int = 10, bottleneck: bool | None = None):
    """Fused CIFAR pre-activation ResNet (ResNet-164 / ResNet-1001 with bottlenecks)."""
    return _fuse_preact(ref_preact.cifar_preact_resnet(depth, num_classes, bottleneck))


def _fuse_preact(model: nn.Module) -> nn.Module:
    for stage in (m for n, m in model.named_children() if n.startswith("layer")):
        for i, blk in enumerate(stage):
            stage[i] = _PREACT_BLOCKS[type(blk)].from_module(blk)
    return model
