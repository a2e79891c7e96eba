"""CPU benchmarks of resfuse (issue 12 and issue 3's CPU bars): whole torchvision ResNets and single
ResNet-18/50 stage blocks, eval and train, against eager PyTorch and torch.compile.

Two ways to run it:

* **pytest-benchmark** (regression tracking, one case at a time)::

      pytest benchmarks/bench_cpu.py --benchmark-only --benchmark-group-by=group \\
          --benchmark-columns=median,iqr,rounds --benchmark-sort=name
      pytest benchmarks/bench_cpu.py -k se_tail ...   # the end of an SE block alone (gate_act vs eager)

* **the tables for the README / benchmarks/results** (providers interleaved round-robin, medians, markdown out; this is
  what to trust on a shared 2-core machine, where a sequential run drifts with the neighbours' load)::

      python benchmarks/bench_cpu.py models   # eval, resnet18/50, batch 1 and 4, 224x224
      python benchmarks/bench_cpu.py train    # train step, resnet18/50, batch 8, 112x112
      python benchmarks/bench_cpu.py drift    # the same, eager vs resfuse for 2 min each: fast vs slow machine states
      python benchmarks/bench_cpu.py cifar    # train step, CIFAR ResNet-20, 32x32, batch 8/32/128
      python benchmarks/bench_cpu.py blocks   # stage blocks, batch 8: eval and train step
      python benchmarks/bench_cpu.py memory   # peak memory of train steps (models and blocks)
      python benchmarks/bench_cpu.py curve    # 20 SGD steps: fused vs eager loss curves
      python benchmarks/bench_cpu.py profile  # where a fused train step spends its time

Providers (all fp32, ``torch.get_num_threads()`` threads, inputs created NCHW):

* ``eager``: torchvision model / ``resfuse.reference`` block, NCHW.
* ``eager_cl``: the same with ``model.to(memory_format=channels_last)`` and the input converted.
* ``compile``: ``torch.compile`` of ``eager`` (Inductor, default options).
* ``compile_freeze``: the same with ``freezing=True`` (eval only: BN folded into the conv, weights
  prepacked for oneDNN, add + ReLU as conv post-ops) — the strong CPU peer in eval.
* ``resfuse``: ``resfuse.layout.channels_last(resfuse.fuse(model))``, backend ``cpu``: the input is
  converted to channels_last once at the model's input; oneDNN fused convolutions in eval.
* ``resfuse_portable``: the same with the portable path forced (``cpu_backend.portable()``): ATen conv
  + resfuse ``bn_act``.
* ``resfuse_blas`` (training): ``resfuse`` with its GEMM forms by BLAS only (no ``matmul``
  candidates: what the cpu backend measured before oneDNN's matmul was one), with choice tables of
  its own, so that both run in one process.
* ``resfuse_nchw``: fused, without the layout helper (NCHW in; a fused ResNet still converts its input to
  channels_last once in inference, ``resfuse.layout.inference_input``, but keeps NCHW weights and, in
  training, NCHW activations).
* ``convs`` (blocks, eval): the block's convolutions alone (``F.conv2d``, channels_last, BN/ReLU/add
  dropped) — the ceiling for anything built on ATen's convolution.

Memory (``memory``): each case runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=131072`` (every
buffer >= 128 KiB is its own mmap, returned to the OS when freed, so RSS follows live memory with no
allocator caching); after warm-up steps the kernel's RSS high-water mark is reset
(``/proc/self/clear_refs`` ← 5) and the peak of one more step is read from ``VmHWM``. Reported: that
peak minus the RSS before the step (parameters, gradients of the previous step are set to None). This
counts everything the step allocates — autograd's saved tensors, gradients, oneDNN scratchpads,
temporaries inside kernels — which a tensor-level tracker would miss. A block's input and output
gradient are given in the provider's own layout (channels_last for ``eager_cl`` and ``resfuse``), as
inside a network, where the layout is chosen once at the model's input: the copies a block would make
converting NCHW tensors at its own boundary are not part of its memory there (they are part of the
block timings, which take NCHW tensors for every provider).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import re
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import resfuse  # noqa: E402
from resfuse import cpu_backend, cpu_conv, layout, reference  # noqa: E402
from resfuse.testing import randomize_bn  # noqa: E402

CL = torch.channels_last
EVAL_BATCHES = (1, 4)
EVAL_HW = 224
TRAIN_BATCH = 8
TRAIN_HW = 112
BLOCK_BATCH = 8
#: train steps run before any timing or memory reading, so that no convolution trial runs in a measured step
TRAIN_WARM = cpu_conv.warm_steps()

# (kind, inplanes, planes, stride, H=W): every distinct block shape of ResNet-18 / ResNet-50 at 224x224
R18_BLOCKS = [("basic", 64, 64, 1, 56), ("basic", 64, 128, 2, 56), ("basic", 128, 128, 1, 28),
              ("basic", 128, 256, 2, 28), ("basic", 256, 256, 1, 14), ("basic", 256, 512, 2, 14),
              ("basic", 512, 512, 1, 7)]
R50_BLOCKS = [("bottleneck", 64, 64, 1, 56), ("bottleneck", 256, 64, 1, 56), ("bottleneck", 256, 128, 2, 56),
              ("bottleneck", 512, 128, 1, 28), ("bottleneck", 512, 256, 2, 28), ("bottleneck", 1024, 256, 1, 14),
              ("bottleneck", 1024, 512, 2, 14), ("bottleneck", 2048, 512, 1, 7)]
BLOCKS = R18_BLOCKS + R50_BLOCKS


def block_id(case):
    kind, cin, planes, stride, hw = case
    return f"{'R18' if kind == 'basic' else 'R50'}-{cin}-{planes}-s{stride}-{hw}"


# -- models and blocks --------------------------------------------------------------------------------------
def torchvision_models():
    """torchvision's model zoo (via tests/tvshim.py), or None when torchvision is not installed."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        import importlib.util
        if importlib.util.find_spec("torchvision") is None:
            return None
        from tvshim import import_torchvision
        return import_torchvision().models
    except Exception:  # noqa: BLE001 - fall back to the identical reference models
        return None
    finally:
        sys.path.pop(0)


