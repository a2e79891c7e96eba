"""The Triton BatchNorm primitives against ``resfuse.reference.primitives`` (float64 inside)."""
import os

import pytest
import torch

from resfuse.reference import primitives as P
from resfuse.testing import assert_close_ref, rand_activation
from resfuse.triton._testing import DTYPES, poison, same_format

pytestmark = pytest.mark.triton

DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# odd sizes; C above and below the reduction tile's channel block; H*W = 1 (layouts coincide)
SHAPES = [(2, 3, 5, 7), (2, 16, 6, 6), (3, 70, 3, 5), (4, 8, 1, 1)]


def _bn():
    from resfuse.triton import bn_act
    return bn_act


def _x(shape, dtype, cl, scale=1.0, offset=0.0):
    return rand_activation(shape, dtype, channels_last=cl, device=DEV, scale=scale, offset=offset)


def _v(c, lo=-1.0, hi=1.0):
    return (torch.rand(c, dtype=torch.float64) * (hi - lo) + lo).float().to(DEV)



@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [True, False], ids=["nhwc", "nchw"])
def test_bn_stats(shape, dtype, cl):
    x = _x(shape, dtype, cl, scale=2.0, offset=3.0)
    with poison():
        mean, var = _bn().bn_stats(x)
    rm, rv = P.bn_stats(x)
    assert mean.dtype == torch.float32 and mean.shape == (shape[1],)
    assert_close_ref(mean, rm, torch.float32, rtol=2e-6, name="mean")
    assert_close_ref(var, rv, torch.float32, rtol=2e-5, name="var")


def test_bn_stats_large_offset_is_numerically_safe():
    """mean 1e4, std 1: raw sum / sum-of-squares in fp32 would lose the variance entirely."""
    x = _x((4, 4, 32, 32), torch.float32, True, scale=1.0, offset=1e4)
    mean, var = _bn().bn_stats(x)
    rm, rv = P.bn_stats(x)
    assert_close_ref(var, rv, torch.float32, rtol=1e-4, name="var")


def test_bn_stats_empty_is_nan():
    mean, var = _bn().bn_stats(torch.zeros(0, 3, 4, 4, device=DEV))
    assert torch.isnan(mean).all() and torch.isnan(var).all()


RES = [None, "plain", "scaled"]


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("res", RES, ids=str)
def test_bn_act(shape, dtype, cl, res):
    c = shape[1]
    x = _x(shape, dtype, cl)
    scale, shift = _v(c, 0.5, 2.0), _v(c)
    r = _x(shape, dtype, cl) if res else None
    rs = _v(c, 0.5, 2.0) if res == "scaled" else None
    for relu in (True, False):
        with poison():
            y = _bn().bn_act(x, scale, shift, r, rs, relu)
        ref = P.bn_act(x, scale, shift, r, rs, relu)
        assert y.dtype == dtype and same_format(y, x)
        assert_close_ref(y, ref.double(), dtype)


def test_bn_act_nan_propagates_through_relu():
    x = _x((1, 4, 3, 3), torch.float32, True)
    x[0, 1, 1, 1] = float("nan")
    y = _bn().bn_act(x, torch.ones(4, device=DEV), torch.zeros(4, device=DEV), None, None, True)
    assert torch.isnan(y[0, 1, 1, 1]) and not torch.isnan(y).sum().item() > 1


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("res", [False, True], ids=["nores", "res"])
def test_bn_backward_reduce(shape, dtype, cl, res):
    c = shape[1]
    x = _x(shape, dtype, cl)
    go = _x(shape, dtype, cl)
    out = _x(shape, dtype, cl)  # sign pattern for the ReLU mask
    mean = _v(c)
    r = _x(shape, dtype, cl) if res else None
    rmean = _v(c) if res else None
    for relu in (True, False):
        with poison():
            got = _bn().bn_act_backward_reduce(go, out, x, mean, r, rmean, relu)
        ref = P.bn_act_backward_reduce(go, out, x, mean, r, rmean, relu)
        for name, a, e in zip(("sum_dz", "sum_dz_xmu", "sum_dz_rmu"), got, ref):
            assert a.dtype == torch.float32 and a.shape == e.shape, name
            if e.numel():
                assert_close_ref(a, e.double(), torch.float32, rtol=2e-5, name=name)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("mode", ["none", "dz", "affine", "dz-nores"])
def test_bn_backward_apply(shape, dtype, cl, mode):
    c = shape[1]
    x, go, out = _x(shape, dtype, cl), _x(shape, dtype, cl), _x(shape, dtype, cl)
    a, b, d = _v(c), _v(c), _v(c)
    r = _x(shape, dtype, cl) if mode in ("dz", "affine") else None
    ra, rb, rd = (_v(c), _v(c), _v(c)) if mode == "affine" else (None, None, None)
    for relu in (True, False):
        with poison():
            gx, gr = _bn().bn_act_backward_apply(go, out, x, a, b, d, r, ra, rb, rd, relu, mode != "none")
        ex, er = P.bn_act_backward_apply(go, out, x, a, b, d, r, ra, rb, rd, relu, mode != "none")
        assert gx.dtype == dtype and same_format(gx, x)
        assert_close_ref(gx, ex.double(), dtype, name="grad_input")
        assert gr.shape == er.shape and gr.dtype == er.dtype
        if er.numel():
            assert same_format(gr, x)
            assert_close_ref(gr, er.double(), dtype, name="grad_residual")


def test_relu_mask_matches_aten_threshold_backward():
    """dz = 0 where output <= 0 (NaN grad dropped there); NaN output keeps the gradient."""
    shape = (1, 2, 2, 2)
    out = torch.tensor([1.0, 0.0, -1.0, float("nan")] * 2, device=DEV).view(shape)
    go = torch.tensor([1.0, float("nan"), 2.0, 3.0] * 2, device=DEV).view(shape)
    x = torch.ones(shape, device=DEV)
    z = torch.zeros(2, device=DEV)
    one = torch.ones(2, device=DEV)
    gx, _ = _bn().bn_act_backward_apply(go, out, x, one, z, z, None, None, None, None, True, False)
    ex, _ = P.bn_act_backward_apply(go, out, x, one, z, z, None, None, None, None, True, False)
    assert torch.equal(torch.nan_to_num(gx, nan=-7.0), torch.nan_to_num(ex, nan=-7.0))


def test_mismatched_residual_arguments_raise():
    x = _x((1, 2, 2, 2), torch.float32, False)
    v = _v(2)
    with pytest.raises(ValueError, match="together"):
        _bn().bn_act_backward_reduce(x, x, x, v, x, None, True)
    with pytest.raises(ValueError, match="together"):
        _bn().bn_act_backward_apply(x, x, x, v, v, v, None, v, v, v, True, True)
