"""The CPU per-channel ops of a BN layer (``csrc/cpu/bn_params.cpp``): ``bn_normalize``,
``bn_backward_coefficients`` and ``bn_running_update_`` against the tensor-op form they replace in the
fused chain (``resfuse/ops/chain.py``, ``resfuse/functional.py`` — still what a GPU and torch.compile
run) and against float64 formulas; a whole train step through either form; ``opcheck``; argument
errors."""
import copy

import pytest
import torch
import torch.nn.functional as F

import resfuse
from resfuse import _extension, functional
from resfuse.backends import ConvGeom
from resfuse.ops import bn_act as prim
from resfuse.ops import chain

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason=f"resfuse._C not built: {_extension.ERROR}")

DTYPES = [torch.float32, torch.float64]


@pytest.fixture
def tensor_ops(monkeypatch):
    """Run the callers' tensor-op form (what a GPU and torch.compile run) instead of the C++ ops."""
    real = prim.params_in_cpp

    def use(on: bool):
        monkeypatch.setattr(prim, "params_in_cpp", (lambda t: False) if on else real)
    return use


def _vec(c, dtype, positive=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(c, generator=g, dtype=torch.float64)
    return (v.abs() + 0.1 if positive else v).to(dtype)


def _spec(batch_stats, affine, eps=1e-5):
    layer = chain.LayerSpec(ConvGeom((1, 1), (0, 0), (1, 1), 1), eps, batch_stats, affine)
    return layer, chain.ChainSpec((layer,), "none", None, False, True, False)


def _close(a, b, dtype):
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("c", [1, 7, 64])
def test_normalise_and_coefficients_match_the_tensor_ops(tensor_ops, dtype, affine, batch_stats, c):
    """Forward coefficients (incl. the unbiased variance) and backward coefficients: the C++ ops and
    the tensor-op form agree, and both match the float64 formulas."""
    L, spec = _spec(batch_stats, affine, eps=1e-3)
    y = torch.empty(3, c, 5, 7, dtype=dtype)  # count 105
    mean, var = _vec(c, dtype, seed=1), _vec(c, dtype, positive=True, seed=2)
    gamma, beta = (_vec(c, dtype, seed=3), _vec(c, dtype, seed=4)) if affine else (None, None)
    rm, rv = _vec(c, dtype, seed=5), _vec(c, dtype, positive=True, seed=6)
    sum_dz, sum_dz_xmu = _vec(c, dtype, seed=7), _vec(c, dtype, seed=8)
    out = {}
    for form in ("cpp", "tensor_ops"):
        tensor_ops(form == "tensor_ops")
        n = chain._normaliser(y, mean, var, gamma, beta, rm, rv, L, spec, None)
        k = chain._coefficients(sum_dz, sum_dz_xmu, n[0], n[1], gamma, n[4], L, spec)
        out[form] = (n, k)
    (n1, k1), (n2, k2) = out["cpp"], out["tensor_ops"]
    for a, b in zip(n1[:4] + k1, n2[:4] + k2):
        assert (a is None) == (b is None)
        if a is not None:
            _close(a, b, dtype)
    assert n1[4] == n2[4] == 105
    assert (n1[5] is None) == (n2[5] is None) == (not batch_stats)
    if batch_stats:
        _close(n1[5], n2[5], dtype)

    # float64 formulas
    d = lambda t: t.double()  # noqa: E731
    m, v = (d(mean), d(var)) if batch_stats else (d(rm), d(rv))
    inv = 1 / torch.sqrt(v + 1e-3)
    scale = inv * d(gamma) if affine else inv
    shift = d(beta) - m * scale if affine else -m * inv
    a = d(gamma) * inv if affine else inv
    xmu = d(sum_dz_xmu) * inv
    b = -a * inv * xmu / 105 if batch_stats else torch.zeros_like(a)
    dd = -(a * d(sum_dz) + 105 * b * m) / 105 if batch_stats else torch.zeros_like(a)
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    for got, want in [(n1[1], inv), (n1[2], scale), (n1[3], shift), (k1[0], a), (k1[1], b), (k1[2], dd)]:
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    if affine:
        torch.testing.assert_close(k1[3].double(), xmu, rtol=tol, atol=tol)
        assert k1[4] is sum_dz
    if batch_stats:
        torch.testing.assert_close(n1[5].double(), d(var) * 105 / 104, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_running_update_matches_batchnorm(tensor_ops, dtype, momentum):
    """``bn_running_update_`` updates like ``nn.BatchNorm2d`` (and like the tensor-op form), counter
    included."""
    x = torch.randn(4, 6, 5, 5, dtype=dtype) * 3 + 2
    want = torch.nn.BatchNorm2d(6, momentum=momentum).to(dtype)
    with torch.no_grad():
        want.running_mean.copy_(_vec(6, dtype, seed=1))
        want.running_var.copy_(_vec(6, dtype, positive=True, seed=2))
    got = {form: copy.deepcopy(want) for form in ("cpp", "tensor_ops")}
    want(x)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
    for form, bn in got.items():
        tensor_ops(form == "tensor_ops")
        versions = [t._version for t in bn.buffers()]
        functional._update_running(bn, mean, var)
        # version counters move as with ATen's in-place ops: caches of BN folded into a conv see it
        assert all(t._version > v for t, v in zip(bn.buffers(), versions)), form
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for bn in got.values():
        torch.testing.assert_close(bn.running_mean, want.running_mean, rtol=tol, atol=tol)
        torch.testing.assert_close(bn.running_var, want.running_var, rtol=tol, atol=tol)
        assert bn.num_batches_tracked.item() == want.num_batches_tracked.item() == 1


def test_running_update_falls_back_where_the_op_does_not_apply(tensor_ops):
    """Cumulative average (momentum None), half-precision buffers, non-contiguous buffers: the
    tensor-op form runs (and matches nn.BatchNorm2d)."""
    x = torch.randn(4, 6, 5, 5)
    cases = [torch.nn.BatchNorm2d(6, momentum=None), torch.nn.BatchNorm2d(6).to(torch.bfloat16)]
    for bn in cases:
        want = copy.deepcopy(bn).float()
        want.momentum = bn.momentum
        want(x)
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
        functional._update_running(bn, mean, var)
        tol = 1e-6 if bn.running_mean.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(bn.running_mean.float(), want.running_mean, rtol=tol, atol=tol)
        torch.testing.assert_close(bn.running_var.float(), want.running_var, rtol=tol, atol=tol)
    bn = torch.nn.BatchNorm2d(6)
    buf = torch.zeros(12)
    bn.running_mean = buf[::2]  # a strided view: updated in place through the tensor-op form
    functional._update_running(bn, torch.ones(6), torch.ones(6))
    assert torch.allclose(buf[::2], torch.full((6,), 0.1)) and buf[1::2].eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_train_steps_match_the_tensor_ops(tensor_ops, dtype):
    """Three SGD steps of a fused CIFAR ResNet (projection and identity blocks, running statistics)
    through the C++ per-channel ops and through the tensor-op form: the same losses, gradients and
    buffers within rounding."""
    torch.manual_seed(0)
    base = resfuse.reference.cifar_resnet(8).to(dtype)
    x = torch.randn(4, 3, 16, 16, dtype=dtype)
    y = torch.randint(0, 10, (4,))
    results = {}
    for form in ("cpp", "tensor_ops"):
        tensor_ops(form == "tensor_ops")
        net = resfuse.fuse(copy.deepcopy(base)).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        losses = []
        with resfuse.use_backend("cpu"), resfuse.cpu_conv.forced("onednn"):
            for _ in range(3):
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        results[form] = (losses, net.state_dict())
    (l1, s1), (l2, s2) = results["cpp"], results["tensor_ops"]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert l1 == pytest.approx(l2, rel=tol)
    for k in s1:
        if s1[k].is_floating_point():
            torch.testing.assert_close(s1[k], s2[k], rtol=tol, atol=tol, msg=k)
        else:
            assert torch.equal(s1[k], s2[k]), k


def _samples(dtype):
    c = 5
    v = lambda seed, positive=False: _vec(c, dtype, positive, seed)  # noqa: E731
    return {
        "bn_normalize": [(v(1), v(2, True), v(3), v(4), 1e-5, 10), (v(1), v(2, True), None, None, 0.1, 1)],
        "bn_backward_coefficients": [(v(1), v(2), v(3), v(4, True), v(5), 20, True),
                                     (v(1), v(2), v(3), v(4, True), None, 20, False)],
        "bn_running_update_": [(v(1), v(2, True), torch.tensor(3), v(3), v(4, True), 0.1)],
    }


@pytest.mark.parametrize("op", ["bn_normalize", "bn_backward_coefficients", "bn_running_update_"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(op, dtype):
    for args in _samples(dtype)[op]:
        torch.library.opcheck(getattr(torch.ops.resfuse, op).default, args)


BAD = [
    ("bn_normalize", lambda v: (v(5).half(), v(5), None, None, 1e-5, 4), "mean must be float32 or float64"),
    ("bn_normalize", lambda v: (v(5), v(4), None, None, 1e-5, 4), r"var must have shape \[C\] = \[5\]"),
    ("bn_normalize", lambda v: (v(5), v(5).double(), None, None, 1e-5, 4), "var must be Double|var must be Float"),
    ("bn_normalize", lambda v: (v(5), v(5), v(5), None, 1e-5, 4), "weight and bias go together"),
    ("bn_backward_coefficients", lambda v: (v(5), v(5), v(5), v(5), v(3), 4, True), "weight must have shape"),
    ("bn_backward_coefficients", lambda v: (v(5), v(5), v(5), v(5), None, 0, True), "count must be positive"),
    ("bn_running_update_", lambda v: (v(5), v(5), torch.tensor(1.0), v(5), v(5), 0.1),
     "num_batches_tracked must be a one-element int64"),
    ("bn_running_update_", lambda v: (torch.zeros(10)[::2], v(5), torch.tensor(1), v(5), v(5), 0.1),
     "must be contiguous"),
]


@pytest.mark.parametrize("op,make,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(op, make, match):
    args = make(lambda c: torch.rand(c))
    with pytest.raises(RuntimeError, match=f"resfuse::{op}: .*({match})"):
        getattr(torch.ops.resfuse, op)(*args)
