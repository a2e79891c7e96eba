"""Shared harness for resfuse's pytest benchmarks: variants, timing, peak memory, roofline, ``extra_info``.

``bench_ops.py``, ``bench_blocks.py`` and ``bench_models.py`` describe *cases* (an eager reference module,
how to fuse it, its inputs) and hand them to the :func:`bench_run` fixture, which runs one *variant* of
the case as one pytest-benchmark entry. Any ``bench_*.py`` may use the fixtures below; nothing here runs
unless a test asks for it (``bench_rir.py``, ``bench_sync.py`` only use pytest-benchmark's ``benchmark``).

Variants (the ``variant`` argument, parametrized here for every test that takes one and does not
parametrize it itself), all on identical weights and inputs:

================== ============================================================================
``eager``          the reference model as written (plain PyTorch), NCHW
``eager_cl``       the same, channels_last model and inputs
``compile``        ``torch.compile`` of the channels_last reference, default mode
``compile-max-autotune``  ``mode="max-autotune"`` (CUDA only)
``compile-freezing``      default mode with ``torch._inductor.config.freezing`` (eval only; BN folded,
                   weights constant-folded / prepacked: the strongest inference peer)
``resfuse-<name>`` the resfuse model on backend ``<name>`` (``cpu`` on CPU; ``triton``, ``cuda`` on CUDA),
                   channels_last, for each backend ``resfuse.availability()`` reports usable
================== ============================================================================

Every variant except ``eager`` runs channels_last (resfuse's and Inductor's fast layout). On CUDA all run
under ``torch.autocast(bfloat16)`` with float32 parameters; on CPU in float32.

Timing: one untimed first call (``first_call_s``; for compile variants this is the compile), ``warmup``
more untimed calls, then ``benchmark.pedantic`` with ``rounds = clamp(ceil(--benchmark-max-time / t),
--benchmark-min-rounds, max_rounds)``. Each round is timed by CUDA events on GPU (the device time of the
step; the round ends with an event synchronize, so pytest-benchmark's own wall-clock stats agree) and by
``time.perf_counter`` on CPU. ``extra_info`` holds the median and the 20th/80th percentiles of those times.

Peak memory (one more untimed step, after the timed rounds, gradients reset first):

* CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around the step (``peak_mib``, the extra
  memory the step needs on top of what is resident: weights, inputs, compile caches), plus the absolute
  peak (``peak_abs_mib``).
* CPU: the same quantity, from PyTorch's allocator events recorded by ``torch.profiler`` with
  ``profile_memory=True``: every allocation and free through the CPU allocator (ATen tensors, resfuse's
  C++ kernels' outputs and workspaces, Inductor's buffers, oneDNN memory ATen allocates), summed in time
  order; the peak of that running sum is ``peak_mib``. Why not the process's peak RSS: ``ru_maxrss`` is
  process-wide and monotonic (after the first large case every later case reads the same number), RSS
  also counts the malloc arena, libraries and compiled code, and a fresh subprocess per variant would
  pay torch's import and the whole ``torch.compile`` again. Limitation: memory obtained with plain
  ``malloc`` outside PyTorch's allocator (e.g. OpenMP runtime, some library scratch) is not seen.

Derived numbers: ``images_per_s`` (batch / median), ``flops`` (``torch.utils.flop_counter`` on the eager
reference: convs and matmuls, forward (+ backward in train mode)), ``achieved_tflops``. On CUDA also the
roofline floor ``max(flops / GEMM rate, bytes / copy bandwidth)`` where both rates are measured in the same
session (a bf16 8192³ matmul and a 1 GiB device copy, see the ``device_rates`` fixture) and ``bytes`` is the
ideal-fusion traffic: every conv reads its input and weight and writes its output once (BN, ReLU, add fused
away), times 3 in train mode (forward, data-gradient, weight-gradient); ``pct_of_floor`` = floor / median.

Sanity: ``rel_err_vs_eager`` compares the variant's first output with the eager reference's on the same
inputs (a warning is issued above 1e-3 in float32 / 5e-2 under bf16 autocast).

Options and environment:

* ``--gpu-full`` or ``RESFUSE_BENCH_FULL=1``: full sizes (batch 256 at 224², bf16 channels_last) instead of
  the small CPU sizes.
* ``--no-compile`` or ``RESFUSE_BENCH_NO_COMPILE=1``: deselect every ``compile*`` variant. Implied by
  ``-m smoke`` (and by ``RESFUSE_BENCH_QUICK=1``), which also cuts warm-up to one call.
* ``--bench-variants a,b`` or ``RESFUSE_BENCH_VARIANTS``: run only these variants.
* ``RESFUSE_BENCH_DEVICE=cpu|cuda``: override the device (default: CUDA when available).
* ``RESFUSE_BENCH_AMP=bf16|fp16|none``: override the autocast dtype (default bf16 on CUDA, none on CPU).
* ``--bench-max-rounds N`` (default 100 on CPU, 200 on CUDA), ``--bench-warmup N`` (default 2 on CPU,
  10 on CUDA).
* ``--bench-threads N`` (``torch.set_num_threads``) and ``--bench-clock process`` (CPU rounds timed by
  ``time.process_time``, the process's CPU time: insensitive to other jobs taking the CPU away, which
  wall-clock medians on a shared machine are not; meaningful with one thread, since OpenMP workers spin
  while they wait and spinning is CPU time).
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.util
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = str(HERE.parent)
# resfuse is imported lazily, only when this folder's benchmarks run: a bare ``pytest`` at the root loads this
# conftest too (before tests/conftest.py, which must set TRITON_INTERPRET before anything imports triton).


def _import_resfuse():
    """``import resfuse`` (from the checkout when it is not installed; an installed resfuse, e.g. the GPU
    session's build, takes precedence)."""
    if importlib.util.find_spec("resfuse") is None:
        sys.path.insert(0, ROOT)
    import resfuse
    return resfuse

#: every variant name, in report order
VARIANTS = ("eager", "eager_cl", "compile", "compile-max-autotune", "compile-freezing",
            "resfuse-cpu", "resfuse-triton", "resfuse-cuda")
#: torch.compile ``mode`` per compile variant
COMPILE_MODES = {"compile": None, "compile-max-autotune": "max-autotune", "compile-freezing": None}
#: variants that only make sense for inference graphs
EVAL_ONLY = ("compile-freezing",)
#: resfuse backends benchmarked on each device type (``reference`` is the plain-PyTorch oracle: excluded)
RESFUSE_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}
MODES = ("eval", "train")