def make_model(arch):
    """``(model, source)``: torchvision's ``arch`` (else resfuse.reference's, same structure); timm's
    ``name`` for ``arch = "timm:<name>"`` (e.g. ``timm:seresnet50``)."""
    torch.manual_seed(0)
    if arch.startswith("timm:"):
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        try:
            from tvshim import import_timm
            return import_timm().create_model(arch[5:]), "timm"
        finally:
            sys.path.pop(0)
    tv = torchvision_models()
    if tv is not None:
        return getattr(tv, arch)(), "torchvision"
    return getattr(reference, arch)(), "resfuse.reference"


def make_block(case):
    kind, cin, planes, stride, hw = case
    torch.manual_seed(0)
    cls = reference.BasicBlock if kind == "basic" else reference.Bottleneck
    out = planes * cls.expansion
    down = None
    if stride != 1 or cin != out:
        down = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    return randomize_bn(cls(cin, planes, stride, down))


def fused(model):
    """resfuse.fuse + the layout helper (channels_last chosen once at the input)."""
    return layout.channels_last(resfuse.fuse(copy.deepcopy(model)))


def _fused_block(block):
    """The block swapped for its resfuse twin (``resfuse.fuse`` on a one-block container)."""
    holder = nn.Sequential(copy.deepcopy(block))
    return resfuse.fuse(holder)[0]


def _compiled(model, freeze):
    return torch.compile(copy.deepcopy(model), options={"freezing": True} if freeze else None)


def _cl_input(module):
    """A callable running ``module`` on a channels_last copy of its input (eager channels_last)."""
    module = copy.deepcopy(module).to(memory_format=CL)
    return lambda x: module(x.contiguous(memory_format=CL))


def _portable(fn):
    def run(x):
        with cpu_backend.portable():
            return fn(x)
    return run


def _blas_only(fn):
    """``fn`` run with the ``matmul`` candidates off and per-shape choice tables of its own (swapped
    in around each call: the tables are process-wide), beside providers measuring with them."""
    tables = ({}, {}, {})

    def run(*args):
        saved = cpu_conv._choices, cpu_conv._memo, cpu_conv._recheck, cpu_conv._matmul_probe
        cpu_conv._choices, cpu_conv._memo, cpu_conv._recheck = tables
        cpu_conv._matmul_probe = lambda: "off (benchmark provider resfuse_blas)"
        try:
            return fn(*args)
        finally:
            cpu_conv._choices, cpu_conv._memo, cpu_conv._recheck, cpu_conv._matmul_probe = saved
    run.params = getattr(fn, "params", None)
    run.tables = tables
    return run


def _convs_alone(block):
    """The block's convolutions only (channels_last, no BN/ReLU/add): the ATen-conv ceiling."""
    b = copy.deepcopy(block).to(memory_format=CL)
    convs = [b.conv1, b.conv2] + ([b.conv3] if hasattr(b, "conv3") else [])
    proj = b.downsample[0] if b.downsample is not None else None

    def run(x):
        x = x.contiguous(memory_format=CL)
        h = x
        for c in convs:
            h = c(h)
        if proj is not None:
            proj(x)
        return h
    return run


