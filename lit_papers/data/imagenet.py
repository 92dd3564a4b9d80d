"""ImageNet, or any folder of photos in its layout, with the AlexNet/VGG/GoogLeNet/ResNet/MAE pipelines.

Layout: `root/train/<class>/<image>` and `root/val/<class>/<image>` (the ILSVRC validation images sorted into class
folders). Class indices are the sorted train folder names, as in torchvision's `ImageFolder`.

Images are decoded with PIL and converted to RGB (grayscale, CMYK, palette and PNG-content-in-.JPEG files all work).
Files PIL cannot decode (zero-byte, truncated, corrupt) follow `bad_images`: "raise" stops with a `BadImageError` that
names the file; "skip" logs the path with a running count and serves the next readable sample in its place, so a
batch keeps its size and no time is spent decoding the whole dataset up front.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2.functional import pil_to_tensor

from lit_papers.data.base import ImageDataModule
from lit_papers.data.transforms import (
    DatasetStats,
    DeviceAugmentMixin,
    alexnet_eval,
    alexnet_train,
    device_train_pipeline,
    googlenet_train,
    mae_finetune_train,
    mae_train,
    multi_scale_eval,
    resnet_train,
    ten_crop_eval,
    vgg_train,
)
from lit_papers.errors import UserInputError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# The papers' `scale_range` / `min_scale` per pipeline, used when the DataModule gets `None`.
SCALE_RANGE = {"resnet": (256, 480), "vgg": (256, 512)}
MIN_SCALE = {"mae": 0.2, "mae_finetune": 0.08, "googlenet": 0.08}
PIPELINES = ("alexnet", "resnet", "mae", "mae_finetune", "vgg", "googlenet")
MAX_CONSECUTIVE_BAD = 50  # "skip" gives up when this many files in a row fail: the folder is probably not images


class BadImageError(UserInputError, RuntimeError):
    """An image file that cannot be decoded; the message names the file."""


def load_rgb(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Decode `path` to an RGB PIL image, or raise `BadImageError` naming the file.

    Args:
        path: image file; the format is read from its content, not its extension.
        draft_size: smallest short side the pipeline needs. Large JPEGs are then decoded at a reduced DCT scale
            (1/2, 1/4, 1/8) that still keeps this short side, several times faster than full decoding + resizing.
    """
    try:
        with Image.open(path) as img:  # closes the file even when decoding fails
            if draft_size is not None and img.format == "JPEG":
                scale = draft_size / min(img.size)
                img.draft(img.mode, (math.ceil(img.width * scale), math.ceil(img.height * scale)))
            img.load()  # decode now, so a truncated file fails here with its name rather than later in a transform
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise BadImageError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    if img.mode in ("P", "PA", "LA", "RGBA"):
        img = img.convert("RGBA")  # palette/alpha -> RGBA first, so transparency is handled without a warning
    return img if img.mode == "RGB" else img.convert("RGB")


def layout_error(path: Path, root: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"image folder not found or empty: {path}. Expected the ImageNet layout {root}/train/<class>/<image> and "
        f"{root}/val/<class>/<image>, e.g. train/n01440764/n01440764_10026.JPEG (sort the ILSVRC validation "
        "images into class folders first)."
    )


def find_classes(split_dir: Path, root: Path | None = None) -> list[str]:
    """Sorted class folder names under `split_dir`; a clear `FileNotFoundError` if there are none."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")) \
        if split_dir.is_dir() else []
    if not classes:
        raise layout_error(split_dir, root or split_dir.parent)
    return classes


def list_images(folder: Path) -> list[str]:
    """Image files under `folder` (recursively, sorted, hidden files skipped), as paths relative to `folder`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, folder)
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS):
                found.append(name if rel == "." else os.path.join(rel, name))
    return found


class ImageFolderDataset(Dataset):
    """`split_dir/<class>/<image>` samples as `(transform(uint8 (3, H, W)), label)`.

    Args:
        split_dir: folder with one sub-folder per class.
        classes: class folder names in label order (those of the training split, so labels agree across splits).
        transform: applied to the uint8 `(3, H, W)` tensor; `None` returns it as is.
        bad_images: "raise" or "skip" (see the module docstring).
        draft_size: passed to `load_rgb`.
    """

    def __init__(
        self, split_dir: Path, classes: list[str], transform: Callable[[Tensor], Tensor] | None = None,
        bad_images: Literal["raise", "skip"] = "raise", draft_size: int | None = None,
    ) -> None:
        self.split_dir, self.transform, self.bad_images, self.draft_size = split_dir, transform, bad_images, draft_size
        found = find_classes(split_dir)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{split_dir} has class folders that the training split lacks: {unknown[:5]}")
        files, labels = [], []
        for label, name in enumerate(classes):
            if (split_dir / name).is_dir():
                names = list_images(split_dir / name)
                files += [os.fsencode(os.path.join(name, f)) for f in names]
                labels += [label] * len(names)
        if not files:
            raise layout_error(split_dir, split_dir.parent)
        # numpy arrays, not lists of str: forked workers would otherwise copy every refcounted string (copy-on-read).
        self.files = np.array(files)
        self.labels = np.array(labels, dtype=np.int64)
        self.skipped: list[str] = []  # unreadable files this process has skipped
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.split_dir / os.fsdecode(self.files[index])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        for _ in range(MAX_CONSECUTIVE_BAD):
            if index not in self._bad:
                try:
                    img = pil_to_tensor(load_rgb(self.path(index), self.draft_size))  # (3, H, W) uint8
                    return (self.transform(img) if self.transform else img), int(self.labels[index])
                except BadImageError as err:
                    if self.bad_images == "raise":
                        raise BadImageError(f"{err} (pass bad_images='skip' to drop unreadable files)") from None
                    self._bad.add(index)
                    self.skipped.append(str(self.path(index)))
                    count = len(self.skipped)
                    log.warning("skipping unreadable image (%d skipped so far in this process): %s", count, err)
            index = (index + 1) % len(self)
        raise BadImageError(f"{MAX_CONSECUTIVE_BAD} unreadable images in a row up to {self.path(index)}")


