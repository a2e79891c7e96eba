"""GPU tests of resfuse's CUDA kernels (csrc/cuda): the four BN primitives against
``resfuse.reference.primitives`` and the fused convolutions against ``F.conv2d`` in float64.

Every op x dtype (float32, float64, bfloat16, float16) x memory format (NCHW, channels_last) x odd
sizes (C = 3, 5; H*W = 1, 30, 49; M and K not multiples of the tiles), with inputs whose storage is
misaligned (the scalar, non-16-byte-vector paths) as well as aligned ones. Outputs are NaN-poisoned:
before each op the free blocks of the CUDA caching allocator are filled with all-ones bits (NaN in
every float dtype), so an element a kernel forgets to write fails the comparison.

Skipped without a CUDA device; fails loudly if a device is present but resfuse._C was built without
its CUDA kernels. Run by ``benchmarks/gpu_session.sh`` (also under compute-sanitizer, ``-k "not large"``).
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from resfuse import _extension
from resfuse.reference import primitives as R
from resfuse.testing import assert_close_ref, rand_activation, tolerance

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["nchw", "nhwc"]
# (N, C, H, W): odd C and H*W (scalar paths), vector-friendly, a 1x1 image, several channel blocks
SHAPES = [(2, 5, 7, 7), (3, 16, 8, 8), (4, 40, 5, 6), (1, 3, 1, 1), (2, 72, 3, 3)]
LARGE = (8, 64, 28, 28)


@pytest.fixture(autouse=True)
def _need_kernels():
    if not _extension.has_cuda_kernels():
        pytest.fail("a CUDA device is present but resfuse._C was built without its CUDA kernels "
                    f"({_extension.ERROR or 'CPU-only build'}); rebuild with RESFUSE_BUILD_CUDA=1")


def ops():
    return torch.ops.resfuse


def poison(*likes):
    """Fill the caching allocator's free memory with NaN bits so that the next outputs start as NaN.

    After ``empty_cache`` the only free blocks are these: two of each ``like``'s size (outputs of
    that size take them) and a few small ones (per-channel results, workspaces), all bits set.
    """
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    sizes = [t.numel() * t.element_size() for t in likes for _ in range(2)] + [512] * 8 + [4096] * 4 + [1 << 16] * 2
    blocks = [torch.full((n // 4 + 1,), -1, dtype=torch.int32, device="cuda") for n in sizes]
    del blocks


def act(shape, dtype, layout, *, offset=0.0, scale=1.0, misalign=False):
    """A random activation on the GPU; ``misalign`` shifts its storage by one element (not 16-byte aligned)."""
    t = rand_activation(shape, dtype, layout == "nhwc", device="cuda", offset=offset, scale=scale)
    if not misalign:
        return t
    buf = torch.empty(t.numel() + 1, dtype=dtype, device="cuda")
    out = buf[1:].as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


def vec(c, dtype, lo=-1.0, hi=1.0):
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.empty(c, dtype=pd, device="cuda").uniform_(lo, hi)


def acc_tol(dtype):
    """Tolerance of per-channel results: they are accumulated in float32 (float64 for float64)."""
    return tolerance(torch.float64 if dtype == torch.float64 else torch.float32)


def assert_layout(out, like):
    fmt = torch.channels_last if like.is_contiguous(memory_format=torch.channels_last) and not \
        like.is_contiguous() else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"output strides {out.stride()} not in {fmt}"


def test_poison_fills_new_allocations_with_nan():
    like = torch.empty(1000, device="cuda")
    poison(like)
    t = torch.empty(1000, dtype=torch.bfloat16, device="cuda")
    assert torch.isnan(t).all(), "poisoning the caching allocator did not work: NaN checks would be void"


# ---- bn_stats ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("misalign", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_stats(dtype, layout, shape, misalign):
    x = act(shape, dtype, layout, offset=0.5, misalign=misalign)
    poison(x)
    mean, var = ops().bn_stats(x)
    rmean, rvar = R.bn_stats(x)
    assert mean.dtype == rmean.dtype and var.dtype == rvar.dtype
    assert_close_ref(mean, rmean, rtol=acc_tol(dtype), name="mean")
    assert_close_ref(var, rvar, rtol=acc_tol(dtype), name="var")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_stats_large(dtype, layout):
    x = act(LARGE, dtype, layout, offset=0.5)
    mean, var = ops().bn_stats(x)
    rmean, rvar = R.bn_stats(x)
    assert_close_ref(mean, rmean, rtol=acc_tol(dtype), name="mean")
    assert_close_ref(var, rvar, rtol=acc_tol(dtype), name="var")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_stats_large_mean_float32(layout):
    # mean 1e4, std 1: raw sum/sum^2 in float32 would lose every digit of the variance
    x = act((4, 24, 16, 16), torch.float32, layout, offset=1e4)
    mean, var = ops().bn_stats(x)
    rmean, rvar = R.bn_stats(x)
    assert_close_ref(mean, rmean, rtol=1e-6, name="mean")
    assert_close_ref(var, rvar, rtol=1e-3, name="var")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_stats_deterministic(layout):
    x = act(LARGE, torch.bfloat16, layout)
    a = ops().bn_stats(x)
    b = ops().bn_stats(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_bn_stats_empty():
    x = torch.empty((0, 4, 3, 3), device="cuda")
    mean, var = ops().bn_stats(x)
    assert mean.shape == (4,) and torch.isnan(mean).all() and torch.isnan(var).all()
    mean, var = ops().bn_stats(torch.empty((2, 0, 3, 3), device="cuda"))
    assert mean.shape == (0,) and var.shape == (0,)


# ---- bn_act -----------------------------------------------------------------------------------------

BN_ACT_MODES = [("none", False), ("none", True), ("add", True), ("scaled", True), ("scaled", False)]
BN_ACT_CASES = [(d, lo, s, r, u) for d, lo, s, (r, u) in itertools.product(DTYPES, LAYOUTS, SHAPES, BN_ACT_MODES)]


@pytest.mark.parametrize("dtype,layout,shape,res,relu", BN_ACT_CASES,
                         ids=[f"{d}-{lo}-{s}-{r}-relu{int(u)}" for d, lo, s, r, u in BN_ACT_CASES])
def test_bn_act(dtype, layout, shape, res, relu):
    x = act(shape, dtype, layout)
    C = shape[1]
    scale, shift = vec(C, dtype, 0.5, 1.5), vec(C, dtype)
    r = act(shape, dtype, layout) if res != "none" else None
    rs = vec(C, dtype, 0.5, 1.5) if res == "scaled" else None
    poison(x)
    out = ops().bn_act(x, scale, shift, r, rs, relu)
    assert_layout(out, x)
    assert_close_ref(out, R.bn_act(x, scale, shift, r, rs, relu), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_act_misaligned_and_mixed_layouts(dtype, layout):
    shape = (3, 16, 8, 8)
    x = act(shape, dtype, layout, misalign=True)
    other = "nchw" if layout == "nhwc" else "nhwc"
    r = act(shape, dtype, other)  # the residual in the other memory format is copied once
    scale, shift, rs = vec(16, dtype), vec(16, dtype), vec(16, dtype)
    poison(x)
    out = ops().bn_act(x, scale, shift, r, rs, True)
    assert_close_ref(out, R.bn_act(x, scale, shift, r, rs, True), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_act_large(dtype, layout):
    x, r = act(LARGE, dtype, layout), act(LARGE, dtype, layout)
    scale, shift = vec(LARGE[1], dtype), vec(LARGE[1], dtype)
    out = ops().bn_act(x, scale, shift, r, None, True)
    assert_close_ref(out, R.bn_act(x, scale, shift, r, None, True), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_act_nan_propagates(layout):
    x = act((2, 8, 4, 4), torch.float32, layout)
    x[0, 3, 1, 2] = float("nan")
    x[1, 0, 0, 0] = float("nan")
    out = ops().bn_act(x, vec(8, torch.float32), vec(8, torch.float32), None, None, True)
    assert torch.isnan(out[0, 3, 1, 2]) and torch.isnan(out[1, 0, 0, 0])
    assert torch.isnan(out).sum() == 2


# ---- bn_act_backward_reduce -------------------------------------------------------------------------

def backward_inputs(shape, dtype, layout, misalign=False):
    g = act(shape, dtype, layout, misalign=misalign)
    out = act(shape, dtype, layout, offset=0.3, misalign=misalign)
    out[torch.rand(shape, device="cuda") < 0.15] = 0  # exact zeros: the ReLU mask is output > 0
    x = act(shape, dtype, layout, offset=0.5, misalign=misalign)
    return g, out, x


REDUCE_CASES = list(itertools.product(DTYPES, LAYOUTS, SHAPES, [False, True], [False, True]))


@pytest.mark.parametrize("dtype,layout,shape,residual,relu", REDUCE_CASES,
                         ids=[f"{d}-{lo}-{s}-res{int(r)}-relu{int(u)}" for d, lo, s, r, u in REDUCE_CASES])
def test_bn_act_backward_reduce(dtype, layout, shape, residual, relu):
    C = shape[1]
    g, out, x = backward_inputs(shape, dtype, layout, misalign=shape[1] == 16)
    mean = vec(C, dtype)
    r = act(shape, dtype, layout, offset=-0.2) if residual else None
    rmean = vec(C, dtype) if residual else None
    poison(x)
    got = ops().bn_act_backward_reduce(g, out, x, mean, r, rmean, relu)
    want = R.bn_act_backward_reduce(g, out, x, mean, r, rmean, relu)
    for name, a, e in zip(["sum_dz", "sum_dz_xmu", "sum_dz_rmu"], got, want):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert_close_ref(a, e, rtol=acc_tol(dtype), name=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_act_backward_reduce_large(dtype, layout):
    g, out, x = backward_inputs(LARGE, dtype, layout)
    r = act(LARGE, dtype, layout)
    mean, rmean = vec(LARGE[1], dtype), vec(LARGE[1], dtype)
    got = ops().bn_act_backward_reduce(g, out, x, mean, r, rmean, True)
    want = R.bn_act_backward_reduce(g, out, x, mean, r, rmean, True)
    for name, a, e in zip(["sum_dz", "sum_dz_xmu", "sum_dz_rmu"], got, want):
        assert_close_ref(a, e, rtol=acc_tol(dtype), name=name)
    again = ops().bn_act_backward_reduce(g, out, x, mean, r, rmean, True)
    assert all(torch.equal(u, v) for u, v in zip(got, again)), "not deterministic"


def test_bn_act_backward_relu_mask_is_a_select():
    # grad_out inf/NaN under output <= 0 is dropped (threshold_backward), NaN output passes the gradient
    shape = (1, 4, 2, 2)
    g, out, x = (torch.ones(shape, device="cuda") for _ in range(3))
    out[0, 0, 0, 0], g[0, 0, 0, 0] = 0.0, float("inf")
    out[0, 1, 0, 0], g[0, 1, 0, 0] = -1.0, float("nan")
    out[0, 2, 0, 0] = float("nan")
    mean = torch.zeros(4, device="cuda")
    got = ops().bn_act_backward_reduce(g, out, x, mean, None, None, True)
    want = R.bn_act_backward_reduce(g, out, x, mean, None, None, True)
    for a, e in zip(got[:2], want[:2]):
        assert torch.equal(a, e), (a, e)
    one = torch.ones(4, device="cuda")
    gi, _ = ops().bn_act_backward_apply(g, out, x, one, one * 0, one * 0, None, None, None, None, True, False)
    gi_ref, _ = R.bn_act_backward_apply(g, out, x, one, one * 0, one * 0, None, None, None, None, True, False)
    assert torch.equal(gi, gi_ref)


# ---- bn_act_backward_apply --------------------------------------------------------------------------

APPLY_MODES = [("none", True), ("none", False), ("dz", True), ("coef", True), ("coef", False)]
APPLY_CASES = [(d, lo, s, r, u) for d, lo, s, (r, u) in itertools.product(DTYPES, LAYOUTS, SHAPES, APPLY_MODES)]


@pytest.mark.parametrize("dtype,layout,shape,res,relu", APPLY_CASES,
                         ids=[f"{d}-{lo}-{s}-{r}-relu{int(u)}" for d, lo, s, r, u in APPLY_CASES])
def test_bn_act_backward_apply(dtype, layout, shape, res, relu):
    C = shape[1]
    g, out, x = backward_inputs(shape, dtype, layout, misalign=shape[1] == 40)
    a, b, d = vec(C, dtype), vec(C, dtype), vec(C, dtype)
    residual_grad = res != "none"
    r = act(shape, dtype, layout) if res == "coef" else None
    ra, rb, rd = (vec(C, dtype), vec(C, dtype), vec(C, dtype)) if res == "coef" else (None, None, None)
    poison(x)
    gi, gr = ops().bn_act_backward_apply(g, out, x, a, b, d, r, ra, rb, rd, relu, residual_grad)
    gi_ref, gr_ref = R.bn_act_backward_apply(g, out, x, a, b, d, r, ra, rb, rd, relu, residual_grad)
    assert_layout(gi, x)
    assert_close_ref(gi, gi_ref, dtype, name="grad_input")
    assert gr.shape == gr_ref.shape
    if residual_grad:
        assert_layout(gr, x)
        assert_close_ref(gr, gr_ref, dtype, name="grad_residual")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_act_backward_apply_large(dtype, layout):
    C = LARGE[1]
    g, out, x = backward_inputs(LARGE, dtype, layout)
    r = act(LARGE, dtype, layout)
    coef = [vec(C, dtype) for _ in range(6)]
    gi, gr = ops().bn_act_backward_apply(g, out, x, *coef[:3], r, *coef[3:], True, True)
    gi_ref, gr_ref = R.bn_act_backward_apply(g, out, x, *coef[:3], r, *coef[3:], True, True)
    assert_close_ref(gi, gi_ref, dtype, name="grad_input")
    assert_close_ref(gr, gr_ref, dtype, name="grad_residual")


# ---- fused convolutions -----------------------------------------------------------------------------

# (x shape, w shape, stride, padding, dilation): a C=3 stem (scalar loads), K below / above / not a
# multiple of the N tile, strided 1x1, dilated, asymmetric geometry, K not a multiple of 8, many k-tiles
CONV_CASES = {
    "stem7x7s2": ((2, 3, 17, 19), (8, 3, 7, 7), (2, 2), (3, 3), (1, 1)),
    "3x3-k24": ((2, 16, 9, 11), (24, 16, 3, 3), (1, 1), (1, 1), (1, 1)),
    "1x1s2-k136": ((1, 64, 14, 14), (136, 64, 1, 1), (2, 2), (0, 0), (1, 1)),
    "3x3-dil2": ((2, 8, 13, 13), (16, 8, 3, 3), (1, 1), (2, 2), (2, 2)),
    "asym": ((2, 8, 10, 9), (12, 8, 3, 2), (2, 1), (0, 2), (1, 3)),
    "k5": ((1, 8, 6, 6), (5, 8, 3, 3), (1, 1), (1, 1), (1, 1)),
    "3x3-c96-m675": ((3, 96, 15, 15), (64, 96, 3, 3), (1, 1), (1, 1), (1, 1)),
    "1x1-k256": ((2, 32, 7, 7), (256, 32, 1, 1), (1, 1), (0, 0), (1, 1)),
}


def conv_inputs(case, dtype, *, misalign=False, w_layout="nhwc"):
    xs, ws, stride, padding, dilation = CONV_CASES[case]
    x = act(xs, dtype, "nhwc", offset=0.5, misalign=misalign)
    fan_in = ws[1] * ws[2] * ws[3]
    w = (torch.randn(ws, dtype=torch.float64, device="cuda") / fan_in ** 0.5 + 0.05).to(dtype)
    if w_layout == "nhwc":
        w = w.contiguous(memory_format=torch.channels_last)
    return x, w, stride, padding, dilation


def conv_ref(x, w, stride, padding, dilation, scale=None, bias=None, residual=None, relu=False):
    y = F.conv2d(x.double(), w.double(), None, stride, padding, dilation)
    if scale is not None:
        y = y * scale.double().view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.double().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


def conv_out_shape(case):
    xs, ws, stride, padding, dilation = CONV_CASES[case]
    p = (xs[2] + 2 * padding[0] - dilation[0] * (ws[2] - 1) - 1) // stride[0] + 1
    q = (xs[3] + 2 * padding[1] - dilation[1] * (ws[3] - 1) - 1) // stride[1] + 1
    return (xs[0], ws[0], p, q)


CONV_EPILOGUES = {  # (scale, bias, residual, relu)
    "plain": (False, False, False, False),
    "bias-relu": (False, True, False, True),
    "scale-bias-res-relu": (True, True, True, True),
    "bias-res": (False, True, True, False),
}


@pytest.mark.parametrize("epi", list(CONV_EPILOGUES))
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_bias_act(dtype, case, epi):
    use_scale, use_bias, use_res, relu = CONV_EPILOGUES[epi]
    x, w, stride, padding, dilation = conv_inputs(case, dtype)
    K = w.shape[0]
    scale = vec(K, dtype, 0.5, 1.5) if use_scale else None
    bias = vec(K, dtype) if use_bias else None
    res = act(conv_out_shape(case), dtype, "nhwc") if use_res else None
    poison(x, res if res is not None else x)
    y = ops().cuda_conv_bias_act(x, w, scale, bias, list(stride), list(padding), list(dilation), res, relu)
    assert y.dtype == dtype and y.shape == conv_out_shape(case)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_ref(y, conv_ref(x, w, stride, padding, dilation, scale, bias, res, relu), dtype)


@pytest.mark.parametrize("case", ["3x3-k24", "1x1s2-k136"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_bias_act_any_layout(dtype, case):
    # misaligned x (scalar loads despite C % 8 == 0), NCHW weight and an NCHW residual: copied once
    x, w, stride, padding, dilation = conv_inputs(case, dtype, misalign=True, w_layout="nchw")
    res = act(conv_out_shape(case), dtype, "nchw")
    bias = vec(w.shape[0], dtype)
    poison(x)
    y = ops().cuda_conv_bias_act(x, w, None, bias, list(stride), list(padding), list(dilation), res, True)
    assert_close_ref(y, conv_ref(x, w, stride, padding, dilation, None, bias, res, True), dtype)
    x_nchw = x.contiguous()
    y2 = ops().cuda_conv_bias_act(x_nchw, w, None, bias, list(stride), list(padding), list(dilation), res, True)
    assert y2.is_contiguous(memory_format=torch.channels_last)
    assert_close_ref(y2, conv_ref(x, w, stride, padding, dilation, None, bias, res, True), dtype)


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_stats(dtype, case):
    x, w, stride, padding, dilation = conv_inputs(case, dtype)
    poison(x)
    y, mean, var = ops().cuda_conv_stats(x, w, list(stride), list(padding), list(dilation))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_ref(y, conv_ref(x, w, stride, padding, dilation), dtype, name="y")
    # the statistics describe y as stored (after rounding to dtype)
    rmean, rvar = R.bn_stats(y)
    assert mean.dtype == rmean.dtype
    assert_close_ref(mean, rmean, rtol=acc_tol(dtype), name="mean")
    assert_close_ref(var, rvar, rtol=acc_tol(dtype), name="var")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_conv_large(dtype):
    # ResNet-50 stage-1 3x3 and a stage-3 1x1 expansion, with the statistics
    for xs, ws, pad in [((8, 64, 56, 56), (64, 64, 3, 3), 1), ((8, 256, 14, 14), (1024, 256, 1, 1), 0)]:
        x = act(xs, dtype, "nhwc", offset=0.5)
        w = (torch.randn(ws, device="cuda", dtype=torch.float64) / (ws[1] * ws[2] * ws[3]) ** 0.5).to(dtype)
        w = w.contiguous(memory_format=torch.channels_last)
        y, mean, var = ops().cuda_conv_stats(x, w, [1, 1], [pad, pad], [1, 1])
        assert_close_ref(y, conv_ref(x, w, (1, 1), (pad, pad), (1, 1)), dtype, name="y")
        rmean, rvar = R.bn_stats(y)
        assert_close_ref(mean, rmean, rtol=acc_tol(dtype), name="mean")
        assert_close_ref(var, rvar, rtol=acc_tol(dtype), name="var")
        again = ops().cuda_conv_stats(x, w, [1, 1], [pad, pad], [1, 1])
        assert all(torch.equal(u, v) for u, v in zip((y, mean, var), again)), "not deterministic"


def test_conv_empty_batch():
    x = torch.empty((0, 8, 5, 5), dtype=torch.bfloat16, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.randn((16, 8, 3, 3), dtype=torch.bfloat16, device="cuda")
    y, mean, var = ops().cuda_conv_stats(x, w, [1, 1], [1, 1], [1, 1])
    assert y.shape == (0, 16, 5, 5) and torch.isnan(mean).all() and torch.isnan(var).all()


def test_conv_bad_inputs():
    x = act((2, 8, 6, 6), torch.bfloat16, "nhwc")
    w = torch.randn((16, 8, 3, 3), dtype=torch.bfloat16, device="cuda")
    op = ops().cuda_conv_bias_act
    with pytest.raises(RuntimeError, match=r"resfuse::cuda_conv_bias_act: w must have x.size\(1\) = 8"):
        op(x, w[:, :4], None, None, [1, 1], [1, 1], [1, 1], None, True)
    with pytest.raises(RuntimeError, match=r"resfuse::cuda_conv_bias_act: residual must have the shape"):
        op(x, w, None, None, [1, 1], [1, 1], [1, 1], act((2, 16, 5, 6), torch.bfloat16, "nhwc"), True)
    with pytest.raises(RuntimeError, match=r"resfuse::cuda_conv_bias_act: bias must be Float"):
        op(x, w, None, torch.zeros(16, device="cuda", dtype=torch.float64), [1, 1], [1, 1], [1, 1], None, True)
    with pytest.raises(RuntimeError, match=r"resfuse::cuda_conv_bias_act: w must have the dtype of x"):
        op(x, w.float(), None, None, [1, 1], [1, 1], [1, 1], None, True)
    with pytest.raises(RuntimeError, match=r"resfuse::cuda_conv_stats: stride must be >= 1"):
        ops().cuda_conv_stats(x, w, [0, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match=r"resfuse::cuda_conv_stats: output size is empty"):
        ops().cuda_conv_stats(x, w, [1, 1], [0, 0], [4, 4])


def test_opcheck():
    x = act((2, 8, 6, 6), torch.bfloat16, "nhwc")
    w = torch.randn((16, 8, 3, 3), dtype=torch.bfloat16, device="cuda").contiguous(memory_format=torch.channels_last)
    bias, res = vec(16, torch.bfloat16), act((2, 16, 6, 6), torch.bfloat16, "nhwc")
    torch.library.opcheck(ops().cuda_conv_bias_act.default, (x, w, None, bias, [1, 1], [1, 1], [1, 1], res, True))
    torch.library.opcheck(ops().cuda_conv_stats.default, (x, w, [1, 1], [1, 1], [1, 1]))
    xs = act((2, 8, 6, 6), torch.float32, "nchw")
    s = vec(8, torch.float32)
    torch.library.opcheck(ops().bn_stats.default, (xs,))
    torch.library.opcheck(ops().bn_act.default, (xs, s, s, xs, s, True))
    torch.library.opcheck(ops().bn_act_backward_reduce.default, (xs, xs, xs, s, xs, s, True))
    torch.library.opcheck(ops().bn_act_backward_apply.default, (xs, xs, xs, s, s, s, xs, s, s, s, True, True))
