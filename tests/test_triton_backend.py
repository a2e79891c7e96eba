"""The ``triton`` backend object: registration, ``supports``, the fused Backend methods against the
composed reference backend, the torch.library ops (fake tensors, torch.compile), and one fused block
(forward + backward) run end to end through ``resfuse.functional``."""
import os

import pytest
import torch
from torch import nn

from resfuse.backends import Backend, ConvGeom, ReferenceBackend, instance
from resfuse.testing import assert_close_ref, rand_activation
from resfuse.triton._testing import poison

pytestmark = pytest.mark.triton

DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
G1 = ConvGeom((1, 1), (1, 1), (1, 1), 1)
G2 = ConvGeom((2, 2), (1, 1), (1, 1), 1)


def _be():
    from resfuse.triton.backend import TritonBackend
    return TritonBackend()


def _ref():
    return ReferenceBackend()


def _x(shape, dtype=torch.float32, cl=True):
    return rand_activation(shape, dtype, channels_last=cl, device=DEV)


def _w(co, ci, k, dtype=torch.float32):
    return (torch.randn(co, ci, k, k, dtype=torch.float64) / (ci * k * k) ** 0.5).to(dtype).to(DEV)


def _v(c, lo=-0.5, hi=0.5):
    return (torch.rand(c, dtype=torch.float64) * (hi - lo) + lo).float().to(DEV)


def test_registered_and_available():
    be, reason = instance("triton")
    assert reason is None, reason
    assert be.name == "triton" and isinstance(be, Backend)