def eval_providers(model, names):
    """``{name: callable(x)}`` for an eval-mode model or block (call under ``torch.no_grad``)."""
    model = model.eval()
    is_block = not hasattr(model, "fc")
    out = {}
    for n in names:
        if n == "eager":
            out[n] = model
        elif n == "eager_cl":
            out[n] = _cl_input(model)
        elif n in ("compile", "compile_freeze"):
            out[n] = _compiled(model, n == "compile_freeze")
        elif n == "resfuse":
            out[n] = fused(model) if not is_block else _cl_wrap(_fused_block(model))
        elif n == "resfuse_portable":
            out[n] = _portable(fused(model) if not is_block else _cl_wrap(_fused_block(model)))
        elif n == "resfuse_nchw":
            out[n] = resfuse.fuse(copy.deepcopy(model)) if not is_block else _fused_block(model)
        elif n == "convs":
            out[n] = _convs_alone(model)
        else:
            raise ValueError(n)
    return out


def _cl_wrap(block):
    block = block.to(memory_format=CL)
    return lambda x: block(x.contiguous(memory_format=CL))


def train_step(model, cl, loss="ce"):
    """One SGD step (momentum 0.9) of ``model``: zero_grad(set_to_none), forward, loss, backward, step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x, y):
        if cl:
            x = x.contiguous(memory_format=CL)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        lo = F.cross_entropy(out, y) if loss == "ce" else (out * y).sum()
        lo.backward()
        opt.step()
        return lo
    step.params = list(model.parameters())
    return step


def block_train_step(block, cl):
    """Forward + backward of a block (input and parameter grads; no optimizer)."""
    params = list(block.parameters())

    def step(x, g):
        for p in params:
            p.grad = None
        if cl:
            x = x.contiguous(memory_format=CL)
        x = x.detach().requires_grad_()
        out = block(x)
        out.backward(g if not cl else g.contiguous(memory_format=CL))
        return out
    step.params = params
    return step


def train_providers(model, names, block=False):
    model = model.train()
    out = {}
    for n in names:
        m = copy.deepcopy(model)
        if n == "eager":
            fn = (block_train_step if block else train_step)(m, False)
        elif n == "eager_cl":
            fn = (block_train_step if block else train_step)(m.to(memory_format=CL), True)
        elif n == "compile":
            fn = (block_train_step if block else train_step)(torch.compile(m), False)
        elif n == "resfuse":
            f = _fused_block(m).to(memory_format=CL) if block else fused(m)
            fn = (block_train_step if block else train_step)(f, True)
        elif n == "resfuse_blas":
            f = _fused_block(m).to(memory_format=CL) if block else fused(m)
            fn = _blas_only((block_train_step if block else train_step)(f, True))
        elif n == "resfuse_nchw":
            f = _fused_block(m) if block else resfuse.fuse(m)
            fn = (block_train_step if block else train_step)(f, False)
        else:
            raise ValueError(n)
        out[n] = fn
    return out


# -- timing -------------------------------------------------------------------------------------------------
def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def wait_quiet(limit, max_wait=600):
    """Wait (up to ``max_wait`` s) until the 1-minute load average is below ``limit``."""
    if limit <= 0:
        return
    t0 = time.time()
    while loadavg() > limit and time.time() - t0 < max_wait:
        time.sleep(5)


CLOCK = time.perf_counter  # --clock cpu: time.process_time (this process's CPU time, all threads)


def interleaved(fns, args, reps, inner=1, warm=2, grad=False):
    """Median ms per call of each callable; providers run round-robin, ``reps`` rounds of ``inner`` calls."""
    times = {k: [] for k in fns}
    clock = CLOCK
    ctx = torch.enable_grad if grad else torch.no_grad
    with ctx():
        for f in fns.values():
            for _ in range(warm):
                f(*args)
        for _ in range(reps):
            for k, f in fns.items():
                t = clock()
                for _ in range(inner):
                    f(*args)
                times[k].append((clock() - t) * 1e3 / inner)
    return {k: statistics.median(v) for k, v in times.items()}, times


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except Exception:  # noqa: BLE001
        pass
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, clock {CLOCK.__name__}, load {loadavg():.1f}, oneDNN fast path: "
            f"{cpu_backend.onednn_status() or 'available'}")


# -- runners for the README tables ----------------------------------------------------------------------------------
def run_models(args):
    names = args.providers or ["eager", "eager_cl", "compile_freeze", "resfuse", "resfuse_portable"]
    print(f"# eval, {EVAL_HW}x{EVAL_HW}, fp32 — {_machine()}")
    print("| model | batch | " + " | ".join(names) + " | resfuse vs eager | resfuse vs compile_freeze | max rel err |")
    print("|---" * (len(names) + 5) + "|")
    for arch in args.archs:
        base, src = make_model(arch)
        randomize_bn(base)
        base.eval()
        for bs in args.batches:
            x = torch.randn(bs, 3, EVAL_HW, EVAL_HW)
            with torch.no_grad():
                provs = eval_providers(base, names)
                ref = base(x)
                err = max(((provs[n](x) - ref).abs().max() / ref.abs().max()).item() for n in names)
            wait_quiet(args.quiet)
            med, _ = interleaved(provs, (x,), args.reps, inner=args.inner, warm=3)
            ratio = lambda a, b: f"{med[a] / med[b]:.2f}x" if a in med and b in med else "-"  # noqa: E731
            print(f"| {arch} ({src}) | {bs} | " + " | ".join(f"{med[n]:.1f} ms" for n in names)
                  + f" | {ratio('eager', 'resfuse')} | {ratio('compile_freeze', 'resfuse')} | {err:.1e} |",
                  flush=True)


def _train_table(args, title, first, cases, fmt):
    """Print one table of interleaved train steps: ``cases`` yields ``(label, model, x, y)``, each
    model stepped by every provider; times printed with ``fmt`` (milliseconds)."""
    names = args.providers or ["eager", "eager_cl", "compile", "resfuse"]
    print(f"# {title}, fp32 — {_machine()}")
    print(f"| {first} | " + " | ".join(names) + " | resfuse vs eager | resfuse vs eager_cl |")
    print("|---" * (len(names) + 3) + "|")
    for label, base, x, y in cases:
        provs = train_providers(base, names)
        wait_quiet(args.quiet)
        med, _ = interleaved(provs, (x, y), args.reps, warm=TRAIN_WARM, grad=True)
        print(f"| {label} | " + " | ".join(f"{fmt.format(med[n])} ms" for n in names)
              + f" | {med['eager'] / med['resfuse']:.2f}x | "
              + (f"{med['eager_cl'] / med['resfuse']:.2f}x |" if "eager_cl" in med else "- |"), flush=True)


def run_train(args):
    def cases():
        for arch in args.archs:
            base, src = make_model(arch)
            yield (f"{arch} ({src})", base, torch.randn(TRAIN_BATCH, 3, TRAIN_HW, TRAIN_HW),
                   torch.randint(0, 1000, (TRAIN_BATCH,)))
    _train_table(args, f"train step (SGD), batch {TRAIN_BATCH}, {TRAIN_HW}x{TRAIN_HW}", "model", cases(), "{:.0f}")


def run_cifar(args):
    """Train steps of ``resfuse.reference.cifar_resnet(20)`` (He et al.'s CIFAR-10 ResNet-20: 16-64
    channels on 32x32-8x8 maps) at batches 8, 32 and 128: small layers, where per-call costs weigh
    most."""
    def cases():
        for batch in (8, 32, 128):
            torch.manual_seed(0)
            base = reference.cifar_resnet(20)
            yield str(batch), base, torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    _train_table(args, "train step (SGD), CIFAR ResNet-20 (resfuse.reference), 32x32, 10 classes", "batch",
                 cases(), "{:.1f}")


def run_drift(args):
    """Train steps of eager and resfuse, interleaved for ``--seconds`` per model, the rounds split at
    eager's median step time: this machine (a 2-core VM) drifts between a fast and a slow state within
    seconds, and the two providers slow down by different amounts (the ratio of a short run depends on
    which state it met). Prints the medians of each half and the per-round ratio's deciles."""
    names = ["eager", "resfuse"]
    print(f"# train step (SGD), batch {TRAIN_BATCH}, {TRAIN_HW}x{TRAIN_HW}, fp32, interleaved for {args.seconds:.0f} s "
          f"per model, rounds split at eager's median — {_machine()}")
    print("| model | rounds | eager fast | eager slow | resfuse fast | resfuse slow | ratio fast | ratio slow "
          "| per-round ratio p10 / p50 / p90 |")
    print("|---" * 9 + "|")
    for arch in args.archs:
        base, src = make_model(arch)
        x, y = torch.randn(TRAIN_BATCH, 3, TRAIN_HW, TRAIN_HW), torch.randint(0, 1000, (TRAIN_BATCH,))
        provs = train_providers(base, names)
        for f in provs.values():
            for _ in range(TRAIN_WARM):
                f(x, y)
        times = {k: [] for k in names}
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end or len(times["eager"]) < 4:
            for k, f in provs.items():
                t = time.perf_counter()
                f(x, y)
                times[k].append((time.perf_counter() - t) * 1e3)
        cut = statistics.median(times["eager"])
        fast = [i for i, t in enumerate(times["eager"]) if t < cut]
        slow = [i for i, t in enumerate(times["eager"]) if t >= cut]
        med = {(k, h): statistics.median(times[k][i] for i in idx) for k in names
               for h, idx in (("fast", fast), ("slow", slow))}
        ratios = [e / r for e, r in zip(times["eager"], times["resfuse"])]
        dec = statistics.quantiles(ratios, n=10)
        print(f"| {arch} ({src}) | {len(ratios)} | {med['eager', 'fast']:.0f} ms | {med['eager', 'slow']:.0f} ms | "
              f"{med['resfuse', 'fast']:.0f} ms | {med['resfuse', 'slow']:.0f} ms | "
              f"{med['eager', 'fast'] / med['resfuse', 'fast']:.2f}x | {med['eager', 'slow'] / med['resfuse', 'slow']:.2f}x | "
              f"{dec[0]:.2f} / {statistics.median(ratios):.2f} / {dec[-1]:.2f} |", flush=True)


