"""GPU tests of the ``cuda`` backend (resfuse/cuda_backend.py) inside the fused units.

A BasicBlock-shaped chain (identity or projection shortcut), train and eval, float32 / bfloat16 /
float16, NCHW and channels_last, run through ``resfuse.functional.conv_bn_chain`` on the ``cuda``
backend, against the same modules in float64 plain PyTorch. Float32 must match within 1e-4 (the
gradients are several reductions deep); 16-bit dtypes must be within 3x plain PyTorch's own error
in that dtype (L2), as in tests/test_fused_chain.py. Skipped without a CUDA device.
"""
import copy

import pytest
import torch
from torch import nn

import resfuse
from resfuse import _extension, backends
from resfuse import functional as RF
from resfuse.testing import assert_close_ref, assert_error_ratio, rand_activation

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_backend():
    be, reason = backends.instance("cuda")
    if be is None:
        pytest.fail(f"a CUDA device is present but the cuda backend is unavailable: {reason} "
                    f"({_extension.ERROR or 'extension loaded'})")


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 convolutions that fall back to cuDNN must be true float32 for the 1e-5 / 1e-4 checks."""
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


def make_layers(channels, strides, dtype, channels_last):
    layers = []
    for cin, cout, s in zip(channels[:-1], channels[1:], strides):
        conv = nn.Conv2d(cin, cout, 3, s, 1, bias=False)
        bn = nn.BatchNorm2d(cout)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        conv = conv.to("cuda", dtype)
        if channels_last:
            conv = conv.to(memory_format=torch.channels_last)
        layers.append((conv, bn.to("cuda", torch.float64 if dtype == torch.float64 else torch.float32)))
    return layers


def projection(cin, cout, stride, dtype, channels_last):
    conv = nn.Conv2d(cin, cout, 1, stride, 0, bias=False).to("cuda", dtype)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    bn = nn.BatchNorm2d(cout).to("cuda")
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return conv, bn


def copies(mods, dtype):
    out = []
    for c, b in mods:
        c2, b2 = copy.deepcopy(c), copy.deepcopy(b)
        if dtype == torch.float64:
            c2, b2 = c2.double(), b2.double()
        out.append((c2, b2))
    return out


def run(x, layers, shortcut, backend):
    """Output and every gradient (x, conv weights, BN weights and biases) for grad_out = ones-ish."""
    x = x.detach().clone().requires_grad_()
    res = x
    if shortcut is not None:
        res = (x, *shortcut)
    if backend == "plain":
        out = RF._plain(x, layers, res, True)
    else:
        with resfuse.use_backend(backend):
            out = RF.conv_bn_chain(x, layers, res, True)
    g = torch.cos(torch.arange(out.numel(), device="cuda", dtype=torch.float64)).view(out.shape)
    out.backward(g.to(out.dtype))
    mods = list(layers) + ([shortcut] if shortcut is not None else [])
    grads = [x.grad]
    for c, b in mods:
        grads += [c.weight.grad, b.weight.grad, b.bias.grad]
    return out, grads, mods


@pytest.mark.parametrize("proj", [False, True], ids=["identity", "projection"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_basic_block_chain(dtype, train, channels_last, proj):
    cin, cout, stride = (16, 32, 2) if proj else (32, 32, 1)
    layers = make_layers([cin, cout, cout], [stride, 1], dtype, channels_last)
    shortcut = projection(cin, cout, stride, dtype, channels_last) if proj else None
    x = rand_activation((4, cin, 10, 10), dtype, channels_last, device="cuda")

    variants = {}
    for name, dt in [("cuda", dtype), ("plain", dtype), ("truth", torch.float64)]:
        ls = copies(layers, dt)
        sc = copies([shortcut], dt)[0] if proj else None
        for _, b in ls + ([sc] if sc else []):
            b.train(train)
        xin = x.double() if dt == torch.float64 else x
        variants[name] = run(xin, ls, sc, "plain" if name != "cuda" else "cuda")
    assert backends.last_used().get("conv_bn_chain") == "cuda"

    (out, grads, mods), (p_out, p_grads, p_mods), (t_out, t_grads, t_mods) = (
        variants["cuda"], variants["plain"], variants["truth"])
    assert out.dtype == dtype
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        assert_close_ref(out, t_out, dtype, name="out")
        for i, (a, e) in enumerate(zip(grads, t_grads)):
            assert_close_ref(a, e, dtype, rtol=1e-4, name=f"grad {i}")
    else:
        assert_error_ratio(out, p_out, t_out, k=3, name="out", floor=2e-2, l2=True)
        for i, (a, p, e) in enumerate(zip(grads, p_grads, t_grads)):
            assert_error_ratio(a, p, e, k=3, name=f"grad {i}", floor=2e-2, l2=True)
    if train:
        for (_, b), (_, bp), (_, b64) in zip(mods, p_mods, t_mods):
            for stat in ("running_mean", "running_var"):
                ours, plain, truth = getattr(b, stat), getattr(bp, stat), getattr(b64, stat)
                if dtype == torch.float32:
                    assert_close_ref(ours, truth, torch.float32, rtol=1e-4, name=stat)
                else:  # batch statistics of 16-bit conv outputs: as close as plain PyTorch's
                    assert_error_ratio(ours, plain, truth, k=3, name=stat, floor=2e-2, l2=True)


def test_fused_conv_is_used_for_bf16_channels_last():
    be = backends.instance("cuda")[0]
    geom = backends.ConvGeom((1, 1), (1, 1), (1, 1), 1)
    x = rand_activation((2, 16, 8, 8), torch.bfloat16, True, device="cuda")
    w = torch.randn((32, 16, 3, 3), device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert be.supports_fused_conv(x, w, geom) is None
    assert be.supports_fused_conv(x.contiguous(), w, geom) is not None  # NCHW: cuDNN + primitives
    assert be.supports_fused_conv(x.float(), w.float(), geom) is not None  # float32: cuDNN
    y, mean, var = be.conv_stats(x, w, geom)
    y_ref = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 1)
    assert_close_ref(y, y_ref, torch.bfloat16, name="y")
    bias = torch.randn(32, device="cuda")
    out = be.conv_bias_act(x, w, bias, geom, None, True)
    assert_close_ref(out, torch.relu(y_ref + bias.double().view(1, -1, 1, 1)), torch.bfloat16, name="out")


@pytest.mark.parametrize("proj", [False, True], ids=["identity", "projection"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_inference_block(dtype, proj):
    # eval + no_grad: the BN-folded path (conv_bias_act: the fused conv for 16-bit channels_last)
    cin, cout, stride = (16, 32, 2) if proj else (32, 32, 1)
    layers = make_layers([cin, cout, cout], [stride, 1], dtype, True)
    shortcut = projection(cin, cout, stride, dtype, True) if proj else None
    x = rand_activation((4, cin, 10, 10), dtype, True, device="cuda")
    outs = {}
    for name, dt in [("cuda", dtype), ("plain", dtype), ("truth", torch.float64)]:
        ls = copies(layers, dt)
        sc = copies([shortcut], dt)[0] if proj else None
        for _, b in ls + ([sc] if sc else []):
            b.eval()
        xin = x.double() if dt == torch.float64 else x
        res = (xin, *sc) if proj else xin
        with torch.no_grad():
            if name == "cuda":
                with resfuse.use_backend("cuda"):
                    outs[name] = RF.conv_bn_chain(xin, ls, res, True)
            else:
                outs[name] = RF._plain(xin, ls, res, True)
    assert outs["cuda"].is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        assert_close_ref(outs["cuda"], outs["truth"], dtype, rtol=1e-4, name="out")
    else:
        assert_error_ratio(outs["cuda"], outs["plain"], outs["truth"], k=3, name="out", floor=2e-2, l2=True)
