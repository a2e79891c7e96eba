"""The four primitive ops ``torch.ops.resfuse.*`` (C++ CPU kernels) against the float64 reference
primitives (:mod:`resfuse.reference.primitives`): every dtype and both memory layouts on odd shapes,
every flag combination, strided and mixed-layout operands, NaN propagation, large-mean numerics,
``torch.library.opcheck`` and argument errors."""
import pytest
import torch

import resfuse.ops.bn_act as ops
from resfuse import _extension
from resfuse.reference import primitives as ref
from resfuse.testing import assert_close_ref, poisoned, rand_activation

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason=f"resfuse._C not built: {_extension.ERROR}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(1, 3, 7, 7), (2, 5, 9, 9), (3, 17, 1, 1), (2, 64, 7, 7)]
# Several chunks per plane (NCHW), small planes grouped across N (NCHW), several row blocks (NHWC).
BIG_SHAPES = [(2, 3, 50, 50), (300, 2, 3, 3), (8, 17, 24, 24)]
LAYOUTS = [pytest.param(False, id="nchw"), pytest.param(True, id="nhwc")]
RESIDUALS = ["none", "identity", "scaled"]


def _param_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _vec(C, dtype, positive=False):
    """A fresh [C] per-channel vector in the parameter dtype of activations of ``dtype``."""
    v = torch.randn(C, dtype=torch.float64)
    v = v.abs() + 0.5 if positive else v
    return v.to(_param_dtype(dtype))


def _format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _check_activation(actual, expected, like, name):
    """Same dtype, shape and memory format as ``like``; values within the tolerance of the dtype."""
    assert actual.dtype == like.dtype and actual.shape == like.shape, name
    fmt = _format(like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous())
    assert actual.is_contiguous(memory_format=fmt), f"{name}: not in the input's memory format"
    assert_close_ref(actual, expected, like.dtype, name=name)


def _check_vector(actual, expected, input, name):
    """[C] per-channel results: parameter dtype, within its tolerance (computed from the same values)."""
    assert actual.dtype == _param_dtype(input.dtype), name
    assert_close_ref(actual, expected, actual.dtype, name=name)


def _forward_case(shape, dtype, channels_last, residual):
    x = rand_activation(shape, dtype, channels_last, offset=0.3)
    C = shape[1]
    r = rand_activation(shape, dtype, channels_last) if residual != "none" else None
    rs = _vec(C, dtype) if residual == "scaled" else None
    return x, _vec(C, dtype, positive=True), _vec(C, dtype), r, rs


# ---------------------------------------------------------------------------------------- bn_stats

@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + BIG_SHAPES, ids=str)
def test_bn_stats(shape, dtype, channels_last):
    x = rand_activation(shape, dtype, channels_last, offset=0.5)
    mean, var = ops.bn_stats(x)
    ref_mean, ref_var = ref.bn_stats(x)
    _check_vector(mean, ref_mean, x, "mean")
    _check_vector(var, ref_var, x, "var")


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("shape", [(8, 4, 56, 56), (8, 2048, 4, 4), (3, 1030, 5, 3)], ids=str)
def test_bn_stats_large_mean(channels_last, shape):
    # mean 1e4, std 1 in float32: raw sum/sum^2 in float32 would leave no correct digit of var.
    # (many channels on a small map: channels_last rows are few chunks of few rows each, merged per
    # channel block by block)
    x = rand_activation(shape, torch.float32, channels_last, offset=1e4)
    mean, var = ops.bn_stats(x)
    x64 = x.double()
    ref_var, ref_mean = torch.var_mean(x64, dim=(0, 2, 3), unbiased=False)
    assert ((var.double() - ref_var).abs() / ref_var).max().item() < 1e-5  # ~1e-7 measured
    assert ((mean.double() - ref_mean).abs() / ref_mean).max().item() < 1e-6
    # the backward sums are centred too: sum dz * (x - mean) keeps its precision
    g = rand_activation(x.shape, torch.float32, channels_last)
    _, sum_dz_xmu, _ = ops.bn_act_backward_reduce(g, poisoned(x), x, mean, None, None, False)
    expected = (g.double() * (x64 - mean.double().view(1, -1, 1, 1))).sum((0, 2, 3))
    assert_close_ref(sum_dz_xmu, expected, torch.float32, rtol=1e-4, name="sum_dz_xmu")


def test_bn_stats_empty():
    x = torch.randn(0, 3, 4, 4)
    mean, var = ops.bn_stats(x)
    assert mean.shape == var.shape == (3,) and mean.isnan().all() and var.isnan().all()


# ------------------------------------------------------------------------------------------ bn_act