def run_blocks(args):
    ev_names = ["eager", "eager_cl", "resfuse", "convs"]
    tr_names = ["eager", "eager_cl", "resfuse"]
    print(f"# blocks, batch {BLOCK_BATCH}, fp32 — {_machine()}")
    print("| block | eval eager | eval eager_cl | eval resfuse | convs alone | vs eager | vs eager_cl | "
          "resfuse/convs | train eager | train eager_cl | train resfuse | vs eager | vs eager_cl |")
    print("|---" * 13 + "|")
    ge, gecl, gt, gtcl, worst = [], [], [], [], []
    for case in args.blocks:
        kind, cin, planes, stride, hw = case
        blk = make_block(case)
        x = torch.randn(BLOCK_BATCH, cin, hw, hw)
        ev = eval_providers(blk, ev_names)
        wait_quiet(args.quiet)
        me, _ = interleaved(ev, (x,), args.reps, inner=args.inner, warm=3)
        with torch.no_grad():
            out = ev["resfuse"](x)
        g = torch.randn(out.shape)
        tr = train_providers(blk, tr_names, block=True)
        mt, _ = interleaved(tr, (x, g), args.reps, warm=TRAIN_WARM, grad=True)
        r = [me["eager"] / me["resfuse"], me["eager_cl"] / me["resfuse"], me["resfuse"] / me["convs"],
             mt["eager"] / mt["resfuse"], mt["eager_cl"] / mt["resfuse"]]
        ge.append(r[0]), gecl.append(r[1]), gt.append(r[3]), gtcl.append(r[4])
        worst.append(min(r[0], r[3]))
        print(f"| {block_id(case)} | {me['eager']:.2f} | {me['eager_cl']:.2f} | {me['resfuse']:.2f} | "
              f"{me['convs']:.2f} | {r[0]:.2f}x | {r[1]:.2f}x | {r[2]:.2f} | {mt['eager']:.1f} | "
              f"{mt['eager_cl']:.1f} | {mt['resfuse']:.1f} | {r[3]:.2f}x | {r[4]:.2f}x |", flush=True)
    print(f"\ngeomean: eval vs eager {geomean(ge):.2f}x, vs eager_cl {geomean(gecl):.2f}x; "
          f"train vs eager {geomean(gt):.2f}x, vs eager_cl {geomean(gtcl):.2f}x; worst {min(worst):.2f}x")


