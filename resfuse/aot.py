"""Ahead-of-time static report of every GPU kernel of resfuse, without a GPU.

    python -m resfuse.aot [--arch 80,90] [--kernels PATTERN] [--json FILE] [--markdown FILE] [--jobs N]

* Triton: every kernel of ``resfuse.triton.registry`` in every variant its launcher can pick (fusion
  flags x dtype fp32/tf32/bf16/fp16 x registry config) is compiled with
  ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; registers and spills come from
  Triton's own ptxas run (``TRITON_DUMP_PTXAS_LOG``), shared memory from the metadata (dynamic) and
  the ptxas log (static).
* CUDA: every ``csrc/cuda/*.cu`` is compiled by ``nvcc -cubin -Xptxas -v`` for sm_80 and sm_90a; one row
  per ``__global__`` entry (threads per block from ``__launch_bounds__`` when given; dynamic shared
  memory is decided at launch and is not known here).

It prints ONE table: kernel, variant, arch, registers/thread, spill bytes (stores/loads), shared memory
static+dynamic, threads per block, theoretical occupancy on that arch (own calculator, below), the
tensor-core instruction of the main loop (``wgmma`` / ``mma.sync`` / none) and the async copy engine
(``TMA`` = ``cp.async.bulk.tensor``, ``cp.async``), from the PTX.

Exit status 1 (after printing the table) on any compile failure (naming kernel and variant), any
register spill in a kernel marked hot, or shared memory above the arch's per-block limit; 2 on a usage
error (unknown arch, a pattern that matches nothing: the message lists what exists).

Compiles run in parallel processes and are cached by source hash in ``~/.cache/resfuse-aot``
(``RESFUSE_AOT_CACHE`` overrides; ``--no-cache`` ignores it).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime
import fnmatch
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

if not __package__ and __name__ in ("__main__", "__mp_main__"):
    # Run as a script (``python resfuse/aot.py``, e.g. in a scratch venv with another triton and no torch):
    # the script's folder holds ``triton/``, which must not shadow the real ``triton`` package.
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))

ROOT = Path(__file__).resolve().parent.parent
if not __package__ and __name__ in ("__main__", "__mp_main__") and "resfuse" not in sys.modules:
    # script mode: import resfuse.triton.{registry,*_kernels} without resfuse/__init__ (no torch needed),
    # also in the spawned workers (which unpickle registry objects before running any code of ours)
    for _name, _path in (("resfuse", ROOT / "resfuse"), ("resfuse.triton", ROOT / "resfuse" / "triton")):
        _pkg = types.ModuleType(_name)
        _pkg.__path__ = [str(_path)]
        sys.modules[_name] = _pkg
# the checkout's csrc/cuda; an installed resfuse (site-packages) has none: then ./csrc/cuda, if any
CUDA_DIR = Path(os.environ.get("RESFUSE_CUDA_DIR") or (
    ROOT / "csrc" / "cuda" if (ROOT / "csrc" / "cuda").is_dir() else Path.cwd() / "csrc" / "cuda"))
CACHE_VERSION = 3

# ------------------------------------------------------------------------------------------------
# Occupancy calculator (CUDA occupancy rules; limits from the CUDA C Programming Guide's table of
# technical specifications per compute capability and the Ampere/Hopper tuning guides).
# ------------------------------------------------------------------------------------------------
ARCH_LIMITS = {
    80: dict(name="sm_80", max_warps_sm=64, max_blocks_sm=32, regs_sm=65536, max_regs_thread=255,
             max_regs_block=65536, reg_unit=256, smem_sm=164 * 1024, smem_block=163 * 1024,
             smem_reserved=1024, smem_unit=128, max_threads_block=1024),
    90: dict(name="sm_90a", max_warps_sm=64, max_blocks_sm=32, regs_sm=65536, max_regs_thread=255,
             max_regs_block=65536, reg_unit=256, smem_sm=228 * 1024, smem_block=227 * 1024,
             smem_reserved=1024, smem_unit=128, max_threads_block=1024),
}


def _ceil_to(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(arch: int, regs: int, smem: int, threads: int) -> dict:
    """Theoretical occupancy ``{blocks, warps, occupancy, limiter}`` of one SM.

    ``regs`` per thread, ``smem`` = static + dynamic bytes per block, ``threads`` per block. Registers are
    allocated per warp in units of 256 and the register file is split over 4 sub-partitions; shared
    memory per block is rounded to 128 bytes plus 1 KB reserved by the system; the driver is assumed to
    pick the largest shared-memory carve-out (what it does for kernels that need it).
    """
    L = ARCH_LIMITS[arch]
    warps = max(1, -(-threads // 32))
    if threads > L["max_threads_block"]:
        return dict(blocks=0, warps=0, occupancy=0.0, limiter="threads/block")
    lim = {"warps": L["max_warps_sm"] // warps, "blocks": L["max_blocks_sm"]}
    if regs > 0:
        per_warp = _ceil_to(regs * 32, L["reg_unit"])
        if regs > L["max_regs_thread"] or per_warp * warps > L["max_regs_block"]:
            return dict(blocks=0, warps=0, occupancy=0.0, limiter="registers")
        warps_by_regs = (L["regs_sm"] // 4 // per_warp) * 4
        lim["registers"] = warps_by_regs // warps
    if smem > L["smem_block"]:
        return dict(blocks=0, warps=0, occupancy=0.0, limiter="shared memory")
    lim["shared memory"] = L["smem_sm"] // _ceil_to(smem + L["smem_reserved"], L["smem_unit"])
    limiter = min(lim, key=lambda k: (lim[k], k != "warps"))
    blocks = lim[limiter]
    return dict(blocks=blocks, warps=blocks * warps, occupancy=blocks * warps / L["max_warps_sm"], limiter=limiter)


# ------------------------------------------------------------------------------------------------
# ptxas / PTX parsing
# ------------------------------------------------------------------------------------------------
_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_RE_PROPS = re.compile(r"Function properties for (\S+)")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict]:
    """``{entry: {regs, smem_static, stack, spill_stores, spill_loads}}`` from a ``ptxas -v`` log."""
    out: dict[str, dict] = {}
    entries = set()
    current = None
    for line in log.splitlines():
        m = _RE_ENTRY.search(line)
        if m:
            current = m.group(1)
            entries.add(current)
            out.setdefault(current, dict(regs=0, smem_static=0, stack=0, spill_stores=0, spill_loads=0))
            continue
        m = _RE_PROPS.search(line)
        if m:
            current = m.group(1)
            continue
        m = _RE_SPILL.search(line)
        if m and current in out:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = _RE_USED.search(line)
        if m and current in out:
            out[current]["regs"] = int(m.group(1))
            out[current]["smem_static"] = int(m.group(2) or 0)
    return {k: v for k, v in out.items() if k in entries}


def ptx_features(ptx: str) -> dict:
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if re.search(r"\bmma\.sync", ptx) else "none")
    if "cp.async.bulk.tensor" in ptx:
        copy = "TMA"
    elif "cp.async" in ptx:
        copy = "cp.async"
    else:
        copy = "none"
    return dict(mma=mma, copy=copy)


def split_ptx_entries(ptx: str) -> dict[str, str]:
    """``{entry name: its PTX text}`` (the text from its ``.entry`` to the next one)."""
    parts = re.split(r"(?=^\s*\.(?:visible\s+)?\.?entry\s)", ptx, flags=re.MULTILINE)
    out = {}
    for p in parts:
        m = re.match(r"\s*\.(?:visible\s+)?\.?entry\s+(\S+?)\s*\(", p)
        if m:
            out[m.group(1)] = p
    return out


# ------------------------------------------------------------------------------------------------
# Triton units
# ------------------------------------------------------------------------------------------------
def _bare_package():
    """Import ``resfuse.triton.*`` without running ``resfuse/__init__`` (no C++ extension load in the
    workers); harmless when resfuse is already imported."""
    if "resfuse" not in sys.modules:
        for name, path in (("resfuse", ROOT / "resfuse"), ("resfuse.triton", ROOT / "resfuse" / "triton")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg


def _load_file_module(path: str):
    import importlib.util
    name = "resfuse_aot_extra_" + hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:10]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_specs(extra: Sequence[str] = ()) -> dict[str, object]:
    _bare_package()
    from resfuse.triton import registry
    specs = dict(registry.KERNELS)
    for path in extra:
        mod = _load_file_module(path)
        for s in getattr(mod, "KERNELS", []):
            specs[s.name] = s
    return specs


def _kernel_fn(spec):
    if spec.module.endswith(".py"):
        lazy = getattr(_load_file_module(spec.module), spec.attr)
    else:
        lazy = spec.kernel()
    return lazy.jit()


def _spec_source_hash(spec) -> str:
    if spec.module.endswith(".py"):
        path = Path(spec.module)
    else:
        import importlib
        path = Path(importlib.import_module(spec.module).__file__)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_source(spec, unit):
    """``(ASTSource, options)`` for one unit: signature, constexprs and divisibility hints."""
    import inspect

    import triton
    from triton.compiler import ASTSource

    jit = _kernel_fn(spec)
    params = list(inspect.signature(jit.fn).parameters.values())
    variant = dict(unit.variant)
    const = dict(variant)
    const.update(unit.config.kwargs())
    const.update(spec.constexpr_of_dtype(unit.dtype))
    ptrs = spec.pointer_types(unit.dtype)
    div16 = set(spec.div16(variant))
    sig, attrs = {}, {}
    for i, p in enumerate(params):
        ann = p.annotation
        is_const = ann is triton.language.constexpr or (isinstance(ann, str) and "constexpr" in ann)
        if is_const:
            if p.name not in const:
                raise KeyError(f"constexpr {p.name!r} of {spec.name} is set by neither the variant nor the config")
            sig[p.name] = "constexpr"
        elif p.name in ptrs:
            sig[p.name] = "*" + ptrs[p.name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name in spec.floats:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
            if p.name in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    extra = set(const) - {p.name for p in params}
    if extra:
        raise KeyError(f"{spec.name} has no parameter(s) {sorted(extra)}")
    const = {k: v for k, v in const.items() if sig.get(k) == "constexpr"}
    src = ASTSource(fn=jit, signature=sig, constexprs=const, attrs=attrs)
    return src, dict(num_warps=unit.config.num_warps, num_stages=unit.config.num_stages)


def _triton_worker(args):
    """Compile one Triton unit in a worker process; returns a result row (never raises)."""
    unit, extra, spec_hot = args
    row = _row_base(unit.kernel, unit.variant_name, unit.arch, spec_hot)
    try:
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ["TRITON_ALWAYS_COMPILE"] = "1"
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        import warnings
        warnings.filterwarnings("ignore")
        import triton
        from triton.backends.compiler import GPUTarget
        specs = load_specs(extra)
        spec = specs[unit.kernel]
        src, opts = build_source(spec, unit)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=GPUTarget("cuda", unit.arch, 32), options=opts)
        ptx = k.asm["ptx"]
        info = parse_ptxas(buf.getvalue())
        name = k.metadata.name
        res = info.get(name) or (next(iter(info.values())) if info else None)
        if res is None:  # no log (a Triton without TRITON_DUMP_PTXAS_LOG): read the cubin instead
            res = _cuobjdump_usage(k.asm["cubin"])
        threads = opts["num_warps"] * 32 * getattr(k.metadata, "num_ctas", 1)
        row.update(regs=res["regs"], spill_stores=res["spill_stores"], spill_loads=res["spill_loads"],
                   smem_static=res["smem_static"], smem_dynamic=int(k.metadata.shared), threads=threads,
                   **ptx_features(ptx))
        _finish_row(row)
    except Exception as e:  # reported as a failed row naming kernel + variant
        msg = str(e).strip().splitlines()
        row.update(status="FAIL", error=f"{type(e).__name__}: {' | '.join(msg[:3])[:400]}")
    return row


def _cuobjdump_usage(cubin: bytes) -> dict:
    tool = _triton_tool("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    regs, stack, shared, local = (int(g) for g in m.groups())
    return dict(regs=regs, stack=stack, smem_static=shared, spill_stores=local, spill_loads=local)


def _triton_tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _row_base(kernel, variant, arch, hot):
    return dict(kernel=kernel, variant=variant, arch=arch, hot=bool(hot), regs=None, spill_stores=None,
                spill_loads=None, smem_static=None, smem_dynamic=None, threads=None, occupancy=None,
                blocks_per_sm=None, limiter=None, mma=None, copy=None, status="ok", error=None, problems=[])


def _finish_row(row):
    arch = row["arch"]
    smem = (row["smem_static"] or 0) + (row["smem_dynamic"] or 0)
    problems = []
    if row["hot"] and ((row["spill_stores"] or 0) > 0 or (row["spill_loads"] or 0) > 0):
        problems.append(f"register spill in a hot kernel ({row['spill_stores']} B stores, "
                        f"{row['spill_loads']} B loads)")
    if smem > ARCH_LIMITS[arch]["smem_block"]:
        problems.append(f"shared memory {smem} B > {ARCH_LIMITS[arch]['smem_block']} B per-block limit")
    if row["threads"]:
        occ = occupancy(arch, row["regs"] or 0, smem, row["threads"])
        row.update(occupancy=round(occ["occupancy"], 4), blocks_per_sm=occ["blocks"], limiter=occ["limiter"])
    row["problems"] = problems
    if problems:
        row["status"] = "FAIL"
        row["error"] = "; ".join(problems)
    return row


# ------------------------------------------------------------------------------------------------
# CUDA (.cu) units
# ------------------------------------------------------------------------------------------------
def cuda_files() -> list[Path]:
    return sorted(CUDA_DIR.glob("*.cu")) if CUDA_DIR.is_dir() else []


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return None


def _nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
        return f"{m.group(1)} ({m.group(2)})" if m else out.strip().splitlines()[-1]
    except OSError as e:
        return f"unavailable ({e})"


def _demangle(names: Sequence[str], nvcc: str) -> dict[str, str]:
    tool = None
    for cand in (str(Path(nvcc).parent / "cu++filt"), shutil.which("cu++filt"), shutil.which("c++filt")):
        if cand and Path(cand).exists():
            tool = cand
            break
    if tool is None or not names:
        return {n: n for n in names}
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
        if len(out) == len(names):
            return dict(zip(names, out))
    except OSError:
        pass
    return {n: n for n in names}


_CUDA_ARCH = {80: "sm_80", 90: "sm_90a"}


def _cuda_worker(args):
    """Compile one .cu file for one arch; returns a list of rows (one per __global__ entry)."""
    path, arch, nvcc = args
    path = Path(path)
    unit = f"cuda/{path.stem}"
    text = path.read_text(errors="replace")
    cold = set(re.findall(r"resfuse-aot:\s*cold\s+(\w+)", text))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / (path.stem + ".cubin")
        cmd = [nvcc, "-cubin", f"-arch={_CUDA_ARCH[arch]}", "-Xptxas", "-v", "-std=c++17", "-O3", "-lineinfo",
               "--keep", "--keep-dir", tmp, "-I", str(CUDA_DIR.parent), "-I", str(CUDA_DIR), "-o", str(cubin),
               str(path)] + os.environ.get("RESFUSE_AOT_NVCC_FLAGS", "").split()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            row = _row_base(unit, "(compile)", arch, True)
            err = (r.stderr or r.stdout).strip().splitlines()
            errs = [ln for ln in err if "error" in ln.lower()] or err
            row.update(status="FAIL", error=f"nvcc failed: {' | '.join(errs[:3])[:400]}")
            return [row]
        info = parse_ptxas(r.stderr + r.stdout)
        ptx_text = "\n".join(p.read_text(errors="replace") for p in Path(tmp).glob("*.ptx"))
    entries = split_ptx_entries(ptx_text)
    names = _demangle(sorted(info), nvcc)
    rows = []
    for mangled, res in sorted(info.items()):
        pretty = names.get(mangled, mangled)
        clean = re.sub(r"^void\s+", "", pretty.replace("(anonymous namespace)::", ""))
        clean = re.sub(r"\b(?:resfuse::cuda::|resfuse::)", "", clean)
        m = re.match(r"[\w:~]+", clean)
        short = (m.group(0) if m else clean).split("::")[-1]
        hot = short not in cold
        row = _row_base(f"{path.stem}::{short}", clean, arch, hot)
        body = entries.get(mangled, "")
        m = re.search(r"\.(?:maxntid|reqntid)\s+(\d+)(?:,\s*(\d+))?(?:,\s*(\d+))?", body)
        threads = None
        if m:
            threads = 1
            for g in m.groups():
                threads *= int(g or 1)
        row.update(regs=res["regs"], spill_stores=res["spill_stores"], spill_loads=res["spill_loads"],
                   smem_static=res["smem_static"], smem_dynamic=None, threads=threads, **ptx_features(body))
        _finish_row(row)
        if threads is None:
            row["limiter"] = "block size set at launch (no __launch_bounds__)"
        rows.append(row)
    if not rows:
        row = _row_base(unit, "(no __global__ kernels)", arch, False)
        rows.append(row)
    return rows


def _cuda_source_hash(path: Path) -> str:
    h = hashlib.sha256(path.read_bytes())
    for d in (CUDA_DIR.parent / "common", CUDA_DIR):
        if d.is_dir():
            for f in sorted(d.iterdir()):
                if f.suffix in (".h", ".cuh", ".hpp", ".inl"):
                    h.update(f.name.encode())
                    h.update(f.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# cache, table, main
# ------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("RESFUSE_AOT_CACHE", Path.home() / ".cache" / "resfuse-aot"))


def _cache_get(key: str):
    p = cache_dir() / f"{key}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _cache_put(key: str, value) -> None:
    try:
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(value))
        tmp.replace(d / f"{key}.json")
    except OSError:
        pass


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()


def _triton_version() -> str:
    import triton
    return triton.__version__


def _ptxas_version(arch: int) -> str:
    try:
        from triton.backends.nvidia import compiler as nv
        return nv.get_ptxas_version(arch).strip().splitlines()[-1]
    except Exception as e:  # noqa: BLE001
        return f"unknown ({e})"


def _git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                                   text=True).stdout.strip()
            return r.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        pass
    return "uncommitted"


def _fmt(row) -> list[str]:
    def b(v):
        return "-" if v is None else str(v)
    spill = "-" if row["spill_stores"] is None else f"{row['spill_stores']}/{row['spill_loads']}"
    if row["smem_static"] is None:
        smem = "-"
    else:
        smem = f"{row['smem_static']}+{'?' if row['smem_dynamic'] is None else row['smem_dynamic']}"
    occ = "-" if row["occupancy"] is None else f"{100 * row['occupancy']:.1f}% ({row['limiter']})"
    status = "ok" if row["status"] == "ok" else "FAIL: " + (row["error"] or "")
    return [row["kernel"], row["variant"], ARCH_LIMITS[row["arch"]]["name"], b(row["regs"]), spill, smem,
            b(row["threads"]), occ, b(row["mma"]), b(row["copy"]), "hot" if row["hot"] else "", status]


HEADERS = ["kernel", "variant", "arch", "regs", "spill st/ld B", "smem static+dyn B", "threads", "occupancy",
           "mma", "async copy", "hot", "status"]


def render_table(rows, markdown=False) -> str:
    body = [_fmt(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(HEADERS)]
    widths[-1] = len(HEADERS[-1])
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*HEADERS), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in body]
    return "\n".join(lines)


def summarize(rows) -> list[dict]:
    """Per (kernel [dtype], arch): count, register range, spills, max smem, occupancy range, mma/copy."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        dt = r["variant"].split("|")[0]
        name = f"{r['kernel']} [{dt}]" if dt in ("fp32", "tf32", "bf16", "fp16") else r["kernel"]
        groups.setdefault((name, r["arch"]), []).append(r)
    out = []
    for (k, a), rs in groups.items():
        ok = [r for r in rs if r["regs"] is not None]
        occ = [r["occupancy"] for r in ok if r["occupancy"] is not None]
        out.append(dict(
            kernel=k, arch=a, variants=len(rs), failed=sum(r["status"] != "ok" for r in rs),
            regs=(min((r["regs"] for r in ok), default=None), max((r["regs"] for r in ok), default=None)),
            spilling=sum(1 for r in ok if (r["spill_stores"] or 0) + (r["spill_loads"] or 0) > 0),
            max_spill=max(((r["spill_stores"] or 0) for r in ok), default=0),
            smem_max=max(((r["smem_static"] or 0) + (r["smem_dynamic"] or 0) for r in ok), default=None),
            occupancy=(min(occ, default=None), max(occ, default=None)),
            mma=sorted({r["mma"] for r in ok if r["mma"]}), copy=sorted({r["copy"] for r in ok if r["copy"]})))
    return out


