"""Fused models with the reference (and torchvision) module trees and state_dict keys."""
from .resnet import (CifarResNet, ResNet, cifar_preact_resnet, cifar_resnet, preact_resnet, resnet18, resnet34,
                     resnet50, resnet101, resnet152, resnext50_32x4d, wide_resnet50_2)

__all__ = ["ResNet", "CifarResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnext50_32x4d", "wide_resnet50_2", "cifar_resnet", "preact_resnet", "cifar_preact_resnet"]

# ResNet in ResNet (issue 6)
from .rir import RiRCifar, rir_cifar  # noqa: E402

__all__ += ["RiRCifar", "rir_cifar"]
