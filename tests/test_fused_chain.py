"""The fused conv-BN chain (resfuse.functional / ops/chain.py) against plain PyTorch modules in float64.

Each case builds conv/BN modules with random weights and random running statistics, runs the fused
unit in the test dtype on every backend that can run on CPU, and the same modules (deep-copied to
float64) through plain PyTorch; outputs, every gradient, running stats and num_batches_tracked must
agree within the dtype's tolerance.
"""
import contextlib
import copy
import weakref

import pytest
import torch
from torch import nn

import resfuse
from resfuse import backends
from resfuse import functional as RF
from resfuse.ops import chain
from resfuse.testing import assert_close_ref, assert_error_ratio, rand_activation, rel_error_l2, tolerance


def _backends():
    out = ["reference-prims"]
    if backends.instance("cpu")[0] is not None:
        out.append("cpu")
    return out


def run_fused(backend, x, layers, shortcut, relu, weights=None):
    """The fused path on ``backend`` ("reference-prims" = the chain with the plain-PyTorch primitives)."""
    if backend == "reference-prims":
        return RF._dispatch(backends.instance("reference")[0], x, layers, shortcut, relu, None, weights)
    with resfuse.use_backend(backend):
        return RF.conv_bn_chain(x, layers, shortcut, relu, weights)


