"""Fused units with an activation other than ReLU: ``conv_bn_act(..., act=module)``, timm's SiLU /
LeakyReLU ``ConvNormAct`` units, ``Conv2d → BN → SiLU`` runs of a Sequential.

The fused unit computes ``bn(conv(x)) (+ residual)`` and calls the activation module on it, except in
inference on the ``cpu`` backend's oneDNN path, where the activations ``resfuse.functional.post_op``
maps are the convolution's post-op. Checked against plain PyTorch (float64 where exact), NaN and
infinities included, on the oneDNN and portable paths, eval and train, with plans and edits.
"""
import copy

import pytest
import torch
from torch import nn

import resfuse
from resfuse import backends, cpu_backend, cpu_conv
from resfuse import functional as RF
from resfuse.backends import PostOp
from resfuse.convert import FusedSequential
from resfuse.testing import assert_close_ref, randomize_bn

CL = torch.channels_last
MAPPED = {  # module -> the oneDNN post-op it becomes
    "SiLU": (lambda: nn.SiLU(), "swish"),
    "SiLU_inplace": (lambda: nn.SiLU(inplace=True), "swish"),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.2), "leaky_relu"),
    "Hardswish": (lambda: nn.Hardswish(), "hardswish"),
    "GELU_tanh": (lambda: nn.GELU(approximate="tanh"), "gelu"),
    "Sigmoid": (lambda: nn.Sigmoid(), "sigmoid"),
    "Tanh": (lambda: nn.Tanh(), "tanh"),
}
UNMAPPED = {  # called after the fused unit on every path
    "ReLU6": lambda: nn.ReLU6(),
    "Hardsigmoid": lambda: nn.Hardsigmoid(),
    "GELU": lambda: nn.GELU(),
    "Mish": lambda: nn.Mish(),
}
ACTS = {**{k: v[0] for k, v in MAPPED.items()}, **UNMAPPED}


def _onednn_reason():
    with cpu_backend.portable(False):
        return cpu_backend.onednn_status()


@pytest.fixture(params=["onednn", "portable"])
def path(request):
    """The cpu backend's oneDNN inference path (post-ops) or its portable path (ATen conv + bn_act)."""
    if request.param == "onednn" and _onednn_reason() is not None:
        pytest.skip(f"oneDNN fast path unavailable: {_onednn_reason()}")
    with resfuse.use_backend("cpu"), cpu_backend.portable(request.param == "portable"):
        yield request.param


