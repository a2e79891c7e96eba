"""``python -m resfuse.train``: train a fused and a plain-PyTorch network side by side on real data.

Data: scikit-learn's ``load_digits`` (1,797 handwritten 8×8 digits, 10 classes), upsampled to
``--size``² (bilinear), replicated to 3 channels, normalised with the training set's mean and std, and
split once into 1,437 training and 360 test images (stratified, ``random_state=0``).

Models (``--model``): ``resnet20`` — ``resfuse.reference.cifar_resnet(20)`` against
``resfuse.models.cifar_resnet(20)`` loaded with the same ``state_dict``; ``rir`` — the RiR model
``resfuse.reference.rir.rir_cifar_ref`` against ``resfuse.models.rir_cifar`` (``--width`` filters per
stream), the fused one copied from the reference with ``load_into_fused``. Both runs get the same
initial weights, the same batches in the same order, SGD with Nesterov momentum and a one-cycle learning
rate (warm-up, then cosine), in float32.

Checks. Training a ReLU network is chaotic in float32: a rounding-level difference flips a few ReLUs, each
flip moves a gradient by ~1/sqrt(batch·H·W) (percent level), and the trajectories drift apart within a few
steps — plain PyTorch against itself with every initial weight perturbed by one float32 epsilon (the
"noise floor" run, trained for the first 50 steps) drifts exactly as much. So the check is:

* step 1 (identical weights, same batch): losses equal within 1e-5 (relative);
* first 50 steps: ``max |loss_fused - loss_ref| / loss_ref <= max(1e-4, 10 x the noise floor's)``;
* both models reach >= 95% test accuracy.

Prints a table, optionally writes a PNG of the loss curves and their relative differences (``--png``),
exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import models, reference

MATCH_STEPS = 50  # the loss curves are compared over this many first steps ...
MATCH_RTOL = 1e-4  # ... within max(MATCH_RTOL, FLOOR_FACTOR x the noise floor's difference)
FLOOR_FACTOR = 10.0
FIRST_STEP_RTOL = 1e-5  # step 1: same weights, same batch
MIN_ACCURACY = 0.95
QUICK_STEPS, QUICK_BATCH = 80, 32  # --quick (the CI test): ~2 epochs, still >= 95% test accuracy


class Data(NamedTuple):
    x_train: torch.Tensor  # [1437, 3, size, size] float32
    y_train: torch.Tensor  # [1437] int64
    x_test: torch.Tensor  # [360, 3, size, size]
    y_test: torch.Tensor


class Run(NamedTuple):
    losses: list[float]  # training loss of every step
    accuracy: float  # on the test set, eval mode
    seconds: float  # wall time of the training loop


class Report(NamedTuple):
    model: str
    steps: int
    reference: Run
    fused: Run
    floor: Run  # the reference with perturbed initial weights, MATCH_STEPS steps

    def rel_diff(self, run: Run, steps: int | None = None) -> float:
        """Max over the first ``steps`` (all by default) of ``|loss_run - loss_ref| / loss_ref``."""
        pairs = list(zip(run.losses, self.reference.losses))[:steps]
        return max(abs(a - r) / max(abs(r), 1e-12) for a, r in pairs)

    def allowed(self) -> float:
        return max(MATCH_RTOL, FLOOR_FACTOR * self.rel_diff(self.floor, MATCH_STEPS))

    def failures(self) -> list[str]:
        out = []
        if self.rel_diff(self.fused, 1) > FIRST_STEP_RTOL:
            out.append(f"step 1 loss differs by {self.rel_diff(self.fused, 1):.1e} > {FIRST_STEP_RTOL:g}")
        if self.rel_diff(self.fused, MATCH_STEPS) > self.allowed():
            out.append(f"loss curves differ by {self.rel_diff(self.fused, MATCH_STEPS):.1e} over the first "
                       f"{MATCH_STEPS} steps > {self.allowed():.1e} (the noise floor's x {FLOOR_FACTOR:g})")
        for name, run in (("reference", self.reference), ("fused", self.fused)):
            if run.accuracy < MIN_ACCURACY:
                out.append(f"{name} test accuracy {run.accuracy:.1%} < {MIN_ACCURACY:.0%}")
        return out


def load_data(size: int = 16) -> Data:
    """The digits, upsampled to ``size × size``, 3 channels, normalised; the fixed train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=360, random_state=0,
                                           stratify=y.numpy())
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = ((x - mean) / std).contiguous()
    return Data(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def _resnet20(width: int) -> tuple[nn.Module, nn.Module]:
    ref = reference.cifar_resnet(20)
    fused = models.cifar_resnet(20)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _rir(width: int) -> tuple[nn.Module, nn.Module]:
    from .reference.rir import load_into_fused, rir_cifar_ref

    ref = rir_cifar_ref(width=width)
    return ref, load_into_fused(models.rir_cifar(width=width), ref)


MODELS: dict[str, Callable[[int], tuple[nn.Module, nn.Module]]] = {"resnet20": _resnet20}
if hasattr(models, "rir_cifar"):
    MODELS["rir"] = _rir


def batches(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Index batches for ``steps`` steps: a fresh permutation per epoch, dropping the incomplete tail."""
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out += [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:steps]


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every floating-point parameter scaled by ``1 + eps·N(0, 1)``, eps the float32
    machine epsilon: a rounding-level change, the size of what separates two correct float32 programs."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    eps = torch.finfo(torch.float32).eps
    with torch.no_grad():
        for p in out.parameters():
            p.mul_(1 + eps * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out


def train(model: nn.Module, data: Data, order: list[torch.Tensor], lr: float, total_steps: int,
          progress=None) -> Run:
    """SGD (Nesterov momentum 0.9, weight decay 5e-4, one-cycle learning rate peaking at ``lr`` over
    ``total_steps``) over the batches ``order``, then the test accuracy in eval mode."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.3)
    losses = []
    model.train()
    t0 = time.perf_counter()
    for idx in order:
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x in data.x_test.split(256)])
    return Run(losses, (pred == data.y_test).float().mean().item(), seconds)