@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bn_act(shape, dtype, channels_last, relu, residual):
    args = _forward_case(shape, dtype, channels_last, residual)
    out = ops.bn_act(*args, relu=relu)
    _check_activation(out, ref.bn_act(*args, relu=relu), args[0], "out")


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", BIG_SHAPES, ids=str)
def test_bn_act_big(shape, dtype, channels_last):
    args = _forward_case(shape, dtype, channels_last, "scaled")
    _check_activation(ops.bn_act(*args, relu=True), ref.bn_act(*args, relu=True), args[0], "out")


# --------------------------------------------------------------------------------- backward_reduce

def _backward_case(shape, dtype, channels_last, relu, residual):
    """grad_out, the forward output (a realistic ReLU mask), input, its mean, residual, res_mean."""
    x, scale, shift, r, _ = _forward_case(shape, dtype, channels_last, "identity" if residual else "none")
    out = ref.bn_act(x, scale, shift, r, None, relu=True) if relu else poisoned(x)  # not read without relu
    g = rand_activation(shape, dtype, channels_last)
    mean = ref.bn_stats(x)[0]
    res_mean = ref.bn_stats(r)[0] if residual else None
    return g, out, x, mean, r, res_mean


@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + BIG_SHAPES, ids=str)
def test_bn_act_backward_reduce(shape, dtype, channels_last, relu, residual):
    args = _backward_case(shape, dtype, channels_last, relu, residual)
    sums = ops.bn_act_backward_reduce(*args, relu=relu)
    expected = ref.bn_act_backward_reduce(*args, relu=relu)
    for name, actual, exp in zip(("sum_dz", "sum_dz_xmu", "sum_dz_rmu"), sums, expected):
        if name == "sum_dz_rmu" and not residual:
            assert actual.shape == (0,) and actual.dtype == _param_dtype(dtype)
            continue
        _check_vector(actual, exp, args[2], name)


# ---------------------------------------------------------------------------------- backward_apply

