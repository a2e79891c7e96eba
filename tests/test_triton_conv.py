"""The fused Triton convolution (``resfuse.triton.conv.conv2d``) against float64 PyTorch.

Runs on CPU through Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``) or on a GPU. Tiny shapes:
the interpreter executes every program instance in numpy.
"""
import pytest
import torch

from resfuse.testing import assert_close_ref, rand_activation
from resfuse.triton._testing import DTYPES, assert_stats, poison, ref_conv, tf32

pytestmark = pytest.mark.triton


def _dev():
    import os
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _w(c_out, c_in, k, dtype, kw=None):
    kw = k if kw is None else kw
    return (torch.randn(c_out, c_in, k, kw, dtype=torch.float64) / (c_in * k * kw) ** 0.5).to(dtype).to(_dev())


def _act(shape, dtype, cl):
    return rand_activation(shape, dtype, channels_last=cl, device=_dev())


def _vec(c, lo=-0.5, hi=0.5):
    return (torch.rand(c, dtype=torch.float64) * (hi - lo) + lo).float().to(_dev())


def _run(x, w, stride, padding, dilation, **kw):
    from resfuse.triton import conv
    with poison():
        return conv.conv2d(x, w, stride, padding, dilation, **kw)


# geometry sweep: 1x1 (GEMM), strided 1x1 (projection), 3x3, odd sizes, stride 2, dilation, the 7x7 stem
# (flat-K loop, C_in = 3), small C_in through the flat loop, channel counts that leave partial tiles.
GEOMS = [
    # (N, C_in, H, W, C_out, KH, KW, stride, padding, dilation)
    (2, 16, 5, 5, 8, 1, 1, (1, 1), (0, 0), (1, 1)),
    (2, 16, 7, 7, 24, 1, 1, (2, 2), (0, 0), (1, 1)),
    (2, 16, 6, 6, 16, 3, 3, (1, 1), (1, 1), (1, 1)),
    (2, 24, 9, 7, 12, 3, 3, (2, 2), (1, 1), (1, 1)),
    (1, 16, 9, 9, 8, 3, 3, (1, 1), (2, 2), (2, 2)),
    (2, 3, 13, 11, 16, 7, 7, (2, 2), (3, 3), (1, 1)),
    (2, 5, 6, 7, 9, 3, 3, (1, 1), (1, 1), (1, 1)),
    (2, 40, 5, 5, 70, 3, 1, (1, 2), (1, 0), (1, 1)),
]


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: f"c{g[1]}k{g[5]}x{g[6]}s{g[7][0]}{g[7][1]}d{g[9][0]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_geometry(geom, dtype):
    n, ci, h, wd, co, kh, kw, s, p, d = geom
    cl = (ci + co) % 2 == 0  # alternate layouts over the sweep
    x = _act((n, ci, h, wd), dtype, cl)
    w = _w(co, ci, kh, dtype, kw)
    y, mean, var = _run(x, w, s, p, d)
    assert mean is None and var is None
    ref = ref_conv(x, w, s, p, d)
    assert y.dtype == dtype and y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert_close_ref(y, ref, dtype)


# fusion variants on a 3x3 stride-1 conv (and a stride-2 one): every flag combination conv2d accepts
TRAIN = [  # (prologue, prologue relu, residual: None | "full" | "range", stats)
    (False, False, None, True),
    (True, True, None, True),
    (True, False, None, True),
    (True, True, "full", True),
    (False, False, "range", True),
    (True, True, "range", True),
    (True, True, None, False),
    (False, False, "full", False),
]


