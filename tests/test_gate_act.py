"""The end of a squeeze-and-excitation block: ``torch.ops.resfuse.gate_act`` / ``gate_act_backward`` (C++
CPU kernels) against the float64 reference and eager autograd, ``resfuse.functional.gate_act`` /
``channel_mean`` (one autograd node each), and the SE-/ECA-ResNet blocks of timm that run them."""
import copy

import pytest
import torch
from torch import nn
from tvshim import import_timm

import resfuse
from resfuse import _extension
from resfuse import functional as RF
from resfuse.nn import blocks
from resfuse.ops import gate_act as ops
from resfuse.reference import primitives as ref
from resfuse.testing import assert_close_ref, poisoned, rand_activation, randomize_bn, to64

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason=f"resfuse._C not built: {_extension.ERROR}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = [pytest.param(False, id="nchw"), pytest.param(True, id="nhwc")]
# odd sizes; 1x1 maps; a map above the NCHW flush (2048 values); NHWC images of several row blocks
SHAPES = [(1, 3, 7, 7), (3, 37, 5, 7), (2, 17, 1, 1), (2, 5, 50, 47), (2, 64, 40, 40), (3, 130, 3, 5)]


def _gate(n, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, c, generator=g) * 2 - 0.5).to(torch.float64 if dtype == torch.float64 else torch.float32)


