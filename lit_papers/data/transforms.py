"""The papers' image pipelines: PCA lighting, mean subtraction and named per-paper transform chains.

Per-image pipelines are torchvision v2 `Compose`s run in the loader workers: uint8 geometry first (resizing and cropping
bytes is ~4x cheaper than floats), then one conversion to float in [0, 1], then lighting and normalisation.
`device_train_pipeline` splits the same training pipelines in two for `gpu_augment=True`: a worker half that returns
fixed-size uint8 tensors and a `BatchAugment` that does the rest per batch on the accelerator.

MAE fine-tuning (`mae_finetune_train`) uses timm's RandAugment, as the MAE reference code does (`lit_papers.data.randaugment`).

Pipelines take a `DatasetStats` (mean/std, optional eigen-decomposition and per-pixel mean image, in [0, 1] units,
written by `python -m lit_papers.data.stats`); `None` means the ImageNet constants (CIFAR pipelines: the CIFAR-10 ones).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from lit_papers.data.randaugment import RandAugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PCA of ImageNet RGB pixels in [0, 1] (fb.resnet.torch); column i of EIGVEC is the eigenvector of EIGVAL[i].
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass
class DatasetStats:
    """Training-set statistics in [0, 1] pixel units: what `Normalize`, `Lighting` and `SubtractMeanImage` need."""

    mean: Tensor  # (3,) per-channel mean
    std: Tensor  # (3,) per-channel standard deviation
    eigval: Tensor | None = None  # (3,) eigenvalues of the RGB covariance, descending
    eigvec: Tensor | None = None  # (3, 3) column i is the eigenvector of eigval[i]
    mean_image: Tensor | None = None  # (3, S, S) per-pixel mean of the short-side-S, centre-S-crop frames

    @classmethod
    def constants(
        cls, mean: tuple, std: tuple, eigval: tuple | None = None, eigvec: tuple | None = None
    ) -> DatasetStats:
        def as_tensor(values: tuple | None) -> Tensor | None:
            return None if values is None else torch.tensor(values, dtype=torch.float32)

        return cls(as_tensor(mean), as_tensor(std), as_tensor(eigval), as_tensor(eigvec))

    @classmethod
    def imagenet(cls) -> DatasetStats:
        return cls.constants(IMAGENET_MEAN, IMAGENET_STD, IMAGENET_EIGVAL, IMAGENET_EIGVEC)

    @classmethod
    def load(cls, path: str | Path) -> DatasetStats:
        return cls(**torch.load(path, map_location="cpu", weights_only=True))

    def save(self, path: str | Path) -> None:
        torch.save({k: v for k, v in asdict(self).items() if v is not None}, path)


class Lighting(nn.Module):
    """AlexNet's PCA colour augmentation (sec. 4.1): every pixel += eigvec @ (alpha * eigval), alpha ~ N(0, alphastd).

    Works on float images `(3, H, W)` or batches `(B, 3, H, W)` in [0, 1], one alpha draw per image per call. The
    eigen-decomposition is a dataset statistic passed in, never computed per image. `inplace=True` adds into the input
    (the pipelines do, on the fresh tensor `ToFloat` made).
    """

    def __init__(
        self, alphastd: float = 0.1, eigval: Any = IMAGENET_EIGVAL, eigvec: Any = IMAGENET_EIGVEC, inplace: bool = False
    ) -> None:
        super().__init__()
        self.alphastd, self.inplace = alphastd, inplace
        eigval = torch.as_tensor(eigval, dtype=torch.float32)  # (3,)
        eigvec = torch.as_tensor(eigvec, dtype=torch.float32)  # (3, 3)
        # Row i of `mixing` is alphastd * eigval_i * eigvec_i, so z @ mixing with z ~ N(0, 1) is eigvec @ (alpha * eigval)
        # as a row vector: one tiny matmul per call (every extra op costs ~5 us per image in a worker).
        self.register_buffer("mixing", (eigvec * eigval * alphastd).T.contiguous())

    def forward(self, img: Tensor) -> Tensor:
        if self.alphastd == 0:
            return img
        batch = img.shape[:-3]
        shift = torch.randn(*batch, 3, device=img.device) @ self.mixing  # (..., 3): one alpha draw per image
        shift = shift.view(*batch, 3, 1, 1)
        if shift.dtype != img.dtype:
            shift = shift.to(img.dtype)
        return img.add_(shift) if self.inplace else img + shift


class Normalize(nn.Module):
    """Per-channel `(x - mean) / std` on float `(..., 3, H, W)`; `inplace=True` overwrites the input.

    Lighter than `v2.Normalize` (two tensor ops, no dispatch machinery): it runs once per image in every worker.
    """

    def __init__(self, mean: Any, std: Any, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("inv_std", 1 / torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1))

    def forward(self, img: Tensor) -> Tensor:
        return img.sub_(self.mean).mul_(self.inv_std) if self.inplace else (img - self.mean) * self.inv_std


class SubtractMeanImage(nn.Module):
    """The paper's per-pixel mean subtraction; the mean image is resized once if the frame has another size.

    `inplace=True` subtracts from the input (the pipelines do, on the fresh tensor `ToFloat` made).
    """

    def __init__(self, mean_image: Tensor, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.register_buffer("mean_image", torch.as_tensor(mean_image, dtype=torch.float32))  # (3, S, S)
        self._resized: Tensor | None = None  # cache: resizing per image would cost as much as the rest of the pipeline

    def forward(self, img: Tensor) -> Tensor:
        mean = self.mean_image
        if mean.shape[-2:] != img.shape[-2:]:
            cached = self._resized
            if cached is None or cached.shape[-2:] != img.shape[-2:] or cached.device != img.device:
                self._resized = F.interpolate(mean[None], size=img.shape[-2:], mode="bilinear", antialias=True)[0]
            mean = self._resized
        mean = mean.to(img.dtype)
        return img.sub_(mean) if self.inplace else img - mean


class ToFloat(nn.Module):
    """uint8 -> float32 in [0, 1], as a contiguous `(..., 3, H, W)` tensor.

    Images decoded by PIL arrive as channels-last views, which `v2.ToDtype` keeps; per-channel broadcasts (lighting,
    normalisation) over channels-last memory run ~15x slower, so the one conversion pass also fixes the layout.
    """

    def forward(self, img: Tensor) -> Tensor:
        if img.is_floating_point():
            return img.clone(memory_format=torch.contiguous_format)  # a fresh tensor: later ops work in place
        return img.to(torch.float32, memory_format=torch.contiguous_format).div_(255)


class StackCrops(nn.Module):
    """Turn `TenCrop`'s tuple into one `(10, 3, H, W)` tensor (a module, not a lambda, so workers can pickle it)."""

    def forward(self, crops: tuple[Tensor, ...]) -> Tensor:
        return torch.stack(crops)


