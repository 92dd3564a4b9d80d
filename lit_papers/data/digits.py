"""The 1,797 handwritten digits that ship with scikit-learn: real data for an offline quickstart, no download.

Each 8x8 image (16 grey levels, 10 classes) is upscaled to 32x32 and repeated over 3 channels, so every CIFAR-sized net
here trains on it unchanged. The train/val split is fixed and stratified; the per-pixel mean image of the training split
is subtracted (AlexNet's mean subtraction) and the result divided by the training split's standard deviation, unless
`normalize=False` keeps the pixels in [0, 1] (what a sigmoid generator outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from lit_papers.data.base import ImageDataModule, InMemoryDataset
from lit_papers.data.transforms import BatchAugment, DatasetStats


class DigitsDataModule(ImageDataModule):
    """scikit-learn's digits at 32x32, 3 channels, with a fixed stratified split.

    Args:
        val_fraction: share of the 1,797 images held out for validation (stratified by class, fixed by `split_seed`).
        image_size: side of the upscaled square images.
        augment: random translations of up to `image_size // 8` pixels in training (no flips: digits are not symmetric).
        split_seed: fixes which images are held out, independently of the training seed.
        batch_size, num_workers, pin_memory, persistent_workers, seed: see `ImageDataModule`.
        normalize: subtract the training mean image and divide by the std; `False` keeps pixels in [0, 1] (GANs).
        on_device: hold the (float) images on the accelerator and make every batch there, translations included
            (`lit_papers.data.on_device`); no workers, no copies.
    """

    num_classes = 10

    def __init__(
        self,
        val_fraction: float = 0.2,
        image_size: int = 32,
        augment: bool = True,
        split_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        seed: int = 0,
        normalize: bool = True,
        on_device: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed)
        self.val_fraction = val_fraction
        self.image_size = image_size
        self.augment = augment
        self.split_seed = split_seed
        self.normalize = normalize
        self.on_device = on_device

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
        images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        images = images.expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)
        targets = torch.tensor(digits.target, dtype=torch.long)
        train_idx, val_idx = train_test_split(
            torch.arange(len(targets)).numpy(),
            test_size=self.val_fraction,
            stratify=targets.numpy(),
            random_state=self.split_seed,
        )
        train_images = images[train_idx]
        self.mean_image = train_images.mean(0)  # (3, S, S): statistics of the training split only
        self.std = float((train_images - self.mean_image).std())
        normalise = (lambda x: (x - self.mean_image) / self.std) if self.normalize else (lambda x: x)  # noqa: E731
        pad = self.image_size // 8
        augment = None
        if self.augment and self.on_device:  # the same zero-padded random crop, per batch (identity normalisation)
            identity = DatasetStats.constants((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
            augment = BatchAugment(identity, crop_size=self.image_size, padding=pad)
        elif self.augment:
            augment = v2.RandomCrop(self.image_size, padding=pad)
        self.train_set = InMemoryDataset(normalise(train_images), targets[train_idx], augment)
        self.val_set = InMemoryDataset(normalise(images[val_idx]), targets[val_idx])
