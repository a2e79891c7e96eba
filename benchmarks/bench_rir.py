"""ResNet in ResNet: the fused generalized residual layer and ``rir_cifar`` against the paper's four-conv
form, in one run.

Providers:

* ``fused``: ``resfuse.nn.GeneralizedResidualLayer`` / ``resfuse.models.rir_cifar``, backend ``auto``.
  Per layer this is one conv over ``[r | t]`` with the shortcut folded into its weight, then one BN +
  ReLU pass.
* ``four_conv``: ``resfuse.reference.rir``, i.e. eager PyTorch with four convs per layer, the
  explicit shortcut and BN + ReLU per stream.
* ``compiled``: ``torch.compile`` of ``four_conv``, with Inductor ``freezing`` in eval mode (what
  ``torch.compile`` does best for CPU inference: BN folded, weights prepacked, add + ReLU as post-ops).
* ``conv_alone`` (layer only): a single ``F.conv2d`` over ``[r | t]`` with ``W_eff``, without BN or
  ReLU. This is the ceiling for a fused layer built on ATen's convolution.

Modes:

* ``eval``: running statistics, no grad.
* ``train``: forward + backward with batch statistics (no optimizer step).

Shapes are the CIFAR RiR layers: 48, 96 and 192 filters per stream at 32×32, 16×16 and 8×8. Each
benchmark records its provider, shape, batch, dtype, thread count and the resfuse backend that ran in
``extra_info``; compare the medians within a group.

    pytest benchmarks/bench_rir.py --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name
"""
import copy

import pytest
import torch
import torch._inductor.config  # Inductor freezing for the compiled eval peer
import torch.nn.functional as F

import resfuse
from resfuse.models.rir import rir_cifar
from resfuse.nn.rir import GeneralizedResidualLayer
from resfuse.reference import rir as R

LAYER_BATCH = 16
MODEL_BATCH = 16
LAYER_SHAPES = [(48, 32), (96, 16), (192, 8)]  # (filters per stream, H = W)
PROVIDERS = ["fused", "four_conv", "compiled", "conv_alone"]


def _warm(fn, n=2):
    """Run ``fn`` ``n`` times; ``torch.compile`` compiles on the first call, with Inductor freezing
    (BN folded into the conv, weights prepacked for oneDNN: the stronger CPU peer) in effect for
    graphs compiled without grad."""
    with torch._inductor.config.patch(freezing=True):
        for _ in range(n):
            fn()


def _record(benchmark, provider, mode, **info):
    """Call after the warm-up runs (so that ``resfuse.last_used()`` names the fused provider's backend)."""
    benchmark.extra_info.update(provider=provider, mode=mode, dtype="float32", threads=torch.get_num_threads(),
                                torch=torch.__version__, **info)
    if provider == "fused":
        benchmark.extra_info["resfuse_backend"] = resfuse.last_used().get("conv_bn_chain")


def _step(forward, leaves, grads, train):
    """A callable running one eval forward, or one train forward + backward, of ``forward()`` (which
    returns a tensor or a tuple of tensors, matched by ``grads``); ``leaves`` get their ``.grad`` reset."""

    def run():
        if not train:
            with torch.no_grad():
                return forward()
        for t in leaves:
            t.grad = None
        out = forward()
        torch.autograd.backward(out, grads)
        return out

    return run


def _layer_case(provider, c, hw, train):
    torch.manual_seed(0)
    fused = GeneralizedResidualLayer(c, c).train(train)
    x = torch.randn(LAYER_BATCH, 2 * c, hw, hw, requires_grad=train)
    g = torch.randn(LAYER_BATCH, 2 * c, hw, hw)
    if provider == "fused":
        return _step(lambda: fused(x), [x, *fused.parameters()], g, train)
    if provider == "conv_alone":
        w = fused.effective_weight().detach().requires_grad_(train)
        return _step(lambda: F.conv2d(x, w, padding=1), [x, w], g, train)
    # the paper's way: two stream tensors in, two out, four convs, no concatenation anywhere
    ref = R.load_from_fused(R.GeneralizedResidualLayerRef(c, c), fused).train(train)
    run = torch.compile(ref) if provider == "compiled" else ref
    r, t = (x[:, :c].detach().clone().requires_grad_(train), x[:, c:].detach().clone().requires_grad_(train))
    return _step(lambda: run((r, t)), [r, t, *ref.parameters()], (g[:, :c], g[:, c:]), train)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("c, hw", LAYER_SHAPES, ids=[f"{c}x{hw}" for c, hw in LAYER_SHAPES])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_rir_layer(benchmark, provider, c, hw, mode):
    benchmark.group = f"rir-layer-{c}x{hw}-{mode}"
    fn = _layer_case(provider, c, hw, mode == "train")
    _warm(fn)
    _record(benchmark, provider, mode, shape=[LAYER_BATCH, 2 * c, hw, hw], batch=LAYER_BATCH)
    benchmark(fn)


@pytest.mark.parametrize("provider", ["fused", "four_conv", "compiled"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_rir_cifar(benchmark, provider, mode):
    benchmark.group = f"rir-cifar-{mode}"
    train = mode == "train"
    torch.manual_seed(0)
    fused = rir_cifar().train(train)
    x = torch.randn(MODEL_BATCH, 3, 32, 32)
    y = torch.randint(0, 10, (MODEL_BATCH,))
    model = fused
    if provider != "fused":
        model = R.load_from_fused(R.rir_cifar_ref(), fused).train(train)
        if provider == "compiled":
            model = torch.compile(model)
    params = list(model.parameters())

    def step():
        if not train:
            with torch.no_grad():
                return model(x)
        for p in params:
            p.grad = None
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    _warm(step)
    _record(benchmark, provider, mode, shape=[MODEL_BATCH, 3, 32, 32], batch=MODEL_BATCH,
            params=sum(p.numel() for p in fused.parameters()))
    benchmark(step)


@pytest.mark.smoke
@pytest.mark.benchmark(group="rir-smoke")
@pytest.mark.parametrize("provider", ["fused", "four_conv"])
def test_rir_smoke(benchmark, provider):
    """A tiny train step of both forms (CI: the benchmark file runs)."""
    torch.manual_seed(0)
    fused = rir_cifar(width=4)
    model = fused if provider == "fused" else R.load_from_fused(R.rir_cifar_ref(width=4), copy.deepcopy(fused))
    x = torch.randn(2, 3, 16, 16)

    def step():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    _record(benchmark, provider, "train", shape=[2, 3, 16, 16], batch=2)
    benchmark(step)