class MultiScaleCrops(nn.Module):
    """VGG's multi-scale multi-crop views of one image `(3, H, W)` -> `(len(scales) * grid^2 * (1 + flip), 3, S, S)`.

    For each short side Q in `scales`: the `grid x grid` regular grid of `crop_size` crops spanning the rescaled image
    (grid=1: the centre crop, placed as `v2.CenterCrop` does), then, with `flip`, the mirrors of all views.
    """

    def __init__(self, scales: tuple[int, ...], crop_size: int = 224, grid: int = 1, flip: bool = True) -> None:
        super().__init__()
        if min(scales) < crop_size or grid < 1:
            raise ValueError(f"need every scale >= crop_size ({crop_size}) and grid >= 1, got {scales}, {grid}")
        self.scales, self.crop_size, self.grid, self.flip = tuple(scales), crop_size, grid, flip

    def _offsets(self, room: int) -> list[int]:
        if self.grid == 1:
            return [round(room / 2)]
        return [round(i * room / (self.grid - 1)) for i in range(self.grid)]

    def forward(self, img: Tensor) -> Tensor:
        c, views = self.crop_size, []
        for q in self.scales:
            frame = v2.functional.resize(img, q, antialias=True)  # short side -> Q
            h, w = frame.shape[-2:]
            views += [frame[..., top : top + c, left : left + c]
                      for top in self._offsets(h - c) for left in self._offsets(w - c)]
        views = torch.stack(views)  # (V, 3, S, S)
        return torch.cat([views, views.flip(-1)]) if self.flip else views


