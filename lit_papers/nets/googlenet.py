"""GoogLeNet (Inception v1): "Going Deeper with Convolutions".

Szegedy et al., CVPR 2015. https://arxiv.org/abs/1409.4842

22 weight layers built from Inception modules: parallel 1x1, 3x3 and 5x5 convolutions and a 3x3 max pool, their outputs
concatenated, with 1x1 "reduce" convolutions in front of the 3x3 and 5x5 branches and behind the pool ("pool proj") to
keep the width in check (Table 1). Global average pooling replaces the large fully connected layers (6.6M parameters
against AlexNet's 60M). Two auxiliary classifiers on the outputs of 4a and 4d (5x5/3 average pool -> 1x1 conv 128 ->
FC 1024 -> dropout 0.7 -> FC) add gradient to the middle of the net during training; their losses count 0.3 each and
they are dropped at inference. In training mode the net returns ``GoogLeNetOutputs(logits, aux_logits1,
aux_logits2)``, in eval mode only the main logits (``lit_papers.tasks.classification.ImageClassifier`` weights them).

``variant="torchvision"`` (the default, and what ``googlenet()`` builds) has the state dict of
``torchvision.models.googlenet(aux_logits=True)`` key for key and the same outputs, so its published weights load with
``strict=True`` (with them, pass ``transform_input=True`` as torchvision's builder does). ``variant="paper"`` is the
2014 net.

Deviations from the paper (torchvision variant):
- BatchNorm (eps 1e-3) after every conv, which has no bias; no local response normalisation. BN postdates the paper.
- The "5x5" branch uses a 3x3 conv (a known torchvision bug kept for weight compatibility, pytorch/vision#906).
- maxpool4 is 2x2/2 instead of 3x3/2 (same 7x7 output at 224); main dropout 0.2 instead of 0.4.
- The auxiliary heads pool adaptively to 4x4 instead of 5x5/3 (also 4x4 at 224, but 4x4 windows at offsets 0, 3, 7, 10
  of the 14x14 map instead of 5x5 windows at 0, 3, 6, 9), so any input of at least 15x15 works.
- Init: truncated normal std 0.01 for conv and FC weights (torchvision's), PyTorch's default FC biases.
Paper variant: Table 1 and Fig. 3 (no BN, LRN after pool1 and after the stem's 3x3 conv, 5x5 convs, 3x3/2 pools,
dropout 0.4, 5x5/3 auxiliary pool, so 224 inputs), with Caffe's reference init (bvlc_googlenet: "xavier" weights =
uniform of variance 1/fan_in, biases 0.2 on hidden layers, 0 on classifiers; the paper states none) and Caffe's LRN
(size 5, alpha 1e-4, beta 0.75).
Neither variant has the paper's photometric distortions, Polyak averaging or 144-crop testing.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

# Table 1: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj) per Inception module.
INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


class GoogLeNetOutputs(NamedTuple):
    """Training-mode outputs: main logits, then the auxiliary heads on 4a and 4d; each (B, num_classes)."""

    logits: torch.Tensor
    aux_logits1: torch.Tensor
    aux_logits2: torch.Tensor


class BasicConv2d(nn.Module):
    """Conv -> [BN] -> ReLU; the conv has a bias only without BN."""

    def __init__(self, cin: int, cout: int, batch_norm: bool, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=not batch_norm, **conv_kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001) if batch_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """Four parallel branches concatenated along channels: (B, cin, H, W) -> (B, 1x1 + 3x3 + 5x5 + proj, H, W)."""

    def __init__(self, cin: int, widths: tuple[int, ...], batch_norm: bool, k5: int) -> None:
        super().__init__()
        c1, c3r, c3, c5r, c5, proj = widths
        self.branch1 = BasicConv2d(cin, c1, batch_norm, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(cin, c3r, batch_norm, kernel_size=1), BasicConv2d(c3r, c3, batch_norm, kernel_size=3, padding=1)
        )
        self.branch3 = nn.Sequential(  # k5 = 5 in the paper, 3 in torchvision
            BasicConv2d(cin, c5r, batch_norm, kernel_size=1),
            BasicConv2d(c5r, c5, batch_norm, kernel_size=k5, padding=k5 // 2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True), BasicConv2d(cin, proj, batch_norm, kernel_size=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: avg pool to 4x4 -> 1x1 conv 128 -> FC 1024 -> ReLU -> dropout -> FC."""

    def __init__(self, cin: int, num_classes: int, batch_norm: bool, pool: nn.Module, dropout: float) -> None:
        super().__init__()
        self.pool = pool
        self.conv = BasicConv2d(cin, 128, batch_norm, kernel_size=1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.pool(x))  # (B, 128, 4, 4)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))  # (B, 1024)
        return self.fc2(self.dropout(x))  # (B, num_classes)


