"""The cpu backend's convolution algorithms (``resfuse/cpu_conv.py``): the GEMM forms and the Winograd
F(2x2, 3x3) and F(4x4, 3x3) convolutions (``csrc/cpu/winograd.cpp``, ``torch.ops.resfuse.winograd_conv``) against
float64 ATen on odd shapes; the per-shape measured choice; the fused chain trained (gradcheck) with
each algorithm forced; argument errors and ``opcheck``."""
import copy

import pytest
import torch
import torch.nn.functional as F

import resfuse
from resfuse import _extension, backends, cpu_conv, layout
from resfuse.backends import ConvGeom
from resfuse.testing import poisoned, randomize_bn

pytestmark = pytest.mark.skipif(backends.instance("cpu")[0] is None,
                                reason=f"cpu backend unavailable: {backends.instance('cpu')[1]}")

CL = torch.channels_last
WINO = ConvGeom((1, 1), (1, 1), (1, 1), 1)


@pytest.fixture
def algo(monkeypatch):
    """``algo(name)`` forces an algorithm for the test; the default comes back afterwards. The
    per-tap weight gradient is tried at any channel count here, so that the tests' small layers
    reach it (its channel threshold is tested on its own)."""
    monkeypatch.setattr(cpu_conv, "_MIN_TAP_CHANNELS", 1)
    yield cpu_conv.set_algo
    cpu_conv.set_algo(None)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _cl(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=CL)


def _aten_backward(gy, x, w, g: ConvGeom):
    return torch.ops.aten.convolution_backward(gy, x, w, None, list(g.stride), list(g.padding), list(g.dilation),
                                               False, [0, 0], g.groups, [True, True, False])[:2]


GEOMS = [  # (N, Ci, Co, H, W, k, stride, padding, dilation)
    (2, 5, 7, 9, 7, 3, 2, 1, 1), (1, 3, 4, 7, 9, 7, 2, 3, 1), (2, 8, 6, 9, 9, 3, 1, 2, 2),
    (3, 16, 8, 5, 5, 1, 2, 0, 1), (2, 4, 4, 6, 6, 1, 1, 0, 1), (2, 4, 6, 9, 9, 3, 1, 0, 1), (1, 17, 3, 1, 1, 3, 1, 1, 1),
]


needs_matmul = pytest.mark.skipif(cpu_conv._matmul_probe() is not None,
                                  reason=f"oneDNN matmul unavailable: {cpu_conv._matmul_probe()}")


@pytest.mark.parametrize("engine", ["gemm", pytest.param("matmul", marks=needs_matmul)])
@pytest.mark.parametrize("geom", GEOMS, ids=lambda c: "x".join(map(str, c)))
def test_gemm_forms_match_aten(geom, engine):
    """Against float64 ATen: BLAS in float64 (1e-12), oneDNN's matmul in float32 (1e-5)."""
    n, ci, co, h, w_, k, s, p, d = geom
    g = ConvGeom((s, s), (p, p), (d, d), 1)
    x, w = _cl(n, ci, h, w_), _cl(co, ci, k, k)
    y = F.conv2d(x, w, None, s, p, d)
    gy = _cl(*y.shape)
    gx, gw = _aten_backward(gy, x, w, g)
    dt, tol = (torch.float64, 1e-12) if engine == "gemm" else (torch.float32, 1e-5)
    xd, wd, gyd = x.to(dt), w.to(dt), gy.to(dt)
    got = {"forward": cpu_conv.gemm_forward(xd, wd, g, engine),
           "weight_grad": cpu_conv.gemm_weight_grad(gyd, xd, wd, g, engine),
           "input_grad": cpu_conv.gemm_input_grad(gyd, xd, wd, g, engine)}
    want = {"forward": y, "weight_grad": gw, "input_grad": gx}
    for name, value in got.items():
        assert value.shape == want[name].shape and value.dtype == dt, name
        assert value.is_contiguous(memory_format=CL), f"{name}: not channels_last"
        assert _rel(value, want[name]) < tol, name


@needs_matmul
def test_matmul_candidates_are_float32_within_the_cols_bound(monkeypatch):
    """oneDNN's matmul is offered for float32 only (not float64 / bfloat16), and for a weight gradient
    only while its im2col buffer fits MAX_GRAD_COLS_BYTES (a 1x1 stride-1 layer's is a view: always);
    the GEMM input gradient while its product does."""
    g3, g1 = ConvGeom((1, 1), (1, 1), (1, 1), 1), ConvGeom((1, 1), (0, 0), (1, 1), 1)
    x, w3, w1 = _cl(2, 32, 6, 6, dtype=torch.float32), _cl(8, 32, 3, 3, dtype=torch.float32), \
        _cl(8, 32, 1, 1, dtype=torch.float32)
    assert cpu_conv._matmul_applies("weight_grad", x, w3, g3)
    torch.backends.mkldnn.enabled = False
    try:
        assert not cpu_conv._matmul_applies("weight_grad", x, w3, g3)
    finally:
        torch.backends.mkldnn.enabled = True
    assert not cpu_conv._matmul_applies("weight_grad", x.double(), w3.double(), g3)
    assert not cpu_conv._matmul_applies("forward", x.bfloat16(), w3.bfloat16(), g3)
    assert cpu_conv._gemm_applies("input_grad", x, w3, g3)
    assert not cpu_conv._gemm_applies("input_grad", x.bfloat16(), w3.bfloat16(), g3)  # col2im would round
    assert cpu_conv._gemm_applies("input_grad", x.bfloat16(), w1.bfloat16(), g1)  # 1x1: the product is gx
    monkeypatch.setattr(cpu_conv, "MAX_GRAD_COLS_BYTES", cpu_conv._cols_bytes(x, w3, g3) - 1)
    assert not cpu_conv._matmul_applies("weight_grad", x, w3, g3)
    assert not cpu_conv._gemm_applies("input_grad", x, w3, g3)
    assert cpu_conv._gemm_applies("forward", x, w3, g3)  # the forward's bound is MAX_COLS_BYTES
    assert cpu_conv._matmul_applies("weight_grad", x, w1, g1)
    assert "matmul" in cpu_conv._candidates("weight_grad", _cl(2, 8, 6, 6, dtype=torch.float32), x, w1, g1)


