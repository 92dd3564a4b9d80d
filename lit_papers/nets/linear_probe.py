"""Linear probing: a linear classifier on the frozen features of a pre-trained encoder.

The protocol of MAE's linear evaluation (He et al. 2022, appendix A.2, after MoCo v3): the encoder is frozen and kept in
eval mode; its pooled feature ([cls] token after the final norm for ViTs) goes through a BatchNorm without affine
parameters, which normalises the features so that one lr suits encoders of any feature scale, and then a Linear layer
initialised with trunc-normal std 0.01. `probe_head` is shared by the offline protocol (`LinearProbeNet` in
`ImageClassifier`) and the online one (`lit_papers.callbacks.linear_probe.OnlineLinearProbe`).
"""

from __future__ import annotations

import torch
from torch import nn


def probe_head(num_features: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(affine=False, eps=1e-6) + Linear(num_features, num_classes) with trunc-normal(0.01) weights."""
    linear = nn.Linear(num_features, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(num_features, affine=False, eps=1e-6), linear)


def pooled_features(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` -> `(B, num_features)` through any net with the timm interface (pooling, no head)."""
    return encoder.forward_head(encoder.forward_features(x), pre_logits=True)


class LinearProbeNet(nn.Module):
    """A frozen encoder (always in eval mode, no gradients) followed by a trainable `probe_head`.

    Args:
        encoder: any net with `forward_features`, `forward_head(x, pre_logits=True)` and `num_features`, e.g.
            `lit_papers.nets.vit.vit_from_mae_checkpoint(..., global_pool=False)`.
        num_classes: classes of the linear head.
    """

    def __init__(self, encoder: nn.Module, num_classes: int = 1000) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.num_classes, self.num_features = num_classes, encoder.num_features
        self.head = probe_head(encoder.num_features, num_classes)

    def train(self, mode: bool = True) -> LinearProbeNet:
        super().train(mode)
        self.encoder.eval()  # Lightning calls train() every epoch: dropout, drop path and BN statistics stay off
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return pooled_features(self.encoder, x)  # (B, num_features)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
