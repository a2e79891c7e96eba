"""Drop-in modules and whole models against resfuse.reference (plain PyTorch)."""
import copy

import pytest
import torch
from torch import nn

import resfuse
from resfuse import models, reference
from resfuse.nn import (
    BasicBlock,
    Bottleneck,
    ConvBNAct,
    PreActBasicBlock,
    PreActBottleneck,
)
from resfuse.testing import (
    assert_close_ref,
    assert_error_ratio,
    rand_activation,
    randomize_bn,
    rel_error,
)


def _pair(fused_cls, ref_cls, *args, **kwargs):
    torch.manual_seed(1)
    ref = randomize_bn(ref_cls(*args, **kwargs))
    fused = fused_cls(*args, **kwargs)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return fused, ref


def _compare_train_eval(fused, ref, x, dtype=torch.float32, grad_rtol=1e-4):
    """One train step (outputs, all grads, running stats) and an eval forward, fused vs reference."""
    ref64 = copy.deepcopy(ref).double()
    fused.train(), ref64.train()
    xf = x.detach().clone().to(dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    out, out64 = fused(xf), ref64(x64)
    assert_close_ref(out, out64, dtype, rtol=100 * resfuse.testing.tolerance(dtype), name="train out")
    g = torch.randn_like(out64)
    out.backward(g.to(dtype)), out64.backward(g)
    assert_close_ref(xf.grad, x64.grad, dtype, rtol=grad_rtol, name="grad x")
    for (n, p), (_, p64) in zip(fused.named_parameters(), ref64.named_parameters()):
        assert_close_ref(p.grad, p64.grad, dtype, rtol=grad_rtol, name=f"grad {n}")
    for (n, b), (_, b64) in zip(fused.named_buffers(), ref64.named_buffers()):
        assert_close_ref(b, b64, dtype, rtol=1e-4, name=n)
    fused.eval(), ref64.eval()
    with torch.no_grad():
        assert_close_ref(fused(x.to(dtype)), ref64(x.double()), dtype, rtol=100 * resfuse.testing.tolerance(dtype),
                         name="eval out")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", ["basic", "basic_down", "bottleneck", "bottleneck_down", "resnext"])
def test_blocks_match_reference(case, channels_last):
    down = lambda cin, cout, s: nn.Sequential(nn.Conv2d(cin, cout, 1, s, bias=False), nn.BatchNorm2d(cout))
    if case == "basic":
        fused, ref = _pair(BasicBlock, reference.BasicBlock, 5, 5)
        x = rand_activation((2, 5, 7, 7))
    elif case == "basic_down":
        fused, ref = _pair(BasicBlock, reference.BasicBlock, 4, 6, 2, down(4, 6, 2))
        x = rand_activation((2, 4, 9, 9))
    elif case == "bottleneck":
        fused, ref = _pair(Bottleneck, reference.Bottleneck, 12, 3)
        x = rand_activation((2, 12, 7, 7))
    elif case == "bottleneck_down":
        fused, ref = _pair(Bottleneck, reference.Bottleneck, 8, 4, 2, down(8, 16, 2))
        x = rand_activation((1, 8, 9, 9))
    else:
        fused, ref = _pair(Bottleneck, reference.Bottleneck, 16, 4, 1, down(16, 16, 1), groups=2, base_width=64)
        x = rand_activation((2, 16, 5, 5))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _compare_train_eval(fused, ref, x)


@pytest.mark.parametrize("cls,ref_cls,c", [(PreActBasicBlock, reference.PreActBasicBlock, 6),
                                           (PreActBottleneck, reference.PreActBottleneck, 8)])
def test_preact_blocks(cls, ref_cls, c):
    fused, ref = _pair(cls, ref_cls, c * (4 if cls is PreActBottleneck else 1), c)
    _compare_train_eval(fused, ref, rand_activation((2, fused.bn1.num_features, 6, 6)))


def test_convbnact_state_dict_and_forward():
    m = ConvBNAct(3, 8, 3, stride=2)
    assert set(m.state_dict()) == {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                   "bn.num_batches_tracked"}
    assert m.conv.padding == (1, 1) and m.conv.bias is None
    seq = nn.Sequential()
    seq.conv, seq.bn = copy.deepcopy(m.conv), copy.deepcopy(m.bn)
    x = rand_activation((2, 3, 9, 9))
    r = rand_activation((2, 8, 5, 5))
    ref = torch.relu(seq.bn(seq.conv(x)) + r)
    assert_close_ref(m(x, r), ref, rtol=1e-4)
    with pytest.raises(ValueError, match="activation"):
        ConvBNAct(3, 8, 3, activation="gelu")
    assert ConvBNAct(3, 8, 3, dilation=2).conv.padding == (2, 2)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_models_load_reference_state_dict(name):
    ref = getattr(reference, name)()
    fused = getattr(models, name)()
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fused.state_dict(), strict=True)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name,size,batch", [("resnet18", 64, 2), ("resnet50", 64, 2), ("cifar_resnet20", 32, 4)])
def test_whole_models_train_and_eval(name, size, batch):
    """Whole models, train step and eval.

    float64: fused == plain to 1e-6 (outputs, every gradient, running stats) — the same function.
    float32: error vs float64 within k x plain PyTorch's own fp32 error. Deep layers here normalise a
    handful of values per channel (2x2 maps at batch 2): the train gradients are ill-conditioned and
    two equally rounded fp32 runs (e.g. plain NCHW vs plain channels_last) differ by up to ~10x in
    their error, so fp32 gradients are judged all together, in L2.
    """
    if name == "cifar_resnet20":
        ref, fused = reference.cifar_resnet(20), models.cifar_resnet(20)
    else:
        ref, fused = getattr(reference, name)(), getattr(models, name)()
    randomize_bn(ref)
    fused.load_state_dict(ref.state_dict(), strict=True)
    x = rand_activation((batch, 3, size, size))
    g = None
    runs = {}
    for tag, model, dtype in (("fused64", copy.deepcopy(fused).double(), torch.float64),
                              ("plain64", copy.deepcopy(ref).double(), torch.float64),
                              ("fused32", fused, torch.float32), ("plain32", copy.deepcopy(ref), torch.float32)):
        model.train()
        out = model(x.to(dtype))
        g = torch.randn(out.shape, dtype=torch.float64) if g is None else g
        out.backward(g.to(dtype))
        grads = torch.cat([p.grad.flatten().double() for p in model.parameters()])
        model.eval()
        with torch.no_grad():
            ev = model(x.to(dtype))
        runs[tag] = (out, grads, ev, [b.double() for b in model.buffers()])
    f64, p64, f32, p32 = runs["fused64"], runs["plain64"], runs["fused32"], runs["plain32"]
    assert_close_ref(f64[0], p64[0], rtol=1e-6, name="float64 train out")
    assert_close_ref(f64[1], p64[1], rtol=1e-6, name="float64 grads")
    assert_close_ref(f64[2], p64[2], rtol=1e-6, name="float64 eval out")
    for i, (a, e) in enumerate(zip(f64[3], p64[3])):
        assert_close_ref(a, e, rtol=1e-6, name=f"float64 buffer {i}")
    assert_error_ratio(f32[0], p32[0], p64[0], k=4, name="fp32 train out")
    assert_error_ratio(f32[1], p32[1], p64[1], k=5, floor=1e-3, l2=True, name="fp32 grads")
    assert_error_ratio(f32[2], p32[2], p64[2], k=4, name="fp32 eval out")


def test_torch_compile_fullgraph_block_and_model():
    torch._dynamo.reset()
    fused, _ = _pair(BasicBlock, reference.BasicBlock, 4, 4)
    x = rand_activation((2, 4, 6, 6))
    compiled = torch.compile(copy.deepcopy(fused), fullgraph=True, backend="aot_eager")
    fused.train(), compiled.train()
    out_e, out_c = fused(x), compiled(x)
    assert rel_error(out_c, out_e) < 1e-5
    out_c.sum().backward()
    fused.eval(), compiled.eval()
    with torch.no_grad():
        assert rel_error(compiled(x), fused(x)) < 1e-5
    model = models.cifar_resnet(8)
    cm = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    xi = rand_activation((2, 3, 16, 16))
    assert rel_error(cm(xi), model(xi)) < 1e-4