def _stats(stats: DatasetStats | None, default: DatasetStats, per_pixel_mean: bool, lighting: bool) -> DatasetStats:
    stats = stats if stats is not None else default
    if per_pixel_mean and stats.mean_image is None:
        raise ValueError("per_pixel_mean=True needs stats with a mean image (python -m lit_papers.data.stats)")
    if lighting and (stats.eigval is None or stats.eigvec is None):
        raise ValueError("PCA lighting needs stats with eigval/eigvec; pass alphastd=0 to turn lighting off")
    return stats


def _chain(frame: list, crops: list, stats: DatasetStats, per_pixel_mean: bool, alphastd: float = 0.0) -> v2.Compose:
    """uint8 `frame` ops -> `crops` -> float -> lighting -> normalise.

    With `per_pixel_mean` the mean image is subtracted from the whole frame before cropping, so each crop removes the
    matching part of the mean (what Caffe does); the result is divided by the per-channel std so both modes give
    unit-scale inputs.
    """
    to_float = ToFloat()
    # In place after ToFloat, which made a fresh tensor: a new 600 kB buffer per op costs more than the op itself.
    light = [Lighting(alphastd, stats.eigval, stats.eigvec, inplace=True)] if alphastd > 0 else []
    if per_pixel_mean:
        scale = Normalize(torch.zeros(3), stats.std, inplace=True)
        ops = [*frame, to_float, SubtractMeanImage(stats.mean_image, inplace=True), *crops, *light, scale]
    else:
        ops = [*frame, *crops, to_float, *light, Normalize(stats.mean, stats.std, inplace=True)]
    return v2.Compose(ops)


def _frame(resize: int, interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR) -> list:
    # Short side -> resize, then the centre resize x resize square: AlexNet's 256 x 256 training/test image.
    return [v2.Resize(resize, interpolation=interpolation, antialias=True), v2.CenterCrop(resize)]


def alexnet_train(
    *, crop_size: int = 224, resize: int = 256, stats: DatasetStats | None = None, alphastd: float = 0.1,
    per_pixel_mean: bool = False,
) -> v2.Compose:
    """AlexNet training: short side 256 -> centre 256 -> random 224 crop + flip -> PCA lighting -> mean subtraction."""
    stats = _stats(stats, DatasetStats.imagenet(), per_pixel_mean, alphastd > 0)
    crops = [v2.RandomCrop(crop_size), v2.RandomHorizontalFlip()]
    return _chain(_frame(resize), crops, stats, per_pixel_mean, alphastd)


def alexnet_eval(
    *, crop_size: int = 224, resize: int = 256, stats: DatasetStats | None = None, per_pixel_mean: bool = False,
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
) -> v2.Compose:
    """Single-crop evaluation: short side 256 -> centre 224 crop (AlexNet, ResNet; MAE with bicubic `interpolation`)."""
    stats = _stats(stats, DatasetStats.imagenet(), per_pixel_mean, False)
    return _chain(_frame(resize, interpolation), [v2.CenterCrop(crop_size)], stats, per_pixel_mean)