def _unit(cin=8, cout=16, k=3, stride=1, groups=1, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    bn = nn.BatchNorm2d(cout)
    randomize_bn(bn, seed=seed)
    return conv, bn


def _plain(x, conv, bn, act, residual=None):
    y = bn(conv(x))
    return act(y if residual is None else y + residual)


def test_post_op_mapping():
    for name, (make, attr) in MAPPED.items():
        p = RF.post_op(make())
        assert isinstance(p, PostOp) and p.attr == attr, name
    assert RF.post_op(nn.LeakyReLU(0.2)) == RF.post_op(nn.LeakyReLU(0.2)) != RF.post_op(nn.LeakyReLU(0.1))
    assert hash(RF.post_op(nn.SiLU())) == hash(RF.post_op(nn.SiLU(inplace=True)))
    for name, make in UNMAPPED.items():
        assert RF.post_op(make()) is None, name
    assert RF.post_op(nn.ReLU()) is None  # ReLU is the fused units' own activation (relu=True)
    hooked = nn.SiLU()
    hooked.register_forward_hook(lambda *a: None)
    assert RF.post_op(hooked) is None  # a module with hooks is called, so that they fire


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("fmt", ["cl", "nchw"])
def test_inference_matches_plain(path, act, residual, fmt):
    conv, bn = _unit(groups=2 if act == "Tanh" else 1)
    conv.eval(), bn.eval()
    a = ACTS[act]()
    x = torch.randn(3, 8, 9, 7)
    x = x.contiguous(memory_format=CL) if fmt == "cl" else x
    r = torch.randn(3, 16, 9, 7) if residual else None
    with torch.no_grad():
        want = _plain(x.double(), copy.deepcopy(conv).double(), copy.deepcopy(bn).double(), a,
                      None if r is None else r.double())
        for call in range(3):  # first sight (no pack), trial, plan replay
            got = RF.conv_bn_act(x, conv, bn, None if r is None else r.clone(), act=a)
            assert got.is_contiguous(memory_format=CL if fmt == "cl" else torch.contiguous_format)
            assert_close_ref(got, want, rtol=1e-5, name=f"{act} call {call}")


@pytest.mark.parametrize("act", ["SiLU", "LeakyReLU", "Hardswish", "GELU_tanh", "Sigmoid", "Tanh", "ReLU6", "GELU"])
def test_nan_and_inf_propagate(path, act):
    """NaN and infinities come out where plain PyTorch puts them (a post-op that clamps NaN is not mapped)."""
    conv = nn.Conv2d(4, 4, 1, bias=False).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
    bn = nn.BatchNorm2d(4).eval()
    x = torch.randn(1, 4, 2, 4)
    x[0, 0, 0, :] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
    x[0, 1, 1, :] = torch.tensor([-1e30, 3.0, -3.0, 0.0])
    x = x.contiguous(memory_format=CL)
    a = ACTS[act]()
    with torch.no_grad():
        want = a(bn(conv(x)))
        for _ in range(3):
            got = RF.conv_bn_act(x, conv, bn, act=a)
            assert torch.equal(got.isnan(), want.isnan()), act
            fin = ~want.isnan()
            assert torch.allclose(got[fin], want[fin], rtol=1e-5, atol=1e-6), act


def test_post_op_runs_inside_the_convolution(monkeypatch):
    """On the oneDNN path a mapped activation is the convolution's post-op: its PyTorch function is
    never called; on the portable path it is (after the convolution). (oneDNN forced: a 3x3 layer's
    Winograd candidate applies the activation after its output transform.)"""
    if _onednn_reason() is not None:
        pytest.skip(f"oneDNN fast path unavailable: {_onednn_reason()}")
    calls = []
    monkeypatch.setattr(RF, "_silu_", lambda t: calls.append(1) or torch.nn.functional.silu(t, inplace=True))
    conv, bn = _unit()
    conv.eval(), bn.eval()
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=CL)
    cpu_conv.set_algo("onednn")
    try:
        with torch.no_grad(), resfuse.use_backend("cpu"):
            want = _plain(x, conv, bn, nn.SiLU())
            for _ in range(3):
                assert_close_ref(RF.conv_bn_act(x, conv, bn, act=nn.SiLU()), want, rtol=1e-5)
            assert calls == []
            with cpu_backend.portable():
                assert_close_ref(RF.conv_bn_act(x, conv, bn, act=nn.SiLU()), want, rtol=1e-5)
            assert calls == [1]
    finally:
        cpu_conv.set_algo(None)


@pytest.mark.parametrize("algo", ["winograd", "winograd4"])
@pytest.mark.parametrize("residual", [False, True])
def test_winograd_with_a_post_op(algo, residual, monkeypatch):
    """Winograd's output transform applies bias, residual and a ReLU; another activation runs in place
    after it (a forced Winograd, and its plan replay, give the activated result)."""
    if _onednn_reason() is not None:
        pytest.skip(f"oneDNN fast path unavailable: {_onednn_reason()}")
    ran = []
    orig = torch.ops.resfuse.winograd_conv
    monkeypatch.setattr(cpu_backend.torch.ops.resfuse, "winograd_conv",
                        lambda *a: ran.append(1) or orig(*a), raising=False)
    conv, bn = _unit(16, 16)
    conv.eval(), bn.eval()
    x = torch.randn(2, 16, 12, 12).contiguous(memory_format=CL)
    r = torch.randn(2, 16, 12, 12).contiguous(memory_format=CL) if residual else None
    cpu_conv.set_algo(algo)
    try:
        with torch.no_grad(), resfuse.use_backend("cpu"):
            want = _plain(x, conv, bn, nn.SiLU(), r)
            for _ in range(3):
                assert_close_ref(RF.conv_bn_act(x, conv, bn, r, act=nn.SiLU()), want, rtol=1e-5)
    finally:
        cpu_conv.set_algo(None)
    assert ran