# -- memory (one subprocess per case) --------------------------------------------------------------------------
def _rss():
    with open("/proc/self/status") as f:
        s = f.read()
    return {k: int(re.search(k + r":\s+(\d+)", s).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _saved_bytes(fn, params):
    """Bytes of the distinct storages autograd saves for backward during ``fn()`` (parameters
    excluded): the activation memory a train step holds between forward and backward."""
    seen, exclude = {}, {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def measure_peak(kind, name, provider):
    """In *this* process: ``(peak, saved)`` bytes of one train step (see the module docstring).

    ``peak``: VmHWM during the step minus VmRSS before it, with the previous step's gradients already
    freed (so both include the new gradients). ``saved``: bytes autograd holds for backward."""
    if kind == "model":
        base, _ = make_model(name)
        x = torch.randn(TRAIN_BATCH, 3, TRAIN_HW, TRAIN_HW)
        y = torch.randint(0, 1000, (TRAIN_BATCH,))
        step = train_providers(base, [provider])[provider]
        args = (x, y)
    else:
        case = next(c for c in BLOCKS if block_id(c) == name)
        blk = make_block(case)
        x = torch.randn(BLOCK_BATCH, case[1], case[4], case[4])
        with torch.no_grad():
            g = torch.randn(blk.eval()(x).shape)
        step = train_providers(blk, [provider], block=True)[provider]
        if provider in ("eager_cl", "resfuse", "resfuse_blas"):  # in a network the activations arrive in this layout
            x, g = x.contiguous(memory_format=CL), g.contiguous(memory_format=CL)
        args = (x, g)
    for _ in range(TRAIN_WARM):
        step(*args)
    params = step.params
    for p in params:
        p.grad = None
    before = _rss()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(*args)
    peak = _rss()["VmHWM"] - before
    for p in params:
        p.grad = None
    _, saved = _saved_bytes(lambda: step(*args), params)
    return peak, saved


def _peak_subprocess(kind, name, provider):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import bench_cpu as b; "
            f"print('PEAK %d %d' % b.measure_peak({kind!r}, {name!r}, {provider!r}))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    m = re.search(r"PEAK (\d+) (\d+)", r.stdout)
    if not m:
        raise RuntimeError(r.stderr[-3000:])
    return int(m.group(1)), int(m.group(2))


def run_memory(args):
    names = ["eager", "eager_cl", "resfuse"]
    print(f"# train step memory, MiB: peak above the pre-step RSS | saved for backward — {_machine()}")
    print("| case | " + " | ".join(f"peak {n}" for n in names) + " | peak resfuse/eager | peak resfuse/eager_cl | "
          + " | ".join(f"saved {n}" for n in names) + " | saved resfuse/eager |")
    print("|---" * (2 * len(names) + 4) + "|")
    cases = [("model", a) for a in args.archs] + [("block", block_id(c)) for c in args.blocks]
    worst = []
    for kind, name in cases:
        res = {n: _peak_subprocess(kind, name, n) for n in names}
        pk = {n: v[0] for n, v in res.items()}
        sv = {n: v[1] for n, v in res.items()}
        worst.append(pk["resfuse"] / pk["eager"])
        print(f"| {name} | " + " | ".join(f"{pk[n] / 2**20:.1f}" for n in names)
              + f" | {pk['resfuse'] / pk['eager']:.2f} | {pk['resfuse'] / pk['eager_cl']:.2f} | "
              + " | ".join(f"{sv[n] / 2**20:.1f}" for n in names)
              + f" | {sv['resfuse'] / sv['eager']:.2f} |", flush=True)
    print(f"\nworst peak resfuse / eager: {max(worst):.2f}")


# -- loss curves and profile ---------------------------------------------------------------------------------------
def run_curve(args):
    """20 SGD steps (momentum 0.9, lr 0.002, one fixed batch) of eager NCHW, eager channels_last and
    resfuse (and a float64 eager run with ``--f64``): the loss at every step."""
    for arch in args.archs:
        base, src = make_model(arch)
        nets = {"eager": copy.deepcopy(base), "eager_cl": copy.deepcopy(base).to(memory_format=CL),
                "resfuse": fused(base)}
        if args.f64:
            nets["f64"] = copy.deepcopy(base).double()
        opts = {k: torch.optim.SGD(m.parameters(), lr=0.002, momentum=0.9) for k, m in nets.items()}
        g = torch.Generator().manual_seed(1)
        x = torch.randn(TRAIN_BATCH, 3, TRAIN_HW, TRAIN_HW, generator=g)
        y = torch.randint(0, 1000, (TRAIN_BATCH,), generator=g)
        curve = {k: [] for k in nets}
        for _ in range(args.steps):
            for k, m in nets.items():
                xx = x.double() if k == "f64" else (x.contiguous(memory_format=CL) if k == "eager_cl" else x)
                loss = F.cross_entropy(m(xx), y)
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
                curve[k].append(loss.item())
        print(f"# {arch} ({src}): loss per step, batch {TRAIN_BATCH}, {TRAIN_HW}x{TRAIN_HW}")
        print("| step | " + " | ".join(nets) + " | resfuse - eager | eager_cl - eager |")
        print("|---" * (len(nets) + 3) + "|")
        for i in range(args.steps):
            print(f"| {i} | " + " | ".join(f"{curve[k][i]:.6f}" for k in nets)
                  + f" | {curve['resfuse'][i] - curve['eager'][i]:+.1e} | {curve['eager_cl'][i] - curve['eager'][i]:+.1e} |")
        d_f = max(abs(a - b) / abs(b) for a, b in zip(curve["resfuse"], curve["eager"]))
        d_cl = max(abs(a - b) / abs(b) for a, b in zip(curve["eager_cl"], curve["eager"]))
        print(f"\nmax relative |resfuse - eager| {d_f:.1e}; max relative |eager_cl - eager| {d_cl:.1e}")
        if args.f64:
            e = {k: max(abs(a - b) for a, b in zip(curve[k], curve["f64"])) for k in ("eager", "eager_cl", "resfuse")}
            print("max |loss - float64 loss|: " + ", ".join(f"{k} {v:.1e}" for k, v in e.items()))


def run_profile(args):
    """Self CPU time by op category of fused and eager train steps: convolution (fwd/bwd) vs the rest."""
    from torch.profiler import ProfilerActivity, profile
    for arch in args.archs:
        base, src = make_model(arch)
        x = torch.randn(TRAIN_BATCH, 3, TRAIN_HW, TRAIN_HW)
        y = torch.randint(0, 1000, (TRAIN_BATCH,))
        for name in ("eager", "eager_cl", "resfuse"):
            step = train_providers(base, [name])[name]
            for _ in range(TRAIN_WARM):
                step(x, y)
            with profile(activities=[ProfilerActivity.CPU]) as p:
                for _ in range(args.reps):
                    step(x, y)
            cats = {}
            total = 0.0
            for e in p.key_averages():
                t = e.self_cpu_time_total / args.reps / 1e3
                total += t
                n = e.key
                if "conv" in n.lower() or n in ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_"):
                    c = "convolution fwd+bwd (oneDNN, GEMM, Winograd; + the fc's matmuls)"
                elif n.startswith("resfuse::") or "batch_norm" in n or "native_batch_norm" in n:
                    c = "BN stats/apply/backward" if n.startswith("resfuse::") or "batch_norm" in n else n
                elif n in ("aten::relu", "aten::relu_", "aten::threshold_backward", "aten::add", "aten::add_",
                           "aten::clamp_min", "aten::clamp_min_"):
                    c = "ReLU/add (+ their backward)"
                elif "max_pool" in n:
                    c = "max-pool fwd+bwd"
                elif n.startswith("aten::_foreach") or "sgd" in n.lower():
                    c = "optimizer"
                else:
                    c = "other (copies, fc, loss, autograd, Python)"
                cats[c] = cats.get(c, 0.0) + t
            print(f"\n# {arch} ({src}) train step {name}: {total:.0f} ms self CPU per step\n")
            print("| category | ms per step | share |\n|---|---:|---:|")
            for c, t in sorted(cats.items(), key=lambda kv: -kv[1]):
                print(f"| {c} | {t:.1f} ms | {100 * t / total:.0f} % |")
            top = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
            print("top ops: " + ", ".join(f"{e.key} {e.self_cpu_time_total / args.reps / 1e3:.1f}" for e in top))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["models", "train", "drift", "cifar", "blocks", "memory", "curve", "profile"])
    ap.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"],
                    help="torchvision model names, or timm:<name> (e.g. timm:seresnet50)")
    ap.add_argument("--batches", nargs="+", type=int, default=list(EVAL_BATCHES))
    ap.add_argument("--providers", nargs="+")
    ap.add_argument("--blocks", nargs="+", help="block ids (e.g. R18-64-64-s1-56); default: all")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--inner", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=120.0, help="drift: seconds of interleaved steps per model")
    ap.add_argument("--f64", action="store_true", help="curve: also a float64 eager run")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: time.perf_counter; cpu: time.process_time (robust to other processes' "
                         "load for --threads 1; counts spin-waiting with more threads)")
    ap.add_argument("--quiet", type=float, default=0.0,
                    help="wait before each case until the 1-min load average is below this (0: don't)")
    args = ap.parse_args(argv)
    args.blocks = [c for c in BLOCKS if args.blocks is None or block_id(c) in args.blocks]
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    resfuse.set_backend("cpu")
    {"models": run_models, "train": run_train, "drift": run_drift, "cifar": run_cifar, "blocks": run_blocks, "memory": run_memory,
     "curve": run_curve, "profile": run_profile}[args.what](args)


# -- pytest-benchmark cases ----------------------------------------------------------------------------------------
def _bench(benchmark, fn, args, grad=False, **info):
    ctx = torch.enable_grad if grad else torch.no_grad
    with ctx():
        for _ in range(TRAIN_WARM if grad else 2):
            fn(*args)
        benchmark.extra_info.update(dtype="float32", threads=torch.get_num_threads(), torch=torch.__version__,
                                    onednn=cpu_backend.onednn_status() or "available", **info)

        benchmark(fn, *args)


@pytest.fixture(autouse=False)
def _cpu_backend():
    with resfuse.use_backend("cpu"):
        yield


MODEL_EVAL = ["eager", "eager_cl", "compile", "compile_freeze", "resfuse", "resfuse_portable"]


@pytest.mark.parametrize("provider", MODEL_EVAL)
@pytest.mark.parametrize("batch", EVAL_BATCHES)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_model_eval(benchmark, _cpu_backend, arch, batch, provider):
    benchmark.group = f"eval-{arch}-b{batch}"
    base, src = make_model(arch)
    fn = eval_providers(randomize_bn(base), [provider])[provider]
    _bench(benchmark, fn, (torch.randn(batch, 3, EVAL_HW, EVAL_HW),), provider=provider, source=src)


@pytest.mark.parametrize("provider", ["eager", "eager_cl", "compile", "resfuse"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_model_train(benchmark, _cpu_backend, arch, provider):
    benchmark.group = f"train-{arch}-b{TRAIN_BATCH}"
    base, src = make_model(arch)
    fn = train_providers(base, [provider])[provider]
    x = torch.randn(TRAIN_BATCH, 3, TRAIN_HW, TRAIN_HW)
    y = torch.randint(0, 1000, (TRAIN_BATCH,))
    _bench(benchmark, fn, (x, y), grad=True, provider=provider, source=src)


@pytest.mark.parametrize("provider", ["eager", "eager_cl", "resfuse", "convs"])
@pytest.mark.parametrize("case", BLOCKS, ids=block_id)
def test_block_eval(benchmark, _cpu_backend, case, provider):
    benchmark.group = f"block-eval-{block_id(case)}"
    fn = eval_providers(make_block(case), [provider])[provider]
    _bench(benchmark, fn, (torch.randn(BLOCK_BATCH, case[1], case[4], case[4]),), provider=provider)


@pytest.mark.parametrize("provider", ["eager", "eager_cl", "resfuse"])
@pytest.mark.parametrize("case", BLOCKS, ids=block_id)
def test_block_train(benchmark, _cpu_backend, case, provider):
    benchmark.group = f"block-train-{block_id(case)}"
    blk = make_block(case)
    x = torch.randn(BLOCK_BATCH, case[1], case[4], case[4])
    with torch.no_grad():
        g = torch.randn(blk.eval()(x).shape)
    fn = train_providers(blk, [provider], block=True)[provider]
    _bench(benchmark, fn, (x, g), grad=True, provider=provider)


@pytest.mark.smoke
@pytest.mark.benchmark(group="cpu-smoke")
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("provider", ["eager", "resfuse"])
def test_cpu_smoke(benchmark, _cpu_backend, provider, mode):
    case = ("basic", 16, 16, 1, 8)
    blk = make_block(case)
    x = torch.randn(2, 16, 8, 8)
    if mode == "eval":
        fn = eval_providers(blk, [provider])[provider]
        _bench(benchmark, fn, (x,), provider=provider)
    else:
        g = torch.randn(2, 16, 8, 8)
        fn = train_providers(blk, [provider], block=True)[provider]
        _bench(benchmark, fn, (x, g), grad=True, provider=provider)


@pytest.mark.smoke
def test_blas_provider_measures_apart(_cpu_backend):
    """``resfuse_blas`` measures in tables of its own, never picks ``matmul``, and leaves the
    process-wide tables and probe as they were."""
    blk = make_block(("bottleneck", 32, 16, 2, 8))
    x, g = torch.randn(2, 32, 8, 8), torch.randn(2, 64, 4, 4)
    before = dict(cpu_conv.choices()), cpu_conv._matmul_probe
    fn = train_providers(blk, ["resfuse_blas"], block=True)["resfuse_blas"]
    with torch.enable_grad():
        fn(x, g)
    assert fn.tables[0] and "matmul" not in fn.tables[0].values()
    assert (dict(cpu_conv.choices()), cpu_conv._matmul_probe) == before


if __name__ == "__main__":
    main()


#: SE-ResNet-50 block outputs at batch 8, 112x112 images (the train-step shapes): channels, side
SE_TAILS = [(256, 28), (512, 14), (1024, 7), (2048, 4)]


def se_tail(channels, side, provider):
    """``relu(z * s + r)`` with ``s = sigmoid(fc2(relu(fc1(mean_hw(z)))))`` (an SE module, reduction 16):
    ``eager`` as timm runs it (``z * s``, ``+= r``, ``relu_``), ``resfuse`` as the fused timm blocks do
    (:func:`resfuse.functional.channel_mean`, :func:`resfuse.functional.gate_act`); channels_last."""
    torch.manual_seed(0)
    fc1, fc2 = nn.Conv2d(channels, channels // 16, 1), nn.Conv2d(channels // 16, channels, 1)

    def run(z, r):
        if provider == "resfuse":
            s = torch.sigmoid(fc2(torch.relu(fc1(resfuse.functional.channel_mean(z)))))
            return resfuse.functional.gate_act(z, s, r)
        y = z * torch.sigmoid(fc2(torch.relu(fc1(z.mean((2, 3), keepdim=True)))))
        y += r
        return torch.relu_(y)
    return run


@pytest.mark.parametrize("provider", ["eager", "resfuse"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("channels,side", SE_TAILS, ids=[f"{c}x{s}" for c, s in SE_TAILS])
def test_se_tail(benchmark, _cpu_backend, channels, side, mode, provider):
    """The end of an SE block (gate multiply, shortcut add, ReLU; forward + backward in train)."""
    benchmark.group = f"se-tail-{mode}-{channels}x{side}"
    fn = se_tail(channels, side, provider)
    z = torch.randn(TRAIN_BATCH, channels, side, side).contiguous(memory_format=CL)
    r = torch.randn_like(z)
    if mode == "train":
        g = torch.randn_like(z)
        zl, rl = z.requires_grad_(), r.requires_grad_()

        def step(z, r):
            zl.grad = rl.grad = None
            fn(z, r).backward(g)
        _bench(benchmark, step, (zl, rl), grad=True, provider=provider)
    else:
        _bench(benchmark, fn, (z, r), provider=provider)

