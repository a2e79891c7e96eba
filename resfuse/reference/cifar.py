"""Plain-PyTorch CIFAR ResNets (He et al. 2015, §4.2): ResNet-20/32/44/56/110/1202.

Depth ``6n + 2``: a 3×3 conv (16 filters) + BN + ReLU stem on ``[N, 3, 32, 32]`` images, three stages of
``n`` :class:`~resfuse.reference.resnet.BasicBlock` with 16/32/64 filters on 32×32/16×16/8×8 maps (the
first block of stages 2 and 3 has stride 2), global average pool and a fully connected classifier.

Where a block changes shape, the shortcut is either option "A", the parameter-free
:class:`ZeroPadShortcut`, or option "B", a 1×1 conv + BN projection (as torchvision's ``downsample``).
"""

import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import BasicBlock, conv1x1, conv3x3


class ZeroPadShortcut(nn.Module):
    """Option "A" shortcut: strided subsampling, then zero channels appended after the input's.

    ``x`` is ``[N, in_channels, H, W]``; the output is ``[N, out_channels, ceil(H / stride),
    ceil(W / stride)]`` with ``out[:, :in_channels] = x[:, :, ::stride, ::stride]`` and
    ``out[:, in_channels:] = 0``. It has no parameters and no buffers.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"out_channels ({out_channels}) < in_channels ({in_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class CifarResNet(nn.Module):
    """CIFAR ResNet with ``blocks_per_stage`` BasicBlocks in each of its three stages.

    ``x`` is ``[N, 3, H, W]`` (32×32 for CIFAR); the output is ``[N, num_classes]`` logits.
    ``shortcut`` is "A" (:class:`ZeroPadShortcut`) or "B" (1×1 conv + BN projection) and applies to the
    first block of stages 2 and 3, the only ones that change shape. Convolution and linear weights are
    initialised with ``kaiming_normal_`` (fan-in), BN weights with 1 and biases with 0.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, shortcut: str = "A") -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f'shortcut must be "A" or "B", got {shortcut!r}')
        self.shortcut = shortcut
        self.inplanes = 16
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, blocks_per_stage, stride=1)
        self.layer2 = self._make_layer(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """One stage of ``blocks`` BasicBlocks, the first one with ``stride`` and the shortcut option."""
        downsample = None
        if stride != 1 or self.inplanes != planes:
            if self.shortcut == "A":
                downsample = ZeroPadShortcut(self.inplanes, planes, stride)
            else:
                downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


def cifar_resnet(depth: int, num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56, 110, 1202, ...)."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, shortcut=shortcut)
