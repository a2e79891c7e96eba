"""The fused ResNet stem: ``torch.ops.resfuse.bn_act_max_pool`` / ``max_pool_act_backward`` (C++ CPU
kernels) against ATen's max-pool and the float64 reference, and ``resfuse.functional.conv_bn_act_pool``
(conv -> BN -> ReLU -> max-pool as one autograd node) against plain PyTorch modules."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resfuse
import resfuse.ops.bn_act as ops
from resfuse import _extension
from resfuse import functional as RF
from resfuse.reference import primitives as ref
from resfuse.testing import assert_close_ref, assert_error_ratio, rand_activation, randomize_bn, to64, tolerance

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason=f"resfuse._C not built: {_extension.ERROR}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = [pytest.param(False, id="nchw"), pytest.param(True, id="nhwc")]
SHAPES = [(1, 3, 7, 7), (2, 5, 9, 8), (3, 17, 1, 1), (2, 64, 7, 6), (2, 19, 12, 13)]
POOLS = [((3, 3), (2, 2), (1, 1)), ((2, 2), (2, 2), (0, 0)), ((3, 2), (1, 2), (1, 0)), ((1, 1), (1, 1), (0, 0))]


def _vectors(C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(C, generator=g).to(pd), torch.randn(C, generator=g).to(pd)


def _fits(shape, pool):
    (kh, kw), _, (ph, pw) = pool
    return shape[2] + 2 * ph >= kh and shape[3] + 2 * pw >= kw


def _aten_pool(out, pool):
    """ATen's max-pool of ``out`` and its indices as window-local uint8 (255 where the max is <= 0)."""
    k, s, p = pool
    pooled, flat = F.max_pool2d(out, k, s, p, return_indices=True)
    local = ref._window_local(flat, out.shape[3], pooled, k, s, p)
    return pooled, torch.where(pooled <= 0, torch.full_like(local, 255), local).to(torch.uint8)


def _cases():
    return [(s, p) for s in SHAPES for p in POOLS if _fits(s, p)]


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,pool", _cases(), ids=str)
def test_forward_is_aten_max_pool_of_bn_act(shape, pool, dtype, channels_last):
    """Exactly ATen's max-pool (values and argmax, ties included) of the op's own bn_act output, and
    the float64 reference within the dtype's tolerance."""
    x = rand_activation(shape, dtype, channels_last)
    scale, shift = _vectors(shape[1], dtype)
    out, argmax = ops.bn_act_max_pool(x, scale, shift, *pool)
    want, want_arg = _aten_pool(ops.bn_act(x, scale, shift, None, None, True), pool)
    assert torch.equal(out, want) and torch.equal(argmax, want_arg)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and argmax.is_contiguous(memory_format=fmt)
    assert argmax.dtype == torch.uint8 and out.dtype == dtype
    assert_close_ref(out, ref.bn_act_max_pool(x, scale, shift, *pool)[0], dtype)


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,pool", _cases(), ids=str)
def test_backward_matches_aten(shape, pool, dtype, channels_last):
    """Gradient routed like ATen's max-pool backward followed by ReLU's, overlapping windows summed;
    the reference composite agrees; every element written (no zero fill left to chance)."""
    x = rand_activation(shape, dtype, channels_last)
    scale, shift = _vectors(shape[1], dtype, seed=1)
    out, argmax = ops.bn_act_max_pool(x, scale, shift, *pool)
    gy = rand_activation(out.shape, dtype, channels_last)
    for _ in range(3):  # leave NaN-filled blocks in the allocator for the op's output to land on
        del _
        torch.full(x.shape, float("nan"), dtype=dtype)
    got = ops.max_pool_act_backward(gy, argmax, x, *pool)
    z = ops.bn_act(x, scale, shift, None, None, False).double().requires_grad_()
    F.max_pool2d(torch.relu(z).to(dtype).double(), *pool).backward(gy.double())
    assert got.shape == x.shape and got.dtype == dtype and not got.isnan().any()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)
    assert_close_ref(got, z.grad, dtype, name="grad")
    assert torch.equal(got == 0, z.grad == 0)
    assert_close_ref(ref.max_pool_act_backward(gy, argmax, x, *pool), z.grad, dtype, name="reference grad")