def _operands(shape, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = rand_activation(shape, dtype, channels_last, generator=g)
    r = rand_activation(shape, dtype, channels_last, generator=g)
    return x, _gate(shape[0], shape[1], dtype, seed), r


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
def test_op_matches_reference(shape, dtype, channels_last, relu, residual):
    """Forward and backward against the float64 oracle, results in the input's memory format."""
    x, gate, r = _operands(shape, dtype, channels_last)
    r = r if residual else None
    out = ops.gate_act(x, gate, r, relu)
    assert_close_ref(out, ref.gate_act(x, gate, r, relu))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and out.dtype == dtype
    g = rand_activation(shape, dtype, channels_last, generator=torch.Generator().manual_seed(5))
    got = ops.gate_act_backward(g, out, x, gate, relu, True)
    want = ref.gate_act_backward(g, out, x, gate, relu, True)
    for a, b, name in zip(got, want, ("grad_input", "grad_gate", "grad_residual")):
        # grad_gate sums H*W products: its error is the accumulation's, relative to the largest sum
        assert_close_ref(a, b, dtype if name != "grad_gate" else gate.dtype, name=name,
                         rtol=1e-2 if dtype in (torch.bfloat16, torch.float16) else None)
    assert got[0].is_contiguous(memory_format=fmt) and got[2].is_contiguous(memory_format=fmt)
    assert got[1].shape == gate.shape and got[1].dtype == gate.dtype
    assert ops.gate_act_backward(g, out, x, gate, relu, False)[2].shape == (0,)
    # without input: no grad_gate, the same activation gradients
    no_gate = ops.gate_act_backward(g, out, None, gate, relu, True)
    assert no_gate[1].shape == (0,) and torch.equal(no_gate[0], got[0]) and torch.equal(no_gate[2], got[2])
    assert no_gate[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("channels_last", LAYOUTS)
def test_matches_eager_autograd_with_nan_and_inf(channels_last):
    """Against ``relu(x * s + r)`` in eager autograd, bitwise in float64: NaN and infinities propagate
    forward as in eager, and the ReLU mask is threshold_backward's (a NaN output passes its gradient)."""
    x, gate, r = _operands((2, 6, 5, 4), torch.float64, channels_last)
    x[0, 1, 2, 3], x[1, 2, 0, 0], r[0, 3, 1, 1], r[1, 4, 4, 3] = float("nan"), float("inf"), -float("inf"), float("nan")
    x64, r64 = x.clone().requires_grad_(), r.clone().requires_grad_()
    s64 = gate.view(2, 6, 1, 1).clone().requires_grad_()
    want = torch.relu(x64 * s64 + r64)
    g = rand_activation(want.shape, torch.float64, channels_last)
    want.backward(g)
    out = ops.gate_act(x, gate, r, True)
    assert torch.equal(out.isnan(), want.isnan())
    assert_close_ref(out.nan_to_num(), want.detach().nan_to_num(), rtol=1e-14)
    gx, gg, gr = ops.gate_act_backward(g, out, x, gate, True, True)
    assert torch.equal(gx.isnan(), x64.grad.isnan())
    assert_close_ref(gx.nan_to_num(), x64.grad.nan_to_num(), rtol=1e-14)
    assert_close_ref(gr, r64.grad, rtol=1e-14)
    assert torch.equal(gg.isnan(), s64.grad.view(2, 6).isnan())


@pytest.mark.parametrize("channels_last", LAYOUTS)
def test_threads_do_not_change_results(channels_last):
    x, gate, r = _operands((3, 48, 33, 31), torch.float32, channels_last)
    prev = torch.get_num_threads()
    try:
        res = []
        for t in (1, 2):
            torch.set_num_threads(t)
            out = ops.gate_act(x, gate, r, True)
            res.append((out, *ops.gate_act_backward(torch.ones_like(out), out, x, gate, True, True)))
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(a, b) for a, b in zip(*res))


def test_strided_operands_are_copied_once():
    """A channel slice and an operand in the other layout than ``input``: same results as dense ones."""
    x, gate, r = _operands((2, 12, 6, 5), torch.float32, True)
    xs = torch.cat([x, x], 1)[:, 3:9]  # a channel slice of a channels_last tensor
    rn = r[:, :6].contiguous()  # NCHW while xs is channels_last-like
    gs = _gate(2, 12, torch.float32)[:, ::2]  # a strided [N, C] gate
    out = ops.gate_act(xs, gs, rn, True)
    assert_close_ref(out, ref.gate_act(xs, gs, rn, True))
    grads = ops.gate_act_backward(torch.ones_like(out), out, xs, gs, True, True)
    for a, b in zip(grads, ref.gate_act_backward(torch.ones_like(out), out, xs, gs, True, True)):
        assert_close_ref(a, b, rtol=1e-5)


@pytest.mark.parametrize("op", ["gate_act", "gate_act_backward"])
def test_opcheck(op):
    for dtype in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            x, gate, r = _operands((2, 5, 7, 6), dtype, cl)
            if op == "gate_act":
                for args in ((x, gate, r, True), (x, gate, None, False)):
                    torch.library.opcheck(torch.ops.resfuse.gate_act.default, args)
            else:
                out = ops.gate_act(x, gate, r, True)
                for rg in (True, False):
                    for inp in (x, None):
                        torch.library.opcheck(torch.ops.resfuse.gate_act_backward.default,
                                              (torch.randn_like(out), out, inp, gate, True, rg))


def _bad_cases():
    x = torch.randn(2, 3, 4, 4)
    g = torch.rand(2, 3)
    fwd, bwd = torch.ops.resfuse.gate_act, torch.ops.resfuse.gate_act_backward
    return [
        ("gate shape", lambda: fwd(x, g[:, :2], None, True), r"gate must have shape \[N, C\] = \[2, 3\]"),
        ("gate 4-D", lambda: fwd(x, g.view(2, 3, 1, 1), None, True), r"gate must have shape \[N, C\]"),
        ("gate dtype", lambda: fwd(x, g.double(), None, True), r"gate must be Float for Float input"),
        ("bf16 gate", lambda: fwd(x.bfloat16(), g.bfloat16(), None, True), r"gate must be Float for BFloat16"),
        ("rank", lambda: fwd(x[0], g, None, True), r"input must be a 4-D"),
        ("int input", lambda: fwd(x.int(), g, None, True), r"input must be float32, float64"),
        ("residual shape", lambda: fwd(x, g, x[:, :, :3], True), r"residual must have the shape of input"),
        ("residual dtype", lambda: fwd(x, g, x.double(), True), r"residual must have the dtype of input"),
        ("input shape", lambda: bwd(x, x, x[:1], g, True, True), r"input must have the shape of grad_out"),
        ("output dtype", lambda: bwd(x, x.double(), None, g, True, True), r"output must have the dtype of grad_out"),
    ]


@pytest.mark.parametrize("case", range(10), ids=[c[0] for c in _bad_cases()])
def test_bad_input(case):
    _, fn, msg = _bad_cases()[case]
    with pytest.raises(RuntimeError, match=msg):
        fn()


# ------------------------------------------------------------------- functional.gate_act, channel_mean

@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("channels_last", LAYOUTS)
def test_gradcheck(relu, residual, channels_last):
    """float64 gradcheck of the fused node through every input, the gate as an SE module produces it
    (``[N, C, 1, 1]``) and through the mean it is computed from."""
    torch.manual_seed(0)
    x = rand_activation((2, 4, 3, 5), torch.float64, channels_last).requires_grad_()
    r = rand_activation((2, 4, 3, 5), torch.float64, channels_last).requires_grad_() if residual else None
    s = torch.rand(2, 4, 1, 1, dtype=torch.float64).add_(0.5).requires_grad_()
    with resfuse.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda x, s, r: RF.gate_act(x, s, r, relu), (x, s, r))
        # the gate computed from x itself, as in an SE block: both of x's gradients meet
        assert torch.autograd.gradcheck(lambda x, r: RF.gate_act(x, torch.sigmoid(RF.channel_mean(x)), r, relu),
                                        (x, r))
    assert resfuse.backends.last_used()["gate_act"] == "cpu"