def make_layers(channels, kernels, strides, *, groups=1, dilation=1, momentum=0.1, affine=True,
                track=True, dtype=torch.float32):
    layers = []
    for i, (k, s) in enumerate(zip(kernels, strides)):
        cin, cout = channels[i], channels[i + 1]
        conv = nn.Conv2d(cin, cout, k, s, dilation * (k // 2), dilation, groups if k == 3 else 1, bias=False)
        bn = nn.BatchNorm2d(cout, momentum=momentum, affine=affine, track_running_stats=track)
        with torch.no_grad():
            if affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
            if track:
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
        layers.append((conv.to(dtype), bn.double() if dtype == torch.float64 else bn))
    return layers


def to64(layers):
    return [(copy.deepcopy(c).double(), copy.deepcopy(b).double()) for c, b in layers]


def check_case(backend, layers, x, shortcut_kind, relu=True, train=True, dtype=torch.float32,
               channels_last=False, grad=True, grad_l2=None):
    """Run fused (dtype) vs plain (float64) and compare everything. ``grad_l2``: compare the
    gradients by their L2 relative error against this bound instead (a ReLU mask element that rounding
    flipped moves single gradient elements by O(1); in bfloat16 it also decides which of plain
    PyTorch's and resfuse's errors is larger on a small map)."""
    ref_layers = to64(layers)
    proj = None
    if shortcut_kind == "projection":
        proj = make_layers([layers[0][0].in_channels, layers[-1][0].out_channels], [1],
                           [_total_stride(layers)], dtype=dtype)[0]
        proj_ref = to64([proj])[0]
    for (c, b), (c64, b64) in zip(layers + ([proj] if proj else []), ref_layers + ([proj_ref] if proj else [])):
        b.train(train)
        b64.train(train)
    x = x.detach().requires_grad_(grad)
    x64 = x.detach().double().requires_grad_(grad)
    res = res64 = None
    if shortcut_kind == "tensor":
        out_shape = _out_shape(layers, x)
        r = rand_activation(out_shape, dtype, channels_last)
        res, res64 = r.requires_grad_(grad), r.detach().double().requires_grad_(grad)
    elif shortcut_kind == "identity":
        res, res64 = x, x64
    elif shortcut_kind == "projection":
        res, res64 = (x, *proj), (x64, *proj_ref)

    with torch.set_grad_enabled(grad):
        out = run_fused(backend, x, layers, res, relu)
        out64 = RF._plain(x64, ref_layers, res64, relu)
    assert out.dtype == dtype
    assert out.shape == out64.shape
    if channels_last and out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    tol = tolerance(dtype)
    assert_close_ref(out, out64, dtype, name="out")
    mods = layers + ([proj] if proj else [])
    mods64 = ref_layers + ([proj_ref] if proj else [])
    if grad:
        g = torch.randn(out.shape, dtype=torch.float64)
        out.backward(g.to(dtype))
        out64.backward(g)
        grads = [("grad x", x.grad, x64.grad)]
        if shortcut_kind == "tensor":
            grads.append(("grad residual", res.grad, res64.grad))
        for i, ((c, b), (c64, b64)) in enumerate(zip(mods, mods64)):
            grads.append((f"grad conv{i}.weight", c.weight.grad, c64.weight.grad))
            if b.affine:
                grads += [(f"grad bn{i}.weight", b.weight.grad, b64.weight.grad),
                          (f"grad bn{i}.bias", b.bias.grad, b64.bias.grad)]
        if grad_l2 is not None:
            for name, a, e in grads:
                err = rel_error_l2(a, e)
                assert err <= grad_l2, f"{name}: L2 relative error {err:.3e} > {grad_l2:.1e} ({dtype})"
        elif dtype in (torch.float64, torch.float32):
            # gradients are a few reductions deeper than the forward
            gtol = 1e-8 if dtype == torch.float64 else 1e-4
            for name, a, e in grads:
                assert_close_ref(a, e, dtype, rtol=gtol, name=name)
        else:
            # low precision: a ReLU mask flipped by rounding moves single elements, so compare in L2
            # against plain PyTorch's own error in the same dtype
            plain = _plain_lowp(layers, proj, x, res, shortcut_kind, relu, g, dtype, train)
            for (name, a, e), p in zip(grads, plain):
                assert_error_ratio(a, p, e, k=3, name=name, floor=2e-2, l2=True)
    for i, ((c, b), (c64, b64)) in enumerate(zip(mods, mods64)):
        if b.track_running_stats:
            assert_close_ref(b.running_mean, b64.running_mean, torch.float32, rtol=max(tol, 1e-5),
                             name=f"bn{i}.running_mean")
            assert_close_ref(b.running_var, b64.running_var, torch.float32, rtol=max(tol, 1e-5),
                             name=f"bn{i}.running_var")
            assert b.num_batches_tracked.item() == b64.num_batches_tracked.item()


def _plain_lowp(layers, proj, x, res, kind, relu, g, dtype, train):
    """Plain PyTorch's gradients in ``dtype`` (same modules, fresh copies), ordered like check_case's."""
    lp = [(copy.deepcopy(c), copy.deepcopy(b)) for c, b in layers]
    pj = (copy.deepcopy(proj[0]), copy.deepcopy(proj[1])) if proj else None
    for c, b in lp + ([pj] if pj else []):
        c.weight.grad = None
        b.train(train)
        if b.affine:
            b.weight.grad = b.bias.grad = None
    xl = x.detach().clone().requires_grad_()
    rl = None
    if kind == "tensor":
        rl = res.detach().clone().requires_grad_()
    elif kind == "identity":
        rl = xl
    elif kind == "projection":
        rl = (xl, *pj)
    out = RF._plain(xl, lp, rl, relu)
    out.backward(g.to(dtype))
    grads = [xl.grad] + ([rl.grad] if kind == "tensor" else [])
    for c, b in lp + ([pj] if pj else []):
        grads.append(c.weight.grad)
        if b.affine:
            grads += [b.weight.grad, b.bias.grad]
    return grads


def _total_stride(layers):
    s = 1
    for c, _ in layers:
        s *= c.stride[0]
    return s


def _out_shape(layers, x):
    h, w = x.shape[2], x.shape[3]
    for c, _ in layers:
        h, w = RF._out_hw(h, w, c)
    return (x.shape[0], layers[-1][0].out_channels, h, w)


BACKENDS = _backends()


@pytest.fixture(params=["save", "recompute"])
def recompute(request, monkeypatch):
    """Run a test with every conv output saved, then with the last conv's (and the projection's)
    recomputed in backward — whatever ``chain._cheap`` would pick for the shape."""
    monkeypatch.setattr(chain, "RECOMPUTE_MACS_PER_BYTE", 0 if request.param == "save" else 10 ** 9)
    return request.param


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", ["basic", "bottleneck", "single"])
def test_chain_blocks(backend, dtype, channels_last, train, kind, recompute):
    if kind == "basic":
        layers = make_layers([5, 5, 5], [3, 3], [1, 1], dtype=dtype)
        shortcut = "identity"
    elif kind == "bottleneck":
        layers = make_layers([8, 3, 3, 8], [1, 3, 1], [1, 1, 1], dtype=dtype)
        shortcut = "identity"
    else:
        layers = make_layers([3, 17], [3], [1], dtype=dtype)
        shortcut = "none"
    x = rand_activation((2, layers[0][0].in_channels, 7, 9), dtype, channels_last)
    check_case(backend, layers, x, shortcut, train=train, dtype=dtype, channels_last=channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shortcut", ["projection", "tensor", "none"])
@pytest.mark.parametrize("train", [True, False])
def test_chain_shortcuts_stride2(backend, shortcut, train, recompute):
    layers = make_layers([4, 6, 6], [3, 3], [2, 1])
    x = rand_activation((3, 4, 9, 9))
    check_case(backend, layers, x, shortcut, train=train)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(momentum=None), dict(affine=False), dict(track=False),
                                  dict(groups=2), dict(dilation=2)])
def test_chain_bn_options(backend, opts):
    groups = opts.pop("groups", 1)
    dilation = opts.pop("dilation", 1)
    layers = make_layers([4, 6, 4], [3, 3], [1, 1], groups=groups, dilation=dilation, **opts)
    x = rand_activation((2, 4, 8, 8))
    for step in range(2):  # twice: momentum=None is a cumulative average
        check_case(backend, layers, x, "identity", train=True)
        for c, b in layers:
            c.weight.grad = None
            if b.affine:
                b.weight.grad = b.bias.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [True, False])
