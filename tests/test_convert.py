"""resfuse.fuse / unfuse / explain on the reference models and on hand-built modules.

Numerics are checked by :func:`check_fused_model` (also used by ``test_compat.py`` on torchvision and
timm): a train step and an eval forward of the fused model against the unfused one,

* in float32 by the error-ratio rule against a float64 run of the unfused model (outputs, running
  statistics, input gradient, and all parameter gradients as one vector): deep BN networks on tiny
  inputs are ill-conditioned in float32 (plain PyTorch itself is off by up to ~30% on single gradient
  tensors of a torchvision ResNet-50 at 2×3×64×64), so "fused ≈ plain float32" would test noise;
* in float64 tightly, tensor by tensor (every output, gradient and buffer within 1e-9).
"""
import contextlib
import copy

import pytest
import torch
from torch import nn

import resfuse
from resfuse import backends, cpu_conv, models, reference
from resfuse import nn as fnn
from resfuse.convert import FusedSequential
from resfuse.testing import assert_close_ref, assert_error_ratio, randomize_bn

F64_RTOL = 1e-9


# -- helpers (imported by test_compat.py) ---------------------------------------------------------------
def _step(model, x, g):
    """One train step: (output, input grad, {name: param grad}, {name: buffer}) and the eval output;
    the same random stream for every model (stochastic depth draws the same masks)."""
    torch.manual_seed(0)
    model.train()
    xr = x.clone().requires_grad_()
    out = model(xr)
    out.backward(g.to(out.dtype))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.eval()
    with torch.no_grad():
        ev = model(x)
    return out.detach(), xr.grad, grads, bufs, ev


@contextlib.contextmanager
def _onednn_convs():
    """The CPU backend's convolutions pinned to oneDNN for the float32 run. Its measured per-shape
    choice (oneDNN / GEMM / Winograd) depends on timing, and float32 gradients through ReLU are not
    continuous in the rounding: one pre-activation a few ulp from 0 flips a mask (seen on
    tv_resnet18, BN seed 0, 4x3x64x64: one of layer4.1's 16 values per channel, every upstream
    gradient then 1e-2 off float64 where plain PyTorch's is 3e-6 — an outcome decided by rounding,
    not by a defect). Pinned, the check is deterministic; the other algorithms are checked per op
    and per block in test_cpu_conv.py."""
    with cpu_conv.forced("onednn"):
        yield


def check_fused_model(plain: nn.Module, x: torch.Tensor, *, fused32=None, float64=True) -> nn.Module:
    """Fuse a copy of ``plain`` and check a train step + eval forward against it (see module doc).

    ``plain`` is float32; ``fused32`` (default ``resfuse.fuse(copy)``) must share nothing with it.
    Returns the fused float32 model.
    """
    plain = plain.float()
    fused32 = resfuse.fuse(copy.deepcopy(plain)) if fused32 is None else fused32
    plain64 = copy.deepcopy(plain).double()
    fused64 = resfuse.fuse(copy.deepcopy(plain64)) if float64 else None
    x64 = x.double()
    torch.manual_seed(123)
    out_shape = plain64.eval()(x64[:1]).shape[1:]
    g = torch.randn(x.shape[0], *out_shape, dtype=torch.float64).to(x.device)
    truth = _step(plain64, x64, g)
    with _onednn_convs():
        ours, theirs = _step(fused32, x, g), _step(plain, x, g)
    assert ours[2].keys() == truth[2].keys()
    # float32: error-ratio rule against float64
    for i, what in ((0, "train output"), (4, "eval output"), (1, "input grad")):
        assert_error_ratio(ours[i], theirs[i], truth[i], k=2, name=what, floor=1e-4)
    cat = lambda r: torch.cat([r[2][n].double().flatten() for n in truth[2]])
    assert_error_ratio(cat(ours), cat(theirs), cat(truth), k=2, name="all parameter grads", floor=1e-4)
    for n, b in truth[3].items():
        if b.is_floating_point():
            assert_error_ratio(ours[3][n], theirs[3][n], b, k=2, name=n, floor=1e-5)
        else:
            assert torch.equal(ours[3][n], b), n
    if float64:
        got = _step(fused64, x64, g)
        for i, what in ((0, "train output"), (4, "eval output"), (1, "input grad")):
            assert_close_ref(got[i], truth[i], rtol=F64_RTOL, name=f"float64 {what}")
        scale = max(t.abs().max().item() for t in truth[2].values())
        for n, t in truth[2].items():  # some gradients are zero up to rounding (a shift before a BN)
            err = (got[2][n] - t).abs().max().item() / max(t.abs().max().item(), 1e-6 * scale)
            assert err <= F64_RTOL, f"float64 grad {n}: relative error {err:.3e}"
        for n, b in truth[3].items():
            assert_close_ref(got[3][n], b, rtol=F64_RTOL, name=f"float64 {n}")
    return fused32