def ten_crop_eval(
    *, crop_size: int = 224, resize: int = 256, stats: DatasetStats | None = None, per_pixel_mean: bool = False
) -> v2.Compose:
    """10-crop evaluation: 4 corners + centre of the 256 x 256 frame and their flips -> `(10, 3, 224, 224)` per image.

    A classifier averages its logits/softmax over dim 1 of the `(B, 10, C, H, W)` batch.
    """
    stats = _stats(stats, DatasetStats.imagenet(), per_pixel_mean, False)
    return _chain(_frame(resize), [v2.TenCrop(crop_size), StackCrops()], stats, per_pixel_mean)


def multi_scale_eval(
    *, crop_size: int = 224, scales: tuple[int, ...] = (256, 384, 512), grid: int = 1, flip: bool = True,
    stats: DatasetStats | None = None,
) -> v2.Compose:
    """VGG's multi-scale evaluation (sec. 4.2-4.3): views at several short sides Q -> `(V, 3, 224, 224)` per image.

    A classifier averages the softmax over the views, as for 10 crops. Defaults: Q in {256, 384, 512} (S_min,
    (S_min + S_max) / 2, S_max of the jittered training), centre crop + mirror = 6 views; `grid=5` is the paper's
    multi-crop protocol (5x5 crops x 2 flips x 3 scales = 150 views). The paper's dense (fully convolutional)
    evaluation over the whole image is not implemented.
    """
    stats = _stats(stats, DatasetStats.imagenet(), False, False)
    return _chain([], [MultiScaleCrops(scales, crop_size, grid, flip)], stats, False)


def resnet_train(
    *, crop_size: int = 224, scale_range: tuple[int, int] = (256, 480), stats: DatasetStats | None = None,
    alphastd: float = 0.1,
) -> v2.Compose:
    """ResNet ImageNet training: short side random in [256, 480] -> random 224 crop + flip -> lighting -> normalise.

    Per-channel normalisation as in fb.resnet.torch: the paper's per-pixel mean is not well defined over random scales.
    """
    stats = _stats(stats, DatasetStats.imagenet(), False, alphastd > 0)
    frame = [v2.RandomShortestSize(list(range(scale_range[0], scale_range[1] + 1)), antialias=True)]
    return _chain(frame, [v2.RandomCrop(crop_size), v2.RandomHorizontalFlip()], stats, False, alphastd)


def vgg_train(
    *, crop_size: int = 224, scale_range: tuple[int, int] = (256, 512), stats: DatasetStats | None = None,
    alphastd: float = 0.1,
) -> v2.Compose:
    """VGG training (sec. 3.1): scale jittering, short side S random in [256, 512] -> random 224 crop + flip -> RGB
    colour shift (AlexNet's PCA lighting) -> normalise. `scale_range=(S, S)` is single-scale training at S.

    ResNet's pipeline is this one with its own range, so both share `resnet_train`.
    """
    return resnet_train(crop_size=crop_size, scale_range=scale_range, stats=stats, alphastd=alphastd)


def mae_train(*, crop_size: int = 224, min_scale: float = 0.2, stats: DatasetStats | None = None) -> v2.Compose:
    """MAE pre-training / linear probe: RandomResizedCrop(224, scale=(0.2, 1), bicubic) + flip + normalise."""
    stats = _stats(stats, DatasetStats.imagenet(), False, False)
    rrc = v2.RandomResizedCrop(crop_size, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC)
    return _chain([rrc, v2.RandomHorizontalFlip()], [], stats, False)


def mae_finetune_train(
    *, crop_size: int = 224, min_scale: float = 0.08, stats: DatasetStats | None = None,
    randaugment_magnitude: float = 9.0, erase_prob: float = 0.25,
) -> v2.Compose:
    """MAE fine-tuning (the reference's timm pipeline): RandomResizedCrop(224, scale=(0.08, 1), bicubic) + flip ->
    RandAugment rand-m9-mstd0.5-inc1 -> normalise -> random erasing (p=0.25, per-pixel N(0, 1) values, after the
    normalisation). `randaugment_magnitude=0` or `erase_prob=0` turns either off; mixup/cutmix run in the task."""
    stats = _stats(stats, DatasetStats.imagenet(), False, False)
    rrc = v2.RandomResizedCrop(crop_size, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC)
    fill = tuple(round(255 * float(m)) for m in stats.mean)  # timm fills uncovered areas with the mean colour
    augment = [RandAugment(magnitude=randaugment_magnitude, fill=fill)] if randaugment_magnitude > 0 else []
    erase = [v2.RandomErasing(p=erase_prob, value="random", inplace=True)] if erase_prob > 0 else []
    return v2.Compose([_chain([rrc, v2.RandomHorizontalFlip(), *augment], [], stats, False), *erase])