class ImageNetDataModule(DeviceAugmentMixin, ImageDataModule):
    """ImageNet-layout folders with a paper's training pipeline; `num_classes` is set at construction.

    Args:
        root: folder holding `train/<class>/<image>` and `val/<class>/<image>`.
        pipeline: training augmentation: "alexnet" (256 frame, random 224 crop + flip, PCA lighting), "resnet" (short
            side random in `scale_range`, random crop + flip, lighting), "vgg" (the same scale jittering with S in
            [256, 512]), "googlenet" (crops of 8%-100% area, aspect 3/4-4/3, + flip), "mae" (bicubic RandomResizedCrop(0.2,
            1) + flip: MAE pre-training, and its linear probe with `min_scale=0.08`) or "mae_finetune" (bicubic
            RandomResizedCrop(0.08, 1) + flip + RandAugment + random erasing, see `mae_finetune_train`).
            Evaluation is short side `resize` -> centre `crop_size` (or 10 crops, or `eval_scales`), resized
            bicubically for the MAE pipelines as in the MAE reference code, bilinearly otherwise.
        batch_size: images per batch on each device.
        num_workers: loader worker processes; JPEG decoding needs several per GPU.
        pin_memory: page-locked host memory; `None` pins when the Trainer runs on CUDA.
        persistent_workers: keep workers alive between epochs.
        seed: seeds shuffling and the workers' random streams.
        bad_images: "raise" stops at an unreadable file with its path; "skip" logs it and serves the next sample.
        stats: a file written by `python -m lit_papers.data.stats`; `None` uses the ImageNet constants.
        per_pixel_mean: subtract the stats file's mean image (AlexNet paper) instead of the per-channel mean
            ("alexnet" pipeline only); inputs are still divided by the per-channel std.
        gpu_augment: workers return uint8 crops of a fixed size and the random crop/flip, lighting and normalisation of
            training batches run on the device in `on_after_batch_transfer`.
        ten_crop: evaluate on 10 crops per image: batches are `(B, 10, 3, crop_size, crop_size)`.
        eval_scales: VGG's multi-scale evaluation: short sides Q (e.g. [256, 384, 512]), each giving `eval_grid`^2
            crops and their mirrors; batches are `(B, views, 3, crop_size, crop_size)`, the softmax averaged over views.
        eval_grid: crops per side at each scale: 1 = centre crop, 5 = the paper's multi-crop (150 views at 3 scales,
            so lower `batch_size` for `test`).
        crop_size: network input size.
        resize: short side before the centre frame/crop (AlexNet training frame and evaluation).
        scale_range: short-side range of the "resnet"/"vgg" scale augmentation; `None`: [256, 480] (resnet), [256,
            512] (vgg). Equal ends give VGG's single-scale training.
        alphastd: standard deviation of the PCA lighting coefficients ("alexnet", "resnet"); 0 turns it off.
        min_scale: smallest crop area fraction of the "mae"/"mae_finetune"/"googlenet" RandomResizedCrop; `None`:
            0.2 (mae pre-training; the MAE linear probe sets 0.08), 0.08 (mae_finetune, googlenet).
        randaugment_magnitude: "mae_finetune" only: mean RandAugment magnitude on timm's 0-10 scale (MAE: 9, with
            magnitude std 0.5, 2 ops; see `lit_papers.data.transforms.RandAugment`); 0 turns RandAugment off.
        erase_prob: "mae_finetune" only: probability of random erasing with per-pixel normal noise (MAE: 0.25).
    """

    def __init__(
        self,
        root: str | Path,
        pipeline: Literal["alexnet", "resnet", "mae", "mae_finetune", "vgg", "googlenet"] = "alexnet",
        batch_size: int = 256,
        num_workers: int = 8,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        seed: int = 0,
        bad_images: Literal["raise", "skip"] = "raise",
        stats: str | Path | None = None,
        per_pixel_mean: bool = False,
        gpu_augment: bool = False,
        ten_crop: bool = False,
        eval_scales: list[int] | None = None,
        eval_grid: int = 1,
        crop_size: int = 224,
        resize: int = 256,
        scale_range: tuple[int, int] | None = None,
        alphastd: float = 0.1,
        min_scale: float | None = None,
        randaugment_magnitude: float = 9.0,
        erase_prob: float = 0.25,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed)
        if pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {', '.join(map(repr, PIPELINES))}, got {pipeline!r}")
        if gpu_augment and pipeline == "mae_finetune":
            raise ValueError("gpu_augment is not available for 'mae_finetune': RandAugment runs per image in the workers")
        if eval_scales and (ten_crop or per_pixel_mean):
            raise ValueError("eval_scales (multi-scale evaluation) excludes ten_crop and per_pixel_mean")
        if bad_images not in ("raise", "skip"):
            raise ValueError(f"bad_images must be 'raise' or 'skip', got {bad_images!r}")
        if per_pixel_mean and pipeline != "alexnet":
            raise ValueError("per_pixel_mean is only defined for the 'alexnet' pipeline's fixed square frame")
        self.root = Path(root).expanduser()
        self.pipeline, self.bad_images, self.gpu_augment, self.ten_crop = pipeline, bad_images, gpu_augment, ten_crop
        self.per_pixel_mean, self.crop_size, self.resize = per_pixel_mean, crop_size, resize
        self.scale_range = tuple(scale_range) if scale_range is not None else SCALE_RANGE.get(pipeline, (256, 480))
        self.min_scale = min_scale if min_scale is not None else MIN_SCALE.get(pipeline, 0.2)
        self.alphastd, self.eval_scales, self.eval_grid = alphastd, eval_scales, eval_grid
        self.randaugment_magnitude, self.erase_prob = randaugment_magnitude, erase_prob
        self.stats = DatasetStats.load(stats) if stats is not None else DatasetStats.imagenet()
        self.classes = find_classes(self.root / "train", self.root)
        self.num_classes = len(self.classes)

    def _train_transform(self) -> Callable[[Tensor], Tensor]:
        """The per-image training pipeline, or with `gpu_augment` its worker half (setting the batch half)."""
        kw = dict(crop_size=self.crop_size, stats=self.stats)
        if self.gpu_augment:
            worker, self.train_batch_augment = device_train_pipeline(
                self.pipeline, resize=self.resize, scale_range=self.scale_range, min_scale=self.min_scale,
                alphastd=self.alphastd, per_pixel_mean=self.per_pixel_mean, **kw,
            )
            return worker
        if self.pipeline == "alexnet":
            return alexnet_train(resize=self.resize, alphastd=self.alphastd, per_pixel_mean=self.per_pixel_mean, **kw)
        if self.pipeline == "resnet":
            return resnet_train(scale_range=self.scale_range, alphastd=self.alphastd, **kw)
        if self.pipeline == "vgg":
            return vgg_train(scale_range=self.scale_range, alphastd=self.alphastd, **kw)
        if self.pipeline == "googlenet":
            return googlenet_train(min_scale=self.min_scale, **kw)
        if self.pipeline == "mae_finetune":
            return mae_finetune_train(min_scale=self.min_scale, randaugment_magnitude=self.randaugment_magnitude,
                                      erase_prob=self.erase_prob, **kw)
        return mae_train(min_scale=self.min_scale, **kw)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            # Smallest short side the training pipeline needs from the JPEG decoder (see `load_rgb`); MAE's small
            # random crops get upscaled, so it decodes at full resolution.
            draft = {"alexnet": self.resize, "resnet": self.scale_range[1], "vgg": self.scale_range[1], "mae": None,
                     "mae_finetune": None, "googlenet": None}[self.pipeline]
            self.train_set = ImageFolderDataset(
                self.root / "train", self.classes, self._train_transform(), self.bad_images, draft
            )
        if self.val_set is None:
            draft = self.resize
            if self.eval_scales:
                transform = multi_scale_eval(
                    crop_size=self.crop_size, scales=tuple(self.eval_scales), grid=self.eval_grid, stats=self.stats
                )
                draft = max(self.eval_scales)  # decode large enough for the largest scale
            else:
                kw = dict(crop_size=self.crop_size, resize=self.resize, stats=self.stats,
                          per_pixel_mean=self.per_pixel_mean)
                if self.ten_crop:
                    transform = ten_crop_eval(**kw)
                else:  # MAE's reference evaluates with a bicubic resize (224 / 256 crop ratio)
                    mode = InterpolationMode.BICUBIC if self.pipeline.startswith("mae") else InterpolationMode.BILINEAR
                    transform = alexnet_eval(**kw, interpolation=mode)
            self.val_set = ImageFolderDataset(self.root / "val", self.classes, transform, self.bad_images, draft)