def assert_shares(fused: nn.Module, plain: nn.Module) -> None:
    """Same state_dict keys, and the very same Parameter and buffer objects."""
    assert list(fused.state_dict()) == list(plain.state_dict())
    for (n, p), (m, q) in zip(fused.named_parameters(), plain.named_parameters()):
        assert n == m and p is q, n
    for (n, b), (m, c) in zip(fused.named_buffers(), plain.named_buffers()):
        assert n == m and b is c, n


def types_by_path(model: nn.Module) -> dict:
    return {n: type(m) for n, m in model.named_modules()}


def sections(text: str) -> dict:
    """explain_model's output as {"fused": [lines], "fusable": [...], "left": [...]}."""
    out, key = {}, None
    for line in text.splitlines()[1:]:
        if not line.startswith("  "):
            key = line.split()[0]
            out[key] = []
        else:
            out[key].append(line.strip())
    return out


def _down(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


# -- reference models --------------------------------------------------------------------------------------
REFERENCE_MODELS = {
    "resnet_basic": (lambda: reference.ResNet(reference.BasicBlock, [1, 1, 1, 1], num_classes=10), 48,
                     models.ResNet, fnn.BasicBlock),
    "resnet_bottleneck": (lambda: reference.ResNet(reference.Bottleneck, [1, 2, 1, 1], num_classes=10), 48,
                          models.ResNet, fnn.Bottleneck),
    "resnext": (lambda: reference.ResNet(reference.Bottleneck, [1, 1, 1, 1], num_classes=10, groups=4,
                                         width_per_group=8), 48, models.ResNet, fnn.Bottleneck),
    "cifar_A": (lambda: reference.cifar_resnet(8, shortcut="A"), 16, models.CifarResNet, fnn.BasicBlock),
    "cifar_B": (lambda: reference.cifar_resnet(8, shortcut="B"), 16, models.CifarResNet, fnn.BasicBlock),
    "preact_basic": (lambda: reference.cifar_preact_resnet(8), 16, reference.CifarPreActResNet,
                     fnn.PreActBasicBlock),
    "preact_bottleneck": (lambda: reference.cifar_preact_resnet(11, bottleneck=True), 16,
                          reference.CifarPreActResNet, fnn.PreActBottleneck),
    "preact_imagenet": (lambda: reference.PreActResNet(reference.PreActBasicBlock, [1, 1, 1, 1], num_classes=10),
                        48, reference.PreActResNet, fnn.PreActBasicBlock),
}


@pytest.mark.parametrize("name", list(REFERENCE_MODELS))
def test_reference_models(name):
    ctor, size, root_cls, block_cls = REFERENCE_MODELS[name]
    torch.manual_seed(0)
    plain = randomize_bn(ctor())
    fused = resfuse.fuse(plain)
    assert type(fused) is root_cls
    blocks = [m for m in fused.modules() if type(m) is block_cls]
    assert len(blocks) == sum(1 for m in plain.modules() if type(m).__name__ == block_cls.__name__) > 0
    assert_shares(fused, plain)
    report = sections(resfuse.explain(fused))
    assert report["fusable"] == [], resfuse.explain(fused)
    if "preact" in name:  # BN → ReLU → conv: the leading BNs (and the final one) stay plain
        assert report["left"] and all(line.startswith("bn_final ") or line.endswith("not directly after a Conv2d")
                                      for line in report["left"]), resfuse.explain(fused)
    else:
        assert report["left"] == [], resfuse.explain(fused)
    check_fused_model(plain, torch.randn(2, 3, size, size))


def test_explain_lists_swaps_and_reasons():
    plain = reference.cifar_resnet(8)
    before = sections(resfuse.explain(plain))
    assert before["fused"] == [] and len(before["fusable"]) == 4  # the model (stem) + 3 blocks
    assert before["fusable"][0].startswith("(model) ") and "-> resfuse.models.resnet.CifarResNet" in before["fusable"][0]
    fused = resfuse.fuse(plain)
    after = sections(resfuse.explain(fused))
    assert after["fusable"] == [] and len(after["fused"]) == 4
    assert "layer2.0" in after["fused"][2] and "(was resfuse.reference.resnet.BasicBlock)" in after["fused"][2]
    # modules built fused (no fuse call) are reported as fused too
    assert len(sections(resfuse.explain(models.cifar_resnet(8)))["fused"]) == 4


# -- sharing, inplace, optimizer -----------------------------------------------------------------------
def test_inplace_false_shares_tensors_not_modules():
    plain = reference.cifar_resnet(8)
    plain_types = types_by_path(plain)
    fused = resfuse.fuse(plain)
    assert types_by_path(plain) == plain_types  # the original is untouched
    assert not set(map(id, fused.modules())) & set(map(id, plain.modules()))  # every module is new
    assert_shares(fused, plain)
    fused.eval()
    assert plain.training and plain.layer1[0].bn1.training  # own training flags
    # training the fused model moves the original's running statistics (same buffers)
    fused.train()
    rm = plain.layer1[0].bn1.running_mean.clone()
    fused(torch.randn(4, 3, 16, 16))
    assert not torch.equal(plain.layer1[0].bn1.running_mean, rm)


def test_inplace_true():
    stage = nn.Sequential(reference.BasicBlock(8, 8), reference.BasicBlock(8, 8))
    children = list(stage)
    out = resfuse.fuse(stage, inplace=True)
    assert out is stage and all(type(b) is fnn.BasicBlock for b in stage)
    assert stage[0].conv1 is children[0].conv1
    model = reference.cifar_resnet(8)
    layer1 = model.layer1
    fused = resfuse.fuse(model, inplace=True)
    assert fused is not model and type(fused) is models.CifarResNet  # the root was swapped: use the result
    assert fused.layer1 is layer1 and type(layer1[0]) is fnn.BasicBlock


def test_optimizer_built_before_fuse_trains_fused_model():
    torch.manual_seed(0)
    plain = reference.cifar_resnet(8)
    twin = copy.deepcopy(plain)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    fused = resfuse.fuse(plain)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for _ in range(3):
        for m, o in ((fused, opt), (twin, opt_twin)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for (n, p), q, r in zip(fused.named_parameters(), plain.parameters(), twin.parameters()):
        assert p is q
        assert_close_ref(p, r, rtol=1e-4, name=n)
    assert fused.state_dict().keys() == twin.state_dict().keys()


def test_shared_module_fused_once():
    block = reference.BasicBlock(4, 4)
    model = nn.Sequential(block, nn.Identity(), block)
    fused = resfuse.fuse(model)
    assert type(fused[0]) is fnn.BasicBlock and fused[0] is fused[2]


def test_hooks_and_attributes_carried_over():
    block = reference.BasicBlock(4, 4)
    block.note = "kept"
    seen = []
    block.register_forward_hook(lambda m, i, o: seen.append(type(m)))
    fused = resfuse.fuse(block)
    assert type(fused) is fnn.BasicBlock and fused.note == "kept" and fused.downsample is None
    fused(torch.randn(2, 4, 5, 5))
    assert seen == [fnn.BasicBlock]


# -- what is left alone -------------------------------------------------------------------------------
class _OwnForward(reference.BasicBlock):
    def forward(self, x):
        return super().forward(x) * 0.5


class _FrozenBN(nn.Module):  # a frozen BN that is not a BatchNorm subclass (as torchvision's FrozenBatchNorm2d)
    def __init__(self, c):
        super().__init__()
        self.register_buffer("weight", torch.ones(c))
        self.register_buffer("bias", torch.zeros(c))

    def forward(self, x):
        return x * self.weight.view(-1, 1, 1) + self.bias.view(-1, 1, 1)


class _BNSubclass(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) + 1.0


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.tanh(self.bn(self.conv(x)))


class _OwnSequential(nn.Sequential):
    def forward(self, x):
        return super().forward(x) - 1.0


def _left_cases():
    silu = reference.BasicBlock(4, 4)
    silu.relu = nn.SiLU()
    hooked = reference.BasicBlock(4, 4)
    hooked.conv1.register_forward_hook(lambda *a: None)
    bias = reference.BasicBlock(4, 4)
    bias.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=True)
    frozen = reference.BasicBlock(4, 4, norm_layer=_FrozenBN)
    subbn = reference.BasicBlock(4, 4, norm_layer=_BNSubclass)
    proj = reference.BasicBlock(4, 8, 1, nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), _BNSubclass(8)))
    extra = reference.BasicBlock(4, 4)
    extra.extra = nn.Linear(2, 2)
    mixed = reference.BasicBlock(4, 4)
    mixed.bn2 = nn.SyncBatchNorm(4)
    seq_hooked = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    seq_hooked[1].register_forward_pre_hook(lambda *a: None)
    return {
        "own_forward": (_OwnForward(4, 4), "overrides BasicBlock.forward"),
        "silu": (silu, "relu is SiLU, not nn.ReLU"),
        "hooked": (hooked, "conv1 has hooks"),
        "bias": (bias, "conv has a bias"),
        "frozen_bn": (frozen, "bn1 is _FrozenBN, not nn.BatchNorm2d"),
        "bn_subclass": (subbn, "bn1 is _BNSubclass"),
        "bn_subclass_projection": (proj, "downsample is Sequential(Conv2d, _BNSubclass)"),
        "extra_child": (extra, "unexpected children ['extra']"),
        "mixed_sync": (mixed, "mixes nn.SyncBatchNorm and nn.BatchNorm2d"),
        "own_sequential": (_OwnSequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)),
                           "overrides Sequential.forward"),
        "sequential_hooked": (seq_hooked, "run 0-1 has hooks"),
    }