# -- settings ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchSettings:
    """What this session runs; ``config.resfuse_bench`` (bench modules read it in ``pytest_generate_tests``)."""

    device: torch.device
    full: bool          # full (GPU) sizes
    quick: bool         # smoke run: no compile, minimal warm-up
    compile: bool       # compile variants selected
    variants: tuple     # the variants to parametrize, in order
    warmup: int         # untimed calls after the first one
    max_rounds: int
    min_rounds: int
    max_time: float
    amp_dtype: torch.dtype | None  # autocast dtype (bf16 on CUDA), None for float32
    clock: str = "wall"  # CPU rounds: "wall" (time.perf_counter) or "process" (time.process_time)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def cases(self, table: dict, cpu_names, smoke: str) -> list:
        """``pytest.param`` per case of ``table`` (name -> case; only ``cpu_names`` unless full sizes), with
        the case's name as id and the ``smoke`` mark on the case named ``smoke``."""
        names = list(table) if self.full else cpu_names
        return [pytest.param(table[n], id=n, marks=[pytest.mark.smoke] if n == smoke else []) for n in names]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _resfuse_variants(device: torch.device) -> list:
    """``resfuse-<name>`` for each backend usable on ``device`` (constructible and supporting a tensor there)."""
    out = []
    from resfuse import backends
    probe = torch.empty(1, 8, 4, 4, device=device)
    for name in RESFUSE_BACKENDS.get(device.type, ()):
        b, _ = backends.instance(name)
        if b is not None and b.supports(probe) is None:
            out.append(f"resfuse-{name}")
    return out