@pytest.mark.parametrize("channels_last", LAYOUTS)
def test_ties_nan_and_dead_windows(channels_last):
    """Equal maxima: the first in row-major window order (ATen's); all-negative windows: no
    gradient (255); NaN: pooled NaN, argmax at the NaN, the gradient passes (as ReLU's does)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.ones(1, 2, 5, 5).contiguous(memory_format=fmt)
    x[0, 1] = -1.0
    x[0, 0, 3, 3] = float("nan")
    one, zero = torch.ones(2), torch.zeros(2)
    out, argmax = ops.bn_act_max_pool(x, one, zero, (3, 3), (2, 2), (1, 1))
    want, want_arg = _aten_pool(ops.bn_act(x, one, zero, None, None, True), ((3, 3), (2, 2), (1, 1)))
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.nan_to_num())
    assert torch.equal(argmax, want_arg)
    assert out[0, 0, 2, 2].isnan() and out[0, 0, 1, 1].isnan()
    assert (argmax[0, 1] == 255).all() and (out[0, 1] == 0).all()
    assert argmax[0, 0, 0, 0] == 4  # padded window: its first in-image element
    g = ops.max_pool_act_backward(torch.ones_like(out), argmax, x, (3, 3), (2, 2), (1, 1))
    assert g[0, 0, 3, 3] == 4 and (g[0, 1] == 0).all()


@pytest.mark.parametrize("channels_last", LAYOUTS)
def test_threads_do_not_change_results(channels_last):
    x = rand_activation((4, 24, 30, 30), torch.float32, channels_last)
    scale, shift = _vectors(24, torch.float32)
    prev = torch.get_num_threads()
    try:
        res = []
        for t in (1, 2):
            torch.set_num_threads(t)
            out, arg = ops.bn_act_max_pool(x, scale, shift, (3, 3), (2, 2), (1, 1))
            res.append((out, arg, ops.max_pool_act_backward(out, arg, x, (3, 3), (2, 2), (1, 1))))
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(a, b) for a, b in zip(*res))


@pytest.mark.parametrize("op", ["bn_act_max_pool", "max_pool_act_backward"])
def test_opcheck(op):
    for dtype in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            x = rand_activation((2, 5, 7, 6), dtype, cl)
            scale, shift = _vectors(5, dtype)
            pool = ([3, 3], [2, 2], [1, 1])
            if op == "bn_act_max_pool":
                args = (x, scale, shift, *pool)
            else:
                out, arg = ops.bn_act_max_pool(x, scale, shift, *pool)
                args = (torch.randn_like(out), arg, x, *pool)
            torch.library.opcheck(getattr(torch.ops.resfuse, op).default, args)


def _bad_cases():
    x = torch.randn(2, 3, 8, 8)
    v = torch.randn(3)
    out, arg = ops.bn_act_max_pool(x, v, v, (3, 3), (2, 2), (1, 1))
    fwd, bwd = torch.ops.resfuse.bn_act_max_pool, torch.ops.resfuse.max_pool_act_backward
    return [
        ("scale shape", lambda: fwd(x, v[:2], v, [3, 3], [2, 2], [1, 1]), r"scale must have shape \[C\] = \[3\]"),
        ("int input", lambda: fwd(x.int(), v, v, [3, 3], [2, 2], [1, 1]), r"input must be float32, float64"),
        ("rank", lambda: fwd(x[0], v, v, [3, 3], [2, 2], [1, 1]), r"input must be a 4-D"),
        ("padding", lambda: fwd(x, v, v, [3, 3], [2, 2], [2, 2]), r"padding must be between 0 and half"),
        ("stride", lambda: fwd(x, v, v, [3, 3], [0, 2], [1, 1]), r"kernel_size and stride must be positive"),
        ("big kernel", lambda: fwd(torch.randn(1, 3, 20, 20), v, v, [16, 16], [1, 1], [0, 0]),
         r"has more than 255 elements"),
        ("kernel > input", lambda: fwd(x, v, v, [11, 3], [1, 1], [1, 1]), r"larger than the padded input"),
        ("grad shape", lambda: bwd(out[:, :, :3], arg, x, [3, 3], [2, 2], [1, 1]),
         r"grad_output must have the pooled shape \[2, 3, 4, 4\]"),
        ("argmax dtype", lambda: bwd(out, arg.long(), x, [3, 3], [2, 2], [1, 1]), r"argmax must be uint8"),
        ("grad dtype", lambda: bwd(out.double(), arg, x, [3, 3], [2, 2], [1, 1]), r"grad_output must have the dtype"),
    ]


@pytest.mark.parametrize("case", range(10), ids=[c[0] for c in _bad_cases()])
def test_bad_input(case):
    _, fn, msg = _bad_cases()[case]
    with pytest.raises(RuntimeError, match=msg):
        fn()


# ------------------------------------------------------------------------------- the fused stem

def _stem(cin=3, cout=8, dtype=torch.float32, channels_last=False, pool=None):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 7, 2, 3, bias=False)
    bn = nn.BatchNorm2d(cout)
    randomize_bn(nn.Sequential(bn))
    mods = [conv.to(dtype), bn.to(dtype if dtype == torch.float64 else torch.float32)]
    if channels_last:
        mods[0] = mods[0].to(memory_format=torch.channels_last)
    return mods[0], mods[1], pool or nn.MaxPool2d(3, 2, 1)


def _plain(x, conv, bn, pool):
    return pool(torch.relu(bn(conv(x))))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval_grad"])
def test_stem_matches_plain(backend, dtype, channels_last, train):
    """Output, input/weight/gamma/beta gradients, running stats and num_batches_tracked against plain
    PyTorch in float64 (bfloat16: against plain PyTorch's own bfloat16 error)."""
    conv, bn, pool = _stem(dtype=dtype, channels_last=channels_last)
    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    bn.train(train), bn64.train(train)
    x = rand_activation((2, 3, 21, 19), dtype, channels_last).requires_grad_()
    (x64,) = to64(x)
    with resfuse.use_backend(backend):
        out = RF.conv_bn_act_pool(x, conv, bn, pool)
    out64 = _plain(x64, conv64, bn64, pool)
    assert out.dtype == dtype and out.shape == out64.shape
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g.to(dtype))
    out64.backward(g)
    grads = [("x", x.grad, x64.grad), ("conv", conv.weight.grad, conv64.weight.grad),
             ("gamma", bn.weight.grad, bn64.weight.grad), ("beta", bn.bias.grad, bn64.bias.grad)]
    if dtype == torch.bfloat16:
        conv_p, bn_p = copy.deepcopy(conv), copy.deepcopy(bn)
        for p in (conv_p.weight, bn_p.weight, bn_p.bias):
            p.grad = None
        bn_p.running_mean.copy_(bn64.running_mean), bn_p.running_var.copy_(bn64.running_var)
        xp = x.detach().clone().requires_grad_()
        _plain(xp, conv_p, bn_p, pool).backward(g.to(dtype))
        plain = [xp.grad, conv_p.weight.grad, bn_p.weight.grad, bn_p.bias.grad]
        assert_error_ratio(out, out64.to(dtype), out64, k=3, floor=2e-2, l2=True, name="out")
        for (name, a, e), p in zip(grads, plain):
            assert_error_ratio(a, p, e, k=3, floor=2e-2, l2=True, name=name)
    else:
        assert_close_ref(out, out64, dtype, name="out")
        for name, a, e in grads:
            assert_close_ref(a, e, dtype, rtol=1e-8 if dtype == torch.float64 else 1e-4, name=name)
    tol = max(tolerance(dtype), 1e-5)
    assert_close_ref(bn.running_mean, bn64.running_mean, torch.float32, rtol=tol, name="running_mean")
    assert_close_ref(bn.running_var, bn64.running_var, torch.float32, rtol=tol, name="running_var")
    assert bn.num_batches_tracked.item() == bn64.num_batches_tracked.item()


