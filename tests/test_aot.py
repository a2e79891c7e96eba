"""``python -m resfuse.aot``: the static (no-GPU) compile report of every kernel.

Compiles a few small Triton kernels for real (AOT, no GPU needed); the full run is a manual/CI tool.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from resfuse import aot

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, cache=None, timeout=600):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if cache is not None:
        env["RESFUSE_AOT_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "resfuse.aot", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


BROKEN = textwrap.dedent('''
    import triton.language as tl
    from resfuse.triton._jit import kernel
    from resfuse.triton.registry import KernelSpec, cfg

    @kernel
    def broken_kernel(X, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + offs)
        y = tl.dot(x, x)  # a 1-D dot does not compile
        tl.store(X + offs, y)

    KERNELS = [KernelSpec(name="deliberately_broken", module=__file__, attr="broken_kernel", hot=True,
                          dtypes=("fp32",), variants=[{}],
                          configs={a: [cfg("b16", 1, 1, ("fp32",), BLOCK=16)] for a in (80, 90)},
                          pointer_types=lambda d: {"X": "fp32"})]
''')


def test_invalid_kernel_exits_nonzero_naming_it(tmp_path):
    extra = tmp_path / "broken.py"
    extra.write_text(BROKEN)
    r = _run("--arch", "90", "--kernels", "deliberately_broken", "--extra", str(extra), "--no-cuda",
             "--no-cache", "--jobs", "1")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "FAILED deliberately_broken [fp32|b16]" in r.stderr
    assert "sm_90a" in r.stderr


def test_json_rows_match_registry_and_cache(tmp_path):
    from resfuse.triton import registry
    out = tmp_path / "aot.json"
    pattern = "bn_stats_partial,stats_merge"
    r = _run("--arch", "90", "--kernels", pattern, "--json", str(out), "--no-cuda", "--quiet", "--jobs", "1",
             cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    specs = [registry.KERNELS["bn_stats_partial"], registry.KERNELS["stats_merge"]]
    expected = sum(len(s.configs_for(90, v, d)) for s in specs for v in s.variants for d in s.dtypes)
    assert expected == len(registry.aot_units(specs, [90])) == len(rows) == data["meta"]["rows"] == 7
    keys = {(row["kernel"], row["variant"], row["arch"]) for row in rows}
    assert len(keys) == len(rows)  # one row per (kernel, variant, arch)
    for row in rows:
        assert row["status"] == "ok" and row["regs"] > 0 and row["threads"] > 0 and 0 < row["occupancy"] <= 1
        assert row["spill_stores"] == 0
    # second run: everything from the cache
    r2 = _run("--arch", "90", "--kernels", pattern, "--no-cuda", "--quiet", cache=tmp_path / "cache")
    assert r2.returncode == 0 and f"{len(rows)} cached, compiling 0" in r2.stderr


def test_unknown_arch_lists_valid_ones(capsys):
    assert aot.main(["--arch", "75", "--no-cuda"]) == 2
    err = capsys.readouterr().err
    assert "unknown arch 75" in err and "80, 90" in err
    assert aot.main(["--arch", "eighty"]) == 2
    assert "valid archs: 80, 90" in capsys.readouterr().err


def test_pattern_matching_nothing_lists_kernels(capsys):
    assert aot.main(["--kernels", "no_such_kernel", "--no-cuda"]) == 2
    err = capsys.readouterr().err
    assert "matches no kernel" in err and "conv2d_fwd" in err and "bn_act" in err


def test_zero_cu_files_is_fine(tmp_path, monkeypatch):
    monkeypatch.setattr(aot, "CUDA_DIR", tmp_path)
    units, cuda, _ = aot.plan([80, 90], "stats_merge", (), True)
    assert cuda == [] and len(units) == 2


def test_registry_covers_every_launcher_variant():
    """Every flag combination conv2d can launch has a config for every dtype and arch (and the AOT
    units are exactly those), so nothing the launcher picks escapes the static report."""
    from resfuse.triton import registry
    for spec in registry.KERNELS.values():
        for arch in registry.ARCHS:
            for v in spec.variants:
                for d in spec.dtypes:
                    assert spec.configs_for(arch, v, d), (spec.name, arch, v, d)
    variants = registry.conv_flag_combos()
    assert len({tuple(sorted(v.items())) for v in variants}) == len(variants) == 24
    for M, c_out, sms in ((10, 8, 4), (10 ** 6, 64, 132), (10 ** 6, 256, 132), (3000, 512, 132)):
        for arch in registry.ARCHS:
            for v in variants:
                for d in registry.DTYPES:
                    c = registry.pick_conv(arch, v, d, M, c_out, sms)
                    assert c in registry.CONV.configs_for(arch, v, d)


def test_occupancy_calculator():
    # 256 threads x 128 regs = 32K regs: 2 blocks on 64K; 64 KB smem: 2 blocks on 164 KB (sm_80)
    o = aot.occupancy(80, 128, 64 * 1024, 256)
    assert o["blocks"] == 2 and o["occupancy"] == 0.25
    # 1024 threads x 32 regs, no smem: warp-limited, 2 blocks = 64 warps
    o = aot.occupancy(90, 32, 0, 1024)
    assert o["blocks"] == 2 and o["occupancy"] == 1.0 and o["limiter"] == "warps"
    # 255 regs round to 8192 per warp: 8 warps fit -> one 8-warp block
    o = aot.occupancy(90, 255, 0, 256)
    assert o["blocks"] == 1 and o["limiter"] == "registers"
    # shared memory: 100 KB blocks -> 2 per SM on sm_90 (228 KB), 1 on sm_80 (164 KB)
    assert aot.occupancy(90, 64, 100 * 1024, 128)["blocks"] == 2
    assert aot.occupancy(80, 64, 100 * 1024, 128)["blocks"] == 1
    # above the per-block limit: nothing runs
    assert aot.occupancy(80, 64, 200 * 1024, 128)["blocks"] == 0
    # 32-block cap with tiny blocks
    assert aot.occupancy(80, 16, 0, 32)["blocks"] == 32


def test_parse_ptxas_and_ptx_features():
    log = textwrap.dedent("""\
        ptxas info    : 0 bytes gmem
        ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
        ptxas info    : Function properties for _Z3fooPf
            16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 364 bytes cmem[0]
        ptxas info    : Function properties for _Z6helperv
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Compiling entry function 'bar' for 'sm_80'
        ptxas info    : Function properties for bar
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 32 registers, used 0 barriers, 360 bytes cmem[0]
        """)
    info = aot.parse_ptxas(log)
    assert set(info) == {"_Z3fooPf", "bar"}
    assert info["_Z3fooPf"] == dict(regs=255, smem_static=4096, stack=16, spill_stores=8, spill_loads=12)
    assert info["bar"]["regs"] == 32 and info["bar"]["smem_static"] == 0
    assert aot.ptx_features("wgmma.mma_async.sync.aligned ... cp.async.bulk.tensor.2d") == \
        dict(mma="wgmma", copy="TMA")
    assert aot.ptx_features("mma.sync.aligned.m16n8k16 cp.async.ca.shared.global") == \
        dict(mma="mma.sync", copy="cp.async")
    row = aot._finish_row(dict(aot._row_base("k", "v", 80, True), regs=255, spill_stores=8, spill_loads=12,
                               smem_static=0, smem_dynamic=200 * 1024, threads=128))
    assert row["status"] == "FAIL" and "spill" in row["error"] and "per-block limit" in row["error"]


@pytest.mark.skipif(aot.find_nvcc() is None, reason="nvcc not installed")
def test_cuda_file_rows(tmp_path):
    cu = tmp_path / "tiny.cu"
    cu.write_text(textwrap.dedent("""\
        __global__ void __launch_bounds__(128) scale(float* x, float s, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) x[i] *= s;
        }
        // resfuse-aot: cold other
        __global__ void other(float* x) { x[threadIdx.x] = 0.f; }
        """))
    rows = aot._cuda_worker((str(cu), 90, aot.find_nvcc()))
    by = {r["kernel"]: r for r in rows}
    assert set(by) == {"tiny::scale", "tiny::other"}
    assert by["tiny::scale"]["threads"] == 128 and by["tiny::scale"]["regs"] > 0
    assert by["tiny::scale"]["status"] == "ok" and by["tiny::scale"]["hot"]
    assert by["tiny::other"]["threads"] is None and not by["tiny::other"]["hot"]
