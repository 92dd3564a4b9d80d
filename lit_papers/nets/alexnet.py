"""AlexNet: "ImageNet Classification with Deep Convolutional Neural Networks".

Krizhevsky, Sutskever, Hinton, NIPS 2012.
https://papers.nips.cc/paper/4824-imagenet-classification-with-deep-convolutional-neural-networks
(no arXiv version; the single-GPU variant follows "One weird trick", https://arxiv.org/abs/1404.5997)

Five convolutional layers (96-256-384-384-256 kernels) followed by three fully connected layers
(4096-4096-1000). The paper's ingredients: ReLU instead of tanh, local response normalisation (LRN)
after the first two ReLUs, overlapping max pooling (3x3 windows, stride 2), dropout in the first
two fully connected layers, and a two-GPU layout in which conv2, conv4 and conv5 only see the
kernel maps on their own GPU (``groups=2`` here). ``variant="torchvision"`` builds the single-GPU
64-192-384-256-256 net without LRN whose state dict is identical to
``torchvision.models.alexnet()``, so its published weights load with ``strict=True``.

Deviations from the paper:
- Input is 224x224 (what the data pipelines produce) with conv1 padded by 2, as in torchvision:
  224 -> 55 -> 27 -> 13 -> 6, exactly the paper's map sizes. Caffe used 227 crops without padding.
- An ``AdaptiveAvgPool2d((6, 6))`` sits between the convolutions and fc6. It is a no-op for 224
  inputs and only lets other input sizes (e.g. 64x64 in tests) reach the 9216-wide fc6.
- ``groups=2`` reproduces the two-GPU connectivity of conv2/4/5 on one device, but LRN still
  normalises across all 96/256 maps; on two GPUs its window stopped at the GPU boundary.
- Dropout is "inverted" (torch scales kept units by 2 during training) instead of multiplying
  outputs by 0.5 at test time: the same expected activations.
- Bias init is configurable (``bias_init``, default the paper's 1.0): Caffe's reference net used
  0.1 because 1 gave a flat loss at the start of training.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


def _paper_lrn() -> nn.LocalResponseNorm:
    # Paper (sec. 3.3): b = a / (k + alpha * sum_{n neighbours} a^2) ^ beta with k=2, n=5,
    # alpha=1e-4, beta=0.75. Trap: torch computes alpha / n * sum, so alpha must be 5 * 1e-4.
    return nn.LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2.0)


class ConvTrunkFCHead:
    """The classifier interface of nets built as `features` (convs) -> `avgpool` -> `classifier` (fc6, fc7, fc8).

    AlexNet and VGG share this layout (and torchvision's module names); the pre-logits features are fc7's outputs.
    """

    features: nn.Sequential
    avgpool: nn.Module
    classifier: nn.Sequential
    num_features: int
    num_classes: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutional trunk: (B, 3, H, W) -> (B, C, h, w)."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """fc6-fc8 on the conv features; ``pre_logits=True`` stops at the fc7 features (B, num_features)."""
        x = torch.flatten(self.avgpool(x), 1)  # (B, C * 6 * 6) for AlexNet, (B, 512 * 7 * 7) for VGG
        x = self.classifier[:-1](x)  # fc6, fc7 with ReLU and dropout: (B, num_features)
        return x if pre_logits else self.classifier[-1](x)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace fc8 with a fresh ``num_classes``-way layer (0 -> identity, i.e. fc7 features)."""
        self.num_classes = num_classes
        self.classifier[-1] = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


class AlexNet(ConvTrunkFCHead, nn.Module):
    """AlexNet with the timm-style classifier interface.

    Module names (``features``, ``avgpool``, ``classifier``) follow torchvision in both variants.
    The pre-logits features are the 4096-wide fc7 activations (after ReLU, and after dropout in
    the paper variant, where dropout acts on the outputs of fc6 and fc7).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        variant: Literal["paper", "torchvision"] = "paper",
        groups: int = 1,
        dropout: float = 0.5,
        bias_init: float = 1.0,
    ) -> None:
        """Build an AlexNet.

        Args:
            num_classes: Width of fc8 (0 gives a net that returns the fc7 features).
            variant: ``"paper"`` is the 2012 net (96-256-384-384-256, LRN, paper init).
                ``"torchvision"`` is the single-GPU 64-192-384-256-256 net without LRN whose
                state dict matches ``torchvision.models.alexnet()`` key for key.
            groups: 2 splits conv2, conv4 and conv5 into two groups like the paper's two-GPU
                layout (paper variant only).
            dropout: Drop probability in the first two fully connected layers.
            bias_init: Bias of conv2, conv4, conv5, fc6 and fc7 in the paper variant (the paper
                uses 1.0; Caffe's reference used 0.1). Other biases start at 0.
        """
        super().__init__()
        if variant == "paper":
            self.features = nn.Sequential(
                nn.Conv2d(3, 96, kernel_size=11, stride=4, padding=2),  # conv1: (B, 96, 55, 55)
                nn.ReLU(inplace=True),
                _paper_lrn(),
                nn.MaxPool2d(kernel_size=3, stride=2),  # overlapping pooling: (B, 96, 27, 27)
                nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=groups),  # conv2: (B, 256, 27, 27)
                nn.ReLU(inplace=True),
                _paper_lrn(),
                nn.MaxPool2d(kernel_size=3, stride=2),  # (B, 256, 13, 13)
                nn.Conv2d(256, 384, kernel_size=3, padding=1),  # conv3 sees both GPUs: (B, 384, 13, 13)
                nn.ReLU(inplace=True),
                nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=groups),  # conv4: (B, 384, 13, 13)
                nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=groups),  # conv5: (B, 256, 13, 13)
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),  # (B, 256, 6, 6)
            )
            # Caffe's reference order: dropout on the outputs of fc6 and fc7 ("setting to zero the
            # output of each hidden neuron"), nothing before fc6 or after fc8.
            self.classifier = nn.Sequential(
                nn.Linear(256 * 6 * 6, 4096),  # fc6
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(4096, 4096),  # fc7
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(4096, num_classes) if num_classes > 0 else nn.Identity(),  # fc8
            )
        elif variant == "torchvision":
            if groups != 1:
                raise ValueError("groups=2 is the paper's two-GPU layout; the torchvision variant has none")
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # (B, 64, 55, 55)
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),  # (B, 64, 27, 27)
                nn.Conv2d(64, 192, kernel_size=5, padding=2),  # (B, 192, 27, 27)
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),  # (B, 192, 13, 13)
                nn.Conv2d(192, 384, kernel_size=3, padding=1),  # (B, 384, 13, 13)
                nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, kernel_size=3, padding=1),  # (B, 256, 13, 13)
                nn.ReLU(inplace=True),
                nn.Conv2d(256, 256, kernel_size=3, padding=1),  # (B, 256, 13, 13)
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),  # (B, 256, 6, 6)
            )
            # torchvision drops the *inputs* of fc6 and fc7; indices must match its state dict.
            self.classifier = nn.Sequential(
                nn.Dropout(dropout),
                nn.Linear(256 * 6 * 6, 4096),  # classifier.1
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(4096, 4096),  # classifier.4
                nn.ReLU(inplace=True),
                nn.Linear(4096, num_classes) if num_classes > 0 else nn.Identity(),  # classifier.6
            )
        else:
            raise ValueError(f"variant must be 'paper' or 'torchvision', got {variant!r}")
        # No-op at 224 (the maps are already 6x6); lets smaller or larger inputs reach fc6.
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.variant = variant
        self.num_classes = num_classes
        self.num_features = 4096
        if variant == "paper":
            self._init_paper(bias_init)
        # The torchvision variant keeps PyTorch's default init, exactly as torchvision does.

    def _init_paper(self, bias_init: float) -> None:
        # Sec. 5: weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden FC layers
        # ("accelerates the early stages of learning by providing the ReLUs with positive inputs").
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        fcs = [m for m in self.classifier if isinstance(m, nn.Linear)]  # fc8 absent if num_classes=0
        for layer in convs + fcs:
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            nn.init.zeros_(layer.bias)
        for layer in (convs[1], convs[3], convs[4], fcs[0], fcs[1]):  # conv2, conv4, conv5, fc6, fc7
            nn.init.constant_(layer.bias, bias_init)
