"""VGG: "Very Deep Convolutional Networks for Large-Scale Image Recognition".

Simonyan, Zisserman, ICLR 2015. https://arxiv.org/abs/1409.1556

Depth with the smallest receptive field: stacks of 3x3 convolutions (stride 1, padding 1, ReLU) in five stages of
64-128-256-512-512 channels, each closed by a 2x2 max pool (stride 2), then fully connected layers 4096-4096-1000 with
dropout 0.5 on the first two. Two stacked 3x3 layers see 5x5 and three see 7x7, with fewer parameters and more
non-linearities than one large kernel. Configurations A, B, D and E of Table 1 have 11, 13, 16 and 19 weight layers
(``depth``). State dicts match ``torchvision.models.vgg{11,13,16,19}[_bn]()`` key for key, so published weights load
with ``strict=True``.

Deep nets did not train from N(0, 0.01) weights, so the paper trained net A first and started B, D and E from its
first four conv layers and its three FC layers, the other layers random (sec. 3.1): ``init_from_vgg_a``. After
submission the authors found Glorot & Bengio's initialisation trains the deep nets directly (``init="glorot"``).

Deviations from the paper:
- ``batch_norm=True`` (torchvision's ``vgg*_bn``) puts BatchNorm after every conv; BN postdates the paper.
- An ``AdaptiveAvgPool2d((7, 7))`` sits before fc6, as in torchvision: a no-op on 224 inputs, it lets other sizes
  reach fc6. ``pool_size`` and ``fc_width`` shrink the head for small inputs (e.g. 1 and 512 on CIFAR): not the paper's.
- Default init is torchvision's (Kaiming normal convs, N(0, 0.01) FC layers, zero biases); ``init="paper"`` is the
  paper's N(0, 0.01) with zero biases for every layer.
- Configurations C (with 1x1 convs) and A-LRN are not built; dense (fully convolutional) evaluation is replaced by
  multi-scale multi-crop evaluation in the data pipeline (``lit_papers.data.transforms.multi_scale_eval``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lit_papers.nets.alexnet import ConvTrunkFCHead

# Convs per stage of widths 64-128-256-512-512 (Table 1): A = 11, B = 13, D = 16, E = 19 weight layers (+ 3 FC).
STAGE_DEPTHS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
STAGE_WIDTHS = (64, 128, 256, 512, 512)
Init = Literal["kaiming", "paper", "glorot"]


class VGG(ConvTrunkFCHead, nn.Module):
    """VGG with torchvision's module layout (``features``, ``avgpool``, ``classifier``) and the timm-style interface.

    The pre-logits features are the fc7 activations after ReLU and dropout (``num_features = fc_width``).
    """

    def __init__(
        self,
        depth: Literal[11, 13, 16, 19] = 16,
        batch_norm: bool = False,
        num_classes: int = 1000,
        dropout: float = 0.5,
        init: Init = "kaiming",
        fc_width: int = 4096,
        pool_size: int = 7,
    ) -> None:
        """Build a VGG net.

        Args:
            depth: Weight layers: 11 (configuration A), 13 (B), 16 (D) or 19 (E).
            batch_norm: BatchNorm after every conv (torchvision's ``vgg*_bn``; not in the paper).
            num_classes: Width of fc8 (0 gives a net that returns the fc7 features).
            dropout: Drop probability after fc6 and fc7.
            init: ``"kaiming"`` (torchvision: Kaiming normal fan-out convs, N(0, 0.01) FC), ``"paper"`` (N(0, 0.01)
                everywhere, the paper's net A) or ``"glorot"`` (Glorot uniform, the paper's post-submission note).
                Biases start at 0; BN at weight 1, bias 0.
            fc_width: Width of fc6 and fc7 (4096 in the paper).
            pool_size: Side of the adaptive average pool before fc6 (7: the 224-input map, so a no-op there).
        """
        super().__init__()
        if depth not in STAGE_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(STAGE_DEPTHS)} (configurations A, B, D, E), got {depth}")
        layers: list[nn.Module] = []
        cin = 3
        for n, width in zip(STAGE_DEPTHS[depth], STAGE_WIDTHS):
            for _ in range(n):
                layers.append(nn.Conv2d(cin, width, kernel_size=3, padding=1))  # spatial size kept
                layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)] if batch_norm else [nn.ReLU(inplace=True)]
                cin = width
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))  # halves the map: 224 -> 112 -> ... -> 7
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(512 * pool_size * pool_size, fc_width),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_width, fc_width),  # fc7
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_width, num_classes) if num_classes > 0 else nn.Identity(),  # fc8
        )
        self.depth, self.batch_norm = depth, batch_norm
        self.num_classes = num_classes
        self.num_features = fc_width
        self._init_weights(init)

    def _init_weights(self, init: Init) -> None:
        if init not in ("kaiming", "paper", "glorot"):
            raise ValueError(f"init must be 'kaiming', 'paper' or 'glorot', got {init!r}")
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if init == "glorot":
                    nn.init.xavier_uniform_(m.weight)
                elif init == "kaiming" and isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:  # the paper's N(0, 10^-2) (sec. 3.1); torchvision keeps it for the FC layers
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def caffe_conv_layers(net: VGG) -> dict[str, list[nn.Module]]:
    """The conv layers under their Caffe names ``conv{stage}_{index}`` (conv1_1, conv1_2, conv2_1, ...), each as
    ``[conv]`` or ``[conv, bn]``. Caffe copied weights between nets by these names."""
    named: dict[str, list[nn.Module]] = {}
    stage, index = 1, 0
    for m in net.features:
        if isinstance(m, nn.Conv2d):
            index += 1
            named[f"conv{stage}_{index}"] = [m]
        elif isinstance(m, nn.BatchNorm2d):
            named[f"conv{stage}_{index}"].append(m)
        elif isinstance(m, nn.MaxPool2d):
            stage, index = stage + 1, 0
    return named


# Net A's first four conv layers, by name. The deeper nets' layers with these names have the same shapes (their extra
# convs come second in a stage), whereas their first four convs by position would not (conv1_2 is 64 -> 64).
VGG_A_TRANSFER = ("conv1_1", "conv2_1", "conv3_1", "conv3_2")


@torch.no_grad()
def init_from_vgg_a(deeper: VGG, trained_a: VGG) -> VGG:
    """Start ``deeper`` (B, D or E) from a trained net A, as the paper did (sec. 3.1), in place; returns ``deeper``.

    Copies A's first four conv layers (conv1_1, conv2_1, conv3_1, conv3_2, with their BN if any) and its three FC
    layers; every other layer keeps the init ``deeper`` was built with (the paper's: ``init="paper"``). Both nets
    need the same ``batch_norm``, ``fc_width``, ``pool_size`` and ``num_classes``.
    """
    if trained_a.depth != 11:
        raise ValueError(f"trained_a must be VGG-11 (configuration A), got VGG-{trained_a.depth}")
    if deeper.batch_norm != trained_a.batch_norm:
        raise ValueError("deeper and trained_a must both have batch_norm or both not")
    src, dst = caffe_conv_layers(trained_a), caffe_conv_layers(deeper)
    for name in VGG_A_TRANSFER:
        for target, source in zip(dst[name], src[name]):
            target.load_state_dict(source.state_dict())  # raises on a shape mismatch
    fc_src = [m for m in trained_a.classifier if isinstance(m, nn.Linear)]
    fc_dst = [m for m in deeper.classifier if isinstance(m, nn.Linear)]
    if len(fc_src) != len(fc_dst):
        raise ValueError("both nets need an fc8 (num_classes > 0) to copy the three FC layers")
    for target, source in zip(fc_dst, fc_src):
        target.load_state_dict(source.state_dict())
    return deeper


# Builders with torchvision's names; 138,357,544 parameters for vgg16 (torchvision's model card).
def vgg11(*, num_classes: int = 1000, dropout: float = 0.5, init: Init = "kaiming") -> VGG:
    """VGG-11 (configuration A), 132,863,336 parameters. Args as in :class:`VGG`."""
    return VGG(11, False, num_classes, dropout, init)


def vgg11_bn(*, num_classes: int = 1000, dropout: float = 0.5, init: Init = "kaiming") -> VGG:
    """VGG-11 with BatchNorm. Args as in :class:`VGG`."""
    return VGG(11, True, num_classes, dropout, init)


def vgg13(*, num_classes: int = 1000, dropout: float = 0.5, init: Init = "kaiming") -> VGG:
    """VGG-13 (configuration B), 133,047,848 parameters. Args as in :class:`VGG`."""
    return VGG(13, False, num_classes, dropout, init)


def vgg13_bn(*, num_classes: int = 1000, dropout: float = 0.5, init: Init = "kaiming") -> VGG:
    """VGG-13 with BatchNorm. Args as in :class:`VGG`."""
    return VGG(13, True, num_classes, dropout, init)


def vgg16(*, num_classes: int = 1000, dropout: float = 0.5, init: Init = "kaiming") -> VGG:
    """VGG-16 (configuration D), 138,357,544 parameters. Args as in :class:`VGG`."""
    return VGG(16, False, num_classes, dropout, init)


def vgg16_bn(*, num_classes: int = 1000, dropout: float = 0.5, init: Init = "kaiming") -> VGG:
    """VGG-16 with BatchNorm. Args as in :class:`VGG`."""
    return VGG(16, True, num_classes, dropout, init)


def vgg19(*, num_classes: int = 1000, dropout: float = 0.5, init: Init = "kaiming") -> VGG:
    """VGG-19 (configuration E), 143,667,240 parameters. Args as in :class:`VGG`."""
    return VGG(19, False, num_classes, dropout, init)


def vgg19_bn(*, num_classes: int = 1000, dropout: float = 0.5, init: Init = "kaiming") -> VGG:
    """VGG-19 with BatchNorm. Args as in :class:`VGG`."""
    return VGG(19, True, num_classes, dropout, init)
