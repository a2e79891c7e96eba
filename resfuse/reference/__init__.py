"""Plain-PyTorch reference ResNets: the unfused oracle for the fused kernels and models.

- :mod:`.resnet`: torchvision-compatible ImageNet ResNet / ResNeXt / wide ResNet.
- :mod:`.cifar`: CIFAR ResNets (depth 6n + 2) with option "A" (:class:`ZeroPadShortcut`) or "B" shortcuts.
- :mod:`.preact`: pre-activation ResNets (ImageNet and CIFAR).
"""

from .cifar import CifarResNet, ZeroPadShortcut, cifar_resnet
from .preact import (
    CifarPreActResNet,
    PreActBasicBlock,
    PreActBottleneck,
    PreActResNet,
    cifar_preact_resnet,
    preact_resnet18,
    preact_resnet34,
    preact_resnet50,
    preact_resnet101,
    preact_resnet152,
)
from .resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    conv1x1,
    conv3x3,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    wide_resnet50_2,
)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarPreActResNet",
    "CifarResNet",
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreActResNet",
    "ResNet",
    "ZeroPadShortcut",
    "cifar_preact_resnet",
    "cifar_resnet",
    "conv1x1",
    "conv3x3",
    "preact_resnet18",
    "preact_resnet34",
    "preact_resnet50",
    "preact_resnet101",
    "preact_resnet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "wide_resnet50_2",
]