def test_unrecognised_modules_are_left_with_a_reason():
    cases = _left_cases()
    model = nn.ModuleDict({k: m for k, (m, _) in cases.items()})
    model.add_module("custom", _Custom())
    fused = resfuse.fuse(model)
    for name, (module, _) in cases.items():
        assert type(fused[name]) is type(module), name
    report = sections(resfuse.explain(fused))
    left = {line.split()[0]: line for line in report["left"]}
    for name, (_, reason) in cases.items():
        assert reason in left[name], (name, left[name])
    assert "custom.bn" in left and "whose forward resfuse does not know" in left["custom.bn"]
    # a rejected block's children still get fused where they can: the projection's Sequential
    assert "bn_subclass_projection.downsample" not in left
    # each module still computes what it did
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    for name in cases:
        fused[name].eval(), model[name].eval()
        with torch.no_grad():
            assert torch.equal(fused[name](x), model[name](x)), name


def test_sequential_runs_keep_their_keys():
    torch.manual_seed(0)
    seq = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),   # run 0-2
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),              # run 3-4
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 1, bias=True), nn.BatchNorm2d(8),                                  # falls back: bias
        nn.BatchNorm2d(8), nn.ReLU()))                                                     # no conv before
    fused = resfuse.fuse(seq)
    assert type(fused) is FusedSequential and list(fused.state_dict()) == list(seq.state_dict())
    report = sections(resfuse.explain(fused))
    assert len(report["fused"]) == 1 and "run 6-7: conv has a bias" in report["fused"][0]
    assert len(report["left"]) == 1 and report["left"][0].startswith("8 ") and "not directly after a Conv2d" in \
        report["left"][0]
    check_fused_model(seq, torch.randn(2, 3, 12, 12), fused32=resfuse.fuse(copy.deepcopy(seq)))
    fused[3] = nn.Conv2d(8, 8, 3, padding=1, bias=False)  # editing the Sequential afterwards is fine
    plain = copy.deepcopy(fused)
    plain.__class__ = nn.Sequential
    fused.eval(), plain.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 12, 12)
        assert_close_ref(fused(x), plain(x), rtol=1e-5)


