"""Randomised fused chains against plain PyTorch in float64: the combinations the grids of
``test_fused_chain.py`` do not enumerate.

Each seed draws one chain — 1 to 3 conv-BN layers with kernels 1/3/5/7, strides 1/2, dilation 1/2,
groups 1/2 (3x3 layers), 1-40 channels, a 1-19 x 1-19 map, batch 1-4 — and one setting of everything
around it: float32 / float64 / bfloat16, NCHW / channels_last / a strided (non-dense) input, train or
eval, final ReLU or not, affine or not, running statistics tracked or not, momentum 0.1 / 0.3 / None,
no / tensor / identity / projection shortcut, the ``cpu`` backend under every convolution algorithm
(``auto`` and each forced one; a forced one runs where it applies) or the chain on the plain-PyTorch
primitives, and one or two calls. Output, every gradient, running statistics and the batch counter
are compared by :func:`test_fused_chain.check_case`.

float32 gradients are compared elementwise (1e-4), bfloat16 ones against 3x plain PyTorch's own
bfloat16 error (+ 2e-2). Where that fails, the seed is run again in float64, which must pass at 1e-8
— the logic is exact — and the gradients in the drawn dtype must be within ``GRAD_L2`` (float32 3e-3,
bfloat16 0.25) in L2: a pre-activation within rounding of 0 flips a ReLU mask element and moves
single gradient elements by O(1), in plain PyTorch just as well, and on a small map a few such
elements decide whether plain PyTorch's or resfuse's bfloat16 error is the larger (a few seeds in a
hundred).
"""
import random

import pytest
import torch

from resfuse import backends, cpu_conv
from resfuse.testing import rand_activation

from test_fused_chain import check_case, make_layers

SEEDS = range(320)
ALGOS = ("auto", "onednn", "gemm", "winograd", "winograd4")
#: the L2 bound on gradients of a seed whose elementwise (float32) or plain-relative (bfloat16) check failed
GRAD_L2 = {torch.float32: 3e-3, torch.bfloat16: 2.5e-1}


def draw(seed: int) -> dict:
    """One random chain and its setting (see the module docstring)."""
    rnd = random.Random(seed)
    k = rnd.choice([1, 2, 3])
    c = dict(kernels=[rnd.choice([1, 3, 3, 5, 7]) for _ in range(k)],
             strides=[rnd.choice([1, 1, 2]) for _ in range(k)],
             chans=[rnd.randint(1, 40) for _ in range(k + 1)],
             groups=rnd.choice([1, 1, 1, 2]), dilation=rnd.choice([1, 1, 2]),
             dtype=rnd.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16]),
             channels_last=rnd.random() < 0.6, strided=rnd.random() < 0.15,
             train=rnd.random() < 0.7, relu=rnd.random() < 0.8, affine=rnd.random() < 0.85,
             track=rnd.random() < 0.85, momentum=rnd.choice([0.1, 0.3, None]),
             algo=rnd.choice(ALGOS), backend="cpu" if rnd.random() < 0.8 else "reference-prims",
             shape=(rnd.randint(1, 4), rnd.randint(1, 19), rnd.randint(1, 19)) if rnd.random() < 0.75 else
             (rnd.randint(2, 4), rnd.randint(12, 19), rnd.randint(12, 19)),
             shortcut=rnd.choice(["none", "tensor", "projection", "identity"]), calls=rnd.choice([1, 2]))
    if c["shortcut"] == "identity":
        c["chans"][-1], c["strides"] = c["chans"][0], [1] * k
    if c["groups"] == 2:
        c["chans"] = [ch + ch % 2 for ch in c["chans"]]
    return c


def _runnable(c) -> bool:
    """Every conv output is non-empty, and every BN normalising by batch statistics sees > 1 value —
    in bfloat16 every layer has at least 64 values per channel (on fewer, single rounding flips
    decide its errors)."""
    n, h, w = c["shape"]
    batch_stats = c["train"] or not c["track"]
    for kk, s in zip(c["kernels"], c["strides"]):
        pad, dil = c["dilation"] * (kk // 2), c["dilation"]
        h = (h + 2 * pad - dil * (kk - 1) - 1) // s + 1
        w = (w + 2 * pad - dil * (kk - 1) - 1) // s + 1
        if h <= 0 or w <= 0 or (batch_stats and n * h * w == 1):
            return False
        if c["dtype"] == torch.bfloat16 and n * h * w < 64:
            return False
    return True


def run(c, dtype, seed, grad_l2=None):
    torch.manual_seed(seed)
    layers = make_layers(c["chans"], c["kernels"], c["strides"], groups=c["groups"], dilation=c["dilation"],
                         momentum=c["momentum"], affine=c["affine"], track=c["track"], dtype=dtype)
    x = rand_activation((c["shape"][0], c["chans"][0], *c["shape"][1:]), dtype, c["channels_last"])
    if c["strided"]:
        x = torch.cat([x, x], 3)[..., ::2]
    # (a 1-channel input is NCHW and channels_last at once: its output may be either)
    cl = c["channels_last"] and not c["strided"] and c["chans"][0] > 1
    with cpu_conv.forced(c["algo"]):
        for _ in range(c["calls"]):
            for conv, bn in layers:
                for p in (*conv.parameters(), *bn.parameters()):
                    p.grad = None
            check_case(c["backend"], layers, x, c["shortcut"], relu=c["relu"], train=c["train"], dtype=dtype,
                       channels_last=cl, grad_l2=grad_l2)


@pytest.mark.skipif(backends.instance("cpu")[0] is None, reason="cpu backend unavailable")
@pytest.mark.parametrize("seed", SEEDS)
def test_random_chain(seed):
    c = draw(seed)
    if not _runnable(c):
        pytest.skip("drawn chain has an empty output or a one-value batch statistic")
    try:
        run(c, c["dtype"], seed)
    except AssertionError as e:
        if c["dtype"] == torch.float64 or not str(e).startswith("grad"):
            raise AssertionError(f"seed {seed}: {c}: {e}") from e
        run(c, torch.float64, seed)
        run(c, c["dtype"], seed, grad_l2=GRAD_L2[c["dtype"]])


def test_draws_cover_the_space():
    """The seeds reach every kind of setting (a guard against a draw that silently narrows)."""
    cs = [draw(s) for s in SEEDS]
    runnable = [c for c in cs if _runnable(c)]
    assert len(runnable) >= 0.7 * len(cs)
    for key, values in (("dtype", (torch.float32, torch.float64, torch.bfloat16)), ("algo", ALGOS),
                        ("shortcut", ("none", "tensor", "projection", "identity")),
                        ("backend", ("cpu", "reference-prims")), ("momentum", (0.1, 0.3, None)),
                        ("train", (True, False)), ("strided", (True, False)), ("calls", (1, 2))):
        assert {c[key] for c in runnable} == set(values), key
    assert {g for c in runnable for g in (c["groups"], c["dilation"])} == {1, 2}
    assert {kk for c in runnable for kk in c["kernels"]} == {1, 3, 5, 7}
    # layers that Winograd takes (3x3, stride 1, dilation 1, one group) under a forced Winograd algorithm
    assert any(c["algo"].startswith("winograd") and c["dilation"] == 1 and c["groups"] == 1
               and any(kk == 3 and s == 1 for kk, s in zip(c["kernels"], c["strides"])) for c in runnable)