def test_stem_saves_no_full_size_activation():
    """The node keeps the input, the uint8 argmax and the weights: the conv output is recomputed in
    backward and neither the ReLU output nor int64 indices are saved."""
    conv, bn, pool = _stem(cout=16, channels_last=True)
    x = rand_activation((2, 3, 32, 32), torch.float32, True).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with resfuse.use_backend("cpu"):
            out = RF.conv_bn_act_pool(x, conv, bn, pool)
    params = {p.data_ptr() for p in (conv.weight, bn.weight, bn.bias)}
    big = [t for t in saved if t.numel() > out.numel() and t.data_ptr() not in params | {x.data_ptr()}]
    assert not big, [(t.shape, t.dtype) for t in big]
    assert any(t.dtype == torch.uint8 and t.shape == out.shape for t in saved)
    out.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


def test_stem_gradcheck_float64():
    conv, bn, pool = _stem(cin=2, cout=3, dtype=torch.float64)
    bn.track_running_stats = False  # gradcheck evaluates many times; keep the function pure
    bn.running_mean = bn.running_var = None
    x = rand_activation((2, 2, 9, 8), torch.float64).requires_grad_()

    def f(x, w, gamma, beta):
        c2, b2 = copy.deepcopy(conv), copy.deepcopy(bn)
        del c2.weight, b2.weight, b2.bias
        c2.weight, b2.weight, b2.bias = w, gamma, beta
        with resfuse.use_backend("cpu"):
            return RF.conv_bn_act_pool(x, c2, b2, pool)

    params = [p.detach().clone().requires_grad_() for p in (conv.weight, bn.weight, bn.bias)]
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("pool", ["ceil_mode", "dilation", "indices", "hook", "avgpool"])
def test_unfusable_pool_is_called_as_a_module(pool):
    """Any other pooling module (or one with hooks) runs after the fused conv-BN-ReLU, as itself."""
    calls = []
    mod = {"ceil_mode": nn.MaxPool2d(3, 2, 1, ceil_mode=True), "dilation": nn.MaxPool2d(3, 2, 1, dilation=2),
           "indices": nn.MaxPool2d(3, 2, 1), "hook": nn.MaxPool2d(3, 2, 1), "avgpool": nn.AvgPool2d(3, 2, 1)}[pool]
    if pool == "hook":
        mod.register_forward_hook(lambda *a: calls.append(1))
    conv, bn, _ = _stem()
    assert (RF._pool_geom(mod) is None) == (pool != "indices")
    x = rand_activation((2, 3, 20, 20)).requires_grad_()
    with resfuse.use_backend("cpu"):
        out = RF.conv_bn_act_pool(x, conv, bn, mod)
    want = _plain(x, copy.deepcopy(conv), copy.deepcopy(bn), mod)
    assert_close_ref(out, want, torch.float32)
    if pool == "hook":
        assert len(calls) == 2


def test_stem_eval_no_grad_and_compile():
    """Inference (folded BN, oneDNN) and torch.compile(fullgraph) of the training node agree with eager."""
    conv, bn, pool = _stem(channels_last=True)
    x = rand_activation((2, 3, 24, 24), torch.float32, True)
    bn.eval()
    with torch.no_grad(), resfuse.use_backend("cpu"):
        assert_close_ref(RF.conv_bn_act_pool(x, conv, bn, pool), _plain(x, conv, bn, pool), torch.float32)
    bn.train()
    torch._dynamo.reset()

    def f(x):
        with resfuse.use_backend("cpu"):
            return RF.conv_bn_act_pool(x, conv, bn, pool)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c = compiled(xc)
    out_e = f(xe)
    assert_close_ref(out_c, out_e, torch.float32, rtol=1e-5)
    out_c.square().sum().backward()
    out_e.square().sum().backward()
    assert_close_ref(xc.grad, xe.grad, torch.float32, rtol=1e-4, name="grad x")
