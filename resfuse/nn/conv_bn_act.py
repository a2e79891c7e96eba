"""``ConvBNAct``: conv → BatchNorm → (+ residual) → activation as one fused unit."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import functional as RF

_ACTIVATIONS = ("relu", None)


class ConvBNAct(nn.Module):
    """``act(bn(conv(x)) + residual)`` with children ``.conv`` (``nn.Conv2d``, no bias) and ``.bn``
    (``nn.BatchNorm2d``), so its state_dict is that of ``nn.Sequential(conv, bn)`` under these names.

    Args:
        padding: ``None`` means ``dilation * (kernel_size // 2)`` ("same" for odd kernels at stride 1).
        activation: ``"relu"`` or ``None``.

    ``forward(x, residual=None)``: ``x`` is ``[N, in_channels, H, W]`` (NCHW or channels_last);
    ``residual`` is ``None`` or a tensor of the output's shape ``[N, out_channels, H', W']``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: Optional[int] = None, dilation: int = 1, groups: int = 1,
                 activation: Optional[str] = "relu", eps: float = 1e-5, momentum: Optional[float] = 0.1):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if padding is None:
            padding = dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.activation = activation

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: Optional[str] = "relu") -> "ConvBNAct":
        """Wrap existing modules (shared, not copied: same Parameter and buffer objects)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv, self.bn, self.activation = conv, bn, activation
        return self

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return RF.conv_bn_act(x, self.conv, self.bn, residual, relu=self.activation == "relu")

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
