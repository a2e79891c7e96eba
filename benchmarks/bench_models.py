"""Whole networks: resnet18, resnet50 (ImageNet), cifar_resnet(56) and, when present, the ResNet-in-ResNet
``rir_cifar``; eval (inference) and train step (forward + cross-entropy + backward; no optimizer step, which
is the same work for every variant).

Reference (``eager``): ``resfuse.reference.<model>()`` (torchvision's code for the ImageNet models). resfuse:
``resfuse.fuse(reference)`` (the same parameters), or for RiR ``resfuse.models.rir_cifar`` loaded from the
four-conv reference ``resfuse.reference.rir.rir_cifar_ref`` (``load_into_fused``). Variants and
measurements: ``benchmarks/conftest.py``. ``cifar_resnet20`` at batch 2 is the smoke case (collected only
under ``-m smoke`` / ``RESFUSE_BENCH_QUICK=1``).

Sizes (batch, image side): CPU small, ``--gpu-full`` in brackets.

    pytest benchmarks/bench_models.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch

import resfuse
import resfuse.reference as ref_models


class Model(NamedTuple):
    name: str
    build: Callable
    fuse: Callable
    classes: int
    small: tuple   # (batch, side) on the CPU / without --gpu-full
    full: tuple    # (batch, side) with --gpu-full


def _rir_pair():
    """(build, fuse) for the RiR network, or None if ``resfuse.models.rir_cifar`` does not exist."""
    try:
        from resfuse.models import rir_cifar
        from resfuse.reference.rir import load_into_fused, rir_cifar_ref
    except ImportError:
        return None
    return rir_cifar_ref, lambda ref: load_into_fused(rir_cifar(), ref)


MODELS = [
    Model("resnet18", ref_models.resnet18, resfuse.fuse, 1000, (4, 112), (256, 224)),
    Model("resnet50", ref_models.resnet50, resfuse.fuse, 1000, (2, 112), (256, 224)),
    Model("cifar_resnet56", lambda: ref_models.cifar_resnet(56), resfuse.fuse, 10, (8, 32), (256, 32)),
    Model("cifar_resnet20", lambda: ref_models.cifar_resnet(20), resfuse.fuse, 10, (2, 32), (256, 32)),
]
if _rir_pair() is not None:
    MODELS.append(Model("rir_cifar", *_rir_pair(), 10, (4, 32), (256, 32)))
SMOKE = "cifar_resnet20"


def pytest_generate_tests(metafunc):
    """The smoke case runs only in smoke (quick) sessions: its ~2 minutes of CPU compile buy nothing that
    cifar_resnet56 does not show."""
    if "model" in metafunc.fixturenames:
        quick = metafunc.config.resfuse_bench.quick
        metafunc.parametrize("model", [pytest.param(m, id=m.name, marks=[pytest.mark.smoke] if m.name == SMOKE else [])
                                       for m in MODELS if quick or m.name != SMOKE])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model(benchmark, bench_run, bench_full, variant, model, mode):
    batch, side = model.full if bench_full else model.small
    bench_run(benchmark, variant, suite="models", case=model.name, mode=mode, batch=batch,
              build=model.build, fuse=model.fuse,
              inputs=lambda: {"x": torch.randn(batch, 3, side, side), "input_grad": False,
                              "target": torch.randint(0, model.classes, (batch,))},
              info={"model": model.name, "side": side,
                    "params": sum(p.numel() for p in model.build().parameters())})