def test_syncbatchnorm_blocks_are_swapped():
    torch.manual_seed(0)
    plain = randomize_bn(nn.SyncBatchNorm.convert_sync_batchnorm(reference.cifar_resnet(8, shortcut="B")))
    fused = resfuse.fuse(plain)
    assert type(fused) is models.CifarResNet and type(fused.layer2[0]) is fnn.BasicBlock
    assert type(fused.layer2[0].bn1) is nn.SyncBatchNorm
    # without a process group SyncBatchNorm is plain BatchNorm, in PyTorch and in resfuse
    check_fused_model(plain, torch.randn(2, 3, 16, 16), float64=False)


# -- unfuse ------------------------------------------------------------------------------------------------
def test_unfuse_round_trip():
    plain = nn.Sequential(reference.cifar_resnet(8, shortcut="B"),
                          nn.Sequential(nn.Conv2d(10, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU()))
    plain[0].fc = nn.Linear(64, 10 * 4 * 4)
    plain.insert(1, nn.Unflatten(1, (10, 4, 4)))
    fused = resfuse.fuse(plain)
    assert type(fused[2]) is FusedSequential and type(fused[0]) is models.CifarResNet
    back = resfuse.unfuse(fused)
    assert types_by_path(back) == types_by_path(plain)
    assert_shares(back, plain)
    assert not any("_resfuse_unfused" in vars(m) for m in back.modules())
    assert sections(resfuse.explain(back))["fused"] == []
    x = torch.randn(2, 3, 16, 16)
    for m in (plain, back):
        m.eval()
    with torch.no_grad():
        assert torch.equal(back(x), plain(x))


def test_unfuse_models_built_fused():
    fused = models.cifar_resnet(8)
    plain = resfuse.unfuse(fused)
    assert type(plain) is reference.CifarResNet
    assert {type(b) for b in plain.layer1} == {reference.BasicBlock}
    assert not any(type(m).__module__.startswith(("resfuse.nn", "resfuse.models", "resfuse.convert"))
                   for m in plain.modules())
    assert_shares(plain, fused)


def test_unfused_model_exports():
    fused = resfuse.fuse(reference.cifar_resnet(8)).eval()
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(resfuse.unfuse(fused), (x,))
    assert not [n for n in exported.graph.nodes if "resfuse" in str(n.target)]
    with torch.no_grad():
        assert_close_ref(exported.module()(x), fused(x), rtol=1e-5)


# -- verify, backend, errors -----------------------------------------------------------------------------
def test_verify_passes_and_leaves_the_model_alone():
    plain = randomize_bn(reference.cifar_resnet(8))
    state = copy.deepcopy(plain.state_dict())
    fused = resfuse.fuse(plain, verify=True)
    fused = resfuse.fuse(plain, verify=torch.randn(3, 3, 20, 20))
    assert plain.training and fused.training
    for k, v in plain.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_verify_catches_a_wrong_fused_model(monkeypatch):
    real = resfuse.functional.conv_bn_chain
    monkeypatch.setattr(resfuse.functional, "conv_bn_chain", lambda *a, **k: real(*a, **k) * 1.01)
    stage = nn.Sequential(reference.BasicBlock(4, 4))
    with pytest.raises(AssertionError, match="worst relative error"):
        resfuse.fuse(stage, inplace=True, verify=True)
    assert type(stage[0]) is reference.BasicBlock  # a failed check changes nothing, even in place


def test_verify_needs_an_input_it_can_run():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 2))
    with pytest.raises(ValueError, match="pass an example input"):
        resfuse.fuse(model, verify=True)  # the default [2, 3, 64, 64] batch does not fit the Linear
    assert type(resfuse.fuse(model, verify=torch.randn(2, 3, 8, 8))) is FusedSequential


def test_backend_argument():
    with pytest.raises(ValueError, match="unknown backend"):
        resfuse.fuse(reference.BasicBlock(4, 4), backend="fastest")
    missing = [n for n, why in backends.availability().items() if why is not None]
    if missing:
        with pytest.raises(backends.BackendUnavailable, match=missing[0]):
            resfuse.fuse(reference.BasicBlock(4, 4), backend=missing[0])
    assert backends.get_backend_name() == "auto"
    try:
        resfuse.fuse(reference.BasicBlock(4, 4), backend="reference")
        assert backends.get_backend_name() == "reference"  # process-wide
        resfuse.fuse(reference.BasicBlock(4, 4))  # "auto" leaves the choice alone
        assert backends.get_backend_name() == "reference"
    finally:
        resfuse.set_backend("auto")


def test_type_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        resfuse.fuse("resnet18")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        resfuse.unfuse(None)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        resfuse.explain(42)
