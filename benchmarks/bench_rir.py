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
* ``*_cl``: the same with channels_last weights and activations (for the model: converted once at its
  input by ``resfuse.layout.channels_last``), oneDNN's native CPU layout. The other providers run NCHW.

Modes:

* ``eval``: running statistics, no grad.
* ``train``: forward + backward with batch statistics (no optimizer step).

Shapes are the CIFAR RiR layers: 48, 96 and 192 filters per stream at 32×32, 16×16 and 8×8 (batch
16), and the whole ``rir_cifar`` (batch 16, 32×32), float32 NCHW.

Two ways to run it:

* **pytest-benchmark**, one case at a time. Each benchmark records its provider, shape, batch,
  dtype, thread count and the resfuse backend in ``extra_info``; compare the medians within a
  group::

      pytest benchmarks/bench_rir.py --benchmark-only --benchmark-group-by=group \
          --benchmark-columns=median,iqr,rounds --benchmark-sort=name

* **Interleaved**, with the providers of a case timed round-robin, medians and a Markdown table.
  This is what to trust on a shared machine, where a sequential run drifts with the neighbours'
  load::

      python benchmarks/bench_rir.py [--reps 15] [--what layers|model|all]
"""
import argparse
import copy
import os
import statistics
import sys
import time

import pytest
import torch
import torch._inductor.config  # Inductor freezing for the compiled eval peer
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # script mode from a checkout
    sys.path.insert(0, ROOT)

import resfuse  # noqa: E402
from resfuse import cpu_conv, layout  # noqa: E402
from resfuse.models.rir import rir_cifar  # noqa: E402
from resfuse.nn.rir import GeneralizedResidualLayer  # noqa: E402
from resfuse.reference import rir as R  # noqa: E402

LAYER_BATCH = 16
#: train steps before timing, so that no convolution trial runs in a timed step
TRAIN_WARM = cpu_conv.warm_steps()
MODEL_BATCH = 16
LAYER_SHAPES = [(48, 32), (96, 16), (192, 8)]  # (filters per stream, H = W)
PROVIDERS = ["fused", "four_conv", "compiled", "conv_alone", "fused_cl", "four_conv_cl", "conv_alone_cl"]
MODEL_PROVIDERS = ["fused", "four_conv", "compiled", "fused_cl", "four_conv_cl"]
CL = torch.channels_last


def _warm(fn, n=2):
    """Run ``fn`` ``n`` times (train steps: ``TRAIN_WARM``); ``torch.compile`` compiles on the first call, with Inductor freezing
    (BN folded into the conv, weights prepacked for oneDNN: the stronger CPU peer) in effect for
    graphs compiled without grad."""
    with torch._inductor.config.patch(freezing=True):
        for _ in range(n):
            fn()


def _record(benchmark, provider, mode, **info):
    """Call after the warm-up runs (so that ``resfuse.last_used()`` names the fused provider's backend)."""
    benchmark.extra_info.update(provider=provider, mode=mode, dtype="float32", threads=torch.get_num_threads(),
                                torch=torch.__version__, **info)
    if provider.startswith("fused"):
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
    base, cl = provider.removesuffix("_cl"), provider.endswith("_cl")
    fmt = CL if cl else torch.contiguous_format
    fused = GeneralizedResidualLayer(c, c).train(train)
    x = torch.randn(LAYER_BATCH, 2 * c, hw, hw).contiguous(memory_format=fmt).requires_grad_(train)
    g = torch.randn(LAYER_BATCH, 2 * c, hw, hw).contiguous(memory_format=fmt)
    if base == "fused":
        fused = fused.to(memory_format=fmt)
        return _step(lambda: fused(x), [x, *fused.parameters()], g, train)
    if base == "conv_alone":
        w = fused.effective_weight().detach().contiguous(memory_format=fmt).requires_grad_(train)
        return _step(lambda: F.conv2d(x, w, padding=1), [x, w], g, train)
    # the paper's way: two stream tensors in, two out, four convs, no concatenation anywhere
    ref = R.load_from_fused(R.GeneralizedResidualLayerRef(c, c), fused).train(train).to(memory_format=fmt)
    run = torch.compile(ref) if base == "compiled" else ref
    r, t = (h.detach().contiguous(memory_format=fmt).requires_grad_(train) for h in (x[:, :c], x[:, c:]))
    gs = tuple(h.contiguous(memory_format=fmt) for h in (g[:, :c], g[:, c:]))
    return _step(lambda: run((r, t)), [r, t, *ref.parameters()], gs, train)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("c, hw", LAYER_SHAPES, ids=[f"{c}x{hw}" for c, hw in LAYER_SHAPES])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_rir_layer(benchmark, provider, c, hw, mode):
    benchmark.group = f"rir-layer-{c}x{hw}-{mode}"
    fn = _layer_case(provider, c, hw, mode == "train")
    _warm(fn, TRAIN_WARM if mode == "train" else 2)
    _record(benchmark, provider, mode, shape=[LAYER_BATCH, 2 * c, hw, hw], batch=LAYER_BATCH)
    benchmark(fn)


def _model_case(provider, train):
    torch.manual_seed(0)
    fused = rir_cifar().train(train)
    x = torch.randn(MODEL_BATCH, 3, 32, 32)
    y = torch.randint(0, 10, (MODEL_BATCH,))
    base = provider.removesuffix("_cl")
    model = fused if base == "fused" else R.load_from_fused(R.rir_cifar_ref(), fused).train(train)
    if provider.endswith("_cl"):  # channels_last weights, the input converted once at the model's input
        model = layout.channels_last(model)
    params = list(model.parameters())
    if base == "compiled":
        model = torch.compile(model)

    def step():
        if not train:
            with torch.no_grad():
                return model(x)
        for p in params:
            p.grad = None
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return step


@pytest.mark.parametrize("provider", MODEL_PROVIDERS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_rir_cifar(benchmark, provider, mode):
    benchmark.group = f"rir-cifar-{mode}"
    step = _model_case(provider, mode == "train")
    _warm(step, TRAIN_WARM if mode == "train" else 2)
    _record(benchmark, provider, mode, shape=[MODEL_BATCH, 3, 32, 32], batch=MODEL_BATCH, params=9_492_980)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description="Interleaved RiR benchmark (see the module docstring).")
    ap.add_argument("--reps", type=int, default=15, help="timed rounds per provider (default 15)")
    ap.add_argument("--what", choices=["layers", "model", "all"], default="all")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 (NCHW; CL = channels_last), medians of {args.reps} "
          f"interleaved rounds (ms)\n")
    print("| case | mode | fused | four-conv | compile(four-conv) | conv alone | four-conv / fused "
          "| compile / fused | fused / conv alone | fused CL | four-conv CL | conv alone CL | four-conv CL / fused CL "
          "| fused CL / conv alone CL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in ("eval", "train"):
        train = mode == "train"
        cases = []
        if args.what in ("layers", "all"):
            cases += [(f"layer {c}x{hw}²", {p: _layer_case(p, c, hw, train) for p in PROVIDERS}) for c, hw in LAYER_SHAPES]
        if args.what in ("model", "all"):
            cases.append(("rir_cifar", {p: _model_case(p, train) for p in MODEL_PROVIDERS}))
        for name, fns in cases:
            for fn in fns.values():
                _warm(fn, TRAIN_WARM if train else 2)
            times = {k: [] for k in fns}
            for _ in range(args.reps):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            f, ca, fc, cac = med["fused"], med.get("conv_alone"), med["fused_cl"], med.get("conv_alone_cl")
            na = "—"
            print(f"| {name} | {mode} | {f:.1f} | {med['four_conv']:.1f} | {med['compiled']:.1f} | "
                  f"{na if ca is None else f'{ca:.1f}'} | {med['four_conv'] / f:.2f}x | {med['compiled'] / f:.2f}x | "
                  f"{na if ca is None else f'{f / ca:.2f}'} | {fc:.1f} | {med['four_conv_cl']:.1f} | "
                  f"{na if cac is None else f'{cac:.1f}'} | {med['four_conv_cl'] / fc:.2f}x | "
                  f"{na if cac is None else f'{fc / cac:.2f}'} |", flush=True)


if __name__ == "__main__":
    main()
