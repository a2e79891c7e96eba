"""Extra cost of synchronised BatchNorm in resfuse's fused chains, on GPUs (NCCL). Skipped without CUDA.

    python benchmarks/bench_sync.py                                  # one GPU (world size 1, see below)
    torchrun --nproc-per-node=8 benchmarks/bench_sync.py             # all GPUs of a node: the real sync
    python benchmarks/bench_sync.py --model resnet18 --batch 128 --json benchmarks/results/sync.json
    pytest benchmarks/bench_sync.py                                  # runs the one-GPU case (or skips)

Every variant is the same training step — DDP (``resfuse.distributed.DistributedDataParallel``, which is
torch's DDP on GPUs), forward + cross-entropy + backward + SGD step, bf16 autocast, channels_last —
timed with CUDA events after warm-up, median of ``--repeats`` runs of ``--iters`` steps (the slowest rank
counts):

* ``fused``        resfuse model, ``nn.BatchNorm2d``                       (the baseline)
* ``fused_sync``   resfuse model, ``nn.SyncBatchNorm`` → ``resfuse.distributed``
* ``eager``        plain PyTorch reference model, ``nn.BatchNorm2d``
* ``eager_sync``   plain PyTorch reference model, ``nn.SyncBatchNorm`` (torch's own; only with world size
  > 1 — at world size 1 torch silently runs plain BatchNorm, nothing to measure)

The extra cost of the sync is ``fused_sync − fused`` (ms per step, %, and per synchronised BN layer),
to compare with torch's ``eager_sync − eager``. Per synchronised layer and step resfuse issues one
``all_gather`` (forward) and one ``all_reduce`` (backward) and copies the global count to the host once.

With a single process (world size 1) a sync has nothing to talk to, so resfuse would skip it; the
benchmark sets ``resfuse.distributed._FORCE_COLLECTIVES`` so that the collectives, the merge and the
host copy really run — this measures the fixed cost of the calls (NCCL launches, the device→host
synchronisation), not the network. A micro-benchmark times one ``sync_batch_stats`` + ``sync_grad_sums``
pair on ``[C]`` vectors as well.

``--device cpu`` (gloo, float32, tiny sizes) only checks that the script runs (CI smoke test); its numbers
mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {  # name -> (fused factory, reference factory, image size, classes)
    "resnet50": ("resfuse.models.resnet50", "resfuse.reference.resnet50", 224, 1000),
    "resnet18": ("resfuse.models.resnet18", "resfuse.reference.resnet18", 224, 1000),
    "cifar_resnet56": ("resfuse.models.cifar_resnet:56", "resfuse.reference.cifar_resnet:56", 32, 10),
    "cifar_resnet8": ("resfuse.models.cifar_resnet:8", "resfuse.reference.cifar_resnet:8", 16, 10),
}


def _factory(spec: str):
    import importlib
    path, _, arg = spec.partition(":")
    module, _, name = path.rpartition(".")
    fn = getattr(importlib.import_module(module), name)
    return (lambda: fn(int(arg))) if arg else fn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device: str):
    """``(rank, world, local_rank, forced)``: torchrun's env:// when launched by it, else a one-process group."""
    backend = "nccl" if device == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=300)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=timeout)
    else:
        local = 0
        if device == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                timeout=timeout)
    world = dist.get_world_size()
    import resfuse.distributed as D
    D._FORCE_COLLECTIVES = world == 1
    return dist.get_rank(), world, local, world == 1


