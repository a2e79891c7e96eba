"""Whole residual blocks: ResNet BasicBlock (resnet18/34) and Bottleneck (resnet50, v1.5) at real layer shapes.

Reference (``eager``): ``resfuse.reference.BasicBlock`` / ``Bottleneck`` (torchvision's code). resfuse:
``resfuse.nn.BasicBlock.from_module(ref)`` / ``Bottleneck.from_module(ref)`` (same modules; one fused chain
per block, the projection shortcut's conv + BN included). The RiR layer is in ``bench_rir.py``. Variants
and measurements: ``benchmarks/conftest.py``; modes ``eval`` and ``train`` (forward + backward, the block
input needs a gradient as inside a network).

Cases (``name``: block, in-planes → planes, stride, input side at 224² images); a stride or a width
change gives the block a 1×1 conv + BN projection shortcut (``proj``). On the CPU the side is halved and
the batch is 8; at ``--gpu-full`` the batch is 256.

    pytest benchmarks/bench_blocks.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

import resfuse
from resfuse.reference import BasicBlock, Bottleneck, conv1x1


class Block(NamedTuple):
    name: str
    kind: str       # "basic" | "bottleneck"
    inplanes: int
    planes: int
    stride: int
    side: int       # input side for 224x224 images


CASES = {c.name: c for c in [
    Block("basic.l1", "basic", 64, 64, 1, 56),
    Block("basic.l2.0.proj", "basic", 64, 128, 2, 56),
    Block("basic.l3", "basic", 256, 256, 1, 14),
    Block("basic.l4", "basic", 512, 512, 1, 7),
    Block("bottleneck.l1.0.proj", "bottleneck", 64, 64, 1, 56),
    Block("bottleneck.l1.1", "bottleneck", 256, 64, 1, 56),
    Block("bottleneck.l2.0.proj", "bottleneck", 256, 128, 2, 56),
    Block("bottleneck.l3.1", "bottleneck", 1024, 256, 1, 14),
    Block("bottleneck.l3.0.proj", "bottleneck", 512, 256, 2, 28),
    Block("bottleneck.l4.1", "bottleneck", 2048, 512, 1, 7),
]}
CPU_CASES = ["basic.l1", "basic.l2.0.proj", "bottleneck.l1.1", "bottleneck.l3.0.proj"]
SMOKE = "basic.l1"


def sizes(full: bool):
    """(batch, image side) of this session."""
    return (256, 224) if full else (8, 112)


def make_block(c: Block) -> nn.Module:
    cls = BasicBlock if c.kind == "basic" else Bottleneck
    out = c.planes * cls.expansion
    down = None
    if c.stride != 1 or c.inplanes != out:
        down = nn.Sequential(conv1x1(c.inplanes, out, c.stride), nn.BatchNorm2d(out))
    return cls(c.inplanes, c.planes, c.stride, down)


def fuse_block(ref: nn.Module) -> nn.Module:
    fused_cls = resfuse.nn.BasicBlock if isinstance(ref, BasicBlock) else resfuse.nn.Bottleneck
    return fused_cls.from_module(ref)


def pytest_generate_tests(metafunc):
    if "block" in metafunc.fixturenames:
        metafunc.parametrize("block", metafunc.config.resfuse_bench.cases(CASES, CPU_CASES, SMOKE))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_block(benchmark, bench_run, bench_full, variant, block, mode):
    batch, image = sizes(bench_full)
    side = max(1, round(block.side * image / 224))
    bench_run(benchmark, variant, suite="blocks", case=block.name, mode=mode, batch=batch,
              build=lambda: make_block(block), fuse=fuse_block,
              inputs=lambda: {"x": torch.randn(batch, block.inplanes, side, side)},
              info={"block": block.kind, "inplanes": block.inplanes, "planes": block.planes,
                    "stride": block.stride, "side": side})