def test_supports_reasons():
    be = _be()
    x = _x((1, 2, 3, 3))
    assert be.supports(x, _v(2)) is None
    assert "float64" in be.supports(x.double()) or "dtype" in be.supports(x.double())
    assert "3-D" in be.supports(torch.zeros(2, 3, 4, device=DEV))
    assert "meta" in be.supports(torch.zeros(1, 2, 3, 3, device="meta"))
    assert "grouped" in be.supports_conv(_x((1, 4, 3, 3)), _w(4, 2, 3), ConvGeom((1, 1), (1, 1), (1, 1), 2))
    assert "weight dtype" in be.supports_conv(x, _w(2, 2, 3, torch.bfloat16), G1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relu", [True, False])
def test_conv_stats_prologue_matches_composition(dtype, relu):
    y_prev = _x((2, 8, 6, 6), dtype)
    w = _w(16, 8, 3, dtype)
    pro = (y_prev, _v(8, 0.5, 1.5), _v(8), relu)
    with poison():
        y, mean, var = _be().conv_stats(None, w, G2, pro)
    ry, rmean, rvar = _ref().conv_stats(None, w.double(), G2, (y_prev.double(), *pro[1:]))
    # the reference backend ran in float64 from the same inputs, but materialised the prologue in
    # float64 (no rounding to dtype), hence the dtype tolerance
    assert_close_ref(y, ry, dtype)
    assert_close_ref(var, rvar, dtype=torch.float32, rtol=2e-2 if dtype != torch.float32 else 2e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y2, m2, v2 = _be().conv_stats(None, w, G2, pro, stats=False)
    assert m2 is None and v2 is None and torch.equal(y, y2)


def test_conv_stats_with_rir_partial_identity_residual():
    s = _x((2, 8, 5, 5))
    w = _w(8, 8, 3)
    r = s[:, :4]  # the r stream of [r | t], a channel slice read in place
    y, mean, var = _be().conv_stats(s, w, G1, None, residual=r)
    ref = torch.nn.functional.conv2d(s.double(), w.double(), None, 1, 1)
    ref[:, :4] += r.double()
    assert_close_ref(y, ref, torch.float32)
    assert_close_ref(mean, ref.mean((0, 2, 3)), torch.float32, rtol=1e-5)


@pytest.mark.parametrize("res", [False, True])
def test_conv_bias_act_matches_composition(res):
    x = _x((2, 8, 6, 5), cl=False)
    w, b = _w(8, 8, 3), _v(8)
    r = _x((2, 8, 6, 5), cl=False) if res else None
    with poison():
        out = _be().conv_bias_act(x, w, b, G1, r, True)
    ref = _ref().conv_bias_act(x.double(), w.double(), b.double(), G1, None if r is None else r.double(), True)
    assert_close_ref(out, ref, torch.float32)
    assert out.is_contiguous()


def test_grouped_conv_falls_back_to_aten():
    g = ConvGeom((1, 1), (1, 1), (1, 1), 2)
    x, w = _x((2, 4, 5, 5)), _w(6, 2, 3)
    y, mean, var = _be().conv_stats(x, w, g)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 1, 1, 2)
    assert_close_ref(y, ref, torch.float32)
    assert_close_ref(var, ref.var((0, 2, 3), unbiased=False), torch.float32, rtol=2e-5)


def test_conv_backward_is_aten():
    x, w = _x((2, 4, 5, 5)), _w(6, 4, 3)
    gy = _x((2, 6, 5, 5))
    gx, gw = _be().conv_backward(gy, x, w, G1, True, True)
    rx, rw = Backend().conv_backward(gy, x, w, G1, True, True)
    assert torch.equal(gx, rx) and torch.equal(gw, rw)


def test_backward_primitives_through_backend():
    be = _be()
    y, go, out, r = (_x((2, 6, 4, 4)) for _ in range(4))
    mean, rmean = _v(6), _v(6)
    got = be.bn_act_backward_reduce(go, out, y, mean, r, rmean, True)
    from resfuse.reference import primitives as P
    ref = P.bn_act_backward_reduce(go, out, y, mean, r, rmean, True)
    for a, e in zip(got, ref):
        assert_close_ref(a, e, torch.float32, rtol=2e-5)
    a, b, d = _v(6), _v(6), _v(6)
    gx, gr = be.bn_act_backward_apply(go, out, y, a, b, d, r, a, b, d, True, True)
    ex, er = P.bn_act_backward_apply(go, out, y, a, b, d, r, a, b, d, True, True)
    assert_close_ref(gx, ex, torch.float32)
    assert_close_ref(gr, er, torch.float32)


def test_ops_fake_tensor_and_schema():
    from resfuse.triton import ops  # noqa: F401
    x, w = _x((2, 4, 5, 5)), _w(6, 4, 3)
    args = (x, w, [1, 1], [1, 1], [1, 1], _v(4), _v(4), True, None, None, None, False, True)
    torch.library.opcheck(torch.ops.resfuse.triton_conv.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.resfuse.triton_bn_act.default, (x, _v(4), _v(4), None, None, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.resfuse.triton_bn_stats.default, (x,),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_the_ops():
    be = _be()
    x, w = _x((2, 4, 5, 5)), _w(6, 4, 3)
    sc, sh = _v(6, 0.5, 1.5), _v(6)

    def f(x, w):
        y, mean, var = be.conv_stats(x, w, G1)
        return be.bn_act(y, sc, sh, None, None, True), mean

    eager = f(x, w)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


class _Block(nn.Module):
    """conv-bn-relu-conv-bn + identity, relu: a BasicBlock body."""

    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_block_through_functional(train):
    """A BasicBlock through resfuse.functional on the triton backend vs plain PyTorch in float64:
    output, input gradient, weight/BN gradients and running statistics."""
    from resfuse import functional
    from resfuse.backends import use_backend
    torch.manual_seed(1)
    blk = _Block(8).to(DEV)
    ref = _Block(8).to(DEV).double()
    ref.load_state_dict(blk.state_dict())
    blk.train(train)
    ref.train(train)
    x = _x((2, 8, 6, 6))
    x.requires_grad_(train)
    xr = x.detach().double().requires_grad_(train)
    with use_backend("triton"):
        out = functional.conv_bn_chain(x, [(blk.c1, blk.b1), (blk.c2, blk.b2)], x, True)
    h = torch.relu(ref.b1(ref.c1(xr)))
    out_ref = torch.relu(ref.b2(ref.c2(h)) + xr)
    assert_close_ref(out, out_ref, torch.float32, rtol=1e-4)
    if train:
        g = torch.randn_like(out)
        out.backward(g)
        out_ref.backward(g.double())
        assert_close_ref(x.grad, xr.grad, torch.float32, rtol=1e-4, name="grad x")
        for (n1, p1), (_, p2) in zip(blk.named_parameters(), ref.named_parameters()):
            assert_close_ref(p1.grad, p2.grad, torch.float32, rtol=1e-4, name=f"grad {n1}")
        assert_close_ref(blk.b1.running_var, ref.b1.running_var, torch.float32, rtol=1e-5)