def render_summary_md(rows) -> list[str]:
    lines = [("| kernel | arch | variants | failed | regs min-max | variants spilling (max B) | "
              "max smem B | occupancy min-max | mma | async copy |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summarize(rows):
        occ = s["occupancy"]
        occ_s = "-" if occ[0] is None else f"{100 * occ[0]:.1f}%-{100 * occ[1]:.1f}%"
        lines.append(f"| {s['kernel']} | {ARCH_LIMITS[s['arch']]['name']} | {s['variants']} | {s['failed']} | "
                     f"{s['regs'][0]}-{s['regs'][1]} | {s['spilling']} ({s['max_spill']}) | {s['smem_max']} | "
                     f"{occ_s} | {', '.join(s['mma'])} | {', '.join(s['copy'])} |")
    return lines


def render_markdown(rows, meta, arch_label, others=()) -> str:
    """The commit-ready report; ``others``: ``(meta, rows)`` of other runs (e.g. another Triton version)
    whose per-kernel summary is added."""
    intro = ("Generated by `python -m resfuse.aot` (no GPU needed: Triton AOT compile + nvcc/ptxas). "
             "Nothing here is a measured speed. Columns: registers per thread; spill stores/loads in bytes; "
             "shared memory static+dynamic bytes per block (`?` = decided at launch); threads per block; "
             "theoretical occupancy (resident warps / 64) with its limiter; tensor-core instruction and async "
             "copy found in the PTX.")
    lines = [f"# Static kernel report: {arch_label}", "", intro, ""]
    for k, v in meta.items():
        lines.append(f"- {k}: {v}")
    lines += ["", f"## Summary per kernel (triton {meta.get('triton')})", ""] + render_summary_md(rows)
    for m2, r2 in others:
        title = (f"## Summary per kernel with triton {m2.get('triton')} "
                 f"(ptxas {m2.get('ptxas (Triton' + chr(39) + 's)')}, {m2.get('date')})")
        lines += ["", title, ""]
        lines += render_summary_md(r2)
    lines += ["", f"## Every variant (triton {meta.get('triton')})", "", render_table(rows, markdown=True), ""]
    return "\n".join(lines)


def _match(name: str, patterns: Sequence[str]) -> bool:
    for p in patterns:
        if any(ch in p for ch in "*?[") and fnmatch.fnmatchcase(name, p):
            return True
        if not any(ch in p for ch in "*?[") and p in name:
            return True
    return False


class UsageError(Exception):
    pass


def plan(archs: Sequence[int], pattern: str | None, extra: Sequence[str], with_cuda: bool):
    """``(triton units, cuda (path, arch) pairs, hot flags)`` after filtering; raises UsageError."""
    for a in archs:
        if a not in ARCH_LIMITS:
            raise UsageError(f"unknown arch {a}; valid archs: {', '.join(str(k) for k in ARCH_LIMITS)}")
    specs = load_specs(extra)
    from resfuse.triton import registry
    cu = cuda_files() if with_cuda else []
    names = list(specs) + [f"cuda/{p.stem}" for p in cu]
    pats = [p.strip() for p in pattern.split(",")] if pattern else None
    if pats is not None and not any(_match(n, pats) for n in names):
        raise UsageError(f"--kernels {pattern!r} matches no kernel; kernels: {', '.join(names) or '(none)'}")
    chosen = [s for n, s in specs.items() if pats is None or _match(n, pats)]
    units = registry.aot_units(chosen, archs)
    cuda = [(p, a) for p in cu if pats is None or _match(f"cuda/{p.stem}", pats) for a in archs]
    hot = {s.name: s.hot for s in specs.values()}
    return units, cuda, hot


def run(archs, pattern=None, extra=(), jobs=None, use_cache=True, with_cuda=True, log=print):
    """Compile everything planned; returns ``(rows, meta)``."""
    units, cuda, _ = plan(archs, pattern, extra, with_cuda)
    specs = load_specs(extra)
    t0 = time.time()
    tv = _triton_version()
    ptxas = {a: _ptxas_version(a) for a in archs}
    src_hash = {}
    rows: list[dict | None] = [None] * len(units)
    todo = []
    for i, u in enumerate(units):
        spec = specs[u.kernel]
        if spec.name not in src_hash:
            src_hash[spec.name] = _spec_source_hash(spec)
        key = _key("triton", u.kernel, u.variant, u.dtype, asdict(u.config), u.arch, src_hash[spec.name], tv,
                   ptxas[u.arch], u.hot(spec))
        hit = _cache_get(key) if use_cache else None
        if hit is not None:
            rows[i] = hit
        else:
            todo.append((i, key, u))
    nvcc = find_nvcc() if cuda else None
    nvcc_ver = _nvcc_version(nvcc) if nvcc else "not found"
    cuda_rows: list[list[dict]] = [None] * len(cuda)
    cuda_todo = []
    for j, (p, a) in enumerate(cuda):
        if nvcc is None:
            r = _row_base(f"cuda/{p.stem}", "(compile)", a, True)
            r.update(status="FAIL", error="nvcc not found (set NVCC, or pass --no-cuda)")
            cuda_rows[j] = [r]
            continue
        key = _key("cuda", str(p.name), a, _cuda_source_hash(p), nvcc_ver, os.environ.get("RESFUSE_AOT_NVCC_FLAGS", ""),
                   hashlib.sha256(Path(__file__).read_bytes()).hexdigest())  # parsing lives here
        hit = _cache_get(key) if use_cache else None
        if hit is not None:
            cuda_rows[j] = hit
        else:
            cuda_todo.append((j, key, p, a))
    n_work = len(todo) + len(cuda_todo)
    log(f"resfuse.aot: {len(units)} Triton variants, {len(cuda)} CUDA file x arch; "
        f"{len(units) - len(todo) + len(cuda) - len(cuda_todo)} cached, compiling {n_work} "
        f"with {jobs or os.cpu_count()} processes ...")
    if n_work:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=jobs or os.cpu_count(), mp_context=ctx) as pool:
            futs = {}
            for i, key, u in todo:
                futs[pool.submit(_triton_worker, (u, tuple(extra), u.hot(specs[u.kernel])))] = ("t", i, key)
            for j, key, p, a in cuda_todo:
                futs[pool.submit(_cuda_worker, (str(p), a, nvcc))] = ("c", j, key)
            for f in cf.as_completed(futs):
                kind, idx, key = futs[f]
                try:
                    res = f.result()
                except Exception as e:  # a crashed worker process
                    u = units[idx] if kind == "t" else None
                    r = _row_base(u.kernel if u else f"cuda/{cuda[idx][0].stem}",
                                  u.variant_name if u else "(compile)", u.arch if u else cuda[idx][1],
                                  u.hot(specs[u.kernel]) if u else True)
                    r.update(status="FAIL", error=f"worker crashed: {type(e).__name__}: {e}")
                    res = r if kind == "t" else [r]
                ok = (res["status"] != "FAIL" or res.get("problems")) if kind == "t" else \
                    all(r["status"] != "FAIL" or r.get("problems") for r in res)
                if ok and use_cache:  # cache results, not transient failures
                    _cache_put(key, res)
                if kind == "t":
                    rows[idx] = res
                else:
                    cuda_rows[idx] = res
    all_rows = list(rows) + [r for rs in cuda_rows for r in rs]
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git commit": _git_commit(),
        "triton": tv,
        "ptxas (Triton's)": "; ".join(f"sm_{a}: {v}" for a, v in ptxas.items()),
        "nvcc": nvcc_ver if cuda else f"{nvcc_ver if nvcc else 'not needed'} ({len(cuda_files())} .cu files)",
        "archs": ", ".join(ARCH_LIMITS[a]["name"] for a in archs),
        "rows": len(all_rows),
        "wall seconds": round(time.time() - t0, 1),
    }
    return all_rows, meta


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resfuse.aot", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    ap.add_argument("--kernels", default=None,
                    help="comma-separated kernel name substrings or globs (CUDA files are 'cuda/<stem>')")
    ap.add_argument("--json", default=None, help="write the rows (and metadata) as JSON")
    ap.add_argument("--markdown", default=None, help="write a commit-ready Markdown report")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    ap.add_argument("--no-cache", action="store_true", help="ignore and do not write the result cache")
    ap.add_argument("--no-cuda", action="store_true", help="skip csrc/cuda/*.cu")
    ap.add_argument("--extra", action="append", default=[],
                    help="a Python file defining KERNELS = [KernelSpec, ...] to compile too (tests, experiments)")
    ap.add_argument("--quiet", action="store_true", help="print only the summary and failures")
    ap.add_argument("--also-json", action="append", default=[],
                    help="with --markdown: add the per-kernel summary of another run's --json (e.g. another triton)")
    args = ap.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        print(f"resfuse.aot: --arch {args.arch!r}: expected comma-separated integers; valid archs: "
              f"{', '.join(str(k) for k in ARCH_LIMITS)}", file=sys.stderr)
        return 2
    try:
        rows, meta = run(archs, args.kernels, args.extra, args.jobs, not args.no_cache, not args.no_cuda,
                         log=lambda m: print(m, file=sys.stderr))
    except UsageError as e:
        print(f"resfuse.aot: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(render_table(rows))
    for s in summarize(rows):
        occ = s["occupancy"]
        print(f"# {s['kernel']:<40} {ARCH_LIMITS[s['arch']]['name']:<7} variants={s['variants']:<4} "
              f"failed={s['failed']:<3} regs={s['regs'][0]}-{s['regs'][1]} spilling={s['spilling']} "
              f"smem<={s['smem_max']} occ={'-' if occ[0] is None else f'{100*occ[0]:.0f}-{100*occ[1]:.0f}%'} "
              f"mma={','.join(s['mma'])} copy={','.join(s['copy'])}")
    print("# " + " | ".join(f"{k}: {v}" for k, v in meta.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.markdown:
        label = ", ".join(ARCH_LIMITS[a]["name"] for a in archs)
        others = []
        for f in args.also_json:
            d = json.loads(Path(f).read_text())
            others.append((d["meta"], [r for r in d["rows"] if r["arch"] in archs]))
        Path(args.markdown).write_text(render_markdown(rows, meta, label, others))
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        print(f"resfuse.aot: FAILED {r['kernel']} [{r['variant']}] {ARCH_LIMITS[r['arch']]['name']}: {r['error']}",
              file=sys.stderr)
    if failed:
        print(f"resfuse.aot: {len(failed)} of {len(rows)} rows failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