def test_inference_path(backend, relu):
    """Eval without grad runs BN folded into the conv (conv_bias_act)."""
    layers = make_layers([3, 8, 8, 8], [7, 3, 1], [2, 1, 1])
    x = rand_activation((1, 3, 17, 17))
    check_case(backend, layers, x, "projection", relu=relu, train=False, grad=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_override(backend):
    """``weights=`` replaces conv.weight and receives the gradient."""
    layers = make_layers([4, 4], [3], [1], dtype=torch.float64)
    w = torch.randn_like(layers[0][0].weight, requires_grad=True)
    x = rand_activation((2, 4, 6, 6), torch.float64)
    out = run_fused(backend, x, layers, None, True, weights=[w])
    ref_conv = copy.deepcopy(layers[0][0])
    with torch.no_grad():
        ref_conv.weight.copy_(w)
    ref = torch.relu(copy.deepcopy(layers[0][1])(ref_conv(x)))
    assert_close_ref(out, ref, torch.float64, name="out")
    out.sum().backward()
    assert w.grad is not None and layers[0][0].weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_value_per_channel_raises(backend):
    layers = make_layers([3, 4], [1], [1])
    x = rand_activation((1, 3, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        run_fused(backend, x, layers, None, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    layers = make_layers([3, 4], [3], [1])
    layers[0][1].eval()
    x = rand_activation((2, 3, 5, 5))
    x[0, 0, 2, 2] = float("nan")
    with torch.no_grad():
        out = run_fused(backend, x, layers, None, False)
    assert torch.isnan(out).any()


def test_gradcheck_float64():
    """torch.autograd.gradcheck of the fused chain (train mode, projection shortcut) in float64."""
    layers = make_layers([2, 3, 3], [3, 1], [1, 1], dtype=torch.float64)
    proj = make_layers([2, 3], [1], [1], dtype=torch.float64)[0]
    for c, b in layers + [proj]:
        b.double()
        b.track_running_stats = False  # gradcheck evaluates many times; keep the function pure
        b.running_mean = b.running_var = None
    be = "cpu" if "cpu" in BACKENDS else "reference-prims"
    params = [p for c, b in layers + [proj] for p in (c.weight, b.weight, b.bias)]
    x = rand_activation((2, 2, 4, 4), torch.float64).requires_grad_()

    def g(x, *ps):
        # rebuild the modules' parameters as the inputs, so gradients flow to the checked tensors
        it = iter(ps)
        mods = []
        for c, b in layers + [proj]:
            c2, b2 = copy.deepcopy(c), copy.deepcopy(b)
            del c2.weight, b2.weight, b2.bias
            c2.weight, b2.weight, b2.bias = next(it), next(it), next(it)
            mods.append((c2, b2))
        return run_fused(be, x, mods[:2], (x, *mods[2]), True)

    inputs = (x, *[p.detach().clone().requires_grad_() for p in params])
    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def _saved_during(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("backend", BACKENDS)
def test_cheap_outputs_recomputed_not_saved(backend):
    """A Bottleneck with a projection whose 1x1 convs read few channels (resnet50's first stage):
    the node saves neither the expansion conv's output nor the projection's, and its gradients equal
    (bit for bit on ``cpu``: the recompute runs the forward's algorithm) those of a node that saves
    them; a 3x3 last conv over 64 channels is saved."""
    torch.manual_seed(0)
    layers = make_layers([16, 8, 8, 32], [1, 3, 1], [1, 2, 1])
    proj = make_layers([16, 32], [1], [2])[0]
    x = rand_activation((2, 16, 9, 9), torch.float32, True)
    results = {}
    for mode in ("rule", "save"):
        mods = [(copy.deepcopy(c), copy.deepcopy(b)) for c, b in layers + [proj]]
        xi = x.detach().clone().requires_grad_()
        limit = chain.RECOMPUTE_MACS_PER_BYTE if mode == "rule" else 0
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(chain, "RECOMPUTE_MACS_PER_BYTE", limit)
            out, saved = _saved_during(lambda: run_fused(backend, xi, mods[:3], (xi, *mods[3]), True))
            out.backward(torch.ones_like(out))
        big = [t for t in saved if t.dim() == 4 and t.shape[1] == 32 and t.shape[2] > 1]
        results[mode] = (big, [xi.grad] + [p.grad for c, b in mods for p in (c.weight, b.weight, b.bias)])
    big_rule, grads_rule = results["rule"]
    big_save, grads_save = results["save"]
    # saved at 32 channels: `out` only with the rule; out, y_2 and y_s without it
    assert len(big_rule) == 1 and len(big_save) == 3, ([t.shape for t in big_rule], [t.shape for t in big_save])
    for a, b in zip(grads_rule, grads_save):
        if backend == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)

    wide = make_layers([64, 64, 64], [3, 3], [1, 1])
    x = rand_activation((2, 64, 5, 5), torch.float32, True).requires_grad_()
    out, saved = _saved_during(lambda: run_fused(backend, x, wide, x, True))
    assert sum(t.dim() == 4 and t.shape == out.shape and t.data_ptr() != x.data_ptr() for t in saved) == 3


def _bottleneck_case(dtype=torch.float64):
    torch.manual_seed(1)
    layers = make_layers([6, 4, 4, 12], [1, 3, 1], [1, 2, 1], dtype=dtype)
    proj = make_layers([6, 12], [1], [2], dtype=dtype)[0]
    x = rand_activation((2, 6, 9, 9), dtype, True)
    return layers, proj, x


def _grads_of(backend, layers, proj, x, hooks=False, twice=False):
    mods = [(copy.deepcopy(c), copy.deepcopy(b)) for c, b in layers + [proj]]
    xi = x.detach().clone().requires_grad_()
    ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if hooks else contextlib.nullcontext()
    with ctx:
        out = run_fused(backend, xi, mods[:3], (xi, *mods[3]), True)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    out.backward(g, retain_graph=twice)
    first = [xi.grad.clone()] + [p.grad.clone() for c, b in mods for p in (c.weight, b.weight, b.bias)]
    if twice:  # the retained graph still has every conv output
        out.backward(g)
        second = [xi.grad] + [p.grad for c, b in mods for p in (c.weight, b.weight, b.bias)]
        for a, b in zip(first, second):
            torch.testing.assert_close(b, 2 * a)
    return first


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", ["save", "recompute"], indirect=True)
def test_held_outputs_hooks_and_retained_graph(backend, recompute):
    """Without saved-tensor hooks the node keeps its conv outputs on ctx and frees them during
    backward; under hooks (which must see them) it saves them; a retained graph keeps them for a
    second backward. All three give the same gradients."""
    layers, proj, x = _bottleneck_case()
    plain = _grads_of(backend, layers, proj, x)
    for kw in (dict(hooks=True), dict(twice=True), dict(hooks=True, twice=True)):
        for a, b in zip(_grads_of(backend, layers, proj, x, **kw), plain):
            assert torch.equal(a, b), kw


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
def test_conv_outputs_freed_during_backward(monkeypatch):
    """Each held conv output is freed once its layer's backward is done: when the second conv's
    gradients are computed only the first conv's output is alive, at the first conv's none — but the
    projection's buffer, which now holds the projection's output gradient (written over it; kept until
    its input gradient is added into x's)."""
    layers, proj, x = _bottleneck_case(torch.float32)
    monkeypatch.setattr(chain, "RECOMPUTE_MACS_PER_BYTE", 0)  # every output held, none recomputed
    be = backends.instance("cpu")[0]
    outputs, alive = [], {}
    conv_stats, conv_backward = type(be).conv_stats, type(be).conv_backward

    def record(self, *args, **kwargs):
        y, mean, var = conv_stats(self, *args, **kwargs)
        outputs.append(weakref.ref(y))
        return y, mean, var

    def check(self, gy, x_, w, geom, *args):
        for i in (0, 1):
            if w.shape == layers[i][0].weight.shape:
                alive[i] = [r() is not None for r in outputs]
        return conv_backward(self, gy, x_, w, geom, *args)

    monkeypatch.setattr(type(be), "conv_stats", record)
    monkeypatch.setattr(type(be), "conv_backward", check)
    mods = [(copy.deepcopy(c), copy.deepcopy(b)) for c, b in layers + [proj]]
    xi = x.detach().clone().requires_grad_()
    with resfuse.use_backend("cpu"):
        out = RF.conv_bn_chain(xi, mods[:3], (xi, *mods[3]), True)
    assert len(outputs) == 4 and all(r() is not None for r in outputs)  # y_0, y_1, y_2, y_s
    out.sum().backward()
    assert alive == {1: [True, False, False, True], 0: [False, False, False, True]}, alive


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
def test_apply_into_owned_dense_only():
    """A gradient goes over an owned conv output only where that output is dense; a strided one (a
    backend could return a view) gets a new buffer and is left as it was. Both equal the out-of-place op."""
    from resfuse.ops import bn_act as ops
    big = rand_activation((2, 6, 7, 9), torch.float32, True)
    g, out = rand_activation((2, 3, 7, 9), torch.float32, True), rand_activation((2, 3, 7, 9), torch.float32, True)
    a, b, d = (torch.randn(3) for _ in range(3))
    for y in (big[:, :3].clone(memory_format=torch.channels_last), big[:, ::2]):
        before = y.clone()
        want, _ = ops.bn_act_backward_apply(g, out, before, a, b, d, None, None, None, None, True, False)
        got = chain._apply_into(ops.bn_act_backward_apply_, y, True, g, out, a, b, d, True)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        dense = y.is_contiguous(memory_format=torch.channels_last)
        assert (got.data_ptr() == y.data_ptr()) == dense
        if not dense:
            assert torch.equal(y, before)