WINO_SHAPES = [(2, 5, 7, 9, 7), (1, 3, 4, 1, 1), (2, 8, 6, 2, 3), (3, 16, 9, 6, 6), (1, 17, 5, 5, 8), (2, 32, 24, 14, 11)]
#: fp32 error bound (max abs error / max abs value, against float64) per Winograd tile: F(4x4)'s transforms
#: scale by up to 8 and round ~4x as much as F(2x2)'s (measured 1-3e-6 norm-relative on 64-512 channels)
WINO_TOL32 = {2: 2e-6, 4: 1e-5}


@pytest.mark.parametrize("chunk", [None, 1, 7])
@pytest.mark.parametrize("epilogue", ["none", "bias", "bias_residual_relu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", WINO_SHAPES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_matches_conv(tile, shape, dtype, epilogue, chunk):
    """Forward (with fused bias / residual / ReLU) and the input-gradient form, against float64 ATen;
    any number of tiles per chunk (1, 7: chunks that do not divide the tiles, the default); maps
    smaller than one tile and not a multiple of it (cropped tiles)."""
    n, ci, co, h, w_ = shape
    x, w = _cl(n, ci, h, w_), _cl(co, ci, 3, 3) / 3
    bias = torch.randn(co, dtype=torch.float64) if "bias" in epilogue else None
    res = _cl(n, co, h, w_) if "residual" in epilogue else None
    relu = "relu" in epilogue
    want = F.conv2d(x, w, bias, 1, 1) + (res if res is not None else 0)
    want = want.relu() if relu else want
    cast = (lambda t: None if t is None else t.to(dtype).contiguous(memory_format=CL)) \
        if dtype != torch.float64 else (lambda t: t)
    got = cpu_conv.winograd_forward(cast(x), cpu_conv.winograd_weight(cast(w), tile=tile),
                                    None if bias is None else bias.to(dtype), cast(res), relu, chunk, tile)
    tol = 1e-12 if dtype == torch.float64 else WINO_TOL32[tile]
    assert got.dtype == dtype and got.is_contiguous(memory_format=CL) and got.shape == want.shape
    assert _rel(got, want) < tol

    gy = _cl(n, co, h, w_)
    gx, _ = _aten_backward(gy, x, w, WINO)
    got_gx = cpu_conv.winograd_forward(cast(gy), cpu_conv.winograd_weight(cast(w), True, tile), chunk=chunk, tile=tile)
    assert _rel(got_gx, gx) < tol


@pytest.mark.parametrize("tile, factor", [(2, 4), (4, 12)])
def test_winograd_fp32_error_like_direct_conv(tile, factor):
    """fp32 Winograd rounds like oneDNN's direct convolution (both against float64): F(2x2, 3x3)
    within 4x its error, F(4x4, 3x3) within 12x (measured ~3x; both far inside the 1e-5 bar)."""
    x, w = _cl(2, 256, 14, 14), _cl(256, 256, 3, 3) / 48
    want = F.conv2d(x, w, None, 1, 1)
    x32, w32 = x.float().contiguous(memory_format=CL), w.float().contiguous(memory_format=CL)
    err_wino = _rel(cpu_conv.winograd_forward(x32, cpu_conv.winograd_weight(w32, tile=tile), tile=tile), want)
    err_direct = _rel(F.conv2d(x32, w32, None, 1, 1), want)
    assert err_wino < max(factor * err_direct, WINO_TOL32[tile]), (err_wino, err_direct)


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_nonfinite_input_is_not_masked(tile):
    """NaN in, NaN out: every output eager makes NaN is NaN (the transforms spread a NaN over the
    output blocks of the (at most 4) tiles that read it, a superset); the finite outputs agree."""
    x, w = _cl(1, 4, 16, 16, dtype=torch.float32), _cl(4, 4, 3, 3, dtype=torch.float32)
    x[0, 1, 3, 4] = float("nan")
    want = F.conv2d(x, w, None, 1, 1)
    got = cpu_conv.winograd_forward(x, cpu_conv.winograd_weight(w, tile=tile), None, None, True, tile=tile)
    assert got[want.isnan()].isnan().all()
    fin = got.isfinite()
    assert fin.sum() >= 4 * (256 - 4 * tile * tile)
    assert _rel(got[fin], want.relu()[fin]) < WINO_TOL32[tile]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 64, 56, 56), (8, 256, 14, 14), (4, 128, 28, 28), (1, 512, 7, 7),
                                   (3, 5, 9, 7), (8, 64, 56, 56)], ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_chunks_are_balanced(tile, shape, threads):
    """Chunks of equal size, no larger than the target (128 or 256 tiles), none mostly padding."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        chunk = cpu_conv.winograd_chunk(torch.empty(shape), tile)
    finally:
        torch.set_num_threads(prev)
    n, c, h, w = shape
    tiles = n * -(-h // tile) * -(-w // tile)
    target = 128 if c > 64 and threads == 1 else 256
    chunks = -(-tiles // chunk)
    assert chunk <= max(target, 1) and chunks == -(-tiles // target)
    assert chunks * chunk - tiles < chunks  # the padding is less than one tile per chunk


def test_winograd_weight_is_cached_and_invalidated():
    """The inference path transforms and packs a folded weight once per tile size and GEMM input
    (dense and unpacked at the weight's first sight), again only after the weight changes; the
    results follow."""
    from resfuse import cpu_backend
    cpu_backend.onednn()
    x, w = _cl(2, 8, 6, 6, dtype=torch.float32), _cl(8, 8, 3, 3, dtype=torch.float32)
    for tile in (2, 4):
        chunk = cpu_conv.winograd_chunk(x, tile)
        first = cpu_backend._winograd_packed(w, x, tile, chunk)
        # the weight's first sight (tile 2 here): dense; from then on packed, whatever the tile
        assert first.is_mkldnn == (tile == 4)
        assert first.is_mkldnn or first.shape == (cpu_conv.points(tile) * 8, 8, 1, 1)
        packed = cpu_backend._winograd_packed(w, x, tile, chunk)
        assert packed.is_mkldnn and cpu_backend._winograd_packed(w, x, tile, chunk) is packed
        y = cpu_conv.winograd_forward(x, packed, tile=tile)
        assert _rel(y, F.conv2d(x, w, None, 1, 1)) < WINO_TOL32[tile]
    with torch.no_grad():
        w.mul_(2)
    for tile in (2, 4):
        chunk = cpu_conv.winograd_chunk(x, tile)
        again = cpu_backend._winograd_packed(w, x, tile, chunk)
        again = cpu_backend._winograd_packed(w, x, tile, chunk) if not again.is_mkldnn else again
        assert _rel(cpu_conv.winograd_forward(x, again, tile=tile), F.conv2d(x, w, None, 1, 1)) < WINO_TOL32[tile]


# ------------------------------------------------------------------------------------ selection

def test_set_algo_rejects_unknown_name(algo):
    with pytest.raises(ValueError, match="unknown CPU convolution algorithm 'fft'; valid: auto, onednn, gemm"):
        algo("fft")


def test_auto_measures_once_per_shape(algo, monkeypatch):
    algo("auto")
    calls = {"gemm": 0, "matmul": 0}
    real = cpu_conv.gemm_weight_grad

    def spy(*a):  # (gy, x, w, geom, engine)
        calls[a[4] if len(a) > 4 else "gemm"] += 1
        return real(*a)

    monkeypatch.setattr(cpu_conv, "gemm_weight_grad", spy)
    x, w = _cl(2, 8, 4, 4, dtype=torch.float32), _cl(16, 8, 3, 3, dtype=torch.float32)
    gy = _cl(2, 16, 4, 4, dtype=torch.float32)
    g = ConvGeom((1, 1), (1, 1), (1, 1), 1)
    first = cpu_conv.backward(gy, x, w, g, False, True)[1]
    trials = calls["gemm"]
    assert trials == 1 + cpu_conv._TRIALS  # one warm-up, then the timed runs
    chosen = [v for k, v in cpu_conv.choices().items() if k[0] == "weight_grad"]
    assert calls["matmul"] == (1 + cpu_conv._TRIALS if cpu_conv._matmul_probe() is None else 0)
    assert chosen and chosen[0] in cpu_conv.ALGOS[1:]
    for _ in range(3):
        again = cpu_conv.backward(gy, x, w, g, False, True)[1]
    assert calls["gemm"] == trials + (3 if chosen[0] == "gemm" else 0)
    assert _rel(again, first) < 1e-5 and _rel(first, _aten_backward(gy, x, w, g)[1]) < 1e-5


@pytest.mark.parametrize("op", ["forward", "pair"])
def test_choice_is_checked_again_when_warm(algo, monkeypatch, op):
    """A measured training choice is timed once more at the RECHECK_AFTER-th call after its trial (no
    warm-up), and that trial decides: a candidate slowed down during the first trial (a cold process)
    wins the second. Then no more trials; the values stay right throughout."""
    algo("auto")
    monkeypatch.setattr(cpu_conv, "RECHECK_AFTER", 2)
    slow = {"on": True}
    runs = {"onednn": 0, "gemm": 0, "matmul": 0}
    real_timed = cpu_conv._timed

    real_candidates = cpu_conv._candidates

    def candidates(*args):  # each candidate tagged with its name
        cands = real_candidates(*args)
        for name, fn in cands.items():
            fn.algo = name
        return cands

    def timed(fn):  # gemm looks 1 s slower in the first trial, 1 s faster in the second; matmul 9 s slower
        t, r = real_timed(fn)
        name = getattr(fn, "algo", None) or fn.args[1]  # a weight gradient's pair: _pair(ni, nw, ...)
        runs[name] += 1
        return t + (1.0 if slow["on"] else -1.0) * (name == "gemm") + 9.0 * (name == "matmul"), r

    monkeypatch.setattr(cpu_conv, "_candidates", candidates)
    monkeypatch.setattr(cpu_conv, "_timed", timed)
    x, w = _cl(2, 32, 4, 4, dtype=torch.float32), _cl(16, 32, 1, 1, dtype=torch.float32)
    gy = _cl(2, 16, 4, 4, dtype=torch.float32)
    g = ConvGeom((1, 1), (0, 0), (1, 1), 1)
    want_y = F.conv2d(x, w)
    want_gx, want_gw = cpu_conv._aten_backward(gy, x, w, g, True, True)

    def call():
        if op == "forward":
            assert _rel(cpu_conv.forward(x, w, g), want_y) < 1e-5
        else:
            gx, gw = cpu_conv.backward(gy, x, w, g, True, True)
            assert _rel(gx, want_gx) < 1e-5 and _rel(gw, want_gw) < 1e-5

    name = "forward" if op == "forward" else "weight_grad"
    call()
    assert {k[0]: v for k, v in cpu_conv.choices().items()}[name] == "onednn"
    slow["on"] = False
    timed_runs = sum(runs.values())
    call()  # the first run by the choice: no trial yet
    assert sum(runs.values()) == timed_runs
    call()  # the second run: the trial again, which gemm wins
    per_op = 3 if cpu_conv._matmul_probe() is None else 2  # candidates: onednn, gemm, matmul
    assert sum(runs.values()) == timed_runs + (1 if op == "forward" else 2) * per_op * cpu_conv._TRIALS
    assert {k[0]: v for k, v in cpu_conv.choices().items()}[name] == "gemm"
    timed_runs = sum(runs.values())
    for _ in range(3):
        call()
    assert sum(runs.values()) == timed_runs and not cpu_conv._recheck


def test_per_tap_weight_gradient_needs_input_channels():
    """Few input channels (a 3-channel stem) make every tap's GEMM tiny: not tried (oneDNN runs)."""
    g = ConvGeom((2, 2), (3, 3), (1, 1), 1)
    x3, w3 = _cl(2, 3, 16, 16, dtype=torch.float32), _cl(8, 3, 7, 7, dtype=torch.float32)
    x64, w64 = _cl(2, 64, 8, 8, dtype=torch.float32), _cl(8, 64, 3, 3, dtype=torch.float32)
    assert not cpu_conv._gemm_applies("weight_grad", x3, w3, g)
    assert cpu_conv._gemm_applies("weight_grad", x64, w64, g)
    one = ConvGeom((1, 1), (0, 0), (1, 1), 1)
    assert cpu_conv._gemm_applies("weight_grad", x3, _cl(8, 3, 1, 1, dtype=torch.float32), one)


@pytest.mark.parametrize("name,split", [("onednn", 0), ("onednn", None), ("gemm", None)])
def test_gradient_with_more_scratch_runs_first(algo, monkeypatch, name, split):
    """The input and weight gradients are two calls, the one whose algorithm holds more scratch
    memory first: oneDNN's weight gradient (~2 weights) before its input gradient (~1 weight) — or
    one ATen call for both where that order would save less than SPLIT_MIN_BYTES (these tiny
    operands, by default); the per-tap GEMM weight gradient (small pieces) after the GEMM input
    gradient (its product). Same values as ATen's single call for both."""
    algo(name)
    if split is not None:
        monkeypatch.setattr(cpu_conv, "SPLIT_MIN_BYTES", split)
    calls = []
    real, real_gemm = cpu_conv._aten_backward, cpu_conv.gemm_weight_grad

    def spy(gy, x, w, geom, need_input, need_weight):
        calls.append("both" if need_input and need_weight else "input" if need_input else "weight")
        return real(gy, x, w, geom, need_input, need_weight)

    def spy_gemm(*args):
        calls.append("weight")
        return real_gemm(*args)

    real_gemm_x = cpu_conv.gemm_input_grad

    def spy_gemm_x(*args):
        calls.append("input")
        return real_gemm_x(*args)

    monkeypatch.setattr(cpu_conv, "_aten_backward", spy)
    monkeypatch.setattr(cpu_conv, "gemm_weight_grad", spy_gemm)
    monkeypatch.setattr(cpu_conv, "gemm_input_grad", spy_gemm_x)
    x, w = _cl(2, 32, 6, 6, dtype=torch.float64), _cl(16, 32, 3, 3, dtype=torch.float64)
    gy = _cl(2, 16, 6, 6, dtype=torch.float64)
    g = ConvGeom((1, 1), (1, 1), (1, 1), 1)
    gx, gw = cpu_conv.backward(gy, x, w, g, True, True)
    assert calls == {"onednn": ["weight", "input"] if split == 0 else ["both"], "gemm": ["input", "weight"]}[name]
    want_gx, want_gw = real(gy, x, w, g, True, True)
    assert _rel(gx, want_gx) < 1e-12 and _rel(gw, want_gw) < 1e-12
    assert cpu_conv.backward(gy, x, w, g, False, True)[0] is None and calls[-1] == "weight"


def test_weight_gradient_is_chosen_for_the_pair(algo, monkeypatch):
    """With both gradients needed, the weight gradient's trial times each candidate together with the
    chosen input gradient — oneDNN as one ATen call computing both — and the winner's pair is what
    the call returns; later calls run the remembered pair."""
    algo("auto")
    calls = []
    real = cpu_conv._aten_backward

    def spy(gy, x, w, geom, need_input, need_weight):
        calls.append((need_input, need_weight))
        return real(gy, x, w, geom, need_input, need_weight)

    monkeypatch.setattr(cpu_conv, "_aten_backward", spy)
    x, w = _cl(2, 32, 6, 6, dtype=torch.float32), _cl(32, 32, 3, 3, dtype=torch.float32)
    gy = _cl(2, 32, 6, 6, dtype=torch.float32)
    g = ConvGeom((1, 1), (1, 1), (1, 1), 1)
    want_gx, want_gw = real(gy, x, w, g, True, True)
    for _ in range(3):
        gx, gw = cpu_conv.backward(gy, x, w, g, True, True)
        assert _rel(gx, want_gx) < 1e-5 and _rel(gw, want_gw) < 1e-5
    assert (True, True) in calls  # oneDNN's candidate for the pair: one call
    chosen = {k[0]: v for k, v in cpu_conv.choices().items()}
    assert set(chosen) == {"input_grad", "weight_grad"}
    calls.clear()
    cpu_conv.backward(gy, x, w, g, True, True)
    if chosen["input_grad"] == chosen["weight_grad"] == "onednn":
        assert calls == [(True, True)]
    else:
        assert (True, True) not in calls


def test_choice_is_per_layout(algo):
    """A shape measured on channels_last operands (where GEMM / Winograd may win) and then run on
    NCHW ones is a new choice (oneDNN, NCHW out, the same values), and the remembered choice of each
    layout serves its later calls."""
    algo("auto")
    x, w = _cl(2, 32, 6, 6, dtype=torch.float32), _cl(32, 32, 3, 3, dtype=torch.float32)
    g = ConvGeom((1, 1), (1, 1), (1, 1), 1)
    gy = _cl(2, 32, 6, 6, dtype=torch.float32)
    for fmt in (CL, torch.contiguous_format, CL):
        xf, wf, gf = (t.contiguous(memory_format=fmt) for t in (x, w, gy))
        for _ in range(2):  # the trial, then the remembered choice
            y = cpu_conv.forward(xf, wf, g)
            gx, gw = cpu_conv.backward(gf, xf, wf, g, True, True)
            assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
            assert _rel(y, F.conv2d(x, w, None, 1, 1)) < 1e-5
            want_gx, want_gw = cpu_conv._aten_backward(gy, x, w, g, True, True)
            assert _rel(gx, want_gx) < 1e-5 and _rel(gw, want_gw) < 1e-5
    assert not [k for k in cpu_conv.choices() if not k[5]]  # NCHW: nothing to measure
    nchw = [v for k, v in cpu_conv._memo.items() if not k[5]]
    assert nchw and set(nchw) == {"onednn"}


@pytest.mark.parametrize("case", ["nchw", "groups", "float16"])
def test_unsupported_cases_stay_on_onednn(algo, case):
    """NCHW or grouped: oneDNN without a trial; float16: no Winograd (its transforms would round)."""
    algo("auto")
    x, w = _cl(2, 8, 6, 6, dtype=torch.float32), _cl(8, 8, 3, 3, dtype=torch.float32)
    g = WINO
    if case == "nchw":
        x = x.contiguous()
    elif case == "groups":
        w, g = w[:, :4].contiguous(memory_format=CL), ConvGeom((1, 1), (1, 1), (1, 1), 2)
    else:
        x, w = x.half(), w.half()
    y = cpu_conv.forward(x, w, g)
    assert _rel(y, F.conv2d(x.float(), w.float(), None, 1, 1, 1, g.groups)) < 1e-2
    if case == "float16":
        assert set(cpu_conv.choices().values()) <= {"onednn", "gemm"}
    else:
        assert not cpu_conv.choices()  # nothing to choose between: oneDNN ran without a trial


@pytest.mark.parametrize("name", ["onednn", "gemm", "winograd", "winograd4"])
def test_chain_gradcheck_with_each_algorithm(algo, name, monkeypatch):
    """A fused BasicBlock (train-mode BN, identity and projection shortcuts) in float64 channels_last:
    gradcheck with every convolution of the forward and backward on the forced algorithm."""
    algo(name)
    used = []
    for fn in ("gemm_forward", "gemm_weight_grad", "gemm_input_grad", "gemm_input_grad_add_", "_winograd_training",
               "winograd_weight_grad"):
        real = getattr(cpu_conv, fn)
        def spy(*a, _r=real, _n=fn, **k):
            r = _r(*a, **k)
            if r is not False:  # gemm_input_grad_add_ returns False when it did nothing
                used.append(_n)
            return r

        monkeypatch.setattr(cpu_conv, fn, spy)
    for stride, cin in [(1, 4), (2, 3)]:
        blk = randomize_bn(resfuse.nn.BasicBlock(cin, 4, stride, None if (stride, cin) == (1, 4) else torch.nn.Sequential(
            torch.nn.Conv2d(cin, 4, 1, stride, bias=False), torch.nn.BatchNorm2d(4)))).double().train()
        blk = blk.to(memory_format=CL)
        x = torch.randn(2, cin, 6, 6, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
        params = [p for p in blk.parameters()]

        def f(x, *ps, blk=blk):
            return torch.func.functional_call(blk, dict(zip([n for n, _ in blk.named_parameters()], ps)), (x,))

        with resfuse.use_backend("cpu"):
            assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)
    if name == "gemm":  # the projection's input gradient is added into x's (gemm_input_grad_add_)
        assert {"gemm_forward", "gemm_weight_grad", "gemm_input_grad_add_"} <= set(used)
    elif name.startswith("winograd"):
        assert {"_winograd_training", "winograd_weight_grad"} <= set(used)
    else:
        assert not used


# ----------------------------------------------------------------------------------- op contract

def _winograd_args(dtype, epilogue, tile=2):
    x = _cl(2, 5, 7, 6, dtype=dtype)
    u = cpu_conv.winograd_weight(_cl(3, 5, 3, 3, dtype=dtype), tile=tile)
    bias = torch.randn(3, dtype=dtype) if epilogue else None
    res = _cl(2, 3, 7, 6, dtype=dtype) if epilogue else None
    return (x, u, bias, res, epilogue, 5, tile)


@pytest.mark.skipif(not _extension.LOADED, reason="resfuse._C not built")
@pytest.mark.parametrize("tile", [2, 4])
def test_opcheck_winograd_conv(tile):
    for dtype, epilogue in [(torch.float32, False), (torch.float64, True), (torch.float32, True)]:
        torch.library.opcheck(torch.ops.resfuse.winograd_conv.default, _winograd_args(dtype, epilogue, tile))


def _bad_winograd():
    x, u, b, r, relu, chunk, tile = _winograd_args(torch.float32, True)
    op = torch.ops.resfuse.winograd_conv
    return [
        ("nchw input", lambda: op(x.contiguous(), u, b, r, relu, chunk, tile), r"input must be dense channels_last"),
        ("bf16", lambda: op(x.bfloat16(), u.bfloat16(), b, r, relu, chunk, tile), r"input must be float32 or float64"),
        ("weight shape", lambda: op(x, u[:, :4], b, r, relu, chunk, tile),
         r"weight must be the transformed weight \[16\*Co, Ci, 1, 1\] \(tile 2\) with Ci = 5"),
        ("weight of the other tile", lambda: op(x, u, b, r, relu, chunk, 4),
         r"weight must be the transformed weight \[36\*Co, Ci, 1, 1\] \(tile 4\) with Ci = 5, got \[48, 5, 1, 1\]"),
        ("tile", lambda: op(x, u, b, r, relu, chunk, 3), r"tile must be 2 \(F\(2x2, 3x3\)\) or 4 \(F\(4x4, 3x3\)\), got 3"),
        ("bias shape", lambda: op(x, u, b[:2], r, relu, chunk, tile), r"bias must have shape \[Co\] = \[3\]"),
        ("residual shape", lambda: op(x, u, b, r[:1], relu, chunk, tile), r"residual must have shape \[2, 3, 7, 6\]"),
        ("chunk", lambda: op(x, u, b, r, relu, 0, tile), r"chunk must be positive"),
        ("rank", lambda: op(x[0], u, b, r, relu, chunk, tile), r"resfuse::winograd_conv: input must be a 4-D"),
    ]




def test_inference_layer_uses_measured_choice(algo):
    """conv_bias_act under ``auto`` on a 3x3 fp32 channels_last layer: the choice is recorded, the
    result equals ATen's whichever algorithm won, then and on later calls."""
    algo("auto")
    be = backends.instance("cpu")[0]
    x, w = _cl(2, 16, 10, 10, dtype=torch.float32), _cl(16, 16, 3, 3, dtype=torch.float32)
    b, r = torch.randn(16), _cl(2, 16, 10, 10, dtype=torch.float32)
    want = (F.conv2d(x, w, b, 1, 1) + r).relu()
    with torch.no_grad():
        for _ in range(3):
            out = be.conv_bias_act(x, w, b, WINO, poisoned(r).copy_(r), True)
            assert _rel(out, want) < WINO_TOL32[4]
    assert next(v for k, v in cpu_conv.choices().items() if k[0] == "inference") in ("onednn", "winograd",
                                                                                      "winograd4")


def test_inference_trial_keeps_only_the_chosen_transform(algo):
    """After the first call of a shape (the trial), a folded weight keeps the packed weight of the
    form that won only (the losers' Winograd transforms and oneDNN packs are dropped); a second input
    shape, with its own trial, gets correct results whichever form it picks."""
    from resfuse import cpu_backend
    algo("auto")
    be = backends.instance("cpu")[0]
    w, b = _cl(16, 16, 3, 3, dtype=torch.float32), torch.randn(16)
    for n in (2, 3):
        x = _cl(n, 16, 12, 12, dtype=torch.float32)
        with torch.no_grad():
            out = be.conv_bias_act(x, w, b, WINO, None, True)
        assert _rel(out, F.conv2d(x, w, b, 1, 1).relu()) < WINO_TOL32[4]
        chosen = next(v for k, v in cpu_conv.choices().items() if k[0] == "inference" and k[1] == tuple(x.shape))
        cached = {k[0] for k in getattr(w, cpu_backend._WINO_ATTR, {}) if k != "version"}
        assert cached <= {t for t, name in cpu_conv.WINOGRAD.items() if name == chosen}
        if chosen != "onednn":  # oneDNN's packs of w go too
            assert set(getattr(w, cpu_backend._PACK_ATTR, {})) <= {"version"}


@pytest.mark.parametrize("name", ["winograd", "winograd4"])
def test_fused_model_eval_with_winograd_matches_eager(algo, name):
    algo(name)
    from resfuse import reference
    ref = randomize_bn(reference.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        want = copy.deepcopy(ref).double()(x.double())
        fused = layout.channels_last(resfuse.fuse(ref))
        got = fused(x)
        plain = ref(x)
    assert _rel(got, want) < max(4 * _rel(plain, want), 1e-5)


@pytest.mark.parametrize("name", ["auto", "gemm", pytest.param("matmul", marks=needs_matmul)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [6, 7])
def test_gemm_input_grad_add(algo, stride, hw, name, monkeypatch):
    """``acc += dL/dx`` of a 1x1 (strided) convolution, added in place into a channels_last gradient
    by the algorithm measured (``auto``) or forced for the convolution's input gradient: its first
    call decides (a trial under ``auto``) and adds the gradient; later calls with a GEMM engine
    add the product straight into ``acc`` (no input-sized gradient)."""
    algo(name)
    dtype, tol = (torch.float32, 1e-5) if name == "matmul" else (torch.float64, 1e-12)
    x, w = _cl(2, 5, hw, hw, dtype=dtype), _cl(3, 5, 1, 1, dtype=dtype)
    g = ConvGeom((stride, stride), (0, 0), (1, 1), 1)
    gy = _cl(*F.conv2d(x, w, None, stride).shape, dtype=dtype)
    full = []
    real = cpu_conv.gemm_input_grad
    monkeypatch.setattr(cpu_conv, "gemm_input_grad", lambda *a: full.append(a[4]) or real(*a))
    for call in range(3):
        acc = _cl(2, 5, hw, hw, dtype=dtype)
        want = acc.double() + _aten_backward(gy.double(), x.double(), w.double(), g)[0]
        ptr = acc.data_ptr()
        assert cpu_conv.gemm_input_grad_add_(acc, gy, x, w, g)
        assert acc.data_ptr() == ptr and _rel(acc, want) < tol
        if call == 0:
            chosen = cpu_conv._memoised("input_grad", cpu_conv._key(x, w, g, gy))
            assert chosen == name or name == "auto"
            n_full = len(full)
    assert len(full) == n_full  # after the first call: no full-size gradient (or oneDNN's, when it won)
    assert not cpu_conv.gemm_input_grad_add_(acc.contiguous(), gy, x, w, g)  # NCHW: not handled here
    cpu_conv.set_algo("onednn")
    assert not cpu_conv.gemm_input_grad_add_(acc, gy, x, w, g)  # oneDNN forced: not here either


@needs_matmul
@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_fused_block_train_with_matmul_matches_float64(algo, monkeypatch, kind):
    """A fused ResNet block with a strided projection, trained in float32 with every GEMM form by
    oneDNN's matmul: output, input and parameter gradients within 4x plain float32 PyTorch's error
    against float64; the matmul forms ran (forward, input and weight gradients, the projection's
    input gradient added into the block's)."""
    algo("matmul")
    ran = []
    real = cpu_conv.onednn_mm
    monkeypatch.setitem(cpu_conv._MM, "matmul", lambda a, b: ran.append(1) or real(a, b))
    torch.manual_seed(0)
    make = resfuse.reference.Bottleneck if kind == "bottleneck" else resfuse.reference.BasicBlock
    cin, planes = (64, 32) if kind == "bottleneck" else (32, 64)
    down = torch.nn.Sequential(torch.nn.Conv2d(cin, planes * make.expansion, 1, 2, bias=False),
                               torch.nn.BatchNorm2d(planes * make.expansion))
    ref = randomize_bn(make(cin, planes, 2, down)).train()
    x = torch.randn(4, cin, 9, 9)
    g = torch.randn(4, planes * make.expansion, 5, 5)

    def run(model, inp, grad):
        inp = inp.clone().requires_grad_()
        out = model(inp)
        out.backward(grad)
        return [out.detach(), inp.grad] + [p.grad for p in model.parameters()]

    want = run(copy.deepcopy(ref).double(), x.double(), g.double())
    plain = run(copy.deepcopy(ref), x, g)
    with resfuse.use_backend("cpu"):
        fused = layout.channels_last(resfuse.fuse(copy.deepcopy(ref)))
        got = run(fused, x.contiguous(memory_format=CL), g.contiguous(memory_format=CL))
    assert len(ran) >= 3
    for i, (gf, gp, gw) in enumerate(zip(got, plain, want)):
        assert _rel(gf, gw) < max(4 * _rel(gp, gw), 1e-5), i


def test_explain_reports_the_choices(algo):
    algo("auto")
    x, w = _cl(2, 8, 6, 6, dtype=torch.float32), _cl(8, 8, 3, 3, dtype=torch.float32)
    cpu_conv.forward(x, w, WINO)
    report = resfuse.explain()
    assert "cpu convolutions: auto (RESFUSE_CPU_CONV); measured choices for 1 shapes:" in report


# -- resfuse::conv_weight_grad (csrc/cpu/conv_weight_grad.cpp) ---------------------------------------------
WGRAD_GEOMS = [  # (N, Ci, Co, H, W, (kh, kw), stride, padding, dilation)
    (2, 5, 7, 9, 7, (3, 3), (2, 1), (1, 0), (1, 1)), (1, 3, 70, 7, 9, (7, 5), (2, 2), (3, 2), (1, 1)),
    (2, 8, 6, 9, 9, (3, 3), (1, 1), (2, 2), (2, 2)), (3, 16, 65, 5, 5, (1, 1), (2, 2), (0, 0), (1, 1)),
    (1, 17, 3, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1)), (2, 4, 96, 6, 6, (3, 3), (3, 3), (4, 4), (1, 1)),
    # a tap's positions in pieces: of 5 images (3 pieces), of 17 rows of one 30x30 image (2 per
    # image); 256 output channels: each tap in two channel ranges at 2 threads
    (12, 128, 128, 10, 10, (3, 3), (1, 1), (1, 1), (1, 1)), (2, 128, 128, 30, 30, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 16, 256, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1)),
]


@pytest.mark.skipif(not _extension.LOADED, reason="resfuse._C not built")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("geom", WGRAD_GEOMS, ids=lambda c: "x".join(map(str, c)))
def test_conv_weight_grad_matches_float64(geom, channels_last, dtype, threads):
    """Against ATen's float64 weight gradient: odd sizes, asymmetric strides and paddings, taps that
    only see padding (zero slices), more output channels than one split (co ranges), NCHW operands
    (copied once), 1 and 2 threads."""
    n, ci, co, h, w_, k, s, p, d = geom
    fmt = CL if channels_last else torch.contiguous_format
    x = torch.randn(n, ci, h, w_, dtype=torch.float64).contiguous(memory_format=fmt)
    w = torch.randn(co, ci, *k, dtype=torch.float64)
    y = F.conv2d(x, w, None, s, p, d)
    gy = torch.randn(y.shape, dtype=torch.float64).contiguous(memory_format=fmt)
    want = torch.ops.aten.convolution_backward(gy, x, w, None, list(s), list(p), list(d), False, [0, 0], 1,
                                               [False, True, False])[1]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.resfuse.conv_weight_grad(gy.to(dtype), x.to(dtype), list(k), list(s), list(p), list(d))
    finally:
        torch.set_num_threads(old)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous(memory_format=CL)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert _rel(got, want) < tol


@pytest.mark.skipif(not _extension.LOADED, reason="resfuse._C not built")
def test_opcheck_conv_weight_grad():
    for dtype, fmt in [(torch.float32, CL), (torch.float64, torch.contiguous_format), (torch.bfloat16, CL)]:
        x = torch.randn(2, 5, 7, 6, dtype=dtype).contiguous(memory_format=fmt)
        gy = torch.randn(2, 4, 4, 6, dtype=dtype).contiguous(memory_format=fmt)
        torch.library.opcheck(torch.ops.resfuse.conv_weight_grad.default, (gy, x, [3, 3], [2, 1], [1, 1], [1, 1]))


def _bad_wgrad():
    x, gy = _cl(2, 5, 7, 6, dtype=torch.float32), _cl(2, 4, 4, 6, dtype=torch.float32)
    op = torch.ops.resfuse.conv_weight_grad
    geo = ([3, 3], [2, 1], [1, 1], [1, 1])
    return [
        ("rank", lambda: op(gy, x[0], *geo), r"resfuse::conv_weight_grad: input must be a 4-D"),
        ("int dtype", lambda: op(gy, x.long(), *geo), r"input must be float32, float64, bfloat16 or float16"),
        ("dtype mismatch", lambda: op(gy.double(), x, *geo), r"grad_output must have the dtype of input"),
        ("grad_output shape", lambda: op(gy[:, :, :3], x, *geo),
         r"grad_output must have shape \[2, Co, 4, 6\] for input \[2, 5, 7, 6\], got \[2, 4, 3, 6\]"),
        ("kernel too large", lambda: op(gy, x, [11, 3], [1, 1], [1, 1], [1, 1]), r"is larger than the padded input"),
        ("stride", lambda: op(gy, x, [3, 3], [0, 1], [1, 1], [1, 1]), r"stride and dilation must be positive"),
        ("pairs", lambda: op(gy, x, [3, 3, 3], [2, 1], [1, 1], [1, 1]), r"must have 2 elements each"),
    ]




# -- resfuse::winograd_weight_grad (csrc/cpu/winograd.cpp) ---------------------------------------------------
@pytest.mark.skipif(not _extension.LOADED, reason="resfuse._C not built")
@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", WINO_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_weight_grad_matches_aten(tile, shape, dtype, chunk):
    """``G^T (dL/dU) G`` against ATen's float64 weight gradient: odd and 1x1 maps (tiles cropped at
    the edges), chunks of one tile, a few tiles and all of them."""
    n, ci, co, h, w_ = shape
    x = _cl(n, ci, h, w_)
    w = _cl(co, ci, 3, 3)
    gy = _cl(n, co, h, w_)
    want = _aten_backward(gy, x, w, WINO)[1]
    du = torch.ops.resfuse.winograd_weight_grad(gy.to(dtype), x.to(dtype), chunk, tile)
    p = (tile + 2) ** 2
    assert du.shape == (p, co, ci)
    tol = 1e-12 if dtype == torch.float64 else {2: 5e-6, 4: 1e-5}[tile]
    got = (cpu_conv._kron_g(dtype, tile).t() @ du.view(p, -1)).view(3, 3, co, ci).permute(2, 3, 0, 1)
    assert _rel(got, want) < tol
    gw = cpu_conv.winograd_weight_grad(gy.to(dtype), x.to(dtype), tile)  # its own chunk; channels_last out
    assert gw.shape == want.shape and gw.dtype == dtype and gw.is_contiguous(memory_format=CL)
    assert _rel(gw, want) < tol


@pytest.mark.skipif(not _extension.LOADED, reason="resfuse._C not built")
@pytest.mark.parametrize("tile", [2, 4])
def test_opcheck_winograd_weight_grad(tile):
    for dtype in (torch.float32, torch.float64):
        x, gy = _cl(2, 5, 7, 6, dtype=dtype), _cl(2, 3, 7, 6, dtype=dtype)
        torch.library.opcheck(torch.ops.resfuse.winograd_weight_grad.default, (gy, x, 4, tile))


def _bad_winograd_wgrad():
    x, gy = _cl(2, 5, 7, 6, dtype=torch.float32), _cl(2, 3, 7, 6, dtype=torch.float32)
    op = torch.ops.resfuse.winograd_weight_grad
    return [
        ("nchw input", lambda: op(gy, x.contiguous(), 4, 2), r"input must be dense channels_last"),
        ("nchw grad_output", lambda: op(gy.contiguous(), x, 4, 2), r"grad_output must be dense channels_last"),
        ("bf16", lambda: op(gy.bfloat16(), x.bfloat16(), 4, 2), r"input must be float32 or float64"),
        ("dtype mismatch", lambda: op(gy.double(), x, 4, 2), r"grad_output must have the dtype of input"),
        ("grad_output shape", lambda: op(gy[:, :, :6], x, 4, 2),
         r"grad_output must have shape \[2, Co, 7, 6\] \(3x3, stride 1, padding 1\)"),
        ("chunk", lambda: op(gy, x, 0, 2), r"chunk must be positive"),
        ("tile", lambda: op(gy, x, 4, 6), r"resfuse::winograd_weight_grad: tile must be 2 .* or 4 .*, got 6"),
        ("rank", lambda: op(gy, x[0], 4, 2), r"resfuse::winograd_weight_grad: input must be a 4-D"),
    ]


def _bad_cases():
    """Bad arguments of the CPU convolution ops: each raises naming the op and the argument."""
    return ([("winograd_conv: " + n, c, m) for n, c, m in _bad_winograd()]
            + [("conv_weight_grad: " + n, c, m) for n, c, m in _bad_wgrad()]
            + [("winograd_weight_grad: " + n, c, m) for n, c, m in _bad_winograd_wgrad()])


@pytest.mark.skipif(not _extension.LOADED, reason="resfuse._C not built")
@pytest.mark.parametrize("case", range(24), ids=[c[0] for c in _bad_cases()] if _extension.LOADED else None)
def test_conv_ops_bad_input(case):
    _, call, message = _bad_cases()[case]
    with pytest.raises(RuntimeError, match=message):
        call()
