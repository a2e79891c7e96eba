"""Drop-in fused modules (state_dict-compatible with ``nn.Conv2d``/``nn.BatchNorm2d`` and torchvision)."""
from .blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck, run_stages, shortcut_of
from .conv_bn_act import ConvBNAct

__all__ = ["ConvBNAct", "BasicBlock", "Bottleneck", "PreActBasicBlock", "PreActBottleneck", "run_stages",
           "shortcut_of"]

# ResNet in ResNet (issue 6)
from .rir import GeneralizedResidualLayer, RiRBlock, decay_toward_targets, partial_identity, rir_param_groups  # noqa: E402

__all__ += ["GeneralizedResidualLayer", "RiRBlock", "rir_param_groups", "decay_toward_targets", "partial_identity"]
