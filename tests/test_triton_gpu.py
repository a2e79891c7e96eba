"""The Triton kernels on a real GPU at every ResNet-50 layer shape (batch 32), bf16 / fp16 / fp32 (IEEE)
/ tf32, against float64 PyTorch. Skipped without CUDA; run by ``benchmarks/gpu_session.sh``.

Each conv shape is checked in its training form (BN-apply+ReLU prologue of the previous layer, stats
epilogue) and its inference form (bias + residual + ReLU epilogue, where the layer has a residual).
The BN primitives are checked at the activation shapes of each stage in both layouts.
"""
import pytest
import torch

from resfuse.testing import assert_close_ref, rand_activation, tolerance
from resfuse.triton._testing import assert_stats, poison, ref_conv, tf32

pytestmark = [pytest.mark.gpu, pytest.mark.triton,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BATCH = 32
# torchvision ResNet-50 v1.5 conv layers, de-duplicated:
# (name, C_in, H_in, C_out, k, stride, pad, residual in the block's last conv)
RESNET50 = [
    ("stem", 3, 224, 64, 7, 2, 3, False),
    ("l1.c1.first", 64, 56, 64, 1, 1, 0, False),
    ("l1.c1", 256, 56, 64, 1, 1, 0, False),
    ("l1.c2", 64, 56, 64, 3, 1, 1, False),
    ("l1.c3", 64, 56, 256, 1, 1, 0, True),
    ("l1.down", 64, 56, 256, 1, 1, 0, False),
    ("l2.c1.first", 256, 56, 128, 1, 1, 0, False),
    ("l2.c2.first", 128, 56, 128, 3, 2, 1, False),
    ("l2.c1", 512, 28, 128, 1, 1, 0, False),
    ("l2.c2", 128, 28, 128, 3, 1, 1, False),
    ("l2.c3", 128, 28, 512, 1, 1, 0, True),
    ("l2.down", 256, 56, 512, 1, 2, 0, False),
    ("l3.c1.first", 512, 28, 256, 1, 1, 0, False),
    ("l3.c2.first", 256, 28, 256, 3, 2, 1, False),
    ("l3.c1", 1024, 14, 256, 1, 1, 0, False),
    ("l3.c2", 256, 14, 256, 3, 1, 1, False),
    ("l3.c3", 256, 14, 1024, 1, 1, 0, True),
    ("l3.down", 512, 28, 1024, 1, 2, 0, False),
    ("l4.c1.first", 1024, 14, 512, 1, 1, 0, False),
    ("l4.c2.first", 512, 14, 512, 3, 2, 1, False),
    ("l4.c1", 2048, 7, 512, 1, 1, 0, False),
    ("l4.c2", 512, 7, 512, 3, 1, 1, False),
    ("l4.c3", 512, 7, 2048, 1, 1, 0, True),
    ("l4.down", 1024, 14, 2048, 1, 2, 0, False),
]
MODES = [("bf16", torch.bfloat16, False), ("fp16", torch.float16, False), ("fp32", torch.float32, False),
         ("tf32", torch.float32, True)]


def _w(co, ci, k, dtype):
    return (torch.randn(co, ci, k, k, dtype=torch.float64, device="cuda") / (ci * k * k) ** 0.5).to(dtype)


def _vec(c, lo, hi):
    return (torch.rand(c, dtype=torch.float64, device="cuda") * (hi - lo) + lo).float()


@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("layer", RESNET50, ids=[l[0] for l in RESNET50])
def test_resnet50_conv_layers(layer, mode):
    from resfuse.triton import conv
    name, ci, h, co, k, s, p, has_res = layer
    _, dtype, use_tf32 = mode
    torch.manual_seed(0)
    x = rand_activation((BATCH, ci, h, h), dtype, channels_last=True, device="cuda")
    w = _w(co, ci, k, dtype)
    oh = (h + 2 * p - k) // s + 1
    with tf32(use_tf32), poison():
        # training form: the previous layer's BN-apply + ReLU as prologue (not for the stem: raw image)
        pro = None if name == "stem" else (_vec(ci, 0.5, 1.5), _vec(ci, -0.5, 0.5), True)
        kw = dict(stats=True)
        if pro:
            kw.update(pro_scale=pro[0], pro_shift=pro[1], pro_relu=True)
        y, mean, var = conv.conv2d(x, w, (s, s), (p, p), (1, 1), **kw)
        ref = ref_conv(x, w, (s, s), (p, p), (1, 1), pro=pro)
        assert_close_ref(y, ref, dtype, tf32=use_tf32, name=f"{name} train y")
        assert_stats(mean, var, y, ref, dtype if not use_tf32 else torch.bfloat16, name=f"{name} stats")
        # inference form: bias (+ residual) + ReLU epilogue
        b = _vec(co, -0.5, 0.5)
        r = rand_activation((BATCH, co, oh, oh), dtype, channels_last=True, device="cuda") if has_res else None
        out, _, _ = conv.conv2d(x, w, (s, s), (p, p), (1, 1), epi_shift=b, residual=r, relu=True)
        ref2 = ref_conv(x, w, (s, s), (p, p), (1, 1), epi_shift=b, residual=r, relu=True)
        assert_close_ref(out, ref2, dtype, tf32=use_tf32, name=f"{name} infer out")


STAGES = [(64, 112), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("stage", STAGES, ids=[f"c{c}h{h}" for c, h in STAGES])
@pytest.mark.parametrize("cl", [True, False], ids=["nhwc", "nchw"])
def test_resnet50_bn_primitives(stage, dtype, cl):
    from resfuse.reference import primitives as P
    from resfuse.triton import bn_act
    c, h = stage
    shape = (BATCH, c, h, h)
    x = rand_activation(shape, dtype, channels_last=cl, device="cuda", scale=2.0, offset=1.0)
    go = rand_activation(shape, dtype, channels_last=cl, device="cuda")
    r = rand_activation(shape, dtype, channels_last=cl, device="cuda")
    sc, sh = _vec(c, 0.5, 1.5), _vec(c, -0.5, 0.5)
    with poison():
        mean, var = bn_act.bn_stats(x)
        rm, rv = P.bn_stats(x)
        assert_close_ref(var, rv, torch.float32, rtol=1e-5, name="var")
        assert ((mean.double() - rm.double()).abs().max() / rv.double().sqrt().max()).item() < 1e-5
        out = bn_act.bn_act(x, sc, sh, r, None, True)
        assert_close_ref(out, P.bn_act(x, sc, sh, r, None, True), dtype)
        sums = bn_act.bn_act_backward_reduce(go, out, x, mean, r, mean, True)
        for a, e in zip(sums, P.bn_act_backward_reduce(go, out, x, mean, r, mean, True)):
            assert_close_ref(a, e, torch.float32, rtol=5e-5)
        gx, gr = bn_act.bn_act_backward_apply(go, out, x, sc, sh, sc, r, sc, sh, sh, True, True)
        ex, er = P.bn_act_backward_apply(go, out, x, sc, sh, sc, r, sc, sh, sh, True, True)
        assert_close_ref(gx, ex, dtype)
        assert_close_ref(gr, er, dtype)
    assert tolerance(dtype) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("stage", [(256, 56), (2048, 7)], ids=lambda s: f"c{s[0]}h{s[1]}")
@pytest.mark.parametrize("cl", [True, False], ids=["nhwc", "nchw"])
def test_se_resnet50_gate_act(stage, dtype, cl):
    """The end of an SE-ResNet-50 block (gate multiply + shortcut add + ReLU) and its backward at the
    first and last stage's block outputs, batch 32 (8 cases: the GPU session's test step is bounded)."""
    from resfuse.reference import primitives as P
    from resfuse.triton import gate_act
    c, h = stage
    shape = (BATCH, c, h, h)
    x = rand_activation(shape, dtype, channels_last=cl, device="cuda")
    go = rand_activation(shape, dtype, channels_last=cl, device="cuda")
    r = rand_activation(shape, dtype, channels_last=cl, device="cuda")
    gate = torch.rand(BATCH, c, device="cuda")
    with poison():
        out = gate_act.gate_act(x, gate, r, True)
        assert_close_ref(out, P.gate_act(x, gate, r, True), dtype)
        got = gate_act.gate_act_backward(go, out, x, gate, True, True)
        want = P.gate_act_backward(go, out, x, gate, True, True)
        assert_close_ref(got[0], want[0], dtype, name="grad_input")
        assert_close_ref(got[1], want[1], torch.float32, rtol=1e-4, name="grad_gate")
        assert_close_ref(got[2], want[2], dtype, name="grad_residual")


def test_deterministic_on_gpu():
    from resfuse.triton import conv
    x = rand_activation((BATCH, 256, 14, 14), torch.bfloat16, channels_last=True, device="cuda")
    w = _w(256, 256, 3, torch.bfloat16)
    a = conv.conv2d(x, w, (1, 1), (1, 1), (1, 1), stats=True)
    b = conv.conv2d(x, w, (1, 1), (1, 1), (1, 1), stats=True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
