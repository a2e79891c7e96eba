"""``python -m resfuse.train``: train a fused and a plain-PyTorch network side by side on real data.

Data: scikit-learn's ``load_digits`` (1,797 handwritten 8×8 digits, 10 classes), upsampled to
``--size``² (bilinear), replicated to 3 channels, normalised with the training set's mean and std, and
split once into 1,437 training and 360 test images (stratified, ``random_state=0``).

Models (``--model``): ``resnet20`` — ``resfuse.reference.cifar_resnet(20)`` against
``resfuse.models.cifar_resnet(20)`` loaded with the same ``state_dict``; ``rir`` — the RiR model
``resfuse.reference.rir.rir_cifar_ref`` against ``resfuse.models.rir_cifar`` (``--width`` filters per
stream), the fused one copied from the reference with ``load_into_fused``. Both runs get the same
initial weights, the same batches in the same order, SGD with Nesterov momentum and a cosine learning
rate, in float32.

Checks: the two loss curves match step by step (relative difference ≤ 1e-4 over the first 50 steps)
and both reach ≥ 95% test accuracy. Prints a table, optionally writes a PNG of the two loss curves
(``--png``), exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import models, reference

MATCH_STEPS = 50  # the loss curves must agree over this many first steps ...
MATCH_RTOL = 1e-4  # ... within this relative difference
MIN_ACCURACY = 0.95


class Data(NamedTuple):
    x_train: torch.Tensor  # [1437, 3, size, size] float32
    y_train: torch.Tensor  # [1437] int64
    x_test: torch.Tensor  # [360, 3, size, size]
    y_test: torch.Tensor


class Run(NamedTuple):
    losses: List[float]  # training loss of every step
    accuracy: float  # on the test set, eval mode
    seconds: float  # wall time of the training loop


class Report(NamedTuple):
    model: str
    steps: int
    reference: Run
    fused: Run

    def loss_rel_diff(self, steps: int | None = None) -> float:
        """Max over the first ``steps`` (all by default) of ``|loss_fused - loss_ref| / |loss_ref|``."""
        pairs = list(zip(self.fused.losses, self.reference.losses))[:steps]
        return max(abs(f - r) / max(abs(r), 1e-12) for f, r in pairs)

    def ok(self) -> bool:
        return (self.loss_rel_diff(MATCH_STEPS) <= MATCH_RTOL and self.reference.accuracy >= MIN_ACCURACY
                and self.fused.accuracy >= MIN_ACCURACY)


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


def _resnet20(width: int) -> Tuple[nn.Module, nn.Module]:
    ref = reference.cifar_resnet(20)
    fused = models.cifar_resnet(20)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _rir(width: int) -> Tuple[nn.Module, nn.Module]:
    from .reference.rir import load_into_fused, rir_cifar_ref

    ref = rir_cifar_ref(width=width)
    return ref, load_into_fused(models.rir_cifar(width=width), ref)


MODELS: Dict[str, Callable[[int], Tuple[nn.Module, nn.Module]]] = {"resnet20": _resnet20}
if hasattr(models, "rir_cifar"):
    MODELS["rir"] = _rir


def batches(n: int, batch: int, steps: int, seed: int) -> List[torch.Tensor]:
    """Index batches for ``steps`` steps: a fresh permutation per epoch, dropping the incomplete tail."""
    g = torch.Generator().manual_seed(seed)
    out: List[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out += [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:steps]


def train(model: nn.Module, data: Data, order: List[torch.Tensor], lr: float, progress=None) -> Run:
    """SGD (Nesterov momentum 0.9, weight decay 5e-4, cosine learning rate) over the batches ``order``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=len(order), pct_start=0.3)
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
    """Train the reference and the fused ``model`` from the same weights on the same batches."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; available: {', '.join(MODELS)}")
    data = load_data(size)
    torch.manual_seed(seed)
    ref, fused = MODELS[model](width)
    order = batches(len(data.y_train), batch, steps, seed)
    runs = []
    for name, net in (("reference", ref), ("fused", fused)):
        bar = _progress(progress, steps, f"{model} {name}")
        try:
            runs.append(train(net, data, order, lr, bar))
        finally:
            if bar is not None:
                bar.close()
    return Report(model, steps, *runs)


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=False)


def table(reports: List[Report]) -> str:
    head = (f"{'model':<9} {'steps':>5} {'final loss ref':>14} {'final loss fused':>16} "
            f"{'max rel diff (first 50)':>23} {'max rel diff (all)':>18} {'acc ref':>7} {'acc fused':>9} "
            f"{'time ref s':>10} {'time fused s':>12}")
    rows = [head, "-" * len(head)]
    for r in reports:
        rows.append(f"{r.model:<9} {r.steps:>5} {r.reference.losses[-1]:>14.4f} {r.fused.losses[-1]:>16.4f} "
                    f"{r.loss_rel_diff(MATCH_STEPS):>23.2e} {r.loss_rel_diff():>18.2e} "
                    f"{r.reference.accuracy:>7.1%} {r.fused.accuracy:>9.1%} "
                    f"{r.reference.seconds:>10.1f} {r.fused.seconds:>12.1f}")
    return "\n".join(rows)


def plot(reports: List[Report], path: str) -> None:
    """The two loss curves of each report (log scale), one panel per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4), squeeze=False)
    for ax, r in zip(axes[0], reports):
        steps = range(1, r.steps + 1)
        ax.plot(steps, r.reference.losses, label=f"reference (test acc {r.reference.accuracy:.1%})", lw=2)
        ax.plot(steps, r.fused.losses, "--", label=f"resfuse fused (test acc {r.fused.accuracy:.1%})", lw=1.5)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (cross-entropy)")
        ax.set_title(f"{r.model} on digits: max rel. loss diff {r.loss_rel_diff(MATCH_STEPS):.1e} "
                     f"(first {MATCH_STEPS})", fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resfuse.train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=[*MODELS, "all"])
    p.add_argument("--steps", type=int, default=None, help="training steps (default 400, 150 with --quick)")
    p.add_argument("--quick", action="store_true", help="a short run (150 steps): the CI version")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=16, help="image side after upsampling (16 or 32)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--width", type=int, default=8, help="RiR filters per stream in stage 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default=None, help="write the loss curves to this PNG file")
    args = p.parse_args(argv)
    steps = args.steps or (150 if args.quick else 400)
    if steps < MATCH_STEPS:
        p.error(f"--steps must be at least {MATCH_STEPS} (the loss curves are compared over {MATCH_STEPS} steps)")
    names = list(MODELS) if args.model == "all" else [args.model]
    reports = [run_check(n, steps, args.batch, args.size, args.lr, args.width, args.seed, progress=True)
               for n in names]
    print(table(reports))
    if args.png:
        plot(reports, args.png)
        print(f"loss curves: {args.png}")
    ok = all(r.ok() for r in reports)
    print(f"check (loss rel. diff <= {MATCH_RTOL:g} over the first {MATCH_STEPS} steps, test accuracy >= "
          f"{MIN_ACCURACY:.0%}): {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