def test_channel_mean_gradient_is_a_broadcast_view():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    m = RF.channel_mean(x)
    assert torch.equal(m, x.mean((2, 3), keepdim=True))
    gm = torch.randn_like(m)
    (g,) = torch.autograd.grad(m, x, gm)
    assert g.stride()[2:] == (0, 0)
    assert torch.equal(g, torch.autograd.grad(x.mean((2, 3), keepdim=True), x, gm)[0])
    with torch.no_grad():
        assert torch.equal(RF.channel_mean(x), m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_functional_matches_timm_order(dtype):
    """The fused node against timm's ``x * s``, ``+= shortcut``, ``relu_`` in the same dtype: fp32 within
    an ulp-level tolerance (one fused multiply-add instead of two roundings), gradients too; a residual
    of another dtype is cast like ``x += residual``."""
    torch.manual_seed(0)
    x = rand_activation((2, 8, 6, 6), dtype, True).requires_grad_()
    s = torch.rand(2, 8, 1, 1, dtype=dtype).requires_grad_()
    r = rand_activation((2, 8, 6, 6), torch.float32, True).requires_grad_()
    out = RF.gate_act(x, s, r)
    y = x * s
    y += r
    want = torch.relu_(y)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close_ref(out, want, rtol=tol)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, s, r), g)
    exp = torch.autograd.grad(want, (x, s, r), g)
    for a, b in zip(got, exp):
        assert a.dtype == b.dtype
        assert_close_ref(a, b, rtol=tol if dtype == torch.float32 else 2e-2)


def test_functional_falls_back_to_pytorch_ops():
    """The reference backend, a gate of another shape or a missing fused op: PyTorch ops, said so."""
    x = torch.randn(2, 4, 3, 3)
    r = torch.randn(2, 4, 3, 3)
    for s, backend in ((torch.rand(2, 4, 1, 1), "reference"), (torch.rand(1, 4, 1, 1), "cpu"),
                       (torch.rand(2, 4, 3, 3), "cpu")):
        with resfuse.use_backend(backend):
            out = RF.gate_act(x, s, r)
        assert torch.equal(out, torch.relu(x * s + r))
        assert resfuse.backends.last_used()["gate_act"] == "reference"
    with resfuse.use_backend("cpu"):
        RF.gate_act(x, torch.rand(2, 4, 1, 1), r)
    assert resfuse.backends.last_used()["gate_act"] == "cpu"


