"""Plain-PyTorch reference ResNets: the unfused oracle for the fused kernels and models.

- :mod:`.resnet`: torchvision-compatible ImageNet ResNet / ResNeXt / wide ResNet.
- :mod:`.cifar`: CIFAR ResNets (depth 6n + 2) with option "A" (:class:`ZeroPadShortcut`) or "B" shortcuts.
- :mod:`.preact`: pre-activation ResNets (ImageNet and CIFAR).
- :mod:`.rir`: ResNet in ResNet (two streams, four convs per layer) and its CIFAR baselines, plus the
  converters between its weights and the fused :mod:`resfuse.nn.rir` modules' one-conv layout.
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
from .rir import (
    ConvBNHead,
    GeneralizedResidualLayerRef,
    PlainCnnCifarRef,
    RiRBlockRef,
    RiRCifarRef,
    RiRStemRef,
    WideResNetCifarRef,
    join_stream_weight,
    load_from_fused,
    load_into_fused,
    plain_cnn_cifar_ref,
    rir_cifar_ref,
    split_stream_weight,
    wide_resnet_cifar_ref,
)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarPreActResNet",
    "CifarResNet",
    "ConvBNHead",
    "GeneralizedResidualLayerRef",
    "PlainCnnCifarRef",
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreActResNet",
    "ResNet",
    "RiRBlockRef",
    "RiRCifarRef",
    "RiRStemRef",
    "WideResNetCifarRef",
    "ZeroPadShortcut",
    "cifar_preact_resnet",
    "cifar_resnet",
    "conv1x1",
    "conv3x3",
    "join_stream_weight",
    "load_from_fused",
    "load_into_fused",
    "plain_cnn_cifar_ref",
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
    "rir_cifar_ref",
    "split_stream_weight",
    "wide_resnet50_2",
    "wide_resnet_cifar_ref",
]