def googlenet_train(*, crop_size: int = 224, min_scale: float = 0.08, stats: DatasetStats | None = None) -> v2.Compose:
    """GoogLeNet (sec. 6): crops of 8%-100% of the image area, aspect ratio in [3/4, 4/3], resized to 224 (the origin
    of RandomResizedCrop) + flip + normalise. The paper's photometric distortions and random interpolation are left out.
    """
    stats = _stats(stats, DatasetStats.imagenet(), False, False)
    rrc = v2.RandomResizedCrop(crop_size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)
    return _chain([rrc, v2.RandomHorizontalFlip()], [], stats, False)


def cifar_train(
    *, crop_size: int = 32, padding: int = 4, stats: DatasetStats | None = None, per_pixel_mean: bool = False
) -> v2.Compose:
    """ResNet CIFAR training: zero-pad 4 -> random 32 crop -> flip -> normalise."""
    stats = _stats(stats, DatasetStats.constants(CIFAR10_MEAN, CIFAR10_STD), per_pixel_mean, False)
    crops = [v2.RandomCrop(crop_size, padding=padding), v2.RandomHorizontalFlip()]
    return _chain([], crops, stats, per_pixel_mean)


def cifar_eval(*, stats: DatasetStats | None = None, per_pixel_mean: bool = False) -> v2.Compose:
    """CIFAR evaluation: normalisation only."""
    stats = _stats(stats, DatasetStats.constants(CIFAR10_MEAN, CIFAR10_STD), per_pixel_mean, False)
    return _chain([], [], stats, per_pixel_mean)