def test_no_grad_and_inplace_change_detected():
    """Under no_grad the node saves nothing; changing its output in place before backward is caught
    (it keeps the output for the ReLU mask)."""
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    s = torch.rand(2, 4, 1, 1)
    with torch.no_grad():
        assert RF.gate_act(x, s).grad_fn is None
    out = RF.gate_act(x, s)
    out.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# ------------------------------------------------------------------------------- timm's SE blocks

@pytest.fixture(scope="module")
def timm():
    return import_timm()


def _count_gates(monkeypatch):
    calls = []
    real = RF.gate_act

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(RF, "gate_act", spy)
    return calls


def _assert_same_step(fused, plain, x, seed=0):
    """float64: the fused and the plain model's outputs (1e-10) and input / parameter gradients (1e-9; below
    1e-12 where plain's is 0 up to rounding) of one forward + backward, each run from the same random
    state (stochastic depth draws alike)."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(seed)
    a = fused(xa)
    torch.manual_seed(seed)
    b = plain(xb)
    assert_close_ref(a, b, rtol=1e-10)
    a.square().sum().backward()
    b.square().sum().backward()
    assert_close_ref(xa.grad, xb.grad, rtol=1e-9, name="grad x")
    for (n, p), q in zip(fused.named_parameters(), plain.parameters()):
        if q.grad.abs().max() < 1e-12:  # a gradient that is 0 up to rounding (e.g. a BN bias before a BN)
            assert p.grad.abs().max() < 1e-12, n
        else:
            assert_close_ref(p.grad, q.grad, rtol=1e-9, name=f"grad {n}")
        p.grad = q.grad = None


@pytest.mark.parametrize("attn", ["se", "ese", "eca", "eca_mlp"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_timm_blocks_run_the_fused_gate(timm, attn, block, monkeypatch):
    """Every timm ResNet block with an SE / effective-SE / ECA module runs its end as one gate_act; the
    fused model's output and all gradients equal plain timm's in float64 (train and eval)."""
    from timm.layers import EcaModule
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    torch.manual_seed(0)
    layer = {"eca_mlp": lambda c, **kw: EcaModule(c, use_mlp=True)}.get(attn, attn)
    plain = randomize_bn(ResNet(BasicBlock if block == "basic" else Bottleneck, [1, 2, 1, 1], num_classes=5,
                                block_args={"attn_layer": layer})).double()
    fused = resfuse.fuse(copy.deepcopy(plain))
    calls = _count_gates(monkeypatch)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for train in (True, False):
        plain.train(train), fused.train(train)
        calls.clear()
        _assert_same_step(fused, plain, x)
        assert len(calls) == 5  # every block


def test_timm_gate_left_to_the_module(timm, monkeypatch):
    """The module runs itself where the fused gate would skip something: hooks on it, add_maxpool,
    stochastic depth after it, a subclass; results stay plain timm's."""
    from timm.layers.squeeze_excite import SEModule
    from timm.models.resnet import BasicBlock, ResNet

    class MySE(SEModule):
        def forward(self, x):
            return super().forward(x) * 0.5

    torch.manual_seed(0)
    edits = {
        "hook": lambda m: m.layer2[0].se.register_forward_hook(lambda mod, i, o: o * 2),
        "add_maxpool": lambda m: setattr(m.layer2[0].se, "add_maxpool", True),
        "subclass": lambda m: setattr(m.layer2[0], "se", MySE(128)),
    }
    for name, edit in edits.items():
        plain = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5, block_args={"attn_layer": "se"}))
        edit(plain)
        plain.double()
        fused = resfuse.fuse(copy.deepcopy(plain))
        calls = _count_gates(monkeypatch)
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        assert_close_ref(fused(x), plain(x), rtol=1e-10, name=name)
        assert len(calls) == 3, name  # the edited block's gate is the module's own
    plain = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5, drop_path_rate=0.2,
                                block_args={"attn_layer": "se"})).double()
    plain.layer2[0].drop_path = nn.Dropout(0.3)  # not timm's DropPath: the modules run themselves
    fused = resfuse.fuse(copy.deepcopy(plain))
    calls = _count_gates(monkeypatch)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(3)
    a = fused.train()(x)
    torch.manual_seed(3)
    assert_close_ref(a, plain.train()(x), rtol=1e-10)
    assert len(calls) == 3