def run_check(model: str = "resnet20", steps: int = 400, batch: int = 64, size: int = 16, lr: float = 0.1,
              width: int = 8, seed: int = 0, progress: bool = False) -> Report:
    """Train the reference, the fused and the noise-floor ``model`` from the same weights on the same batches."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; available: {', '.join(MODELS)}")
    if steps < MATCH_STEPS:
        raise ValueError(f"steps must be at least {MATCH_STEPS}, got {steps}")
    data = load_data(size)
    torch.manual_seed(seed)
    ref, fused = MODELS[model](width)
    floor = perturbed(ref, seed)
    order = batches(len(data.y_train), batch, steps, seed)
    runs = []
    for name, net, n in (("reference", ref, steps), ("fused", fused, steps), ("noise floor", floor, MATCH_STEPS)):
        bar = _progress(progress, n, f"{model} {name}")
        try:
            runs.append(train(net, data, order[:n], lr, steps, bar))
        finally:
            if bar is not None:
                bar.close()
    return Report(model, steps, *runs)


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=False)


def table(reports: list[Report]) -> str:
    cols = [("model", 9), ("steps", 5), ("final loss ref", 14), ("final loss fused", 16),
            (f"rel diff {MATCH_STEPS} steps", 18), ("noise floor", 11), ("rel diff all", 12), ("acc ref", 7),
            ("acc fused", 9), ("time ref s", 10), ("time fused s", 12)]
    rows = [" ".join(f"{c:>{w}}" for c, w in cols)]
    rows.append("-" * len(rows[0]))
    for r in reports:
        vals = [r.model, r.steps, f"{r.reference.losses[-1]:.4f}", f"{r.fused.losses[-1]:.4f}",
                f"{r.rel_diff(r.fused, MATCH_STEPS):.2e}", f"{r.rel_diff(r.floor, MATCH_STEPS):.2e}",
                f"{r.rel_diff(r.fused):.2e}", f"{r.reference.accuracy:.1%}", f"{r.fused.accuracy:.1%}",
                f"{r.reference.seconds:.1f}", f"{r.fused.seconds:.1f}"]
        rows.append(" ".join(f"{v:>{w}}" for v, (_, w) in zip(vals, cols)))
    return "\n".join(rows)


def plot(reports: list[Report], path: str) -> None:
    """Per model: the loss curves (log scale) and the relative differences to the reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(reports), figsize=(6.5 * len(reports), 7), squeeze=False, sharex="col")
    for j, r in enumerate(reports):
        top, bottom = axes[0][j], axes[1][j]
        steps = range(1, r.steps + 1)
        top.plot(steps, r.reference.losses, label=f"reference (test acc {r.reference.accuracy:.1%})", lw=2)
        top.plot(steps, r.fused.losses, "--", label=f"resfuse fused (test acc {r.fused.accuracy:.1%})", lw=1.5)
        top.set_yscale("log")
        top.set_ylabel("training loss")
        top.set_title(f"{r.model} on sklearn digits ({r.steps} steps, float32)")
        top.legend()
        for run, label, style in ((r.fused, "fused vs reference", "-"),
                                  (r.floor, "noise floor: reference vs reference with weights x (1 + eps·N(0,1))",
                                   ":")):
            d = [abs(a - b) / b for a, b in zip(run.losses, r.reference.losses)]
            bottom.plot(range(1, len(d) + 1), [max(v, 1e-9) for v in d], style, label=label)
        bottom.axvline(MATCH_STEPS, color="gray", lw=0.8)
        bottom.set_yscale("log")
        bottom.set_xlabel("step")
        bottom.set_ylabel("relative loss difference")
        bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resfuse.train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=[*MODELS, "all"])
    p.add_argument("--steps", type=int, default=None, help="training steps (default 400, 80 with --quick)")
    p.add_argument("--quick", action="store_true", help="a short run (80 steps of 32 images): the CI version")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64, 32 with --quick)")
    p.add_argument("--size", type=int, default=16, help="image side after upsampling (16 or 32)")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--width", type=int, default=8, help="RiR filters per stream in stage 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default=None, help="write the loss curves to this PNG file")
    args = p.parse_args(argv)
    steps = args.steps or (QUICK_STEPS if args.quick else 400)
    batch = args.batch or (QUICK_BATCH if args.quick else 64)
    if steps < MATCH_STEPS:
        p.error(f"--steps must be at least {MATCH_STEPS} (the loss curves are compared over {MATCH_STEPS} steps)")
    names = list(MODELS) if args.model == "all" else [args.model]
    reports = [run_check(n, steps, batch, args.size, args.lr, args.width, args.seed, progress=True)
               for n in names]
    print(table(reports))
    if args.png:
        plot(reports, args.png)
        print(f"loss curves: {args.png}")
    failures = [f"{r.model}: {f}" for r in reports for f in r.failures()]
    for f in failures:
        print("FAILED", f)
    if not failures:
        print(f"OK: step-1 losses within {FIRST_STEP_RTOL:g}; loss curves within max({MATCH_RTOL:g}, "
              f"{FLOOR_FACTOR:g} x noise floor) over the first {MATCH_STEPS} steps; test accuracy >= "
              f"{MIN_ACCURACY:.0%}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
