"""ResNet: "Deep Residual Learning for Image Recognition".

He, Zhang, Ren, Sun, CVPR 2016. https://arxiv.org/abs/1512.03385

Instead of asking a stack of layers to fit a mapping H(x), each block fits the residual
F(x) = H(x) - x and adds its input back through a shortcut, so extra depth can start as an
identity and deeper nets stop being harder to optimise than shallow ones ("degradation").
``ResNet`` is the ImageNet family (7x7 stem, four stages of basic blocks for 18/34 layers or
1x1-3x3-1x1 bottlenecks with 4x expansion for 50/101/152, projection shortcuts when the shape
changes); its state dict matches ``torchvision.models.resnetXX()`` key for key, so published
weights load with ``strict=True``. ``CifarResNet`` is the paper's 6n+2-layer CIFAR-10 family
(sec. 4.2), with the parameter-free option-A shortcut, option-B projections, or no shortcut at
all (the "plain" baseline of Fig. 6).

Deviations from the paper:
- Bottleneck nets default to torchvision's "V1.5": the stride-2 of a downsampling bottleneck sits
  on the 3x3 conv. The paper (and Caffe's released models) put it on the first 1x1 conv;
  ``stride_in_1x1=True`` restores that. Basic-block nets (18/34) are identical in both versions.
- ImageNet nets use option-B (projection only when the shape changes) shortcuts everywhere; the
  paper's ResNet-34 "A" row in Table 3 uses zero-padding shortcuts, available only in CifarResNet.
- Init is Kaiming normal with ``mode="fan_out"`` (the backward-pass form of He et al. 2015, as in
  torchvision and fb.resnet.torch); the fc layer keeps PyTorch's default init.
  ``zero_init_residual`` (Goyal et al. 2017) is off by default, as in the paper.
- Option A pads the extra channels with zeros after the existing ones; the paper does not say where.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by striding and zero-pad the new channels (no parameters)."""

    def __init__(self, out_planes: int, stride: int) -> None:
        super().__init__()
        self.out_planes, self.stride = out_planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, 0, self.out_planes - x.shape[1]))  # (B, out_planes, H/s, W/s)


class BasicBlock(nn.Module):
    """Two 3x3 convs; ``residual=False`` drops the shortcut (the paper's plain-net block)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, residual: bool = True
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample  # None: identity shortcut
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H/s, W/s)
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)  # the ReLU comes after the addition (Fig. 2)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), for ResNet-50/101/152 (Fig. 5 right)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        # V1 (paper) strides the first 1x1, which simply skips 3/4 of the input positions;
        # V1.5 strides the 3x3, which sees all of them (about +0.5% top-1 in torchvision).
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, planes, s1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, s3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H, W) or (B, planes, H/s, W/s) in V1
        out = self.relu(self.bn2(self.conv2(out)))  # (B, planes, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (B, 4 * planes, H/s, W/s)
        out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


def _init_weights(net: nn.Module, zero_init_residual: bool) -> None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:  # each residual branch starts as zero, so each block as an identity
        for m in net.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


class _ClassifierMixin:
    """timm-style head shared by both families: global average pool -> fc."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the (B, C, H, W) features to (B, C) logits input; ``pre_logits`` stops there."""
        x = torch.flatten(self.avgpool(x), 1)  # (B, num_features)
        return x if pre_logits else self.fc(x)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``fc`` with a fresh ``num_classes``-way layer (0 -> identity)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