@pytest.mark.parametrize("attn", [None, "se"])
def test_timm_drop_path_folded_into_the_gate(timm, attn, monkeypatch):
    """Stochastic depth (timm's DropPath) is the gate's per-image mask: same random draws as timm's
    ``drop_path(se(z))``, so train-mode outputs and gradients equal plain timm's in float64; with and
    without an SE module, Bottleneck blocks with projections."""
    from timm.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    plain = randomize_bn(ResNet(Bottleneck, [2, 2, 1, 1], num_classes=5, drop_path_rate=0.5,
                                block_args={"attn_layer": attn})).double()
    fused = resfuse.fuse(copy.deepcopy(plain))
    calls = _count_gates(monkeypatch)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    fused.train(), plain.train()
    for seed in range(3):
        _assert_same_step(fused, plain, x, seed)
    assert len(calls) == 3 * (6 if attn else 5)  # the first block has no drop path (rate 0): no gate without se
    calls.clear()
    assert_close_ref(fused.eval()(x), plain.eval()(x), rtol=1e-10)
    # in eval a DropPath is the identity: without se the block is one fused chain again (add, ReLU inside)
    assert len(calls) == (6 if attn else 0)


def test_explain_says_how_se_runs(timm):
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5, drop_path_rate=0.2, block_args={"attn_layer": "se"})
    model.layer3[0].se.register_forward_hook(lambda m, i, o: None)
    model.layer4[0].drop_path = nn.Dropout()
    lines = {line.split()[0]: line for line in resfuse.explain(resfuse.fuse(model)).splitlines()[1:]}
    assert lines["layer1.0"].endswith(": se (SEModule), the shortcut add and the ReLU run as one op (gate_act)")
    assert lines["layer2.0"].endswith(
        ": se (SEModule) and drop_path (DropPath), the shortcut add and the ReLU run as one op (gate_act)")
    assert lines["layer3.0"].endswith(": se (SEModule) and drop_path (DropPath) run as modules")
    assert lines["layer4.0"].endswith(": se (SEModule) and drop_path (Dropout) run as modules")
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5, drop_path_rate=0.2)
    lines = {line.split()[0]: line for line in resfuse.explain(resfuse.fuse(model)).splitlines()[1:]}
    assert lines["layer2.0"].endswith(": drop_path (DropPath): in training its mask, the shortcut add and the "
                                      "ReLU run as one op (gate_act); in eval the block is one fused chain")
    assert lines["layer1.0"].endswith("(was timm.models.resnet.BasicBlock)")


def test_pointwise_convs_of_the_gate(timm):
    """The SE MLP's 1x1 convolutions on the [N, C, 1, 1] mean run as linear layers: the same function
    and gradients; a hooked or non-plain conv runs as the module (its hook sees the call)."""
    from timm.layers.squeeze_excite import SEModule

    torch.manual_seed(0)
    se = SEModule(32).double()
    z = torch.randn(3, 32, 5, 4, dtype=torch.float64, requires_grad=True)
    got = z * blocks.channel_gate(se, z)
    want = se(z)
    assert_close_ref(got, want, rtol=1e-12)
    g = torch.randn_like(want)
    a = torch.autograd.grad(got, [z, *se.parameters()], g)
    b = torch.autograd.grad(want, [z, *se.parameters()], g)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert_close_ref(x, y, rtol=1e-10)
    seen = []
    se.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    blocks.channel_gate(se, z)
    assert seen == [(3, se.fc1.out_channels, 1, 1)]
    conv = nn.Conv2d(32, 4, 1).double()
    t = torch.randn(2, 32, 3, 3, dtype=torch.float64)
    assert torch.equal(blocks._pointwise(conv, t), conv(t))  # not a 1x1 map: the module itself


