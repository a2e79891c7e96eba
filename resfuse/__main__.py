"""``python -m resfuse``: what resfuse can do on this machine, in one minute.

Prints ``resfuse.explain()``, fuses a ResNet, checks it against the plain-PyTorch model (eval output,
and a train step's loss and gradients), and prints a small speed table against eager PyTorch on the
current device (CUDA if present, else CPU).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import resfuse
from resfuse.testing import rel_error, tolerance


def _timer(device):
    if device.type == "cuda":
        def t(fn, n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(n):
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)
    else:
        def t(fn, n):
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resfuse", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50", "cifar_resnet20"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="image side (default 224 on GPU, 112 on CPU)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    print(resfuse.explain())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "cifar_resnet20":
        ref = resfuse.reference.cifar_resnet(20)
        size = args.size or 32
    else:
        ref = getattr(resfuse.reference, args.model)()
        size = args.size or (224 if device.type == "cuda" else 112)
    batch = args.batch or (64 if device.type == "cuda" else 4)
    ref = ref.to(device).to(memory_format=torch.channels_last)
    fused = resfuse.fuse(ref)
    print()
    print(resfuse.explain(fused))

    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    # correctness: eval output and one train step's gradients, fused vs plain
    ref.eval(), fused.eval()
    with torch.no_grad():
        e = rel_error(fused(x), ref(x))
    ref_t, fused_t = copy.deepcopy(ref).train(), copy.deepcopy(fused).train()
    ref_t.load_state_dict(fused_t.state_dict())
    lr = ref_t(x).float().square().mean()
    lf = fused_t(x).float().square().mean()
    lr.backward(), lf.backward()
    ge = max(rel_error(a.grad, b.grad) for a, b in zip(fused_t.parameters(), ref_t.parameters())
             if a.grad is not None)
    ok = e <= 100 * tolerance(torch.float32) and ge <= 1e-2
    print(f"\ncheck vs plain PyTorch ({args.model}, batch {batch}, {size}x{size}, fp32, channels_last): "
          f"eval output rel. error {e:.2e}, train-step gradient rel. error {ge:.2e} -> {'OK' if ok else 'MISMATCH'}")

    timer = _timer(device)

    def bench(model, train):
        if train:
            model.train()

            def step():
                model.zero_grad(set_to_none=True)
                model(x).float().square().mean().backward()
        else:
            model.eval()

            def step():
                with torch.no_grad():
                    model(x)
        step(), step()  # warm-up
        return timer(step, args.repeats)

    rows = []
    for mode, train in (("eval", False), ("train step", True)):
        te = bench(ref_t if train else ref, train)
        tf = bench(fused_t if train else fused, train)
        rows.append((mode, te, tf))
    print(f"\nspeed on {device} ({torch.get_num_threads()} threads), median of {args.repeats}:")
    print(f"{'mode':<11} {'eager ms':>9} {'resfuse ms':>11} {'img/s eager':>12} {'img/s resfuse':>14} {'speed-up':>9}")
    for mode, te, tf in rows:
        print(f"{mode:<11} {te * 1e3:9.1f} {tf * 1e3:11.1f} {batch / te:12.1f} {batch / tf:14.1f} {te / tf:8.2f}x")
    print("\nlast backend per op:", resfuse.last_used())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
