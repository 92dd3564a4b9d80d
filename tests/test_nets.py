"""Architectures against the papers' numbers and torchvision's reference implementations (CPU, no downloads)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from lit_papers.nets.alexnet import AlexNet
from lit_papers.nets.resnet import (
    CifarResNet,
    ShortcutA,
    cifar_resnet20,
    cifar_resnet56,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
)

RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101,
           "resnet152": resnet152}

# name -> (builder taking num_classes, input side). Small inputs keep the file fast on two CPU cores:
# AlexNet needs >= 63 px; ImageNet ResNets run down to 32 px (layer4 then works on 1x1 maps).
NETS = {
    "alexnet_paper": (lambda c: AlexNet(c), 64),
    "alexnet_paper_groups2": (lambda c: AlexNet(c, groups=2), 64),
    "alexnet_torchvision": (lambda c: AlexNet(c, variant="torchvision"), 64),
    **{name: (lambda c, b=b: b(num_classes=c), 32) for name, b in RESNETS.items()},
    "resnet50_v1": (lambda c: resnet50(num_classes=c, stride_in_1x1=True), 32),
    "cifar_resnet20_A": (lambda c: cifar_resnet20(num_classes=c), 32),
    "cifar_resnet20_B": (lambda c: cifar_resnet20(shortcut="B", num_classes=c), 32),
    "cifar_plain20": (lambda c: cifar_resnet20(residual=False, num_classes=c), 32),
    "cifar_resnet56_A": (lambda c: cifar_resnet56(num_classes=c), 32),
}


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def conv_params(cin: int, cout: int, k: int, groups: int = 1, bias: bool = True) -> int:
    return cout * (cin // groups) * k * k + (cout if bias else 0)


def linear_params(fin: int, fout: int) -> int:
    return fin * fout + fout


# ---------------------------------------------------------------- common interface, every net


@pytest.mark.parametrize("name", NETS)
def test_interface_and_backward(name: str) -> None:
    torch.manual_seed(0)
    build, side = NETS[name]
    net = build(7)
    x = torch.randn(2, 3, side, side)
    assert net.num_classes == 7
    out = net(x)
    assert out.shape == (2, 7)
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 5])).backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"

    net.eval()  # deterministic from here: no dropout, BN running stats
    with torch.no_grad():
        feats = net.forward_features(x)
        assert feats.dim() == 4 and feats.shape[0] == 2
        pre = net.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, net.num_features)
        torch.testing.assert_close(net.forward_head(feats), net(x))
        net.reset_classifier(3)
        assert net.num_classes == 3 and net(x).shape == (2, 3)
        net.reset_classifier(0)
        assert net.num_classes == 0
        torch.testing.assert_close(net(x), pre)  # headless net returns the pre-logits features


# ---------------------------------------------------------------- AlexNet


def alexnet_paper_params(groups: int, num_classes: int = 1000) -> int:
    return (conv_params(3, 96, 11) + conv_params(96, 256, 5, groups) + conv_params(256, 384, 3)
            + conv_params(384, 384, 3, groups) + conv_params(384, 256, 3, groups)
            + linear_params(256 * 6 * 6, 4096) + linear_params(4096, 4096) + linear_params(4096, num_classes))


def test_alexnet_param_counts() -> None:
    assert n_params(AlexNet()) == alexnet_paper_params(1) == 62_378_344
    assert n_params(AlexNet(groups=2)) == alexnet_paper_params(2) == 60_965_224  # the paper's "60 million"
    assert n_params(AlexNet(variant="torchvision")) == 61_100_840  # torchvision's model card


def test_alexnet_map_sizes_at_224() -> None:
    net = AlexNet(variant="paper").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert net.features[:1](x).shape == (1, 96, 55, 55)  # paper Fig. 2: 55x55x96
        assert net.forward_features(x).shape == (1, 256, 6, 6)  # 6x6 without the adaptive pool's help
        assert net.forward_features(torch.randn(1, 3, 227, 227)).shape == (1, 256, 6, 6)  # Caffe crops work too


def test_alexnet_paper_lrn_matches_paper_formula() -> None:
    net = AlexNet()
    lrns = [i for i, m in enumerate(net.features) if isinstance(m, nn.LocalResponseNorm)]
    assert lrns == [2, 6]  # after ReLU(conv1) and ReLU(conv2)
    for i in lrns:
        assert isinstance(net.features[i - 1], nn.ReLU) and isinstance(net.features[i - 2], nn.Conv2d)
    lrn = net.features[2]
    # Sec. 3.3: b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta, k=2, n=5, a=1e-4, b=0.75.
    a = torch.rand(2, 96, 3, 3) * 50  # ReLU outputs of this size make alpha's factor 5 visible
    sq = a.square()
    window_sum = torch.stack([sq[:, max(0, c - 2): c + 3].sum(1) for c in range(96)], dim=1)
    expected = a / (2.0 + 1e-4 * window_sum) ** 0.75
    torch.testing.assert_close(lrn(a), expected)


def test_alexnet_layout_dropout_and_groups() -> None:
    kinds = lambda seq: [type(m).__name__ for m in seq]  # noqa: E731
    paper = AlexNet(groups=2)
    assert kinds(paper.classifier) == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert kinds(AlexNet(variant="torchvision").classifier) == [
        "Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    convs = [m for m in paper.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96, 256, 384, 384, 256]
    assert [c.groups for c in convs] == [1, 2, 1, 2, 2]  # conv3 sees the maps of both GPUs
    with pytest.raises(ValueError):
        AlexNet(variant="torchvision", groups=2)


@pytest.mark.parametrize("bias_init", [1.0, 0.1])
def test_alexnet_paper_init(bias_init: float) -> None:
    torch.manual_seed(0)
    net = AlexNet(bias_init=bias_init)
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 8
    for layer in layers:
        assert abs(layer.weight.std().item() - 0.01) < 3e-4
        assert abs(layer.weight.mean().item()) < 3e-4
    #            conv1 conv2      conv3 conv4      conv5      fc6        fc7        fc8
    expected = [0.0, bias_init, 0.0, bias_init, bias_init, bias_init, bias_init, 0.0]
    for layer, b in zip(layers, expected):
        assert torch.equal(layer.bias, torch.full_like(layer.bias, b))


def test_alexnet_torchvision_parity() -> None:
    torch.manual_seed(0)
    ref = torchvision.models.alexnet().eval()
    net = AlexNet(variant="torchvision").eval()
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    net.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x))


# ---------------------------------------------------------------- ImageNet ResNets

TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160, "resnet152": 60_192_808}


def _randomise_bn(net: nn.Module) -> None:
    # Fresh BNs are identities in eval mode; random statistics make a mis-wired BN visible.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_torchvision_parity(name: str) -> None:
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)()
    _randomise_bn(ref)
    net = RESNETS[name]()
    assert n_params(net) == n_params(ref) == TORCHVISION_PARAMS[name]
    assert [(k, v.shape) for k, v in net.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    net.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), ref.eval()(x))
        torch.testing.assert_close(net.train()(x), ref.train()(x))  # batch statistics path
        torch.testing.assert_close(net.layer4[-1].bn1.running_mean, ref.layer4[-1].bn1.running_mean)


def test_resnet_paper_counts() -> None:
    # Table 1 / torchvision model cards, literally.
    assert n_params(resnet18()) == 11_689_512
    assert n_params(resnet50()) == 25_557_032
    assert resnet18().num_features == 512 and resnet50().num_features == 2048


def test_resnet_v1_vs_v15_stride_placement() -> None:
    torch.manual_seed(0)
    v15, v1 = resnet50(), resnet50(stride_in_1x1=True)
    assert [(k, v.shape) for k, v in v1.state_dict().items()] == [(k, v.shape) for k, v in v15.state_dict().items()]
    for layer in (v15.layer2[0], v15.layer3[0], v15.layer4[0]):
        assert layer.conv1.stride == (1, 1) and layer.conv2.stride == (2, 2)
    for layer in (v1.layer2[0], v1.layer3[0], v1.layer4[0]):
        assert layer.conv1.stride == (2, 2) and layer.conv2.stride == (1, 1)
    assert v1.layer1[0].conv1.stride == v1.layer1[0].conv2.stride == (1, 1)  # stage 1 never subsamples
    v1.load_state_dict(v15.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = v15.eval().forward_features(x), v1.eval().forward_features(x)
    assert a.shape == b.shape == (2, 2048, 1, 1)
    assert not torch.allclose(a, b)
    # Basic blocks have no 1x1 conv: V1 and V1.5 are the same net.
    r18, r18_v1 = resnet18(), resnet18(stride_in_1x1=True)
    r18_v1.load_state_dict(r18.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(r18_v1.eval()(x), r18.eval()(x))


def test_resnet_init() -> None:
    torch.manual_seed(0)
    net = resnet50()
    w = net.layer4[0].conv2.weight  # 512 x 512 x 3 x 3
    assert abs(w.std().item() / math.sqrt(2.0 / (512 * 9)) - 1) < 0.02  # Kaiming normal, fan_out
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in bns)
    zero50 = resnet50(zero_init_residual=True)
    assert all(bool((b.bn3.weight == 0).all() and (b.bn2.weight == 1).all()) for b in zero50.layer3)
    zero18 = resnet18(zero_init_residual=True)
    assert all(bool((b.bn2.weight == 0).all() and (b.bn1.weight == 1).all()) for b in zero18.layer2)


# ---------------------------------------------------------------- CIFAR ResNets


def cifar_params(depth: int, shortcut: str = "A", num_classes: int = 10) -> int:
    n = (depth - 2) // 6
    total = conv_params(3, 16, 3, bias=False) + 2 * 16 + linear_params(64, num_classes)
    cin = 16
    for planes in (16, 32, 64):
        for i in range(n):
            total += conv_params(cin if i == 0 else planes, planes, 3, bias=False) + 2 * planes
            total += conv_params(planes, planes, 3, bias=False) + 2 * planes
        if shortcut == "B" and cin != planes:
            total += conv_params(cin, planes, 1, bias=False) + 2 * planes
        cin = planes
    return total


# Table 6 "# params", as printed.
PAPER_CIFAR = {20: "0.27M", 32: "0.46M", 44: "0.66M", 56: "0.85M", 110: "1.7M", 1202: "19.4M"}


@pytest.mark.parametrize("depth", PAPER_CIFAR)
def test_cifar_param_counts(depth: int) -> None:
    counts = {kind: n_params(CifarResNet(depth, **kw)) for kind, kw in
              {"A": {}, "B": {"shortcut": "B"}, "plain": {"residual": False}}.items()}
    assert counts["A"] == counts["plain"] == cifar_params(depth)
    assert counts["B"] == cifar_params(depth, "B") == counts["A"] + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    decimals = len(PAPER_CIFAR[depth].split(".")[1]) - 1
    assert f"{counts['A'] / 1e6:.{decimals}f}M" == PAPER_CIFAR[depth]


def test_cifar_exact_counts() -> None:
    assert [cifar_params(d) for d in PAPER_CIFAR] == [269_722, 464_154, 658_586, 853_018, 1_727_962, 19_421_274]


@pytest.mark.parametrize("depth", [0, 2, 18, 21, 57])
def test_cifar_bad_depth(depth: int) -> None:
    with pytest.raises(ValueError, match="6n"):
        CifarResNet(depth)


def test_cifar_shortcuts() -> None:
    torch.manual_seed(0)
    a = CifarResNet(20)
    assert isinstance(a.layer2[0].downsample, ShortcutA) and a.layer2[1].downsample is None
    assert a.layer1[0].downsample is None  # 16 -> 16 maps, stride 1: plain identity
    x = torch.randn(2, 16, 32, 32)
    y = a.layer2[0].downsample(x)
    assert y.shape == (2, 32, 16, 16)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])  # stride-2 subsampling
    assert (y[:, 16:] == 0).all()  # zero-padded extra channels
    b = CifarResNet(20, shortcut="B")
    projections = [m for m in b.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(projections) == 2  # only where the shape changes
    plain = CifarResNet(20, residual=False)
    assert all(blk.downsample is None and not blk.residual for s in (plain.layer1, plain.layer2, plain.layer3)
               for blk in s)
    assert plain(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert a.eval().forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 64, 8, 8)


def test_plain_block_has_no_shortcut() -> None:
    # With its residual branch silenced, a residual block passes relu(x) through; a plain block passes nothing.
    res, plain = CifarResNet(20).layer1[0], CifarResNet(20, residual=False).layer1[0]
    for blk in (res, plain):
        nn.init.zeros_(blk.bn2.weight)
        nn.init.zeros_(blk.bn2.bias)
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(res(x), torch.relu(x))
    assert (plain(x) == 0).all()