class ResNet(_ClassifierMixin, nn.Module):
    """ImageNet ResNet (Table 1) with torchvision's module names."""

    def __init__(
        self,
        block: Literal["basic", "bottleneck"] = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        stride_in_1x1: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        """Build an ImageNet ResNet.

        Args:
            block: ``"basic"`` (two 3x3 convs, ResNet-18/34) or ``"bottleneck"`` (ResNet-50+).
            layers: Number of blocks in each of the four stages, e.g. (3, 4, 6, 3) for ResNet-50.
            num_classes: Width of the final fc layer (0 gives a net that returns pooled features).
            stride_in_1x1: Put a bottleneck's stride on its first 1x1 conv (the paper's V1)
                instead of its 3x3 conv (torchvision's V1.5, the default). No effect on basic blocks.
            zero_init_residual: Start the last BN of every residual branch at zero.
        """
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        block_cls = BasicBlock if block == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = self._make_stage(block_cls, planes, n, stride=1 if i == 0 else 2, stride_in_1x1=stride_in_1x1)
            setattr(self, f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 512 * block_cls.expansion
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        _init_weights(self, zero_init_residual)

    def _make_stage(self, block_cls: type, planes: int, n: int, stride: int, stride_in_1x1: bool) -> nn.Sequential:
        out = planes * block_cls.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:  # option B: project only when the shape changes
            downsample = nn.Sequential(conv1x1(self.inplanes, out, stride), nn.BatchNorm2d(out))
        extra = {"stride_in_1x1": stride_in_1x1} if block_cls is Bottleneck else {}
        blocks = [block_cls(self.inplanes, planes, stride, downsample, **extra)]
        self.inplanes = out
        blocks += [block_cls(out, planes, **extra) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and four stages: (B, 3, 224, 224) -> (B, num_features, 7, 7)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, 56, 56)
        x = self.layer1(x)  # (B, 64 * e, 56, 56)
        x = self.layer2(x)  # (B, 128 * e, 28, 28)
        x = self.layer3(x)  # (B, 256 * e, 14, 14)
        return self.layer4(x)  # (B, 512 * e, 7, 7)


def resnet18(*, num_classes: int = 1000, stride_in_1x1: bool = False, zero_init_residual: bool = False) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2), 11,689,512 parameters. Args as in :class:`ResNet`."""
    return ResNet("basic", (2, 2, 2, 2), num_classes, stride_in_1x1, zero_init_residual)


def resnet34(*, num_classes: int = 1000, stride_in_1x1: bool = False, zero_init_residual: bool = False) -> ResNet:
    """ResNet-34: basic blocks (3, 4, 6, 3), 21,797,672 parameters. Args as in :class:`ResNet`."""
    return ResNet("basic", (3, 4, 6, 3), num_classes, stride_in_1x1, zero_init_residual)


def resnet50(*, num_classes: int = 1000, stride_in_1x1: bool = False, zero_init_residual: bool = False) -> ResNet:
    """ResNet-50: bottlenecks (3, 4, 6, 3), 25,557,032 parameters. Args as in :class:`ResNet`."""
    return ResNet("bottleneck", (3, 4, 6, 3), num_classes, stride_in_1x1, zero_init_residual)


def resnet101(*, num_classes: int = 1000, stride_in_1x1: bool = False, zero_init_residual: bool = False) -> ResNet:
    """ResNet-101: bottlenecks (3, 4, 23, 3), 44,549,160 parameters. Args as in :class:`ResNet`."""
    return ResNet("bottleneck", (3, 4, 23, 3), num_classes, stride_in_1x1, zero_init_residual)


def resnet152(*, num_classes: int = 1000, stride_in_1x1: bool = False, zero_init_residual: bool = False) -> ResNet:
    """ResNet-152: bottlenecks (3, 8, 36, 3), 60,192,808 parameters. Args as in :class:`ResNet`."""
    return ResNet("bottleneck", (3, 8, 36, 3), num_classes, stride_in_1x1, zero_init_residual)


class CifarResNet(_ClassifierMixin, nn.Module):
    """The paper's CIFAR-10 nets (sec. 4.2): 6n+2 layers on 32x32 inputs."""

    def __init__(
        self, depth: int = 20, shortcut: Literal["A", "B"] = "A", residual: bool = True, num_classes: int = 10
    ) -> None:
        """Build a CIFAR ResNet (or plain net).

        Args:
            depth: 6n + 2 weighted layers: 20, 32, 44, 56, 110 and 1202 are the paper's.
            shortcut: ``"A"``: identity, with stride-2 subsampling and zero-padded channels where the
                shape changes (no extra parameters, the paper's CIFAR choice). ``"B"``: 1x1 conv + BN
                projection where the shape changes.
            residual: False builds the plain baseline: the same layers without any shortcut (it
                then has exactly the parameters of option A; ``shortcut`` is ignored).
            num_classes: Width of the final fc layer (0 gives a net that returns pooled features).
        """
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, 1202), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        inplanes = 16
        for i, planes in enumerate((16, 32, 64)):  # feature maps 32, 16, 8
            stride = 1 if i == 0 else 2
            downsample = None
            if residual and (stride != 1 or inplanes != planes):
                downsample = ShortcutA(planes, stride) if shortcut == "A" else nn.Sequential(
                    conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
            blocks = [BasicBlock(inplanes, planes, stride, downsample, residual=residual)]
            blocks += [BasicBlock(planes, planes, residual=residual) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 64
        self.num_classes = num_classes
        self.fc = nn.Linear(64, num_classes) if num_classes > 0 else nn.Identity()
        _init_weights(self, zero_init_residual=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) -> (B, 64, 8, 8)."""
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        x = self.layer1(x)  # (B, 16, 32, 32)
        x = self.layer2(x)  # (B, 32, 16, 16)
        return self.layer3(x)  # (B, 64, 8, 8)


def cifar_resnet20(*, shortcut: Literal["A", "B"] = "A", residual: bool = True, num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR-10 (0.27M parameters with option A)."""
    return CifarResNet(20, shortcut, residual, num_classes)


def cifar_resnet56(*, shortcut: Literal["A", "B"] = "A", residual: bool = True, num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR-10 (0.85M parameters with option A)."""
    return CifarResNet(56, shortcut, residual, num_classes)


def cifar_resnet110(*, shortcut: Literal["A", "B"] = "A", residual: bool = True, num_classes: int = 10) -> CifarResNet:
    """ResNet-110 for CIFAR-10 (1.7M parameters with option A)."""
    return CifarResNet(110, shortcut, residual, num_classes)
