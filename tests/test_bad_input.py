"""Bad input gets a clear Python exception naming the argument; unknown/unavailable backends too."""
import pytest
import torch

import resfuse
from resfuse.nn import BasicBlock, ConvBNAct


@pytest.fixture
def m():
    return ConvBNAct(4, 8, 3)


def test_wrong_rank(m):
    with pytest.raises(ValueError, match=r"x must be a 4-D"):
        m(torch.randn(4, 5, 5))


def test_channel_mismatch(m):
    with pytest.raises(ValueError, match=r"expects 4 input channels, got 3"):
        m(torch.randn(2, 3, 5, 5))


def test_integer_dtype(m):
    with pytest.raises(TypeError, match=r"floating-point"):
        m(torch.ones(2, 4, 5, 5, dtype=torch.int32))


def test_dtype_mismatch(m):
    with pytest.raises(TypeError, match=r"weight is torch.float32 but the input is torch.float64"):
        m(torch.randn(2, 4, 5, 5, dtype=torch.float64))


def test_residual_shape(m):
    with pytest.raises(ValueError, match=r"residual must have the output's shape \[2, 8, 5, 5\]"):
        m(torch.randn(2, 4, 5, 5), torch.randn(2, 8, 5, 4))


def test_residual_type(m):
    with pytest.raises(TypeError, match=r"residual must be a Tensor"):
        m(torch.randn(2, 4, 5, 5), 3.0)


def test_groups_not_dividing():
    with pytest.raises(ValueError, match=r"divisible by groups"):
        ConvBNAct(6, 8, 3, groups=4)


def test_kernel_larger_than_input():
    m = ConvBNAct(3, 4, 7, padding=0)
    with pytest.raises(ValueError, match=r"larger than its padded input 5x5"):
        m(torch.randn(1, 3, 5, 5))


def test_block_channel_mismatch():
    with pytest.raises(ValueError, match=r"layers\[0\].conv expects 8 input channels"):
        BasicBlock(8, 8)(torch.randn(1, 4, 6, 6))


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"valid backends: auto, reference, cpu, cuda, triton"):
        resfuse.set_backend("cudnn")
    with pytest.raises(ValueError, match=r"valid backends"):
        with resfuse.use_backend("tpu"):
            pass


def test_explicit_unavailable_backend_raises(m):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with resfuse.use_backend("cuda"):
        with pytest.raises(resfuse.BackendUnavailable, match=r"'cuda'"):
            m(torch.randn(2, 4, 5, 5))


def test_auto_falls_back_and_explain_reports(m):
    with resfuse.use_backend("auto"):
        m(torch.randn(2, 4, 5, 5))
    report = resfuse.explain()
    assert "conv_bn_chain ->" in report and "backends:" in report
    for name in ("reference", "cpu", "cuda", "triton"):
        assert name in report


def test_nan_in_nan_out(m):
    m.eval()
    x = torch.randn(2, 4, 5, 5)
    x[1, 2, 3, 3] = float("nan")
    with torch.no_grad():
        out = m(x)
    assert torch.isnan(out[1]).any() and not torch.isnan(out[0]).any()
