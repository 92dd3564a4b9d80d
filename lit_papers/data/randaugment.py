"""RandAugment as MAE's fine-tuning recipe uses it: timm's `rand-m9-mstd0.5-inc1`, on uint8 tensors with torchvision v2.

torchvision's `v2.RandAugment` is a different definition (Cubuk et al.'s: no magnitude noise, no per-op probability,
other ops and magnitude scale), so the MAE recipe needs this one. Deviation from timm: rotations, shears and
translations resample bilinearly instead of bicubically (torchvision's tensor kernels have no bicubic affine).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.transforms import v2


# RandAugment ops of timm's "increasing" set ("inc1"), each mapping a level in [0, 1] (= magnitude / 10) and a sign to
# torchvision v2 functional calls on uint8 tensors. The argument formulas are timm's (`timm.data.auto_augment`), which
# MAE's fine-tuning recipe uses through `rand-m9-mstd0.5-inc1`.
def _enhance(adjust):
    # Factor 1 leaves the image unchanged; it moves away from 1, either way, as the level grows (0.1 to 1.9).
    return lambda img, level, sign, geo: adjust(img, max(0.1, 1.0 + sign * 0.9 * level))


def _shear(axis: int):
    # PIL's shear (timm) maps output (x, y) to input (x + s y, y) about the top-left corner: angle atan(s), centre 0.
    def op(img, level, sign, geo):
        angles = [0.0, 0.0]
        angles[axis] = math.degrees(math.atan(sign * 0.3 * level))
        return v2.functional.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=angles, center=[0, 0], **geo)
    return op


def _translate(axis: int):
    # Up to 45% of the side; PIL's offset moves the content the other way, hence the minus sign.
    def op(img, level, sign, geo):
        shift = [0.0, 0.0]
        shift[axis] = -sign * 0.45 * level * img.shape[-1 - axis]  # axis 0: x (width), 1: y (height)
        return v2.functional.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], **geo)
    return op


def _solarize(img: Tensor, threshold: int) -> Tensor:
    return img if threshold > 255 else v2.functional.solarize(img, threshold)  # 256: nothing is inverted


def _solarize_add(img: Tensor, add: int) -> Tensor:
    return torch.where(img < 128, img + add, img)  # the kept sums (img < 128, add <= 110) stay below 256


RANDAUGMENT_OPS = {
    "AutoContrast": lambda img, level, sign, geo: v2.functional.autocontrast(img),
    "Equalize": lambda img, level, sign, geo: v2.functional.equalize(img),
    "Invert": lambda img, level, sign, geo: v2.functional.invert(img),
    "Rotate": lambda img, level, sign, geo: v2.functional.rotate(img, sign * 30.0 * level, **geo),
    "PosterizeIncreasing": lambda img, level, sign, geo: v2.functional.posterize(img, 4 - int(level * 4)),
    "SolarizeIncreasing": lambda img, level, sign, geo: _solarize(img, 256 - min(256, int(level * 256))),
    "SolarizeAdd": lambda img, level, sign, geo: _solarize_add(img, min(128, int(level * 110))),
    "ColorIncreasing": _enhance(v2.functional.adjust_saturation),
    "ContrastIncreasing": _enhance(v2.functional.adjust_contrast),
    "BrightnessIncreasing": _enhance(v2.functional.adjust_brightness),
    "SharpnessIncreasing": _enhance(v2.functional.adjust_sharpness),
    "ShearX": _shear(0),
    "ShearY": _shear(1),
    "TranslateXRel": _translate(0),
    "TranslateYRel": _translate(1),
}


class RandAugment(nn.Module):
    """timm's RandAugment `rand-m{magnitude}-mstd{magnitude_std}-inc1` (n=2) on uint8 `(3, H, W)` tensors.

    Per image: draw `num_ops` ops uniformly, with replacement, from the 15 `RANDAUGMENT_OPS`; apply each with
    probability `prob`, at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10] and a random sign
    (direction of rotations, shears, translations and enhancements). Magnitude 10 is each op's strongest setting
    (30 degrees, shear 0.3, 45% translation, enhancement factor 1 +- 0.9, posterize to 0 bits from 4, solarize
    threshold 0 from 256).

    It differs from `torchvision.transforms.v2.RandAugment` (Cubuk et al.'s definition), which always applies its ops,
    at a fixed magnitude counted in 31 bins (so m=9 there is 30% strength, not 90%), and has Identity but not Invert or
    SolarizeAdd. Deviation from timm: rotations, shears and translations resample bilinearly (torchvision's tensor
    kernels have no bicubic affine; timm uses PIL bicubic in MAE's recipe).

    Args:
        num_ops: ops drawn per image.
        magnitude: mean magnitude on timm's 0-10 scale.
        magnitude_std: standard deviation of the per-op magnitude noise (0: fixed magnitude).
        prob: probability of applying each drawn op.
        fill: uint8 RGB value of the area a geometric op uncovers (timm: the dataset mean, (124, 116, 104)).
    """

    def __init__(
        self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, prob: float = 0.5,
        fill: tuple[int, int, int] = (124, 116, 104),
    ) -> None:
        super().__init__()
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob
        self.fill = [float(v) for v in fill]
        self.names = list(RANDAUGMENT_OPS)

    def sample(self) -> list[tuple[str, float, float]]:
        """The ops to apply to one image: `(name, level in [0, 1], sign +-1)` each."""
        plan = []
        for _ in range(self.num_ops):
            name = self.names[int(torch.randint(len(self.names), ()))]
            if float(torch.rand(())) >= self.prob:
                continue
            magnitude = self.magnitude + self.magnitude_std * float(torch.randn(()))  # timm's "mstd" noise
            sign = 1.0 if float(torch.rand(())) < 0.5 else -1.0
            plan.append((name, min(max(magnitude, 0.0), 10.0) / 10.0, sign))
        return plan

    def forward(self, img: Tensor) -> Tensor:
        geo = dict(interpolation=v2.InterpolationMode.BILINEAR, fill=self.fill)
        for name, level, sign in self.sample():
            img = RANDAUGMENT_OPS[name](img, level, sign, geo)
        return img

    def extra_repr(self) -> str:
        return (f"num_ops={self.num_ops}, magnitude={self.magnitude}, magnitude_std={self.magnitude_std}, "
                f"prob={self.prob}")
