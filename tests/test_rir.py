"""ResNet in ResNet: the fused generalized residual layer (one conv over [r | t]) against the paper's
four-conv Eq. 1 (resfuse.reference.rir), the RiR block and model, ResNet Init's two forms, parameter
counts.

Every comparison runs the fused module in the test dtype on every backend that runs on CPU, and its
reference twin (weights copied with ``load_from_fused``) in float64, then checks:

* outputs;
* the gradients of the input and of every parameter (``W_cat``, projection, BN), with the reference's
  four-conv gradients mapped into the fused layout;
* BN running statistics and ``num_batches_tracked``.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resfuse
from resfuse import backends, layout
from resfuse.models.rir import rir_cifar
from resfuse.nn.rir import (
    GeneralizedResidualLayer,
    RiRBlock,
    decay_toward_targets,
    partial_identity,
    rir_param_groups,
)
from resfuse.reference import rir as R
from resfuse.testing import (
    assert_close_ref,
    assert_error_ratio,
    rand_activation,
    randomize_bn,
    tolerance,
)

BACKENDS = ["reference"] + (["cpu"] if backends.instance("cpu")[0] is not None else [])

# (in, out, stride, shortcut) per stream
LAYER_CASES = {
    "identity": (4, 4, 1, "auto"),
    "projection_s2": (4, 6, 2, "auto"),
    "zero_pad_s2": (4, 6, 2, "zero_pad"),
    "zero_pad_same_width_s2": (5, 5, 2, "zero_pad"),
    "none": (3, 5, 1, "none"),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fused_layout(ref: nn.Module, template: nn.Module, grads: bool = False) -> dict:
    """The reference's parameters (or their gradients) and buffers, named and shaped as in the fused
    ``template`` (fused form: no identity in the weight)."""
    src, ref = ref, copy.deepcopy(ref)  # (deepcopy drops .grad)
    if grads:
        with torch.no_grad():
            for p, q in zip(ref.parameters(), src.parameters()):
                p.copy_(q.grad if q.grad is not None else torch.zeros_like(q))
    out = copy.deepcopy(template).double()
    for m in out.modules():
        if isinstance(m, GeneralizedResidualLayer):
            m.set_identity_in_weight(False)
    R.load_into_fused(out, ref)
    return {**dict(out.named_parameters()), **dict(out.named_buffers())}


def streams_of(x: torch.Tensor, c: int):
    return x[:, :c], x[:, c:]


def compare(backend, fused, ref64, x, ref_in, ref_out, *, dtype, train=True, grad=True, rtol=None, grtol=None):
    """Run ``fused`` (``dtype``, ``backend``) and ``ref64`` (float64) on ``x``; compare everything."""
    fused.train(train), ref64.train(train)
    template = copy.deepcopy(fused)
    xf = x.to(dtype).detach().requires_grad_(grad)
    x64 = x.double().detach().requires_grad_(grad)
    with torch.set_grad_enabled(grad), resfuse.use_backend(backend):
        out = fused(xf)
    with torch.set_grad_enabled(grad):
        out64 = ref_out(ref64(ref_in(x64)))
    assert out.dtype == dtype and out.shape == out64.shape
    rtol = rtol or 10 * tolerance(dtype)
    grtol = grtol or (1e-8 if dtype == torch.float64 else 1e-4)
    assert_close_ref(out, out64, dtype, rtol=rtol, name="out")
    if grad:
        g = torch.randn(out64.shape, dtype=torch.float64)
        out.backward(g.to(dtype))
        out64.backward(g)
        assert_close_ref(xf.grad, x64.grad, dtype, rtol=grtol, name="grad x")
        want = fused_layout(ref64, template, grads=True)
        for name, p in fused.named_parameters():
            assert p.grad is not None, name
            assert_close_ref(p.grad, want[name], dtype, rtol=grtol, name=f"grad {name}")
    want = fused_layout(ref64, template)
    for name, b in fused.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert b.item() == want[name].item(), name
        elif not name.endswith("identity"):
            assert_close_ref(b, want[name], dtype, rtol=max(tolerance(dtype), 1e-6), name=name)
    return out


def make_layer(case, dtype=torch.float32, identity_in_weight=False):
    i, o, s, kind = LAYER_CASES[case]
    fused = randomize_bn(GeneralizedResidualLayer(i, o, s, kind, identity_in_weight=identity_in_weight)).to(dtype)
    ref = R.load_from_fused(R.GeneralizedResidualLayerRef(i, o, s, kind).double(), copy.deepcopy(fused).double())
    return fused, ref, i


# -- the layer against Eq. 1 -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad"])
def test_layer_matches_eq1(backend, case, dtype, mode):
    fused, ref, i = make_layer(case, dtype)
    x = rand_activation((2, 2 * i, 7, 9), torch.float64)
    compare(backend, fused, ref, x, lambda x: streams_of(x, i), lambda s: torch.cat(s, 1), dtype=dtype,
            train=mode == "train", grad=mode != "eval_no_grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_two_steps_running_stats(backend):
    """Two training steps then eval: running statistics accumulate exactly as the reference's."""
    fused, ref, i = make_layer("projection_s2", torch.float64)
    for step in range(2):
        x = rand_activation((3, 2 * i, 8, 8), torch.float64, offset=0.3 * step)
        compare(backend, fused, ref, x, lambda x: streams_of(x, i), lambda s: torch.cat(s, 1),
                dtype=torch.float64)
        for m in (fused, ref):
            m.zero_grad(set_to_none=True)
    x = rand_activation((3, 2 * i, 8, 8), torch.float64)
    compare(backend, fused, ref, x, lambda x: streams_of(x, i), lambda s: torch.cat(s, 1), dtype=torch.float64,
            train=False, grad=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_channels_last(backend):
    fused, ref, i = make_layer("projection_s2")
    x = rand_activation((2, 2 * i, 9, 9), torch.float64).contiguous(memory_format=torch.channels_last)
    out = compare(backend, fused.to(memory_format=torch.channels_last), ref, x, lambda x: streams_of(x, i),
                  lambda s: torch.cat(s, 1), dtype=torch.float32)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_bfloat16_error_ratio(backend):
    """bfloat16: the fused layer's error is within 2x plain PyTorch's own bfloat16 error (four convs)."""
    fused, ref, i = make_layer("identity", torch.bfloat16)
    fused.eval(), ref.eval()
    x = rand_activation((2, 2 * i, 8, 8), torch.float64)
    with torch.no_grad(), resfuse.use_backend(backend):
        out = fused(x.bfloat16())
    with torch.no_grad():
        truth = torch.cat(ref(streams_of(x, i)), 1)
        plain = torch.cat(copy.deepcopy(ref).bfloat16()(streams_of(x.bfloat16(), i)), 1)
    assert_error_ratio(out, plain, truth, k=2.0, floor=tolerance(torch.bfloat16))


def test_layer_structure():
    layer = GeneralizedResidualLayer(4, 6, 2, "projection")
    assert tuple(layer.conv.weight.shape) == (12, 8, 3, 3) and layer.conv.bias is None
    assert layer.conv.stride == (2, 2) and layer.conv.padding == (1, 1)
    assert layer.bn.num_features == 12
    assert tuple(layer.shortcut.weight.shape) == (6, 4, 1, 1) and layer.shortcut.stride == (2, 2)
    assert layer.identity is None
    ident = GeneralizedResidualLayer(4, 4)
    assert ident.shortcut is None and ident.shortcut_kind == "identity"
    assert "identity" not in ident.state_dict()  # non-persistent: never in a checkpoint
    assert torch.equal(ident.identity, partial_identity(4, 4))
    assert ident.double().identity.dtype == torch.float64  # follows .to()
    assert GeneralizedResidualLayer(4, 4, 1, "zero_pad").shortcut_kind == "identity"


@pytest.mark.parametrize("case", ["identity", "projection_s2"])
def test_inference_cache_sees_weight_updates(case):
    """Eval without grad reuses W_eff until a weight changes in place (an optimizer step)."""
    fused, _, i = make_layer(case, torch.float64)
    fused.eval()
    x = rand_activation((2, 2 * i, 6, 6), torch.float64)
    with torch.no_grad():
        fused(x)
        assert fused.effective_weight() is fused.effective_weight()
        fused.conv.weight.mul_(0.5)
        if fused.shortcut is not None:
            fused.shortcut.weight.add_(1.0)
        out = fused(x)
    ref = R.load_from_fused(R.GeneralizedResidualLayerRef(*LAYER_CASES[case]).double(), fused).eval()
    assert_close_ref(out, torch.cat(ref(streams_of(x, i)), 1), torch.float64)


def test_partial_identity_is_the_shortcut():
    """A 3×3 conv whose only tap is P's centre equals option A (stride 2) on the residual stream."""
    p = partial_identity(3, 5).double()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    y = F.conv2d(x, p, stride=2, padding=1)
    want = torch.zeros_like(y)
    want[:, :5] = R.ZeroPadShortcut(3, 5, 2)(x[:, :3])
    assert torch.equal(y, want)


# -- the block and the model ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("outer", ["residual", "both", "none"])
@pytest.mark.parametrize("shape", [(4, 4, 1, "auto"), (3, 5, 2, "auto"), (3, 5, 2, "zero_pad")])
@pytest.mark.parametrize("train", [True, False])
def test_block_matches_reference(backend, outer, shape, train):
    i, o, s, kind = shape
    fused = randomize_bn(RiRBlock(i, o, s, layers=2, outer_shortcut=outer, shortcut=kind)).double()
    ref = R.load_from_fused(R.RiRBlockRef(i, o, s, 2, outer, kind).double(), fused)
    x = rand_activation((2, 2 * i, 8, 8), torch.float64)
    compare(backend, fused, ref, x, lambda x: streams_of(x, i), lambda s: torch.cat(s, 1), dtype=torch.float64,
            train=train)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layers", [1, 3])
def test_block_float32_layers(backend, layers):
    fused = randomize_bn(RiRBlock(4, 4, 1, layers=layers))
    ref = R.load_from_fused(R.RiRBlockRef(4, 4, 1, layers).double(), copy.deepcopy(fused).double())
    x = rand_activation((2, 8, 8, 8), torch.float64)
    compare(backend, fused, ref, x, lambda x: streams_of(x, 4), lambda s: torch.cat(s, 1), dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("identity_in_weight", [False, True])
def test_model_matches_reference(backend, identity_in_weight):
    fused = randomize_bn(rir_cifar(width=2, identity_in_weight=identity_in_weight)).double()
    ref = R.load_from_fused(R.rir_cifar_ref(width=2).double(), fused)
    x = rand_activation((2, 3, 8, 8), torch.float64)
    compare(backend, fused, ref, x, _same, _same, dtype=torch.float64)
    compare(backend, fused, ref, x, _same, _same, dtype=torch.float64, train=False, grad=False)


def _same(t):
    return t


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_channels_last(backend):
    """resfuse.layout.channels_last (the fast CPU layout) computes the same model, train and eval."""
    fused = randomize_bn(rir_cifar(width=2))
    cl = layout.channels_last(copy.deepcopy(fused))
    x = rand_activation((2, 3, 8, 8))
    for train in (True, False):
        fused.train(train), cl.train(train)
        with resfuse.use_backend(backend):
            assert_close_ref(cl(x), fused(x), torch.float32, rtol=1e-4, name=f"train={train}")


def test_load_round_trip():
    fused = randomize_bn(rir_cifar(width=2, shortcut="zero_pad"))
    ref = R.load_from_fused(R.rir_cifar_ref(width=2, shortcut="zero_pad"), fused)
    back = R.load_into_fused(rir_cifar(width=2, shortcut="zero_pad", identity_in_weight=True), ref)
    back = copy.deepcopy(back)
    for m in back.modules():
        if isinstance(m, GeneralizedResidualLayer):
            m.set_identity_in_weight(False)
    for (n, a), (_, b) in zip(fused.state_dict().items(), back.state_dict().items()):
        assert torch.allclose(a.double(), b.double(), atol=1e-6), n


def test_plain_cnn_is_rir_without_shortcuts():
    """RiR generalises a CNN: without shortcuts, the fused RiR is the plain CNN of width 2·C."""
    fused = randomize_bn(rir_cifar(width=2, shortcut="none", outer_shortcut="none")).double()
    cnn = R.plain_cnn_cifar_ref(width=2).double()
    layers = [fused.stem] + [l for st in (fused.layer1, fused.layer2, fused.layer3) for b in st for l in b.layers]
    seq = list(cnn.features)
    with torch.no_grad():
        for j, layer in enumerate(layers):
            seq[3 * j].load_state_dict(layer.conv.state_dict())
            seq[3 * j + 1].load_state_dict(layer.bn.state_dict())
        cnn.head.load_state_dict(fused.head.state_dict())
    fused.eval(), cnn.eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert_close_ref(fused(x), cnn(x), torch.float64)


def test_no_concatenation_and_one_conv_per_layer():
    """The fused block runs one conv per generalized layer and never concatenates the streams."""

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    block = RiRBlock(4, 6, 2, outer_shortcut="residual")
    ref = R.load_from_fused(R.RiRBlockRef(4, 6, 2), block)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    for backend in BACKENDS:
        with Count() as c, resfuse.use_backend(backend):
            out = block(x)
        convs = [o for o in c.ops if "conv" in o]
        assert len(convs) == 2, (backend, convs)
        with Count() as cb, resfuse.use_backend(backend):
            out.sum().backward()  # (may recompute a conv output: chain.RECOMPUTE_MACS_PER_BYTE)
        assert "cat" not in c.ops + cb.ops, backend
    with Count() as c:
        ref(streams_of(x, 4))
    assert len([o for o in c.ops if "conv" in o]) == 9  # four per layer + the projection


# -- parameter counts ----------------------------------------------------------------------------------
def _on_meta(factory, *args, **kwargs):
    with torch.device("meta"):
        return factory(*args, **kwargs)


@pytest.mark.parametrize("factory, kwargs, count", [
    (rir_cifar, {}, 9_492_980),  # = osmr/imgclsmob rir_cifar10 (four separate convs)
    (rir_cifar, {"num_classes": 100}, 9_527_720),
    (rir_cifar, {"shortcut": "zero_pad"}, 9_469_940),
    (rir_cifar, {"outer_shortcut": "both"}, 9_492_980),
    (rir_cifar, {"identity_in_weight": True}, 9_492_980),
    (R.rir_cifar_ref, {}, 9_492_980),
    (R.rir_cifar_ref, {"num_classes": 100}, 9_527_720),
    (R.wide_resnet_cifar_ref, {}, 9_469_940),
    (R.wide_resnet_cifar_ref, {"shortcut": "B"}, 9_563_252),
    (R.plain_cnn_cifar_ref, {}, 9_469_940),
])
def test_param_counts(factory, kwargs, count):
    assert n_params(_on_meta(factory, **kwargs)) == count


def test_layer_param_count_equals_four_convs():
    for i, o, s, kind in LAYER_CASES.values():
        assert n_params(GeneralizedResidualLayer(i, o, s, kind)) == n_params(R.GeneralizedResidualLayerRef(i, o, s, kind))


# -- ResNet Init: the literal form (identity inside the parameter) -------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["identity", "projection_s2", "zero_pad_s2"])
def test_identity_in_weight_same_function(backend, case):
    fused, _, i = make_layer(case, torch.float64)
    literal = copy.deepcopy(fused).set_identity_in_weight(True)
    if fused.identity is not None:
        assert torch.equal(literal.conv.weight - fused.conv.weight, fused.identity)
        assert torch.equal(literal.effective_weight(), literal.conv.weight)
    x = rand_activation((2, 2 * i, 7, 7), torch.float64)
    outs = []
    for m in (fused, literal):
        xx = x.clone().requires_grad_()
        with resfuse.use_backend(backend):
            out = m(xx)
        out.backward(torch.ones_like(out))
        outs.append((out, xx.grad))
    assert_close_ref(outs[1][0], outs[0][0], torch.float64, name="out")
    assert_close_ref(outs[1][1], outs[0][1], torch.float64, name="grad x")
    for (n, a), (_, b) in zip(literal.named_parameters(), fused.named_parameters()):
        assert_close_ref(a.grad, b.grad, torch.float64, name=f"grad {n}")
    assert R.load_from_fused(R.GeneralizedResidualLayerRef(*LAYER_CASES[case]).double(), literal) is not None


def test_set_identity_in_weight_round_trip():
    layer = GeneralizedResidualLayer(4, 4).double()
    w = layer.conv.weight.detach().clone()
    layer.set_identity_in_weight(True).set_identity_in_weight(True)  # idempotent
    layer.set_identity_in_weight(False)
    assert torch.allclose(layer.conv.weight, w, atol=1e-15)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_decayed_update_equal(momentum):
    """SGD with L2 on W_cat (fused form, plain weight_decay) and on W − I (literal form,
    rir_param_groups + decay_toward_targets) take the same steps; naive decay on W does not."""
    wd, lr = 0.05, 0.1
    fused = randomize_bn(rir_cifar(width=2, shortcut="zero_pad")).double()
    literal = copy.deepcopy(fused)
    for m in literal.modules():
        if isinstance(m, GeneralizedResidualLayer):
            m.set_identity_in_weight(True)
    naive = copy.deepcopy(literal)
    opt_f = torch.optim.SGD(fused.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    groups = rir_param_groups(literal, wd)
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0
    opt_l = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    decay_toward_targets(opt_l, literal)
    opt_n = torch.optim.SGD(naive.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for _ in range(2):
        for model, opt in ((fused, opt_f), (literal, opt_l), (naive, opt_n)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for m in literal.modules():
        if isinstance(m, GeneralizedResidualLayer):
            m.set_identity_in_weight(False)
    for (n, a), (_, b) in zip(literal.named_parameters(), fused.named_parameters()):
        assert_close_ref(a, b, torch.float64, rtol=1e-12, name=n)
    naive_w = naive.layer1[0].layers[0]
    naive_w.set_identity_in_weight(False)
    assert not torch.allclose(naive_w.conv.weight, fused.layer1[0].layers[0].conv.weight, atol=1e-6)


def test_param_groups_fused_form_is_plain():
    model = rir_cifar(width=2)
    groups = rir_param_groups(model, 1e-4)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))


# -- bad arguments -------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, match", [
    (lambda: GeneralizedResidualLayer(4, 4, 1, "bogus"), "shortcut must be one of"),
    (lambda: GeneralizedResidualLayer(4, 6, 1, "identity"), "identity shortcut needs"),
    (lambda: GeneralizedResidualLayer(6, 4, 1, "zero_pad"), "zero_pad shortcut needs"),
    (lambda: RiRBlock(4, 4, outer_shortcut="transient"), "outer_shortcut must be one of"),
    (lambda: RiRBlock(4, 4, layers=0), "at least one layer"),
    (lambda: RiRBlock(6, 4, shortcut="projection"), "out_channels >= in_channels"),
    (lambda: R.RiRBlockRef(4, 4, outer_shortcut="transient"), "outer_shortcut must be one of"),
])
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_wrong_input_channels():
    with pytest.raises(ValueError, match="expects 8 input channels"):
        GeneralizedResidualLayer(4, 4)(torch.randn(2, 4, 5, 5))


# -- Triton (through the interpreter on CPU) -----------------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize("what", ["layer", "block"])
def test_triton(what):
    reason = backends.instance("triton")[1]
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    if what == "layer":
        fused, ref, i = make_layer("projection_s2")
    else:
        i = 3
        fused = randomize_bn(RiRBlock(3, 5, 2))
        ref = R.load_from_fused(R.RiRBlockRef(3, 5, 2).double(), copy.deepcopy(fused).double())
    x = rand_activation((2, 2 * i, 6, 6), torch.float64)
    try:
        compare("triton", fused, ref, x, lambda x: streams_of(x, i), lambda s: torch.cat(s, 1), dtype=torch.float32)
    except resfuse.BackendUnavailable as e:
        pytest.skip(str(e))
