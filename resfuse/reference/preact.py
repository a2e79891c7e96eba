"""Plain-PyTorch pre-activation ResNets (He et al. 2016, "Identity Mappings in Deep Residual Networks").

A pre-activation block computes ``BN → ReLU → conv`` for each of its layers and adds the shortcut with
no activation after the addition. When the block changes shape, its shortcut is a 1×1 convolution
(no BN) applied to the *pre-activated* input ``relu(bn1(x))``, as in the paper's code; otherwise it is
the identity on ``x``. Since every block pre-activates its input, the networks end with BN + ReLU before
the global average pool.

- :class:`PreActResNet` (ImageNet, ``preact_resnet18/34/50/101/152``): 7×7/2 conv stem and 3×3/2
  max-pool (no BN/ReLU in the stem: the first block normalises it), stages of 64/128/256/512 planes.
- :class:`CifarPreActResNet` (``cifar_preact_resnet``): 3×3 conv stem with 16 filters, three stages of
  16/32/64 planes (×4 output channels for bottlenecks), stride 2 opening stages 2 and 3.
"""

from typing import Any

from torch import Tensor, nn

from .resnet import conv1x1, conv3x3


class PreActBasicBlock(nn.Module):
    """``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``, with two 3×3 convs.

    ``x`` is ``[N, inplanes, H, W]``; the output is ``[N, planes, ceil(H / stride), ceil(W / stride)]``.
    ``shortcut`` is ``downsample(relu(bn1(x)))`` when ``downsample`` is given, else ``x``.
    """

    expansion: int = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """Pre-activation 1×1 → 3×3 → 1×1 bottleneck; the stride is on the 3×3 conv.

    ``x`` is ``[N, inplanes, H, W]``; the inner width is ``planes``; the output is
    ``[N, planes * 4, ceil(H / stride), ceil(W / stride)]``. ``shortcut`` is
    ``downsample(relu(bn1(x)))`` when ``downsample`` is given, else ``x``.
    """

    expansion: int = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


PreActBlock = type[PreActBasicBlock | PreActBottleneck]


def _make_stage(block: PreActBlock, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` blocks; the first has ``stride`` and a 1×1 projection shortcut if it changes shape."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU) convolutions, BN weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class PreActResNet(nn.Module):
    """ImageNet pre-activation ResNet.

    ``x`` is ``[N, 3, H, W]`` (224×224 for ImageNet); the output is ``[N, num_classes]`` logits.
    Modules: ``conv1`` (7×7/2, 64 filters), ``maxpool`` (3×3/2), ``layer1..layer4`` (``layers[i]``
    blocks of 64/128/256/512 planes, stride 1/2/2/2), ``bn_final``, ``relu``, ``avgpool``, ``fc``.
    """

    def __init__(self, block: PreActBlock, layers: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _make_stage(block, 64, 64, layers[0], stride=1)
        self.layer2 = _make_stage(block, 64 * block.expansion, 128, layers[1], stride=2)
        self.layer3 = _make_stage(block, 128 * block.expansion, 256, layers[2], stride=2)
        self.layer4 = _make_stage(block, 256 * block.expansion, 512, layers[3], stride=2)
        self.bn_final = nn.BatchNorm2d(512 * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu(self.bn_final(x))
        return self.fc(self.avgpool(x).flatten(1))


class CifarPreActResNet(nn.Module):
    """CIFAR pre-activation ResNet with ``blocks_per_stage`` blocks in each of its three stages.

    ``x`` is ``[N, 3, H, W]`` (32×32 for CIFAR); the output is ``[N, num_classes]`` logits.
    Modules: ``conv1`` (3×3, 16 filters), ``layer1..layer3`` (16/32/64 planes, stride 1/2/2),
    ``bn_final``, ``relu``, ``avgpool``, ``fc``.
    """

    def __init__(self, block: PreActBlock, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, 16)
        self.layer1 = _make_stage(block, 16, 16, blocks_per_stage, stride=1)
        self.layer2 = _make_stage(block, 16 * block.expansion, 32, blocks_per_stage, stride=2)
        self.layer3 = _make_stage(block, 32 * block.expansion, 64, blocks_per_stage, stride=2)
        self.bn_final = nn.BatchNorm2d(64 * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn_final(x))
        return self.fc(self.avgpool(x).flatten(1))


def cifar_preact_resnet(
    depth: int, num_classes: int = 10, bottleneck: bool | None = None
) -> CifarPreActResNet:
    """CIFAR pre-activation ResNet of ``depth`` layers.

    With bottleneck blocks ``depth = 9n + 2`` (ResNet-164, ResNet-1001); with basic blocks
    ``depth = 6n + 2`` (ResNet-20 ... ResNet-110). ``bottleneck=None`` follows the paper, which uses
    basic blocks up to ResNet-110 and bottlenecks from ResNet-164 on: bottleneck iff ``depth >= 164``.
    """
    if bottleneck is None:
        bottleneck = depth >= 164
    block, layers_per_block = (PreActBottleneck, 3) if bottleneck else (PreActBasicBlock, 2)
    per_stage = 3 * layers_per_block
    if depth < per_stage + 2 or (depth - 2) % per_stage != 0:
        raise ValueError(
            f"CIFAR pre-activation ResNet depth with {block.__name__} must be "
            f"{per_stage}n + 2 with n >= 1, got {depth}"
        )
    return CifarPreActResNet(block, (depth - 2) // per_stage, num_classes=num_classes)


def preact_resnet18(**kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-18: PreActBasicBlock × [2, 2, 2, 2]."""
    return PreActResNet(PreActBasicBlock, [2, 2, 2, 2], **kwargs)


def preact_resnet34(**kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-34: PreActBasicBlock × [3, 4, 6, 3]."""
    return PreActResNet(PreActBasicBlock, [3, 4, 6, 3], **kwargs)


def preact_resnet50(**kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-50: PreActBottleneck × [3, 4, 6, 3]."""
    return PreActResNet(PreActBottleneck, [3, 4, 6, 3], **kwargs)


def preact_resnet101(**kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-101: PreActBottleneck × [3, 4, 23, 3]."""
    return PreActResNet(PreActBottleneck, [3, 4, 23, 3], **kwargs)


def preact_resnet152(**kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-152: PreActBottleneck × [3, 8, 36, 3]."""
    return PreActResNet(PreActBottleneck, [3, 8, 36, 3], **kwargs)
