"""Drop-in fused modules (state_dict-compatible with ``nn.Conv2d``/``nn.BatchNorm2d`` and torchvision)."""
from .blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck, shortcut_of
from .conv_bn_act import ConvBNAct

__all__ = ["ConvBNAct", "BasicBlock", "Bottleneck", "PreActBasicBlock", "PreActBottleneck", "shortcut_of"]