@pytest.mark.parametrize("mode", ["none", "dz", "affine"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + BIG_SHAPES[:1], ids=str)
def test_bn_act_backward_apply(shape, dtype, channels_last, relu, mode):
    g, out, x, _, r, _ = _backward_case(shape, dtype, channels_last, relu, mode == "affine")
    C = shape[1]
    a, b, d = _vec(C, dtype), _vec(C, dtype), _vec(C, dtype)
    res = (r, _vec(C, dtype), _vec(C, dtype), _vec(C, dtype)) if mode == "affine" else (None,) * 4
    args = (g, out, x, a, b, d, *res)
    grad_input, grad_residual = ops.bn_act_backward_apply(*args, relu=relu, residual_grad=mode != "none")
    exp_input, exp_residual = ref.bn_act_backward_apply(*args, relu=relu, residual_grad=mode != "none")
    _check_activation(grad_input, exp_input, x, "grad_input")
    if mode == "none":
        assert grad_residual.shape == (0,) and grad_residual.dtype == dtype
    else:
        _check_activation(grad_residual, exp_residual, x, "grad_residual")


# --------------------------------------------------------------------------------- backward_apply_

@pytest.mark.parametrize("form", ["inplace", "into_input", "accumulate", "accumulate_no_input", "fresh"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + BIG_SHAPES[:1], ids=str)
def test_bn_act_backward_apply_inplace(shape, dtype, channels_last, relu, form):
    """``grad_input (+)= a*dz [+ b*input] + d`` in place: into grad_out itself, into input itself,
    accumulated into another gradient (with and without the input term), or into a poisoned fresh
    buffer."""
    g, out, x, _, _, _ = _backward_case(shape, dtype, channels_last, relu, False)
    C = shape[1]
    a, b, d = _vec(C, dtype), _vec(C, dtype), _vec(C, dtype)
    inp = None if form == "accumulate_no_input" else x
    accumulate = form.startswith("accumulate")
    if form == "inplace":
        target = g.clone()
        grad_out = target
    elif form == "into_input":
        target = inp = x.clone()
        grad_out = g
    else:
        target = rand_activation(shape, dtype, channels_last) if accumulate else poisoned(x)
        grad_out = g
    expected = target.clone()
    ref.bn_act_backward_apply_(expected, g, out, inp, a, b, d, relu, accumulate)
    ptr = target.data_ptr()
    assert ops.bn_act_backward_apply_(target, grad_out, out, inp, a, b, d, relu, accumulate) is None
    assert target.data_ptr() == ptr
    _check_activation(target, expected, x, "grad_input")


def test_bn_act_backward_apply_inplace_matches_out_of_place():
    """The in-place op computes bit for bit what bn_act_backward_apply computes."""
    g, out, x, _, _, _ = _backward_case((2, 17, 9, 9), torch.float32, True, True, False)
    a, b, d = _vec(17, torch.float32), _vec(17, torch.float32), _vec(17, torch.float32)
    expected, _ = ops.bn_act_backward_apply(g, out, x, a, b, d, None, None, None, None, True, False)
    ops.bn_act_backward_apply_(g, g, out, x, a, b, d, True, False)
    assert torch.equal(g, expected)


# ------------------------------------------------------------- strided and mixed-layout operands

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", LAYOUTS)
def test_strided_and_mixed_layout_operands(dtype, channels_last):
    """A strided slice is copied once to its suggested layout; secondary operands stored in the other
    layout are converted to the input's. Results equal those of the dense tensors."""
    big = rand_activation((3, 6, 12, 11), dtype, channels_last, offset=0.3)
    x = big[:, 1:6, ::2, 1:]  # neither NCHW- nor channels_last-contiguous
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    other = _format(not channels_last)
    r = rand_activation(x.shape, dtype, not channels_last)
    g = rand_activation(x.shape, dtype).contiguous(memory_format=other)
    C = x.shape[1]
    scale, shift, rs = _vec(C, dtype, True), _vec(C, dtype), _vec(C, dtype)
    scale_strided = torch.stack([scale, scale], 1)[:, 0]  # a non-contiguous [C] vector
    dense = x.contiguous(memory_format=_format(channels_last))

    _check_vector(ops.bn_stats(x)[1], ref.bn_stats(dense)[1], x, "var")
    out = ops.bn_act(x, scale_strided, shift, r, rs, relu=True)
    _check_activation(out, ref.bn_act(dense, scale, shift, r, rs, relu=True), dense, "out")
    mean = ref.bn_stats(dense)[0]
    sums = ops.bn_act_backward_reduce(g, out, x, mean, r, mean, relu=True)
    for name, actual, exp in zip(("sum_dz", "sum_dz_xmu", "sum_dz_rmu"), sums,
                                 ref.bn_act_backward_reduce(g, out, dense, mean, r, mean, relu=True)):
        _check_vector(actual, exp, x, name)
    coefs = (scale, shift, rs, rs, shift, scale)
    grads = ops.bn_act_backward_apply(g, out, x, *coefs[:3], r, *coefs[3:], relu=True, residual_grad=True)
    expected = ref.bn_act_backward_apply(g, out, dense, *coefs[:3], r, *coefs[3:], relu=True, residual_grad=True)
    for name, actual, exp in zip(("grad_input", "grad_residual"), grads, expected):
        _check_activation(actual, exp, dense, name)


# ------------------------------------------------------------------------------------------- NaN

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", LAYOUTS)
def test_nan_propagates(dtype, channels_last):
    shape = (2, 5, 9, 9)
    x, scale, shift, r, rs = _forward_case(shape, dtype, channels_last, "scaled")
    x[1, 2, 3, 4] = float("nan")

    mean, var = ops.bn_stats(x)
    assert mean[2].isnan() and var[2].isnan()
    assert not mean[[0, 1, 3, 4]].isnan().any() and not var[[0, 1, 3, 4]].isnan().any()

    for relu in (True, False):  # NaN passes ReLU: no masking
        out = ops.bn_act(x, scale, shift, r, rs, relu=relu)
        assert out[1, 2, 3, 4].isnan() and out.isnan().sum() == 1

    out = ops.bn_act(x.nan_to_num(), scale, shift, None, None, relu=True)
    g = rand_activation(shape, dtype, channels_last)
    c, h, w = out[0].gt(0).nonzero()[0].tolist()  # a position where the ReLU passed
    g[0, c, h, w] = float("nan")
    sum_dz, sum_dz_xmu, _ = ops.bn_act_backward_reduce(g, out, x.nan_to_num(), mean.nan_to_num(), None, None, True)
    assert sum_dz[c].isnan() and sum_dz_xmu[c].isnan() and sum_dz.isnan().sum() == 1
    ones = torch.ones_like(scale)
    grad_input, _ = ops.bn_act_backward_apply(g, out, x, ones, ones, ones, None, None, None, None, True, False)
    assert grad_input[0, c, h, w].isnan() and grad_input[1, 2, 3, 4].isnan()
    assert grad_input.isnan().sum() == 2


# --------------------------------------------------------------------------------- reproducibility

@pytest.mark.parametrize("channels_last", LAYOUTS)
def test_reductions_independent_of_thread_count(channels_last):
    x = rand_activation((8, 17, 24, 24), torch.float32, channels_last, offset=0.3)
    g = rand_activation(x.shape, torch.float32, channels_last)
    mean = x.mean((0, 2, 3))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((*ops.bn_stats(x), *ops.bn_act_backward_reduce(g, x, x, mean, x, mean, True)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------- opcheck

def _opcheck_samples(dtype, channels_last, with_residual):
    shape = (2, 5, 7, 7)
    x, scale, shift, r, rs = _forward_case(shape, dtype, channels_last, "scaled" if with_residual else "none")
    out = ref.bn_act(x, scale, shift, r, rs, relu=True)
    g = rand_activation(shape, dtype, channels_last)
    mean = ref.bn_stats(x)[0]
    C = shape[1]
    res_mean = mean if with_residual else None
    res_coefs = (_vec(C, dtype), _vec(C, dtype), _vec(C, dtype)) if with_residual else (None,) * 3
    return {
        "bn_stats": (x,),
        "bn_act": (x, scale, shift, r, rs, True),
        "bn_act_backward_reduce": (g, out, x, mean, r, res_mean, True),
        "bn_act_backward_apply": (g, out, x, scale, shift, mean, r, *res_coefs, True, with_residual),
        "bn_act_backward_apply_": (poisoned(x), g, out, None if with_residual else x, scale, shift, mean, True,
                                   False),
    }


@pytest.mark.parametrize("op", ["bn_stats", "bn_act", "bn_act_backward_reduce", "bn_act_backward_apply",
                                "bn_act_backward_apply_"])
def test_opcheck(op):
    for dtype, channels_last, with_residual in [(torch.float32, False, False), (torch.bfloat16, True, True)]:
        args = _opcheck_samples(dtype, channels_last, with_residual)[op]
        torch.library.opcheck(getattr(torch.ops.resfuse, op).default, args)


# ------------------------------------------------------------------------------------- bad inputs

def _bad_cases():
    x = torch.randn(2, 5, 7, 7)
    v = torch.randn(5)
    g = torch.randn_like(x)
    return [
        ("rank", lambda: ops.bn_stats(x[0]), r"resfuse::bn_stats: input must be a 4-D"),
        ("int dtype", lambda: ops.bn_act(x.long(), v, v), r"input must be float32, float64, bfloat16 or float16"),
        ("scale channels", lambda: ops.bn_act(x, torch.randn(6), v), r"scale must have shape \[C\] = \[5\]"),
        ("scale dtype", lambda: ops.bn_act(x, v.double(), v), r"scale must be Float for Float input"),
        ("residual shape", lambda: ops.bn_act(x, v, v, torch.randn(2, 5, 7, 8)),
         r"resfuse::bn_act: residual must have the shape of input \[2, 5, 7, 7\], got \[2, 5, 7, 8\]"),
        ("residual dtype", lambda: ops.bn_act(x, v, v, x.double()), r"residual must have the dtype of input"),
        ("res_scale alone", lambda: ops.bn_act(x, v, v, None, v), r"res_scale is given but residual is None"),
        ("grad_out shape", lambda: ops.bn_act_backward_reduce(g[:1], x, x, v, None, None, True),
         r"bn_act_backward_reduce: grad_out must have the shape of input"),
        ("res_mean alone", lambda: ops.bn_act_backward_reduce(g, x, x, v, x, None, True),
         r"residual and res_mean must be given together"),
        ("mean channels", lambda: ops.bn_act_backward_reduce(g, x, x, v[:4], None, None, True),
         r"mean must have shape \[C\]"),
        ("res coefs", lambda: ops.bn_act_backward_apply(g, x, x, v, v, v, x, v, None, v, True, True),
         r"res_a, res_b and res_d must be given together"),
        ("residual missing", lambda: ops.bn_act_backward_apply(g, x, x, v, v, v, None, v, v, v, True, True),
         r"residual is required"),
        ("output shape", lambda: ops.bn_act_backward_apply(g, x[:, :4], x, v, v, v, None, None, None, None, True,
                                                           False), r"output must have the shape of input"),
        ("inplace accumulate into grad_out", lambda: ops.bn_act_backward_apply_(g, g, x, x, v, v, v, True, True),
         r"grad_input is grad_out; accumulate must be false"),
        ("inplace partial overlap", lambda: ops.bn_act_backward_apply_(g[:, :4], g[:, 1:], x[:, :4], None, v[:4],
                                                                       v[:4], v[:4], True, False),
         r"grad_input must be dense|shares memory with grad_out"),
        ("inplace strided target", lambda: ops.bn_act_backward_apply_(g[:, ::2], x[:, ::2], x[:, ::2], None,
                                                                      v[:3], v[:3], v[:3], True, False),
         r"bn_act_backward_apply_: grad_input must be dense NCHW or channels_last"),
        ("inplace overlaps input", lambda: ops.bn_act_backward_apply_(g[:, :4], x[:, :4], x[:, :4], g[:, 1:], v[:4],
                                                                      v[:4], v[:4], False, False),
         r"grad_input must be dense|shares memory with input without being the same tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_input(case):
    _, call, message = _bad_cases()[case]
    with pytest.raises((RuntimeError, ValueError), match=message):
        call()
