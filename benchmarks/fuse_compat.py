"""``resfuse.fuse`` on the real torchvision and timm ResNets: fused against plain PyTorch on one device.

    python benchmarks/fuse_compat.py --out fuse_compat.json                  # CUDA when present
    python benchmarks/fuse_compat.py --out /tmp/c.json --device cpu --models tv_resnet18 --batch 2 --size 64

For every model and resfuse backend: random weights, every BatchNorm given non-trivial parameters and
running statistics (``resfuse.testing.randomize_bn``), then ``resfuse.fuse`` of a copy, and

* ``eval_fp32``: eval output, float32, TF32 off;
* ``eval_autocast``: eval output under ``torch.autocast`` (bfloat16; ``--autocast none`` skips it);
* ``train_fp32``: one train step, float32, TF32 off: the output, the input gradient, all parameter
  gradients as one vector (L2 relative error) and all running statistics as one vector;

each of the fused model and of the plain model (same dtype, same layout: channels_last) measured against
the plain model in float64 on the same device (``resfuse.testing.rel_error``: max-norm relative). A check
passes when ``error(resfuse) <= K x error(plain) + floor`` (``--k``, default 2; floor 1e-4 in float32,
1e-2 under autocast): resfuse may not be less accurate than PyTorch itself in that dtype.

Writes ``--out`` (JSON) after every model, so that a run stopped by a timeout keeps what it finished:
``stamp`` (device, torch, triton, git commit, date; merged with ``--stamp``, the GPU session's), the
settings, one entry per (model, backend) with every error, ``max_rel_error`` (the largest error of the
fused and of the plain model over the float32 checks, and over the autocast check), which backend ran, how
many blocks were fused and what ``resfuse.explain`` left unfused, and a summary. Prints a Markdown table.
Exit status 1 when a check fails or a model errors. Run by ``benchmarks/gpu_session.sh`` (step
``fuse_compat``); copy its file to ``benchmarks/results/`` as ``fuse-compat-<device>-<date>.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

#: name -> (package, constructor)
MODELS = {
    "tv_resnet18": ("torchvision", lambda tv: tv.models.resnet18()),
    "tv_resnet50": ("torchvision", lambda tv: tv.models.resnet50()),
    "tv_resnext50_32x4d": ("torchvision", lambda tv: tv.models.resnext50_32x4d()),
    "tv_wide_resnet50_2": ("torchvision", lambda tv: tv.models.wide_resnet50_2()),
    "timm_resnet18": ("timm", lambda timm: timm.create_model("resnet18")),
    "timm_resnet50": ("timm", lambda timm: timm.create_model("resnet50")),
    "timm_seresnet50": ("timm", lambda timm: timm.create_model("seresnet50")),  # the SE block end: gate_act
}
FLOOR = {"fp32": 1e-4, "autocast": 1e-2}


def _import(package: str):
    """``torchvision`` / ``timm``; through ``tests/tvshim.py`` (which makes torchvision importable next
    to a CPU-only torch wheel) when the checkout has it."""
    if importlib.util.find_spec(package) is None or importlib.util.find_spec("torchvision") is None:
        raise ModuleNotFoundError(f"{package} is not installed")
    if (REPO / "tests" / "tvshim.py").exists():
        sys.path.insert(0, str(REPO / "tests"))
        try:
            import tvshim
        finally:
            sys.path.pop(0)
        return tvshim.import_timm() if package == "timm" else tvshim.import_torchvision()
    return importlib.import_module(package)


def _git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stamp(device: torch.device, given: dict | None) -> dict:
    """Where and what ran: ``given`` (the GPU session's stamp) completed with this process's view."""
    s = dict(given or {})
    s.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))  # noqa: UP017 (py3.10)
    s.setdefault("git_commit", _git_commit())
    s.setdefault("host", platform.node())
    s["torch"] = torch.__version__
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        s["device"] = f"{p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs {p.total_memory / 2**30:.0f} GiB"
        s["torch_cuda"], s["cudnn"] = torch.version.cuda, torch.backends.cudnn.version()
    else:
        s["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        import triton
        s["triton"] = triton.__version__
    except ImportError:
        s["triton"] = "not installed"
    return s


@contextlib.contextmanager
def _no_tf32():
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


@contextlib.contextmanager
def _process_backend(name: str):
    """``resfuse.set_backend(name)`` for the block (process-wide: on CUDA the backward runs on autograd's
    own thread, which the thread-local ``use_backend`` does not reach)."""
    import resfuse

    prev = resfuse.get_backend_name()
    resfuse.set_backend(name)
    try:
        yield
    finally:
        resfuse.set_backend(prev)


def _train_step(model, x, g):
    """Output, input gradient, all parameter gradients (one float64 vector) and all floating-point
    buffers (one vector) after one train-mode forward + backward of ``model`` on ``x`` with ``out.backward(g)``."""
    model.train()
    xr = x.detach().clone().requires_grad_()
    out = model(xr)
    out.backward(g.to(out.dtype))
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    bufs = torch.cat([b.double().flatten() for b in model.buffers() if b.is_floating_point()])
    return {"output": out.detach(), "input_grad": xr.grad, "param_grads_l2": grads, "running_stats": bufs}


def compare(name: str, ctor, backend: str, device: torch.device, batch: int, size: int, k: float,
            autocast: torch.dtype | None) -> dict:
    """Every check of one model on one backend (see the module doc)."""
    import resfuse
    from resfuse.testing import randomize_bn, rel_error, rel_error_l2

    t0 = time.perf_counter()
    torch.manual_seed(0)
    cl = torch.channels_last
    plain = randomize_bn(ctor(), seed=1).to(device)
    fused = resfuse.fuse(copy.deepcopy(plain)).to(memory_format=cl)  # shares nothing with plain
    plain64 = copy.deepcopy(plain).double()
    plain = plain.to(memory_format=cl)
    report = resfuse.explain(fused).splitlines()
    left_at = next(i for i, line in enumerate(report) if line.startswith("left as is"))
    entry = {"model": name, "backend": backend, "model_class": f"{type(plain).__module__}.{type(plain).__qualname__}",
             "fused_class": f"{type(fused).__module__}.{type(fused).__qualname__}",
             "blocks_fused": sum(type(m).__module__.startswith("resfuse.nn") for m in fused.modules()),
             "left_unfused": [line.strip() for line in report[left_at + 1:]], "checks": {}}
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    x_cl = x.contiguous(memory_format=cl)
    checks = entry["checks"]

    def record(check, key, ours, theirs, truth, floor, l2=False):
        err = rel_error_l2 if l2 else rel_error
        e_f, e_p = err(ours, truth), err(theirs, truth)
        checks.setdefault(check, {})[key] = {
            "fused": e_f, "plain": e_p, "fused_vs_plain": err(ours, theirs), "measure": "l2" if l2 else "max",
            "ok": bool(e_f <= k * e_p + floor)}

    with _process_backend(backend), _no_tf32():
        for m in (plain, fused, plain64):
            m.eval()
        with torch.no_grad():
            truth = plain64(x.double())
            record("eval_fp32", "output", fused(x_cl), plain(x_cl), truth, FLOOR["fp32"])
            if autocast is not None:
                with torch.autocast(device.type, dtype=autocast):
                    ours, theirs = fused(x_cl), plain(x_cl)
                record("eval_autocast", "output", ours, theirs, truth, FLOOR["autocast"])
        g = torch.randn(truth.shape, generator=gen, dtype=torch.float64).to(device)
        want = _train_step(plain64, x.double(), g)
        ours, theirs = _train_step(fused, x_cl, g), _train_step(plain, x_cl, g)
        for key in want:
            record("train_fp32", key, ours[key], theirs[key], want[key], FLOOR["fp32"], l2=key == "param_grads_l2")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    entry["backends_used"] = resfuse.last_used()
    fp32 = [v for c in ("eval_fp32", "train_fp32") for v in checks[c].values()]
    entry["max_rel_error"] = {"fused_fp32": max(v["fused"] for v in fp32), "plain_fp32": max(v["plain"] for v in fp32)}
    if "eval_autocast" in checks:
        entry["max_rel_error"].update(fused_autocast=checks["eval_autocast"]["output"]["fused"],
                                      plain_autocast=checks["eval_autocast"]["output"]["plain"])
    entry["ok"] = all(v["ok"] for c in checks.values() for v in c.values())
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    return entry


def table(results: list[dict]) -> str:
    """Markdown: per model and backend, resfuse's / plain PyTorch's error against float64."""
    cols = ["eval_fp32/output", "eval_autocast/output", "train_fp32/output", "train_fp32/input_grad",
            "train_fp32/param_grads_l2", "train_fp32/running_stats"]
    lines = ["| model | backend | " + " | ".join(c.replace("/", " ") for c in cols) + " | max fused fp32 | ok |",
             "|---|---|" + "---:|" * len(cols) + "---:|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['backend']} | " + " | ".join("" for _ in cols)
                         + f" | | ERROR: {r['error'][:80]} |")
            continue
        cells = []
        for c in cols:
            check, key = c.split("/")
            v = r["checks"].get(check, {}).get(key)
            cells.append(f"{v['fused']:.1e} / {v['plain']:.1e}" + ("" if v["ok"] else " FAIL") if v else "-")
        lines.append(f"| {r['model']} | {r['backend']} | " + " | ".join(cells)
                     + f" | {r['max_rel_error']['fused_fp32']:.1e} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSON result file (rewritten after every model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    p.add_argument("--backends", default=None,
                   help="comma-separated resfuse backends (default: cuda,triton on CUDA, cpu on CPU); each "
                        "backend runs every model before the next backend starts")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--k", type=float, default=2.0, help="pass: error(resfuse) <= K x error(plain) + floor")
    p.add_argument("--autocast", default="bf16", choices=["bf16", "fp16", "none"])
    p.add_argument("--stamp", default=None, help="JSON object to start the stamp from (gpu_session.sh's)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        p.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    backends = (args.backends or ("cuda,triton" if device.type == "cuda" else "cpu")).split(",")
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.autocast]

    if importlib.util.find_spec("resfuse") is None:  # not installed: the checkout's (an installed one wins)
        sys.path.insert(0, str(REPO))
    import resfuse
    from resfuse import backends as rb

    doc = {"stamp": stamp(device, json.loads(args.stamp) if args.stamp else None),
           "settings": {"device": str(device), "batch": args.batch, "size": args.size, "k": args.k,
                        "floor": FLOOR, "tf32": False, "memory_format": "channels_last",
                        "autocast": args.autocast, "measure": "relative error vs plain PyTorch in float64; "
                        "max-norm, L2 for the parameter-gradient vector"},
           "availability": rb.availability(), "results": []}
    out = Path(args.out)

    def save():
        rows = doc["results"]
        doc["summary"] = {"ok": sum(r.get("ok") is True for r in rows), "failed": sum(r.get("ok") is False for r in rows),
                          "errors": sum("error" in r for r in rows)}
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out)

    packages = {}
    print(f"resfuse {resfuse.__version__}, torch {torch.__version__}, {doc['stamp']['device']}; backends {backends}",
          flush=True)
    for backend in backends:
        for name in names:
            package, ctor = MODELS[name]
            try:
                why = rb.availability().get(backend, f"unknown backend {backend!r}")
                if why is not None:
                    raise RuntimeError(f"backend {backend} unavailable: {why}")
                if package not in packages:
                    packages[package] = _import(package)
                entry = compare(name, functools.partial(ctor, packages[package]), backend, device, args.batch,
                                args.size, args.k, autocast)
            except Exception as e:  # noqa: BLE001 - recorded, and the next model runs
                entry = {"model": name, "backend": backend, "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc()[-3000:]}
            doc["results"].append(entry)
            save()
            status = "error: " + entry["error"] if "error" in entry else (
                f"{'passed' if entry['ok'] else 'FAILED'}: max error fused fp32 "
                f"{entry['max_rel_error']['fused_fp32']:.2e} (plain {entry['max_rel_error']['plain_fp32']:.2e}) "
                f"in {entry['seconds']}s")
            print(f"{name} [{backend}]: {status}", flush=True)
    print(table(doc["results"]))
    print(f"summary: {doc['summary']}; results in {out}")
    return 0 if doc["summary"]["failed"] == doc["summary"]["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
