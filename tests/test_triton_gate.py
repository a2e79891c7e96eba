"""The Triton ``gate_act`` / ``gate_act_backward`` (the end of a squeeze-and-excitation block) against
``resfuse.reference.primitives`` (float64 inside), and ``resfuse.functional.gate_act`` on the Triton
backend against eager autograd."""
import os

import pytest
import torch

import resfuse
from resfuse import functional as RF
from resfuse.reference import primitives as P
from resfuse.testing import assert_close_ref, rand_activation
from resfuse.triton._testing import DTYPES, poison, same_format

pytestmark = pytest.mark.triton

DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# odd sizes; C above and below the reduction tile's channel block; H*W = 1; an image of several row chunks
SHAPES = [(2, 3, 5, 7), (3, 70, 3, 5), (4, 8, 1, 1), (2, 16, 20, 21)]


def _gate_ops():
    from resfuse.triton import gate_act
    return gate_act


def _operands(shape, dtype, cl):
    x = rand_activation(shape, dtype, channels_last=cl, device=DEV)
    r = rand_activation(shape, dtype, channels_last=cl, device=DEV)
    gate = (torch.rand(shape[0], shape[1], dtype=torch.float64) * 2 - 0.5).float().to(DEV)
    return x, gate, r



@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("res", [True, False], ids=["res", "nores"])
def test_gate_act_forward_and_backward(shape, dtype, cl, res):
    x, gate, r = _operands(shape, dtype, cl)
    r = r if res else None
    for relu in (True, False):
        with poison():
            y = _gate_ops().gate_act(x, gate, r, relu)
        assert y.dtype == dtype and same_format(y, x)
        assert_close_ref(y, P.gate_act(x, gate, r, relu), dtype)
        g = rand_activation(shape, dtype, channels_last=cl, device=DEV)
        for rg in (True, False):
            with poison():
                got = _gate_ops().gate_act_backward(g, y, x, gate, relu, rg)
            want = P.gate_act_backward(g, y, x, gate, relu, rg)
            assert_close_ref(got[0], want[0], dtype, name="grad_input")
            assert same_format(got[0], x) and got[1].shape == gate.shape and got[1].dtype == torch.float32
            assert_close_ref(got[1], want[1], torch.float32, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                             name="grad_gate")
            if rg:
                assert_close_ref(got[2], want[2], dtype, name="grad_residual")
            else:
                assert got[2].shape == (0,)
            with poison():
                no_gate = _gate_ops().gate_act_backward(g, y, None, gate, relu, rg)
            assert no_gate[1].shape == (0,) and torch.equal(no_gate[0], got[0])
            assert torch.equal(no_gate[2], got[2]) and same_format(no_gate[0], x)


def test_functional_on_the_triton_backend():
    """``functional.gate_act`` as one node on the Triton backend: output and gradients of x, s and the
    shortcut against eager autograd in float64, NaN propagating forward."""
    x, _, r = _operands((2, 12, 5, 6), torch.float32, True)
    x[0, 1, 2, 3] = float("nan")
    s = torch.rand(2, 12, 1, 1, device=DEV)
    leaves = [t.clone().requires_grad_() for t in (x, s, r)]
    with resfuse.use_backend("triton"):
        out = RF.gate_act(*leaves)
    assert resfuse.backends.last_used()["gate_act"] == "triton"
    ref = [t.detach().double().requires_grad_() for t in (x, s, r)]
    want = torch.relu(ref[0] * ref[1] + ref[2])
    assert torch.equal(out.isnan(), want.isnan())
    assert_close_ref(out.nan_to_num(), want.nan_to_num())
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g.double())
    for a, b, name in zip(leaves, ref, ("x", "s", "r")):
        assert torch.equal(a.grad.isnan(), b.grad.isnan()), name
        assert_close_ref(a.grad.nan_to_num(), b.grad.nan_to_num(), name=f"grad {name}")