@pytest.mark.parametrize("channels", [8, 37, 256])
def test_eca_conv_along_channels(timm, channels):
    """ECA's one-channel Conv1d over the channel descriptor as a product of sliding windows: the same
    function and gradients as the module (float64); hooked or strided: the module."""
    from timm.layers import EcaModule

    torch.manual_seed(0)
    eca = EcaModule(channels).double()
    z = torch.randn(2, channels, 3, 4, dtype=torch.float64, requires_grad=True)
    got, want = z * blocks.channel_gate(eca, z), eca(z)
    assert_close_ref(got, want, rtol=1e-12)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, [z, eca.conv.weight], g), torch.autograd.grad(want, [z, eca.conv.weight], g)):
        assert_close_ref(a, b, rtol=1e-10)
    biased = nn.Conv1d(1, 1, 3, padding=1).double()
    y = torch.randn(2, 1, channels, dtype=torch.float64)
    assert_close_ref(blocks._along_channels(biased, y), biased(y), rtol=1e-12)
    strided = nn.Conv1d(1, 1, 3, stride=2, padding=1).double()
    assert torch.equal(blocks._along_channels(strided, y), strided(y))
    seen = []
    eca.conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    blocks.channel_gate(eca, z)
    assert seen == [(2, 1, channels)]


@pytest.mark.parametrize("name", ["seresnet33ts", "regnetz_b16"])
def test_byobnet_attention_gate(timm, name, monkeypatch):
    """timm byobnet blocks' SE ``attn`` (between convolutions) runs as ``h * gate`` with the fused gate:
    float64 train step and eval equal timm's; a hooked ``attn`` runs as the module."""
    torch.manual_seed(0)
    plain = randomize_bn(timm.create_model(name, num_classes=5)).double()
    fused = resfuse.fuse(copy.deepcopy(plain))
    gates = []
    real = blocks.channel_gate
    monkeypatch.setattr(blocks, "channel_gate", lambda m, z: gates.append(m) or real(m, z))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    fused.train(), plain.train()
    _assert_same_step(fused, plain, x)
    n_attn = sum(type(m).__name__ == "SEModule" for m in plain.modules())
    assert n_attn > 0 and len(gates) == n_attn
    assert_close_ref(fused.eval()(x), plain.eval()(x), rtol=1e-10)
    seen = []
    first = next(m for m in fused.modules() if type(m).__name__ == "SEModule")
    first.register_forward_hook(lambda m, i, o: seen.append(1))
    fused(x)
    assert seen == [1]


def test_se_module_attributes_checked(timm):
    from timm.layers.squeeze_excite import SEModule

    se = SEModule(8)
    z = torch.randn(2, 8, 4, 4)
    assert_close_ref(z * blocks.channel_gate(se, z), se(z), rtol=1e-6)
    del se.bn
    assert blocks.channel_gate(se, z) is None
    assert blocks.channel_gate(nn.Identity(), z) is None and blocks.channel_gate(None, z) is None


def test_poisoned_gradient_buffers_are_overwritten():
    """Every element of the kernel outputs is written: results do not depend on what memory held."""
    x, gate, r = _operands((2, 9, 5, 3), torch.float32, True)
    out = ops.gate_act(x, gate, r, True)
    want = ops.gate_act_backward(torch.ones_like(out), out, x, gate, True, True)
    for _ in range(3):  # the allocator hands back the NaN-filled blocks freed here
        junk = [poisoned(out) for _ in range(6)]
        del junk
        assert torch.equal(ops.gate_act(x, gate, r, True), out)
        got = ops.gate_act_backward(torch.ones_like(out), out, x, gate, True, True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