def _make_settings(config) -> BenchSettings:
    dev_name = os.environ.get("RESFUSE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev_name)
    is_cuda = device.type == "cuda"
    markexpr = getattr(config.option, "markexpr", "") or ""
    quick = "smoke" in markexpr and "not smoke" not in markexpr or _env_flag("RESFUSE_BENCH_QUICK")
    no_compile = quick or config.getoption("no_compile") or _env_flag("RESFUSE_BENCH_NO_COMPILE")
    full = bool(config.getoption("gpu_full") or _env_flag("RESFUSE_BENCH_FULL"))
    variants = ["eager", "eager_cl"]
    if not no_compile:
        variants += ["compile"] + (["compile-max-autotune"] if is_cuda else []) + ["compile-freezing"]
    variants += _resfuse_variants(device)
    only = config.getoption("bench_variants") or os.environ.get("RESFUSE_BENCH_VARIANTS")
    if only:
        wanted = [v.strip() for v in only.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in VARIANTS]
        if unknown:
            raise pytest.UsageError(f"unknown benchmark variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
        variants = [v for v in variants if v in wanted]
    warmup = config.getoption("bench_warmup")
    if warmup is None:
        warmup = 1 if quick else (10 if is_cuda else 2)
    max_rounds = config.getoption("bench_max_rounds") or (200 if is_cuda else 100)
    threads = config.getoption("bench_threads")
    if threads:
        torch.set_num_threads(threads)
    return BenchSettings(
        device=device, full=full, quick=quick, compile=not no_compile, variants=tuple(variants), warmup=warmup,
        max_rounds=max_rounds, min_rounds=int(config.getoption("benchmark_min_rounds")),
        max_time=float(config.getoption("benchmark_max_time")),  # its default is the string '1.0'
        amp_dtype=_amp_dtype(is_cuda), clock=config.getoption("bench_clock"))


def _amp_dtype(is_cuda: bool) -> torch.dtype | None:
    amp = os.environ.get("RESFUSE_BENCH_AMP", "").strip().lower()
    if amp in ("", "default"):
        return torch.bfloat16 if is_cuda else None
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "none": None, "fp32": None, "float32": None}
    if amp not in table:
        raise pytest.UsageError(f"RESFUSE_BENCH_AMP={amp!r}: use bf16, fp16 or none")
    return table[amp]


def pytest_addoption(parser):
    g = parser.getgroup("resfuse benchmarks")
    g.addoption("--gpu-full", action="store_true", default=False,
                help="full sizes: batch 256 at 224x224, bf16 channels_last (also RESFUSE_BENCH_FULL=1)")
    g.addoption("--no-compile", action="store_true", default=False,
                help="deselect the torch.compile variants (also RESFUSE_BENCH_NO_COMPILE=1; implied by -m smoke)")
    g.addoption("--bench-variants", default=None, metavar="A,B",
                help=f"only these variants (also RESFUSE_BENCH_VARIANTS); any of {', '.join(VARIANTS)}")
    g.addoption("--bench-warmup", type=int, default=None, metavar="N",
                help="untimed calls after the first one (default 2 on CPU, 10 on CUDA, 1 with -m smoke)")
    g.addoption("--bench-max-rounds", type=int, default=None, metavar="N",
                help="cap on timed rounds per benchmark (default 100 on CPU, 200 on CUDA)")
    g.addoption("--bench-threads", type=int, default=None, metavar="N", help="torch.set_num_threads(N) for the session")
    g.addoption("--bench-clock", choices=("wall", "process"), default="wall",
                help="CPU round timer: wall (time.perf_counter, default) or process (time.process_time: the "
                     "process's CPU time, robust to other jobs' load; use with --bench-threads 1, since "
                     "OpenMP threads spin while waiting and that counts as CPU time)")


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: the benchmark subset CI runs at small sizes")
    config.resfuse_bench = None
    if _targets_benchmarks(config):
        _import_resfuse()
        config.resfuse_bench = _make_settings(config)


def _targets_benchmarks(config) -> bool:
    """Whether a command-line path is this folder or inside it (a bare ``pytest`` at the root is not)."""
    base = Path(config.invocation_params.dir)
    for a in config.args:
        p = (base / str(a).split("::")[0]).resolve()
        if p == HERE or HERE in p.parents:
            return True
    return False


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` (pytest's default ``python_files`` is ``test_*.py``) when this folder is named on
    the command line, so that ``pytest benchmarks`` finds every benchmark while a bare ``pytest`` at the
    repository root still runs only the tests. A file named on the command line is collected by pytest itself."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_") and HERE in file_path.parents
            and not parent.session.isinitpath(file_path) and _targets_benchmarks(parent.config)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    """Parametrize ``variant`` with this session's variants, unless the test parametrizes it itself."""
    if "variant" not in metafunc.fixturenames:
        return
    for m in metafunc.definition.iter_markers("parametrize"):
        names = m.args[0] if m.args else m.kwargs.get("argnames", "")
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if "variant" in names:
            return
    metafunc.parametrize("variant", metafunc.config.resfuse_bench.variants)


def pytest_collection_modifyitems(config, items):
    """Deselect eval-only variants in train mode, and compile variants when compile is off."""
    s = config.resfuse_bench
    if s is None:
        return
    keep, drop = [], []
    for item in items:
        if HERE not in Path(item.path).parents:
            keep.append(item)
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        v, mode = params.get("variant"), params.get("mode")
        if v in VARIANTS and ((v in EVAL_ONLY and mode == "train") or (v.startswith("compile") and not s.compile)):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    s = config.resfuse_bench
    if s is None:
        return None
    return (f"resfuse benchmarks: device {s.device} ({_device_name(s.device)}), "
            f"{'full' if s.full else 'small'} sizes, {'quick (smoke)' if s.quick else 'normal'} mode, "
            f"variants {', '.join(s.variants)}; threads {torch.get_num_threads()}, clock {s.clock}, "
            f"load {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


# -- environment stamp -----------------------------------------------------------------------------------------
def _run(*cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT, check=False).stdout.strip()
    except Exception:  # noqa: BLE001 - a missing tool just leaves the field empty
        return ""


def _cpu_model() -> str:
    """``lscpu``'s model name, with family/model when the name is generic (e.g. "AMD EPYC (family 25, model 17)")."""
    f = {}
    for line in _run("lscpu").splitlines():
        k, _, v = line.partition(":")
        f.setdefault(k.strip(), v.strip())
    name = f.get("Model name") or platform.processor() or "unknown"
    if "CPU family" in f and "Model" in f:
        name += f" (family {f['CPU family']}, model {f['Model']})"
    return name


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB"
    return f"{_cpu_model()}, {os.cpu_count()} cores"


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "not installed"


def _stamp() -> dict:
    resfuse = _import_resfuse()
    commit = os.environ.get("GIT_COMMIT") or _run("git", "rev-parse", "--short", "HEAD") or "unknown"
    dirty = _run("git", "status", "--porcelain", "--untracked-files=no")
    s = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (py3.10)
        "git_commit": commit, "git_dirty": bool(dirty),
        "host": platform.node(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "triton": _triton_version(), "resfuse": resfuse.__version__,
        "resfuse_availability": {k: v or "available" for k, v in resfuse.availability().items()},
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        s["cuda"] = torch.version.cuda
        s["cudnn"] = torch.backends.cudnn.version()
        s["gpu"] = _device_name(torch.device("cuda"))
        s["driver"] = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return s


_STAMP: dict = {}


@pytest.fixture(scope="session")
def bench_env() -> dict:
    """Versions, machine, commit and date of this session (also written to the JSON as ``resfuse_env``)."""
    if not _STAMP:
        _STAMP.update(_stamp())
    return _STAMP


def pytest_benchmark_update_machine_info(config, machine_info):
    if config.resfuse_bench is None:
        return
    machine_info["cpu_model"] = _cpu_model()
    machine_info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    machine_info["torch_threads"] = torch.get_num_threads()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    if config.resfuse_bench is None:
        return
    env = dict(_STAMP or _stamp())
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    s = config.resfuse_bench
    env["settings"] = {"device": str(s.device), "full": s.full, "quick": s.quick, "variants": list(s.variants),
                       "warmup": s.warmup, "min_rounds": s.min_rounds, "max_rounds": s.max_rounds,
                       "max_time": s.max_time, "amp_dtype": str(s.amp_dtype) if s.amp_dtype else None,
                       "clock": "cuda_events" if s.is_cuda else s.clock, "threads": torch.get_num_threads()}
    output_json["resfuse_env"] = env


# -- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def bench_settings(request) -> BenchSettings:
    return request.config.resfuse_bench


@pytest.fixture(scope="session")
def bench_device(bench_settings) -> torch.device:
    return bench_settings.device


@pytest.fixture(scope="session")
def bench_full(bench_settings) -> bool:
    return bench_settings.full


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture(scope="session")
def device_rates(bench_settings) -> dict | None:
    """On CUDA: the bf16 GEMM rate (FLOP/s, 8192³ matmul) and device copy bandwidth (B/s, 1 GiB read + 1 GiB
    written), measured once per session on this device; ``None`` on CPU."""
    if not bench_settings.is_cuda:
        return None
    _import_resfuse()
    from resfuse.testing import median_seconds

    dev = bench_settings.device
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t_mm = median_seconds(functools.partial(torch.mm, a, b), 20, dev, warmup=3)
    del a, b
    x = torch.empty(2**29, device=dev, dtype=torch.bfloat16).normal_()  # 1 GiB
    y = torch.empty_like(x)
    t_cp = median_seconds(functools.partial(y.copy_, x), 20, dev, warmup=3)
    rates = {"gemm_flops": 2 * n**3 / t_mm, "copy_bytes_per_s": 2 * x.numel() * x.element_size() / t_cp}
    del x, y
    torch.cuda.empty_cache()
    return rates


# -- helpers of the runner ---------------------------------------------------------------------------------------
def _percentile(xs, q):
    """Linear-interpolated percentile ``q`` (0-100) of ``xs``."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _dynamo_counts():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _cpu_peak_bytes(step) -> int | None:
    """Peak of the running sum of CPU-allocator events (bytes) during ``step()``, from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    try:
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # private API moved: fall back to the public (less complete) event list
        events = [(e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.name == "[memory]"]
    cur = peak = 0
    for _, nbytes in sorted(events, key=lambda t: t[0]):
        cur += nbytes
        peak = max(peak, cur)
    return peak


def _build(build):
    """``build()`` under a fixed seed, with every BatchNorm given non-trivial affine parameters and running
    statistics (a fresh BN is the identity in eval mode, which would make BN folding free)."""
    _import_resfuse()
    from resfuse.testing import randomize_bn

    torch.manual_seed(0)
    return randomize_bn(build(), seed=3)


@dataclass
class _RefResult:
    key: tuple
    out: torch.Tensor
    flops: int
    conv_bytes: int


_REF_CACHE: dict = {}


def _reference(key, build, inputs_fn, train, settings, loss_grad) -> _RefResult:
    """The eager reference's output (first forward), FLOPs and ideal conv traffic; cached for the last case."""
    hit = _REF_CACHE.get("last")
    if hit is not None and hit.key == key:
        return hit
    _REF_CACHE.clear()
    from torch.utils.flop_counter import FlopCounterMode
    dev = settings.device
    model = _build(build).to(dev).train(train)
    args, target = _prepare_inputs(inputs_fn, dev, torch.contiguous_format, train)
    conv_bytes = [0]
    itemsize = torch.finfo(settings.amp_dtype).bits // 8 if settings.amp_dtype else None

    def hook(mod, inp, out):
        es = itemsize or out.element_size()
        conv_bytes[0] += (inp[0].numel() + mod.weight.numel() + out.numel()) * es

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    counter = FlopCounterMode(display=False)
    with counter, _autocast(settings):
        if train:
            out = model(*args)
            _backward(out, target, loss_grad)
        else:
            with torch.no_grad():
                out = model(*args)
    for h in handles:
        h.remove()
    res = _RefResult(key, out.detach(), counter.get_total_flops(), conv_bytes[0] * (3 if train else 1))
    _REF_CACHE["last"] = res
    return res


def _autocast(settings):
    if settings.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(settings.device.type, dtype=settings.amp_dtype)


def _prepare_inputs(inputs_fn, device, memory_format, train):
    """``inputs_fn()`` -> dict with ``x`` (and optional ``residual``, ``target``), built on the CPU with a fixed
    seed (identical for every variant), moved to ``device`` in ``memory_format``; activations get
    ``requires_grad`` in train mode unless the dict says ``input_grad=False`` (an image)."""
    torch.manual_seed(1)
    d = inputs_fn()
    grad_x = train and d.get("input_grad", True)
    args = []
    for name in ("x", "residual"):
        t = d.get(name)
        if t is None:
            continue
        t = t.to(device).contiguous(memory_format=memory_format)
        if train and (name == "residual" or grad_x):
            t.requires_grad_(True)
        args.append(t)
    target = d.get("target")
    return args, (target.to(device) if target is not None else None)


def _backward(out, target, loss_grad):
    """Cross-entropy against ``target`` if given, else ``out.backward(g)`` with a fixed random ``g``."""
    if target is not None:
        F.cross_entropy(out.float(), target).backward()
        return
    if loss_grad[0] is None or loss_grad[0].shape != out.shape or loss_grad[0].dtype != out.dtype:
        gen = torch.Generator(device=out.device).manual_seed(2)  # drawn on the device: fast at GPU sizes
        g = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        loss_grad[0] = torch.empty_like(out).copy_(g)  # same values in out's memory format
    out.backward(loss_grad[0])


def _memory_format_of(variant):
    return torch.contiguous_format if variant == "eager" else torch.channels_last


# -- the runner ----------------------------------------------------------------------------------------------
@pytest.fixture
def bench_run(bench_settings, bench_env, device_rates):
    """``run(benchmark, variant, *, suite, case, mode, batch, build, fuse, inputs, info=None)``.

    * ``build()``: a fresh eager reference ``nn.Module`` (on the CPU; seeded by the runner);
    * ``fuse(ref)``: the resfuse module computing the same function with ``ref``'s parameters;
    * ``inputs()``: ``{"x": tensor, "residual": tensor | absent, "target": labels | absent,
      "input_grad": bool (default True)}``; with ``target`` the train step's loss is cross-entropy, else
      ``out.backward(g)`` with a fixed random ``g``;
    * ``mode``: ``"eval"`` (no_grad forward, BN running stats) or ``"train"`` (forward + backward with
      batch statistics; gradients reset each step, no optimizer step).

    Every variant gets ``build()``'s module under the same seed, with its BatchNorms given the same random
    affine parameters and running statistics (so eval-mode BN folding is not free), and the same inputs.
    Sets ``benchmark.group = f"{suite}/{case}/{mode}"`` and fills ``benchmark.extra_info``.
    """
    s = bench_settings
    resfuse = _import_resfuse()
    from resfuse import backends

    def run(benchmark, variant, *, suite: str, case: str, mode: str, batch: int, build: Callable,
            fuse: Callable, inputs: Callable, info: dict | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        train = mode == "train"
        dev = s.device
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every variant picks its fastest cuDNN algorithms
        benchmark.group = f"{suite}/{case}/{mode}"
        ref = _reference((suite, case, mode), build, inputs, train, s, [None])
        loss_grad = [None]

        model = _build(build)  # the same weights as the reference
        fmt = _memory_format_of(variant)
        with contextlib.ExitStack() as stack:
            if variant.startswith("resfuse-"):
                backend = variant.split("-", 1)[1]
                model = fuse(model)
                prev = backends.get_backend_name()
                # process-wide (not the thread-local use_backend): CUDA's autograd runs backward on its own thread
                resfuse.set_backend(backend)
                stack.callback(resfuse.set_backend, prev)
            model = model.to(dev).train(train)
            if fmt is torch.channels_last:
                model = model.to(memory_format=torch.channels_last)
            run_model = model
            if variant in COMPILE_MODES:
                torch._dynamo.reset()
                if variant == "compile-freezing":
                    import torch._inductor.config as inductor_config
                    # a config patch for the whole benchmark: options={"freezing": True} is not honoured
                    # (torch 2.13: the graph compiles unfrozen), the global config is
                    stack.enter_context(inductor_config.patch(freezing=True))
                run_model = torch.compile(model, mode=COMPILE_MODES[variant])
            args, target = _prepare_inputs(inputs, dev, fmt, train)
            leaves = [a for a in args if a.requires_grad] + [p for p in model.parameters() if p.requires_grad]

            def zero_grads():
                for t in leaves:
                    t.grad = None

            if train:
                def step():
                    zero_grads()
                    with _autocast(s):
                        out = run_model(*args)
                    _backward(out, target, loss_grad)
                    return out
            else:
                def step():
                    with torch.no_grad(), _autocast(s):
                        return run_model(*args)

            graphs0, breaks0 = _dynamo_counts()
            t0 = time.perf_counter()
            out = step()
            _sync(dev)
            first_call_s = time.perf_counter() - t0
            rel_err = _rel_err(out, ref.out)
            del out
            t_est = first_call_s
            for _ in range(s.warmup):
                t0 = time.perf_counter()
                step()
                _sync(dev)
                t_est = time.perf_counter() - t0
            graphs1, breaks1 = _dynamo_counts()
            rounds = max(s.min_rounds, min(s.max_rounds, math.ceil(s.max_time / max(t_est, 1e-6))))

            times = []
            if dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

                def timed():
                    start.record()
                    step()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1e3)
            else:
                clock = time.process_time if s.clock == "process" else time.perf_counter

                def timed():
                    t0 = clock()
                    step()
                    times.append(clock() - t0)

            load0 = os.getloadavg()[0]
            benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
            load1 = os.getloadavg()[0]
            graphs2, _ = _dynamo_counts()
            used = resfuse.last_used().get("conv_bn_chain") if variant.startswith("resfuse-") else None

            # peak memory of one more step
            zero_grads()
            _sync(dev)
            if dev.type == "cuda":
                base = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                step()
                torch.cuda.synchronize(dev)
                peak_abs = torch.cuda.max_memory_allocated(dev)
                peak, mem_method = peak_abs - base, "torch.cuda.max_memory_allocated - memory_allocated"
            else:
                peak_abs = None
                peak, mem_method = _cpu_peak_bytes(step), "torch.profiler CPU allocator events (peak of running sum)"

        med = statistics.median(times)
        e = benchmark.extra_info
        e.update(info or {})
        e.update(
            suite=suite, case=case, mode=mode, variant=variant, batch=batch,
            input_shape=list(args[0].shape), memory_format="channels_last" if fmt is torch.channels_last else "nchw",
            dtype=str(s.amp_dtype).replace("torch.", "") + " autocast" if s.amp_dtype else "float32",
            device=str(dev), device_name=_device_name(dev), threads=torch.get_num_threads(),
            torch=torch.__version__, triton=bench_env["triton"], git_commit=bench_env["git_commit"],
            timer="cuda_events" if dev.type == "cuda" else "process_time" if s.clock == "process" else "perf_counter",
            rounds=len(times), warmup=1 + s.warmup,
            times_ms=[round(t * 1e3, 4) for t in times], median_ms=med * 1e3, p20_ms=_percentile(times, 20) * 1e3, p80_ms=_percentile(times, 80) * 1e3,
            images_per_s=batch / med, first_call_s=first_call_s,
            peak_mib=peak / 2**20 if peak is not None else None, peak_method=mem_method,
            flops=ref.flops, achieved_tflops=ref.flops / med / 1e12 if ref.flops else None,
            rel_err_vs_eager=rel_err, loadavg=[round(load0, 2), round(load1, 2)],
        )
        if peak_abs is not None:
            e["peak_abs_mib"] = peak_abs / 2**20
        if used is not None:
            e["resfuse_backend"] = used
        if variant in COMPILE_MODES:
            e.update(compile_mode=COMPILE_MODES[variant] or "default", freezing=variant == "compile-freezing",
                     graphs=graphs1 - graphs0, graph_breaks=breaks1 - breaks0, recompiles_timed=graphs2 - graphs1)
        if device_rates:
            floor_s = max(ref.flops / device_rates["gemm_flops"], ref.conv_bytes / device_rates["copy_bytes_per_s"])
            e.update(gemm_tflops=device_rates["gemm_flops"] / 1e12, copy_gbps=device_rates["copy_bytes_per_s"] / 1e9,
                     floor_bytes=ref.conv_bytes, floor_ms=floor_s * 1e3, pct_of_floor=100 * floor_s / med)
        tol = 5e-2 if s.amp_dtype else 1e-3
        if not rel_err <= tol:
            warnings.warn(f"{benchmark.group} {variant}: output differs from eager by {rel_err:.2e} (> {tol:g})")
        if used is not None and used != variant.split("-", 1)[1]:
            warnings.warn(f"{benchmark.group} {variant}: resfuse ran backend {used!r}")

    return run
