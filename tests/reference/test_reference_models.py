"""Tests of the plain-PyTorch reference models in :mod:`resfuse.reference`.

The torchvision / timm comparisons import those packages through ``tests/tvshim.py`` and are skipped
when they are not installed.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import resfuse.reference as R
from resfuse.testing import randomize_bn

# tests/ holds the test-only helper tvshim.py; make it importable however pytest was invoked.
TESTS_DIR = str(Path(__file__).resolve().parents[1])
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
from tvshim import import_timm, import_torchvision

IMAGENET_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "wide_resnet50_2": 68_883_240,
}

# He et al. 2015, Table 6 (option A shortcuts).
CIFAR_PARAMS_A = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962, 1202: 19_421_274}

# He et al. 2016 ("Identity Mappings"), Table 3 reports 1.7M / 10.2M: it counts conv + fc weights only.
# The totals below include the BN parameters.
CIFAR_PREACT_PARAMS = {110: 1_730_522, 164: 1_703_258, 1001: 10_327_706}
CIFAR_PREACT_PAPER_MILLIONS = {164: 1.7, 1001: 10.2}

PREACT_IMAGENET_PARAMS = {
    "preact_resnet18": 11_687_720,
    "preact_resnet34": 21_795_880,
    "preact_resnet50": 25_549_352,
    "preact_resnet101": 44_541_480,
    "preact_resnet152": 60_185_128,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(factory, *args, **kwargs) -> nn.Module:
    """Build a model without allocating or initialising real storage (for structure-only checks)."""
    with torch.device("meta"):
        return factory(*args, **kwargs)


def tree(model: nn.Module) -> list[tuple[str, str]]:
    """Ordered (qualified name, class name) of every module."""
    return [(name, type(m).__name__) for name, m in model.named_modules()]


def leaf_reprs(model: nn.Module) -> list[str]:
    return [repr(m) for m in model.modules() if not list(m.children())]


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Parameter counts (built on the meta device: no storage, no init, no forward)


@pytest.mark.parametrize("name", IMAGENET_PARAMS)
def test_imagenet_param_counts(name):
    assert n_params(on_meta(getattr(R, name))) == IMAGENET_PARAMS[name]


@pytest.mark.parametrize("depth", CIFAR_PARAMS_A)
def test_cifar_param_counts_option_a(depth):
    assert n_params(on_meta(R.cifar_resnet, depth)) == CIFAR_PARAMS_A[depth]


def test_cifar_param_count_option_b():
    # Two 1×1 projections (16→32, 32→64) with BN on top of option A's count.
    extra = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert n_params(on_meta(R.cifar_resnet, 20, shortcut="B")) == CIFAR_PARAMS_A[20] + extra


@pytest.mark.parametrize("depth", CIFAR_PREACT_PARAMS)
def test_cifar_preact_param_counts(depth):
    assert n_params(on_meta(R.cifar_preact_resnet, depth)) == CIFAR_PREACT_PARAMS[depth]


@pytest.mark.parametrize("depth", CIFAR_PREACT_PAPER_MILLIONS)
def test_cifar_preact_param_counts_match_paper(depth):
    model = on_meta(R.cifar_preact_resnet, depth)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert round(weights / 1e6, 1) == CIFAR_PREACT_PAPER_MILLIONS[depth]


@pytest.mark.parametrize("name", PREACT_IMAGENET_PARAMS)
def test_preact_imagenet_param_counts(name):
    assert n_params(on_meta(getattr(R, name))) == PREACT_IMAGENET_PARAMS[name]


# --------------------------------------------------------------------------------------------------
# ImageNet ResNet structure, init and forward


def test_resnet18_forward_shape():
    model = R.resnet18().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_resnet50_forward_shape_and_backward():
    model = R.resnet50(num_classes=7)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None for p in model.parameters())


def test_block_attributes():
    basic = R.BasicBlock(64, 128, stride=2, downsample=nn.Identity())
    bottleneck = R.Bottleneck(256, 128, stride=2, groups=32, base_width=4)
    assert R.BasicBlock.expansion == 1 and R.Bottleneck.expansion == 4
    assert basic.stride == 2 and isinstance(basic.downsample, nn.Identity)
    assert bottleneck.stride == 2 and bottleneck.downsample is None
    for block in (basic, bottleneck):
        assert isinstance(block.relu, nn.ReLU) and block.relu.inplace
    # ResNet v1.5: stride on the grouped 3×3; width = int(128 * 4 / 64) * 32 = 256.
    assert bottleneck.conv1.stride == (1, 1) and bottleneck.conv1.out_channels == 256
    assert bottleneck.conv2.stride == (2, 2) and bottleneck.conv2.groups == 32
    assert bottleneck.conv3.out_channels == 512
    with pytest.raises(ValueError):
        R.BasicBlock(64, 64, groups=2)
    with pytest.raises(NotImplementedError):
        R.BasicBlock(64, 64, dilation=2)
    with pytest.raises(ValueError):
        R.resnet18(replace_stride_with_dilation=[False, True])


def test_resnet_module_tree():
    model = on_meta(R.resnet50)
    top = [name for name, _ in model.named_children()]
    assert top == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    down = model.layer2[0].downsample
    assert (
        isinstance(down, nn.Sequential)
        and isinstance(down[0], nn.Conv2d)
        and isinstance(down[1], nn.BatchNorm2d)
    )
    assert down[0].kernel_size == (1, 1) and down[0].stride == (2, 2)
    assert model.layer2[1].downsample is None


def test_resnet_dilation():
    model = on_meta(R.resnet50, replace_stride_with_dilation=[False, True, True])
    assert model.layer3[0].conv2.stride == (1, 1) and model.layer3[0].conv2.dilation == (1, 1)
    assert model.layer3[1].conv2.dilation == (2, 2)
    assert model.layer4[0].conv2.dilation == (2, 2) and model.layer4[1].conv2.dilation == (4, 4)
    assert model.layer4[0].downsample[0].stride == (1, 1)


def test_resnet_init():
    torch.manual_seed(0)
    model = R.resnet50()
    for conv in (model.conv1, model.layer4[0].conv2):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


@pytest.mark.parametrize("factory", [R.resnet18, R.resnet50])
def test_zero_init_residual(factory):
    model = factory(zero_init_residual=True)
    last_bns = {
        id(b.bn3 if isinstance(b, R.Bottleneck) else b.bn2)
        for b in model.modules()
        if isinstance(b, (R.BasicBlock, R.Bottleneck))
    }
    assert last_bns
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == (0 if id(m) in last_bns else 1))
    # The residual branch is then 0, so an identity block maps its (non-negative) input x to relu(x) = x.
    block = model.layer1[1].eval()
    x = torch.rand(1, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)


# --------------------------------------------------------------------------------------------------
# CIFAR ResNet


def test_zero_pad_shortcut():
    shortcut = R.ZeroPadShortcut(16, 32, stride=2)
    assert list(shortcut.parameters()) == [] and list(shortcut.buffers()) == []
    x = torch.randn(2, 16, 7, 9)
    out = shortcut(x)
    assert out.shape == (2, 32, 4, 5)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.all(out[:, 16:] == 0)
    assert torch.equal(R.ZeroPadShortcut(8, 8, stride=1)(x[:, :8]), x[:, :8])
    with pytest.raises(ValueError):
        R.ZeroPadShortcut(32, 16, stride=1)


def test_cifar_structure_option_a():
    model = R.cifar_resnet(20)
    top = [name for name, _ in model.named_children()]
    assert top == ["conv1", "bn1", "relu", "layer1", "layer2", "layer3", "avgpool", "fc"]
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [3, 3, 3]
    assert all(
        isinstance(b, R.BasicBlock) for layer in (model.layer1, model.layer2, model.layer3) for b in layer
    )
    assert model.layer1[0].downsample is None
    for layer, (cin, cout) in ((model.layer2, (16, 32)), (model.layer3, (32, 64))):
        down = layer[0].downsample
        assert isinstance(down, R.ZeroPadShortcut)
        assert (down.in_channels, down.out_channels, down.stride) == (cin, cout, 2)
        assert layer[0].stride == 2 and layer[1].downsample is None
    assert not any("downsample" in k for k in model.state_dict())


def test_cifar_block_with_zero_pad_shortcut():
    block = R.BasicBlock(16, 32, stride=2, downsample=R.ZeroPadShortcut(16, 32, 2)).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        main = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        expected = torch.relu(main + nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 16)))
        torch.testing.assert_close(block(x), expected)


def test_cifar_option_b():
    model = R.cifar_resnet(20, shortcut="B")
    for layer, (cin, cout) in ((model.layer2, (16, 32)), (model.layer3, (32, 64))):
        down = layer[0].downsample
        assert isinstance(down, nn.Sequential) and len(down) == 2
        assert isinstance(down[0], nn.Conv2d) and isinstance(down[1], nn.BatchNorm2d)
        assert (down[0].in_channels, down[0].out_channels) == (cin, cout)
        assert down[0].kernel_size == (1, 1) and down[0].stride == (2, 2) and down[0].bias is None
    assert "layer2.0.downsample.0.weight" in model.state_dict()
    with pytest.raises(ValueError):
        R.cifar_resnet(20, shortcut="C")


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_forward(shortcut):
    model = R.cifar_resnet(20, shortcut=shortcut)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        h = model.relu(model.bn1(model.conv1(x)))
        for layer, shape in (
            (model.layer1, (16, 32, 32)),
            (model.layer2, (32, 16, 16)),
            (model.layer3, (64, 8, 8)),
        ):
            h = layer(h)
            assert h.shape == (2, *shape)
        assert model(x).shape == (2, 10)


def test_cifar_init_and_depth_check():
    torch.manual_seed(0)
    model = R.cifar_resnet(20, num_classes=100)
    assert model.fc.out_features == 100
    conv = model.layer3[1].conv1  # kaiming_normal_ with fan-in = 64 * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    assert all(
        torch.all(m.weight == 1) and torch.all(m.bias == 0)
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    )
    for depth in (19, 2, 0):
        with pytest.raises(ValueError):
            R.cifar_resnet(depth)


# --------------------------------------------------------------------------------------------------
# Pre-activation ResNets


@pytest.mark.parametrize("block_cls", [R.PreActBasicBlock, R.PreActBottleneck])
def test_preact_block_order_and_shortcut(block_cls):
    """BN → ReLU → conv for every layer, no ReLU after the sum, projection on the pre-activated input."""
    planes = 8
    out_ch = planes * block_cls.expansion
    down = nn.Sequential(R.conv1x1(16, out_ch, stride=2))
    projecting = randomize_bn(block_cls(16, planes, stride=2, downsample=down)).eval()
    identity = randomize_bn(block_cls(out_ch, planes)).eval()
    names = [n for n, _ in projecting.named_children()]
    expected = ["bn1", "conv1", "bn2", "conv2"] + (
        ["bn3", "conv3"] if block_cls is R.PreActBottleneck else []
    )
    assert names == expected + ["relu", "downsample"]
    assert projecting.stride == 2 and identity.downsample is None
    x = torch.randn(2, 16, 8, 8)
    y = torch.randn(2, out_ch, 8, 8)
    with torch.no_grad():
        pre = torch.relu(projecting.bn1(x))
        h = projecting.conv1(pre)
        h = projecting.conv2(torch.relu(projecting.bn2(h)))
        if block_cls is R.PreActBottleneck:
            h = projecting.conv3(torch.relu(projecting.bn3(h)))
            assert projecting.conv2.stride == (2, 2) and projecting.conv1.stride == (1, 1)
        torch.testing.assert_close(projecting(x), h + down(pre))
        assert projecting(x).shape == (2, out_ch, 4, 4)
        # Zeroing the last conv leaves the bare shortcut: x itself (no final ReLU).
        last = identity.conv3 if block_cls is R.PreActBottleneck else identity.conv2
        last.weight.zero_()
        torch.testing.assert_close(identity(y), y)


def test_cifar_preact_structure():
    model = on_meta(R.cifar_preact_resnet, 164)
    top = [name for name, _ in model.named_children()]
    assert top == ["conv1", "layer1", "layer2", "layer3", "bn_final", "relu", "avgpool", "fc"]
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [18, 18, 18]
    assert isinstance(model.layer1[0], R.PreActBottleneck)
    for layer, (cin, cout, stride) in zip(
        (model.layer1, model.layer2, model.layer3), ((16, 64, 1), (64, 128, 2), (128, 256, 2)), strict=True
    ):
        (proj,) = layer[0].downsample
        assert (proj.in_channels, proj.out_channels, proj.stride) == (cin, cout, (stride, stride))
        assert layer[1].downsample is None
    assert model.bn_final.num_features == 256 and model.fc.in_features == 256
    basic = on_meta(R.cifar_preact_resnet, 110)
    assert isinstance(basic.layer1[0], R.PreActBasicBlock) and len(basic.layer1) == 18
    assert basic.layer1[0].downsample is None and basic.fc.in_features == 64
    # 164 = 6·27 + 2 too: the block type can be forced.
    forced = on_meta(R.cifar_preact_resnet, 164, bottleneck=False)
    assert isinstance(forced.layer1[0], R.PreActBasicBlock) and len(forced.layer1) == 27
    for depth, bottleneck in ((1001, False), (100, True), (165, None)):
        with pytest.raises(ValueError):
            R.cifar_preact_resnet(depth, bottleneck=bottleneck)


def test_cifar_preact_forward():
    model = R.cifar_preact_resnet(20)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    deep = R.cifar_preact_resnet(164).eval()
    with torch.no_grad():
        assert deep(torch.randn(1, 3, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize("factory", [R.preact_resnet18, R.preact_resnet50])
def test_preact_imagenet_forward(factory):
    model = factory(num_classes=5).eval()
    top = [name for name, _ in model.named_children()]
    assert top == [
        "conv1",
        "maxpool",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "bn_final",
        "relu",
        "avgpool",
        "fc",
    ]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


# --------------------------------------------------------------------------------------------------
# Equivalence with torchvision and timm (through tests/tvshim.py)


@pytest.fixture(scope="module")
def tv_models():
    return import_torchvision().models


TV_CASES = [(name, {}) for name in IMAGENET_PARAMS] + [
    ("resnet50", {"replace_stride_with_dilation": [False, True, True]}),
    ("resnet18", {"num_classes": 10, "zero_init_residual": True}),
]


@pytest.mark.parametrize(("name", "kwargs"), TV_CASES)
def test_same_structure_as_torchvision(tv_models, name, kwargs):
    ours = on_meta(getattr(R, name), **kwargs)
    theirs = on_meta(getattr(tv_models, name), **kwargs)
    assert tree(ours) == tree(theirs)
    assert shapes(ours) == shapes(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert leaf_reprs(ours) == leaf_reprs(theirs)  # same hyper-parameters (stride, padding, ...)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", {}),
        ("resnet50", {}),
        ("resnext50_32x4d", {}),
        ("wide_resnet50_2", {}),
        ("resnet50", {"replace_stride_with_dilation": [False, True, True]}),
    ],
)
def test_state_dict_interchange_with_torchvision(tv_models, name, kwargs):
    torch.manual_seed(0)
    ours = randomize_bn(getattr(R, name)(**kwargs)).eval()
    # Built on meta (skipping a second and third random init); assign=True adopts the loaded tensors.
    theirs = on_meta(getattr(tv_models, name), **kwargs).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True, assign=True)
    back = on_meta(getattr(R, name), **kwargs).eval()
    back.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = theirs(x)
        assert torch.equal(ours(x), expected)
        assert torch.equal(back(x), expected)


def test_training_step_matches_torchvision(tv_models):
    torch.manual_seed(0)
    ours = randomize_bn(R.resnet18(num_classes=10))
    theirs = tv_models.resnet18(num_classes=10)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=0, atol=0)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(ours.named_buffers(), theirs.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_timm_resnet50_checkpoint_loads():
    timm = import_timm()
    theirs = timm.create_model("resnet50", pretrained=False).eval()
    ours = R.resnet50().eval()
    assert shapes(ours) == shapes(theirs)
    randomize_bn(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