@pytest.mark.parametrize("variant", TRAIN, ids=lambda v: f"pro{int(v[0])}{'r' if v[1] else ''}-res{v[2]}-st{int(v[3])}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [True, False], ids=["nhwc", "nchw"])
def test_conv_train_fusions(variant, dtype, cl):
    pro_on, pro_relu, res_kind, stats = variant
    n, ci, h, wd, co = 2, 16, 7, 6, 12
    stride = (2, 2) if res_kind == "range" else (1, 1)
    x = _act((n, ci, h, wd), dtype, cl)
    w = _w(co, ci, 3, dtype)
    oh, ow = (h - 1) // stride[0] + 1, (wd - 1) // stride[1] + 1
    pro = (_vec(ci, 0.5, 1.5), _vec(ci), pro_relu) if pro_on else None
    residual = None
    if res_kind == "full":
        residual = _act((n, co, oh, ow), dtype, cl)
    elif res_kind == "range":  # RiR: a channel slice of a wider channels_last tensor, read in place
        residual = _act((n, 2 * co, oh, ow), dtype, True)[:, :co // 2]
    kw = dict(residual=residual, stats=stats)
    if pro:
        kw.update(pro_scale=pro[0], pro_shift=pro[1], pro_relu=pro[2])
    y, mean, var = _run(x, w, stride, (1, 1), (1, 1), **kw)
    ref = ref_conv(x, w, stride, (1, 1), (1, 1), pro=pro, residual=residual)
    assert_close_ref(y, ref, dtype)
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    if stats:
        assert mean.dtype == torch.float32 and mean.shape == (co,)
        assert_stats(mean, var, y, ref, dtype)
    else:
        assert mean is None


INFER = [  # (epilogue: "bias" | "affine" | None, residual, relu)
    ("bias", False, True), ("bias", True, True), ("bias", True, False), ("affine", True, True),
    ("affine", False, False), (None, True, True), (None, False, True),
]


@pytest.mark.parametrize("variant", INFER, ids=lambda v: f"{v[0]}-res{int(v[1])}-relu{int(v[2])}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_inference_fusions(variant, dtype):
    epi, res_on, relu = variant
    n, ci, h, wd, co = 2, 8, 6, 5, 16
    cl = epi != "affine"
    x = _act((n, ci, h, wd), dtype, cl)
    w = _w(co, ci, 3, dtype)
    kw = dict(relu=relu)
    if epi == "bias":
        kw["epi_shift"] = _vec(co)
    elif epi == "affine":
        kw["epi_scale"], kw["epi_shift"] = _vec(co, 0.5, 2.0), _vec(co)
    if res_on:
        kw["residual"] = _act((n, co, h, wd), dtype, not cl)  # other layout: the launcher converts
    y, mean, _ = _run(x, w, (1, 1), (1, 1), (1, 1), **kw)
    ref = ref_conv(x, w, (1, 1), (1, 1), (1, 1), **kw)
    assert_close_ref(y, ref, dtype)
    assert mean is None


def test_flat_k_stem_with_prologue_and_stats():
    """The flat-K loop with every main-loop fusion: prologue on a padded 7x7 stride-2 conv."""
    x = _act((2, 3, 11, 9), torch.float32, True)
    w = _w(8, 3, 7, torch.float32)
    pro = (_vec(3, 0.5, 1.5), _vec(3, 0.2, 0.8), True)  # shift > 0: padding must still read as 0
    y, mean, var = _run(x, w, (2, 2), (3, 3), (1, 1), pro_scale=pro[0], pro_shift=pro[1], pro_relu=True,
                        stats=True)
    ref = ref_conv(x, w, (2, 2), (3, 3), (1, 1), pro=pro)
    assert_close_ref(y, ref, torch.float32)
    assert_stats(mean, var, y, ref, torch.float32)


def test_padding_stays_zero_after_prologue():
    """shift > 0 would make act(0*scale + shift) > 0 at padded positions if applied there."""
    x = torch.zeros(1, 16, 4, 4, device=_dev()).contiguous(memory_format=torch.channels_last)
    w = torch.ones(1, 16, 3, 3, device=_dev())
    y, _, _ = _run(x, w, (1, 1), (1, 1), (1, 1), pro_scale=torch.ones(16, device=_dev()),
                   pro_shift=torch.ones(16, device=_dev()), pro_relu=True)
    # interior: 9 taps x 16 channels x 1; corners: 4 taps; edges: 6 taps
    assert y[0, 0, 1, 1].item() == 144 and y[0, 0, 0, 0].item() == 64 and y[0, 0, 0, 1].item() == 96


def test_tf32_switch_selects_tf32_variant():
    """allow_tf32 picks the tf32 configs (the interpreter computes them in fp32; on a GPU the result is
    within the tf32 tolerance)."""
    from resfuse.triton import conv
    x = _act((2, 16, 5, 5), torch.float32, True)
    w = _w(16, 16, 3, torch.float32)
    with tf32(True):
        assert conv.compute_dtype(x) == "tf32"
        y, _, _ = _run(x, w, (1, 1), (1, 1), (1, 1))
    with tf32(False):
        assert conv.compute_dtype(x) == "fp32"
    assert_close_ref(y, ref_conv(x, w, (1, 1), (1, 1), (1, 1)), torch.float32, tf32=True)


def test_deterministic_run_to_run():
    x = _act((2, 16, 7, 7), torch.bfloat16, True)
    w = _w(16, 16, 3, torch.bfloat16)
    pro = dict(pro_scale=_vec(16, 0.5, 1.5), pro_shift=_vec(16), pro_relu=True)
    a = _run(x, w, (1, 1), (1, 1), (1, 1), stats=True, **pro)
    b = _run(x, w, (1, 1), (1, 1), (1, 1), stats=True, **pro)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_bad_arguments_are_rejected():
    from resfuse.triton import conv
    x = _act((1, 4, 5, 5), torch.float32, True)
    w = _w(4, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="excludes prologue"):
        conv.conv2d(x, w, (1, 1), (1, 1), (1, 1), epi_shift=_vec(4), stats=True)
    with pytest.raises(ValueError, match="groups must be 1"):
        conv.conv2d(x, _w(4, 2, 3, torch.float32), (1, 1), (1, 1), (1, 1))
    with pytest.raises(TypeError, match="dtype"):
        conv.conv2d(x, w.to(torch.bfloat16), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="residual shape"):
        conv.conv2d(x, w, (1, 1), (1, 1), (1, 1), residual=_act((1, 8, 5, 5), torch.float32, True))
