"""Generative Adversarial Nets: the generators and discriminators.

Goodfellow, Pouget-Abadie, Mirza, Xu, Warde-Farley, Ozair, Courville, Bengio, NIPS 2014.
https://arxiv.org/abs/1406.2661 (reference code: https://github.com/goodfeli/adversarial, `mnist.yaml`)

A generator G maps noise z ~ p_z to samples; a discriminator D maps a sample to the probability that it came from the
data rather than from G. The paper's MNIST pair is an MLP generator (100 -> 1200 ReLU -> 1200 ReLU -> 784 sigmoid) and a
maxout discriminator (two layers of 240 units x 5 pieces, dropout, one sigmoid output). `DCGANGenerator` and
`DCGANDiscriminator` are the all-convolutional pair of Radford, Metz, Chintala, ICLR 2016
(https://arxiv.org/abs/1511.06434), for 32 and 64 px images. Small `MLPGenerator`/`MLPDiscriminator` instances serve
the 1-D toy of the paper's Fig. 1.

Interface shared by every net here (what `lit_papers.tasks.gan.GAN` and the callbacks rely on):
generators map `(B, latent_dim)` noise to `(B, *sample_shape)` and expose `latent_dim`, `sample_shape` and
`output_range` (the interval their output activation maps to, `None` if unbounded); discriminators map
`(B, *sample_shape)` to `(B,)` logits.

Deviations from the paper:
- Discriminators return a logit; the sigmoid lives in the loss (`binary_cross_entropy_with_logits`), which is the same
  function computed without overflow.
- The reference code starts G's output bias at the logit of the data's pixel marginals; here it starts at 0.
- Dropout is PyTorch's inverted dropout: keep probability 0.8 on D's input and 0.5 elsewhere, survivors scaled by
  1/keep, which is what the reference code's `input_include_probs`/`input_scales` (0.8/1.25, 0.5/2) spell out.
- DCGAN nets: convolutions carry no bias (BatchNorm follows, or the logit/tanh output, where the DCGAN code omits it
  too); D's last 4x4 convolution gives the logit directly. `MLPDiscriminator` (LeakyReLU MLP) is our own toy net.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import nn

OutputActivation = Literal["sigmoid", "tanh", "identity"]
_OUTPUTS = {"sigmoid": (nn.Sigmoid, (0.0, 1.0)), "tanh": (nn.Tanh, (-1.0, 1.0)), "identity": (nn.Identity, None)}


def _uniform_init(module: nn.Module, init_range: float | None) -> None:
    # The reference code draws every weight from U(-irange, irange) and starts biases at 0 (pylearn2's `irange`).
    if init_range is None:
        return
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.uniform_(m.weight, -init_range, init_range)
            nn.init.zeros_(m.bias)


class Maxout(nn.Module):
    """Maxout layer (Goodfellow et al. 2013): `num_pieces` affine maps per unit, the unit outputs their maximum."""

    def __init__(self, in_features: int, out_features: int, num_pieces: int) -> None:
        super().__init__()
        self.out_features, self.num_pieces = out_features, num_pieces
        self.linear = nn.Linear(in_features, out_features * num_pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = self.linear(x).view(x.shape[0], self.out_features, self.num_pieces)  # (B, units, pieces)
        return pieces.amax(-1)  # (B, units)


class MLPGenerator(nn.Module):
    """Fully connected generator: z -> [Linear -> ReLU] x len(hidden_dims) -> Linear -> output activation.

    The defaults are the paper's MNIST generator.

    Args:
        latent_dim: size of the noise vector z.
        hidden_dims: width of each hidden ReLU layer.
        sample_shape: shape of one sample, e.g. `[1, 28, 28]` for MNIST or `[1]` for 1-D data.
        output: "sigmoid" for data in [0, 1] (the paper's MNIST), "tanh" for [-1, 1], "identity" for unbounded data.
        init_range: weights start as U(-init_range, init_range) and biases at 0 (the reference code's 0.05);
            `None` keeps PyTorch's default init.
    """

    def __init__(
        self,
        latent_dim: int = 100,
        hidden_dims: Sequence[int] = (1200, 1200),
        sample_shape: Sequence[int] = (1, 28, 28),
        output: OutputActivation = "sigmoid",
        init_range: float | None = 0.05,
    ) -> None:
        super().__init__()
        self.latent_dim, self.sample_shape = latent_dim, tuple(sample_shape)
        activation, self.output_range = _OUTPUTS[output]
        layers: list[nn.Module] = []
        width = latent_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers += [nn.Linear(width, math.prod(self.sample_shape)), activation()]
        self.net = nn.Sequential(*layers)
        _uniform_init(self, init_range)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.shape[0], *self.sample_shape)  # (B, *sample_shape)


class MaxoutDiscriminator(nn.Module):
    """The paper's MNIST discriminator: dropout -> [Maxout -> dropout] x depth -> Linear to one logit.

    Args:
        sample_shape: shape of one input sample (flattened inside).
        hidden_dim: maxout units per layer (240 in the reference code).
        num_pieces: affine pieces per maxout unit (5).
        depth: number of maxout layers (2).
        input_dropout: drop probability on the input (0.2: the reference code keeps 0.8).
        dropout: drop probability on every maxout layer's output (0.5).
        init_range: weights start as U(-init_range, init_range) (0.005 in the reference code); `None` keeps
            PyTorch's default init.
    """

    def __init__(
        self,
        sample_shape: Sequence[int] = (1, 28, 28),
        hidden_dim: int = 240,
        num_pieces: int = 5,
        depth: int = 2,
        input_dropout: float = 0.2,
        dropout: float = 0.5,
        init_range: float | None = 0.005,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(input_dropout)]
        width = math.prod(sample_shape)
        for _ in range(depth):
            layers += [Maxout(width, hidden_dim, num_pieces), nn.Dropout(dropout)]
            width = hidden_dim
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        _uniform_init(self, init_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0])  # (B,) logits


class MLPDiscriminator(nn.Module):
    """Fully connected discriminator: [Linear -> LeakyReLU(0.2)] x len(hidden_dims) -> Linear to one logit.

    Args:
        sample_shape: shape of one input sample (flattened inside), e.g. `[1]` for 1-D data.
        hidden_dims: width of each hidden layer.
    """

    def __init__(self, sample_shape: Sequence[int] = (1,), hidden_dims: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(sample_shape)
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0])  # (B,) logits


def _num_upsamplings(image_size: int) -> int:
    # DCGAN works between a 4x4 map and the image, doubling the side at every stride-2 layer.
    n = int(math.log2(image_size)) - 2
    if image_size not in (32, 64) or 2 ** (n + 2) != image_size:
        raise ValueError(f"DCGAN nets are defined for 32 or 64 px images, got image_size={image_size}")
    return n


def _dcgan_init(module: nn.Module) -> None:
    # DCGAN sec. 4: all weights from N(0, 0.02); BatchNorm scales from N(1, 0.02), shifts 0.
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """DCGAN generator: z -> 4x4 map -> stride-2 transposed convs (BatchNorm, ReLU) -> tanh image.

    Widths halve at every doubling of the side: for 64 px, 8w x 4x4 -> 4w x 8x8 -> 2w x 16x16 -> w x 32x32 -> image.

    Args:
        latent_dim: size of the noise vector z.
        image_size: 32 or 64.
        channels: image channels (3 for RGB).
        base_width: channels of the last hidden layer (`ngf`, 64 in the DCGAN paper's code).
    """

    output_range = (-1.0, 1.0)

    def __init__(self, latent_dim: int = 100, image_size: int = 64, channels: int = 3, base_width: int = 64) -> None:
        super().__init__()
        self.latent_dim, self.sample_shape = latent_dim, (channels, image_size, image_size)
        n = _num_upsamplings(image_size)
        widths = [base_width * 2 ** (n - 1 - i) for i in range(n)]  # e.g. [8w, 4w, 2w, w] for 64 px
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=False),  # (B, 8w, 4, 4): z as a 1x1 map
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        ]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]  # no BN on the output
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(*z.shape, 1, 1))  # (B, C, S, S)


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: stride-2 convs (LeakyReLU 0.2, BatchNorm except on the first) -> 4x4 map -> one logit.

    Args:
        image_size: 32 or 64.
        channels: image channels.
        base_width: channels of the first conv layer (`ndf`, 64 in the DCGAN paper's code).
    """

    def __init__(self, image_size: int = 64, channels: int = 3, base_width: int = 64) -> None:
        super().__init__()
        n = _num_upsamplings(image_size)
        widths = [base_width * 2**i for i in range(n)]  # e.g. [w, 2w, 4w, 8w] for 64 px
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False))  # (B, 1, 1, 1): the 4x4 map to one logit
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0])  # (B,) logits