class GoogLeNet(nn.Module):
    """Inception v1 with torchvision's module names and the timm-style classifier interface."""

    def __init__(
        self,
        num_classes: int = 1000,
        variant: Literal["torchvision", "paper"] = "torchvision",
        aux_logits: bool = True,
        dropout: float | None = None,
        dropout_aux: float = 0.7,
        transform_input: bool = False,
    ) -> None:
        """Build a GoogLeNet.

        Args:
            num_classes: Width of the classifiers (0 gives a headless net returning pooled features, no aux heads).
            variant: ``"torchvision"`` (BN, torchvision's state dict) or ``"paper"`` (Table 1, no BN, LRN; 224 inputs).
            aux_logits: Build the two auxiliary classifiers; they only run in training mode.
            dropout: Drop probability before the main classifier; ``None`` is the variant's (paper 0.4, torchvision 0.2).
            dropout_aux: Drop probability in the auxiliary classifiers (0.7 in the paper).
            transform_input: Map inputs normalised with the ImageNet mean/std to the (x - 0.5) / 0.5 scaling that
                torchvision's ported IMAGENET1K_V1 weights expect. Off for training from scratch.
        """
        super().__init__()
        if variant not in ("torchvision", "paper"):
            raise ValueError(f"variant must be 'torchvision' or 'paper', got {variant!r}")
        paper = variant == "paper"
        bn = not paper
        lrn = (lambda: nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)) if paper else nn.Identity
        self.conv1 = BasicConv2d(3, 64, bn, kernel_size=7, stride=2, padding=3)  # (B, 64, 112, 112)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # (B, 64, 56, 56)
        self.lrn1 = lrn()
        self.conv2 = BasicConv2d(64, 64, bn, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, bn, kernel_size=3, padding=1)  # (B, 192, 56, 56)
        self.lrn2 = lrn()
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # (B, 192, 28, 28)
        cin = 192
        for name, widths in INCEPTION.items():
            setattr(self, f"inception{name}", Inception(cin, widths, bn, k5=5 if paper else 3))
            cin = widths[0] + widths[2] + widths[4] + widths[5]
            if name == "3b":
                self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # (B, 480, 14, 14)
            elif name == "4e":
                self.maxpool4 = nn.MaxPool2d(3, stride=2, ceil_mode=True) if paper else nn.MaxPool2d(2, 2, ceil_mode=True)
        self.aux1 = self.aux2 = None
        if aux_logits and num_classes > 0:
            pool = (lambda: nn.AvgPool2d(5, stride=3)) if paper else (lambda: nn.AdaptiveAvgPool2d((4, 4)))
            self.aux1 = InceptionAux(512, num_classes, bn, pool(), dropout_aux)  # on 4a: (B, 512, 14, 14)
            self.aux2 = InceptionAux(528, num_classes, bn, pool(), dropout_aux)  # on 4d: (B, 528, 14, 14)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))  # the paper's 7x7/1 average pool at 224
        self.dropout = nn.Dropout((0.4 if paper else 0.2) if dropout is None else dropout)
        self.fc = nn.Linear(1024, num_classes) if num_classes > 0 else nn.Identity()
        self.variant, self.transform_input = variant, transform_input
        self.num_classes = num_classes
        self.num_features = 1024
        # torchvision's ported weights saw x' = (x_raw - 0.5) / 0.5; from x = (x_raw - mean) / std, x' = x * a + b.
        # Constants in float64, rounded once to float32, exactly as torchvision's Python-float arithmetic rounds them.
        mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
        std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
        self.register_buffer("input_scale", (std / 0.5).float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((mean - 0.5) / 0.5).float().view(1, 3, 1, 1), persistent=False)
        if paper:
            self._init_paper()
        else:
            self._init_torchvision()

    def _init_torchvision(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # Bounds +-2 are absolute (200 std), so this is effectively N(0, 0.01); kept as torchvision has it.
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _init_paper(self) -> None:
        classifiers = {id(self.fc)} | {id(aux.fc2) for aux in (self.aux1, self.aux2) if aux is not None}
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="linear")  # Caffe "xavier": U(+-sqrt(3 / fan_in))
                nn.init.constant_(m.bias, 0.0 if id(m) in classifiers else 0.2)

    def _trunk(self, x: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stem and Inception modules: (B, 3, 224, 224) -> (B, 1024, 7, 7), and the aux logits if asked for."""
        if self.transform_input:
            x = x * self.input_scale + self.input_shift
        x = self.lrn1(self.maxpool1(self.conv1(x)))  # (B, 64, 56, 56)
        x = self.maxpool2(self.lrn2(self.conv3(self.conv2(x))))  # (B, 192, 28, 28)
        x = self.maxpool3(self.inception3b(self.inception3a(x)))  # (B, 480, 14, 14)
        aux = []
        x = self.inception4a(x)  # (B, 512, 14, 14)
        if with_aux:
            aux.append(self.aux1(x))
        x = self.inception4d(self.inception4c(self.inception4b(x)))  # (B, 528, 14, 14)
        if with_aux:
            aux.append(self.aux2(x))
        x = self.maxpool4(self.inception4e(x))  # (B, 832, 7, 7)
        return self.inception5b(self.inception5a(x)), aux  # (B, 1024, 7, 7)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) -> (B, 1024, 7, 7); never runs the auxiliary heads."""
        return self._trunk(x, with_aux=False)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool -> dropout -> fc; ``pre_logits=True`` stops before fc (B, 1024)."""
        x = self.dropout(torch.flatten(self.avgpool(x), 1))  # (B, 1024)
        return x if pre_logits else self.fc(x)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> GoogLeNetOutputs | torch.Tensor:
        """Training mode with aux heads: ``GoogLeNetOutputs``; otherwise the main logits (B, num_classes)."""
        with_aux = self.training and self.aux1 is not None
        features, aux = self._trunk(x, with_aux)
        logits = self.forward_head(features)
        return GoogLeNetOutputs(logits, *aux) if with_aux else logits

    def reset_classifier(self, num_classes: int) -> None:
        """Fresh ``num_classes``-way main and auxiliary classifiers; 0 -> identity head and no auxiliary heads."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes == 0:
            self.aux1 = self.aux2 = None
        for aux in (self.aux1, self.aux2):
            if aux is not None:
                aux.fc2 = nn.Linear(aux.fc2.in_features, num_classes)


def googlenet(
    *, num_classes: int = 1000, aux_logits: bool = True, dropout: float = 0.2, dropout_aux: float = 0.7,
    transform_input: bool = False,
) -> GoogLeNet:
    """torchvision-compatible GoogLeNet, 13,004,888 parameters with the auxiliary heads (6,624,904 without).

    Args as in :class:`GoogLeNet`; ``GoogLeNet(variant="paper")`` builds the 2014 net.
    """
    return GoogLeNet(num_classes, "torchvision", aux_logits, dropout, dropout_aux, transform_input)
