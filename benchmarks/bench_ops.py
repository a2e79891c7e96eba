"""One fused unit — conv + BN + ReLU (+ shortcut add) — at ResNet-50 layer shapes.

Reference (``eager``): ``relu(bn(conv(x)) [+ residual])`` with ``nn.Conv2d`` / ``nn.BatchNorm2d``. resfuse:
``resfuse.functional.conv_bn_act(x, conv, bn, residual)`` on the same modules. Variants and measurements:
``benchmarks/conftest.py``. Modes: ``eval`` (running statistics, no grad; resfuse folds BN into the conv)
and ``train`` (forward + backward with batch statistics; the input and the residual need gradients, as
inside a network, except for the stem whose input is the image).

Shapes (``name``: C_in → C_out, kernel, stride, input side at 224² images) are ResNet-50 v1.5 layers; on the
CPU the input side is halved (112² images) and the batch is 8, at ``--gpu-full`` the batch is 256.

    pytest benchmarks/bench_ops.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

import resfuse.functional as RF


class Shape(NamedTuple):
    name: str
    cin: int
    cout: int
    k: int
    stride: int
    side: int          # input side for 224x224 images
    add: bool = False  # shortcut add before the ReLU (the last conv of a block)
    relu: bool = True


SHAPES = {s.name: s for s in [
    Shape("stem.7x7s2", 3, 64, 7, 2, 224),
    Shape("l1.1x1.256-64", 256, 64, 1, 1, 56),
    Shape("l1.3x3.64", 64, 64, 3, 1, 56),
    Shape("l1.1x1.64-256+add", 64, 256, 1, 1, 56, add=True),
    Shape("l1.proj.64-256", 64, 256, 1, 1, 56, relu=False),
    Shape("l2.3x3s2.128", 128, 128, 3, 2, 56),
    Shape("l2.1x1.128-512+add", 128, 512, 1, 1, 28, add=True),
    Shape("l3.3x3.256", 256, 256, 3, 1, 14),
    Shape("l3.1x1.1024-256", 1024, 256, 1, 1, 14),
    Shape("l3.1x1.256-1024+add", 256, 1024, 1, 1, 14, add=True),
    Shape("l4.3x3.512", 512, 512, 3, 1, 7),
    Shape("l4.1x1.512-2048+add", 512, 2048, 1, 1, 7, add=True),
]}
#: the CPU subset (one of each kind per stage, ~5 min with compile on 2 cores)
CPU_SHAPES = ["stem.7x7s2", "l1.3x3.64", "l1.1x1.64-256+add", "l2.3x3s2.128", "l3.1x1.1024-256", "l4.3x3.512"]
SMOKE = "l1.3x3.64"


def sizes(full: bool):
    """(batch, image side) of this session."""
    return (256, 224) if full else (8, 112)


class ConvBNAct(nn.Module):
    """Eager reference unit: ``act(bn(conv(x)) + residual)``."""

    def __init__(self, s: Shape):
        super().__init__()
        self.conv = nn.Conv2d(s.cin, s.cout, s.k, s.stride, s.k // 2, bias=False)
        self.bn = nn.BatchNorm2d(s.cout)
        self.relu = s.relu

    def forward(self, x, residual=None):
        y = self.bn(self.conv(x))
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


class FusedConvBNAct(nn.Module):
    """The same unit through ``resfuse.functional.conv_bn_act`` (shares ``ref``'s modules)."""

    def __init__(self, ref: ConvBNAct):
        super().__init__()
        self.conv, self.bn, self.relu = ref.conv, ref.bn, ref.relu

    def forward(self, x, residual=None):
        return RF.conv_bn_act(x, self.conv, self.bn, residual, relu=self.relu)


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", metafunc.config.resfuse_bench.cases(SHAPES, CPU_SHAPES, SMOKE))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_conv_bn_act(benchmark, bench_run, bench_full, variant, shape, mode):
    batch, image = sizes(bench_full)
    side = max(1, round(shape.side * image / 224))
    out_side = (side + 2 * (shape.k // 2) - shape.k) // shape.stride + 1

    def inputs():
        d = {"x": torch.randn(batch, shape.cin, side, side), "input_grad": shape.cin != 3}
        if shape.add:
            d["residual"] = torch.randn(batch, shape.cout, out_side, out_side)
        return d

    bench_run(benchmark, variant, suite="ops", case=shape.name, mode=mode, batch=batch,
              build=lambda: ConvBNAct(shape), fuse=FusedConvBNAct, inputs=inputs,
              info={"cin": shape.cin, "cout": shape.cout, "kernel": shape.k, "stride": shape.stride,
                    "side": side, "residual": shape.add, "relu": shape.relu})