class BatchAugment(nn.Module):
    """The float half of a training pipeline, per batch on any device: [mean image] -> pad -> random crop + flip ->
    lighting -> normalise.

    Input `(B, 3, H, W)`, uint8 (scaled to [0, 1]) or float in [0, 1]. Crop offsets follow `v2.RandomCrop` (uniform
    over all in-bounds positions of the zero-padded image) and flips `v2.RandomHorizontalFlip` (p=0.5), one draw per
    image; crop and flip are one gather, so no per-image Python loop.
    """

    def __init__(
        self, stats: DatasetStats, crop_size: int | None = None, padding: int = 0, flip: bool = False,
        alphastd: float = 0.0, per_pixel_mean: bool = False,
    ) -> None:
        super().__init__()
        self.crop_size, self.padding, self.flip = crop_size, padding, flip
        self.subtract = SubtractMeanImage(stats.mean_image) if per_pixel_mean else None
        self.lighting = Lighting(alphastd, stats.eigval, stats.eigvec) if alphastd > 0 else None
        self.normalize = Normalize(torch.zeros(3) if per_pixel_mean else stats.mean, stats.std)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float().div_(255) if not x.is_floating_point() else x  # (B, 3, H, W) in [0, 1]
        if self.subtract is not None:
            x = self.subtract(x)
        if self.padding:
            x = F.pad(x, [self.padding] * 4)
        if self.crop_size is not None:
            x = self._crop_flip(x)
        elif self.flip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.lighting is not None:
            x = self.lighting(x)
        return self.normalize(x)

    def _crop_flip(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        size, dev = self.crop_size, x.device
        top = torch.randint(0, h - size + 1, (b,), device=dev)
        left = torch.randint(0, w - size + 1, (b,), device=dev)
        steps = torch.arange(size, device=dev)
        cols = steps.expand(b, size)
        if self.flip:
            flip = torch.rand(b, device=dev) < 0.5
            cols = torch.where(flip[:, None], size - 1 - steps, steps)  # reversed columns = mirrored crop
        rows = (top[:, None] + steps)[:, None, :, None]  # (B, 1, size, 1)
        cols = (left[:, None] + cols)[:, None, None, :]  # (B, 1, 1, size)
        batch = torch.arange(b, device=dev)[:, None, None, None]
        chans = torch.arange(c, device=dev)[None, :, None, None]
        return x[batch, chans, rows, cols]  # (B, C, size, size)


def device_train_pipeline(
    pipeline: str, *, crop_size: int = 224, resize: int = 256, scale_range: tuple[int, int] = (256, 480),
    min_scale: float = 0.2, padding: int = 4, stats: DatasetStats | None = None, alphastd: float = 0.1,
    per_pixel_mean: bool = False,
) -> tuple[nn.Module, BatchAugment]:
    """The training pipeline `pipeline` ("alexnet", "resnet", "vgg", "mae", "googlenet", "cifar") split for `gpu_augment`.

    Returns the worker half (uint8 in, fixed-size uint8 out) and the `BatchAugment` that finishes it per batch. Same
    parameters and same output distribution as the per-image functions above.
    """
    is_cifar = pipeline == "cifar"
    default = DatasetStats.constants(CIFAR10_MEAN, CIFAR10_STD) if is_cifar else DatasetStats.imagenet()
    alphastd = alphastd if pipeline in ("alexnet", "resnet", "vgg") else 0.0
    if per_pixel_mean and pipeline not in ("alexnet", "cifar"):
        raise ValueError(f"per_pixel_mean is only defined for fixed square frames (alexnet, cifar), not {pipeline!r}")
    stats = _stats(stats, default, per_pixel_mean, alphastd > 0)
    batch_kw = dict(stats=stats, alphastd=alphastd, per_pixel_mean=per_pixel_mean)
    if pipeline == "alexnet":
        return v2.Compose(_frame(resize)), BatchAugment(crop_size=crop_size, flip=True, **batch_kw)
    if pipeline in ("resnet", "vgg"):  # the same scale jittering, each with its own `scale_range`
        shortest = v2.RandomShortestSize(list(range(scale_range[0], scale_range[1] + 1)), antialias=True)
        worker = v2.Compose([shortest, v2.RandomCrop(crop_size), v2.RandomHorizontalFlip()])
        return worker, BatchAugment(**batch_kw)
    if pipeline == "mae":
        rrc = v2.RandomResizedCrop(crop_size, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC)
        return v2.Compose([rrc, v2.RandomHorizontalFlip()]), BatchAugment(**batch_kw)
    if pipeline == "googlenet":
        rrc = v2.RandomResizedCrop(crop_size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)
        return v2.Compose([rrc, v2.RandomHorizontalFlip()]), BatchAugment(**batch_kw)
    if is_cifar:
        return v2.Identity(), BatchAugment(crop_size=crop_size, padding=padding, flip=True, **batch_kw)
    raise ValueError(f"unknown pipeline {pipeline!r}; expected 'alexnet', 'resnet', 'vgg', 'mae', 'googlenet' or 'cifar'")


class DeviceAugmentMixin:
    """DataModule mixin: with `gpu_augment`, finish training batches on the device in `on_after_batch_transfer`.

    Subclasses set `self.train_batch_augment` (a `BatchAugment`) in `setup` when `gpu_augment` is on. Validation,
    test and predict batches are finished in the workers and pass through unchanged.
    """

    train_batch_augment: BatchAugment | None = None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if self.train_batch_augment is None or trainer is None or not trainer.training:
            return batch
        images, labels = batch
        return self.train_batch_augment.to(images.device)(images), labels