@pytest.mark.parametrize("act", ["SiLU", "SiLU_inplace", "LeakyReLU", "GELU", "Mish"])
@pytest.mark.parametrize("residual", [False, True])
def test_training_matches_plain(act, residual):
    """Train mode (batch statistics, gradients) in float64: the fused unit + the module equal plain
    PyTorch, running statistics included; an in-place activation after the unit is allowed (the unit
    does not keep its output without a final ReLU)."""
    conv, bn = _unit()
    conv, bn = conv.double(), bn.double()
    c2, b2 = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(3, 8, 9, 7, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    r = torch.randn(3, 16, 9, 7, dtype=torch.float64, requires_grad=True) if residual else None
    r2 = None if r is None else r.detach().clone().requires_grad_()
    g = torch.randn(3, 16, 9, 7, dtype=torch.float64)
    out = RF.conv_bn_act(x, conv, bn, r, act=ACTS[act]())
    ref = _plain(x2, c2, b2, ACTS[act](), r2)
    assert_close_ref(out, ref, rtol=1e-10)
    out.backward(g)
    ref.backward(g)
    for got, want, name in ((x.grad, x2.grad, "x"), (conv.weight.grad, c2.weight.grad, "conv.weight"),
                            (bn.weight.grad, b2.weight.grad, "bn.weight"), (bn.bias.grad, b2.bias.grad, "bn.bias"),
                            (bn.running_mean, b2.running_mean, "running_mean"),
                            (bn.running_var, b2.running_var, "running_var")) + (
                                ((r.grad, r2.grad, "residual"),) if residual else ()):
        assert_close_ref(got, want, rtol=1e-10, name=name)


def test_training_float32_and_bf16_autocast():
    conv, bn = _unit(16, 32)
    c2, b2 = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(4, 16, 10, 10).contiguous(memory_format=CL)
    out = RF.conv_bn_act(x, conv, bn, act=nn.SiLU())
    assert_close_ref(out, _plain(x, c2, b2, nn.SiLU()), rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = RF.conv_bn_act(x, conv, bn, act=nn.SiLU())
        want = _plain(x, c2, b2, nn.SiLU())
    assert y.dtype == want.dtype == torch.bfloat16
    assert_close_ref(y, want.float(), rtol=3e-2)


def test_edits_and_plans():
    """Plans are made per activation module and its settings: a changed slope, another module or a
    hook added afterwards is seen by the next call."""
    conv, bn = _unit()
    conv.eval(), bn.eval()
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=CL)
    a = nn.LeakyReLU(0.1)
    with torch.no_grad():
        for _ in range(3):
            RF.conv_bn_act(x, conv, bn, act=a)
        a.negative_slope = 0.5
        assert_close_ref(RF.conv_bn_act(x, conv, bn, act=a), _plain(x, conv, bn, a), rtol=1e-5)
        seen = []
        a.register_forward_hook(lambda m, i, o: seen.append(1))
        assert_close_ref(RF.conv_bn_act(x, conv, bn, act=a), _plain(x, conv, bn, a), rtol=1e-5)
        assert seen == [1, 1]  # the fused call and the plain one: the hooked module was called
        assert_close_ref(RF.conv_bn_act(x, conv, bn, act=nn.Tanh()), _plain(x, conv, bn, nn.Tanh()), rtol=1e-5)


def test_act_overrides_relu_and_must_be_a_module():
    conv, bn = _unit()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        y = RF.conv_bn_act(x, conv.eval(), bn.eval(), relu=True, act=nn.Tanh())
    assert (y < 0).any()  # not a ReLU
    with torch.no_grad():  # nn.ReLU / nn.Identity are the unit's own ReLU / none
        assert torch.equal(RF.conv_bn_act(x, conv, bn, act=nn.ReLU()), RF.conv_bn_act(x, conv, bn, relu=True))
        assert torch.equal(RF.conv_bn_act(x, conv, bn, act=nn.Identity()), RF.conv_bn_act(x, conv, bn, relu=False))
    with pytest.raises(TypeError, match="act must be an nn.Module"):
        RF.conv_bn_act(x, conv, bn, act=torch.tanh)


def test_reference_backend():
    conv, bn = _unit()
    x = torch.randn(2, 8, 5, 5)
    with resfuse.use_backend("reference"):
        out = RF.conv_bn_act(x, conv, bn, act=nn.SiLU())
    assert_close_ref(out, _plain(x, copy.deepcopy(conv), copy.deepcopy(bn), nn.SiLU()), rtol=1e-6)
    assert backends.last_used()["conv_bn_chain"] == "reference"


def test_sequential_runs_absorb_post_op_activations(path):
    """torchvision-style Conv2d → BN → SiLU / Hardswish runs of a Sequential are fused units with the
    activation; a hooked activation, or one no post-op maps, is called after a conv-BN unit."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU(inplace=True),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.Hardswish(),
                        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Mish(),
                        nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
    randomize_bn(seq)
    seen = []
    seq[11].register_forward_hook(lambda *a: seen.append(1))
    fused = resfuse.fuse(seq)
    assert type(fused) is FusedSequential
    report = resfuse.explain(fused)
    assert "FusedSequential" in report
    x = torch.randn(2, 3, 10, 10).contiguous(memory_format=CL)
    with torch.no_grad():
        want = seq.eval()(x)
        fused.eval()
        for _ in range(3):
            assert_close_ref(fused(x), want, rtol=1e-5)
    assert len(seen) == 4  # the hooked SiLU ran as a module every time
    fused.train(), seq.train()
    assert_close_ref(fused(x), seq(x), rtol=1e-5)
