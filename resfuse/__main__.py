"""``python -m resfuse``: what resfuse can do on this machine, in one minute.

Prints ``resfuse.explain()``, fuses a ResNet, checks it against the plain-PyTorch model (eval output,
and a train step's loss and gradients), and prints a small speed table against eager PyTorch on the
current device (CUDA if present, else CPU).
"""
from __future__ import annotations

import argparse
import copy

import torch

import resfuse
from resfuse import cpu_conv
from resfuse.testing import median_seconds_each, rel_error, rel_error_l2


def _check(ref, fused, x):
    """``(ok, report)``: the eval output and one train step's parameter gradients of ``fused`` and of
    ``ref`` (both float32) against ``ref`` in float64; ok when resfuse's errors are at most 4x plain
    float32's own (+ 1e-5)."""
    ref.eval(), fused.eval()
    ref64 = copy.deepcopy(ref).double()
    with torch.no_grad():
        truth = ref64(x.double())
        e_ours, e_plain = rel_error(fused(x), truth), rel_error(ref(x), truth)
    ref_t, fused_t = copy.deepcopy(ref).train(), copy.deepcopy(fused).train()
    ref_t.load_state_dict(fused_t.state_dict())
    ref64.train()
    grads = []
    for m, inp in ((fused_t, x), (ref_t, x), (ref64, x.double())):
        m(inp).double().square().mean().backward()
        grads.append(torch.cat([p.grad.flatten().double() for p in m.parameters()]))
    g_ours, g_plain = rel_error_l2(grads[0], grads[2]), rel_error_l2(grads[1], grads[2])
    ok = (e_ours <= 4 * e_plain + 1e-5) and (g_ours <= 4 * g_plain + 1e-5)
    return ok, (f"eval output {e_ours:.2e} / {e_plain:.2e}, train-step gradients (L2) {g_ours:.2e} / "
                f"{g_plain:.2e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resfuse", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50", "cifar_resnet20"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="image side (default 224 on GPU, 112 on CPU)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    print(resfuse.explain())
    torch.manual_seed(0)
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
    # correctness: eval output and one train step's gradients, fused (fp32) and plain (fp32) each
    # against plain PyTorch in float64; resfuse passes when its error is at most 4x plain fp32's own.
    # Seeded, and the CPU convolutions on oneDNN (cpu_conv.forced), so that the outcome is not decided
    # by where rounding flips a ReLU mask
    with cpu_conv.forced("onednn"):
        ok, report = _check(ref, fused, x)
    print(f"\ncheck vs plain PyTorch in float64 ({args.model}, batch {batch}, {size}x{size}, channels_last), "
          f"relative errors resfuse fp32 / plain fp32:\n  {report} -> {'OK' if ok else 'MISMATCH'}")
    ref_t, fused_t = copy.deepcopy(ref).train(), copy.deepcopy(fused).train()

    def step_of(model, train):
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
        return step

    rows = []
    for mode, train in (("eval", False), ("train step", True)):
        warm = cpu_conv.warm_steps() if train and torch.device(device).type == "cpu" else 2
        # eager and resfuse alternate call by call: on a machine whose speed drifts, timing one after the
        # other would compare two machine states
        steps = [step_of(ref_t if train else ref, train), step_of(fused_t if train else fused, train)]
        te, tf = median_seconds_each(steps, args.repeats, device, warmup=warm)
        rows.append((mode, te, tf))
    print(f"\nspeed on {device} ({torch.get_num_threads()} threads), median of {args.repeats} "
          "(eager and resfuse alternating):")
    print(f"{'mode':<11} {'eager ms':>9} {'resfuse ms':>11} {'img/s eager':>12} {'img/s resfuse':>14} {'speed-up':>9}")
    for mode, te, tf in rows:
        print(f"{mode:<11} {te * 1e3:9.1f} {tf * 1e3:11.1f} {batch / te:12.1f} {batch / tf:14.1f} {te / tf:8.2f}x")
    print("\nlast backend per op:", resfuse.last_used())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