def build(variant: str, args, device, local):
    import resfuse.distributed as D
    fused_spec, ref_spec, _, _ = MODELS[args.model]
    torch.manual_seed(0)
    model = _factory(fused_spec if variant.startswith("fused") else ref_spec)()
    if variant.endswith("_sync"):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ddp = D.DistributedDataParallel(model, device_ids=[local] if device == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    n_sync = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    return ddp, opt, n_sync


def time_steps(ddp, opt, args, device) -> list:
    """Per-step milliseconds (slowest rank), ``--repeats`` values."""
    _, _, size, classes = MODELS[args.model]
    x = torch.randn(args.batch, 3, size, size, device=device)
    if device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (args.batch,), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    out = []
    for _ in range(args.repeats):
        dist.barrier()
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                step()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end) / args.iters
        else:
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step()
            ms = (time.perf_counter() - t0) * 1e3 / args.iters
        t = torch.tensor([ms], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out.append(t.item())
    return out


def micro(args, device) -> dict:
    """Microseconds per ``sync_batch_stats`` and per ``sync_grad_sums`` call on ``[C]`` float32 vectors
    (host wall time including the device work, slowest rank)."""
    import resfuse.distributed as D
    res = {}
    for c in args.channels:
        mean = torch.randn(c, device=device)
        var = torch.rand(c, device=device) + 0.5
        fns = {"sync_batch_stats": lambda m=mean, v=var: D.sync_batch_stats(m, v, 4096),
               "sync_grad_sums": lambda m=mean, v=var: D.sync_grad_sums(m, v)}
        for name, fn in fns.items():
            for _ in range(20):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            n = 200
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            us = torch.tensor([(time.perf_counter() - t0) * 1e6 / n], dtype=torch.float64, device=device)
            dist.all_reduce(us, op=dist.ReduceOp.MAX)
            res[f"{name}[C={c}]"] = us.item()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    p.add_argument("--batch", type=int, default=64, help="images per GPU")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--channels", type=int, nargs="+", default=[64, 256, 2048])
    p.add_argument("--variants", nargs="+", default=["fused", "fused_sync", "eager", "eager_sync"])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu = gloo smoke run of the script itself (numbers meaningless)")
    p.add_argument("--json", help="write the results here (rank 0)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_sync: skipped: CUDA is not available (this is a GPU benchmark)")
        return 0
    if ROOT not in sys.path:
        sys.path.append(ROOT)
    import resfuse

    rank, world, local, forced = init(args.device)
    device = args.device
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    results = {"model": args.model, "batch_per_rank": args.batch, "world": world, "device": device,
               "forced_collectives": forced, "torch": torch.__version__, "steps_ms": {}, "micro_us": {}}
    if device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    for variant in args.variants:
        if variant == "eager_sync" and world == 1:
            continue  # torch's SyncBatchNorm runs plain BatchNorm at world size 1: nothing to measure
        ddp, opt, n_sync = build(variant, args, device, local)
        times = time_steps(ddp, opt, args, device)
        results["steps_ms"][variant] = statistics.median(times)
        if variant == "fused_sync":
            results["sync_layers"] = n_sync
            results["backend"] = resfuse.last_used().get("conv_bn_chain")
        del ddp, opt
        if device == "cuda":
            torch.cuda.empty_cache()
    results["micro_us"] = micro(args, device)
    s = results["steps_ms"]
    if "fused" in s and "fused_sync" in s:
        extra = s["fused_sync"] - s["fused"]
        results["extra_ms"] = extra
        results["extra_pct"] = 100 * extra / s["fused"]
        results["extra_us_per_layer"] = 1e3 * extra / max(results.get("sync_layers", 1), 1)
    if "eager" in s and "eager_sync" in s:
        results["torch_extra_ms"] = s["eager_sync"] - s["eager"]
        results["torch_extra_pct"] = 100 * (s["eager_sync"] - s["eager"]) / s["eager"]
    if rank == 0:
        print(f"bench_sync: {args.model}, batch {args.batch}/rank, world {world} on {results.get('gpu', device)}"
              + (" (world size 1: collectives forced)" if forced else ""))
        for k, v in s.items():
            print(f"  {k:<11} {v:9.3f} ms/step")
        for k in ("extra_ms", "extra_pct", "extra_us_per_layer", "torch_extra_ms", "torch_extra_pct"):
            if k in results:
                print(f"  {k:<19} {results[k]:9.3f}")
        for k, v in results["micro_us"].items():
            print(f"  {k:<28} {v:8.1f} us/call")
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    dist.destroy_process_group()
    return 0


# -- pytest entry points (the benchmark runs in a subprocess: torch.distributed stays off in pytest) -------
def _run_script(*extra, timeout=900):
    cmd = [sys.executable, os.path.abspath(__file__), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def test_bench_sync_gpu():
    import pytest
    if not torch.cuda.is_available():
        pytest.skip("GPU benchmark: CUDA is not available")
    r = _run_script("--model", "resnet50", "--batch", "64", "--json",
                    os.path.join(ROOT, "benchmarks", "results", "bench_sync.json"))
    print(r.stdout)
    assert r.returncode == 0, r.stderr[-4000:]


try:
    import pytest as _pytest

    @_pytest.mark.smoke
    def test_bench_sync_cpu_smoke():
        """The script runs end to end (gloo, CPU, tiny); its numbers are meaningless."""
        r = _run_script("--device", "cpu", "--model", "cifar_resnet8", "--batch", "4", "--iters", "1",
                        "--warmup", "1", "--repeats", "1", "--channels", "8", "--variants", "fused", "fused_sync",
                        timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        assert "fused_sync" in r.stdout
except ImportError:  # pragma: no cover - running as a script without pytest
    pass


if __name__ == "__main__":
    code = main()
    # Leave without interpreter finalization: gloo's worker threads can still hold finished work objects
    # whose tensors reference Python when the interpreter tears down, which aborts the process
    # ("terminate called without an active exception", seen once in CI at exit, after all output and
    # destroy_process_group; pytorch/pytorch#179291 describes the teardown race). Output is flushed first.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
