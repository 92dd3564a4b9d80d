"""Image datasets as the DCGAN recipe feeds them to a GAN: pixels scaled to [-1, 1] (the tanh generator's range), no
crops, no normalisation by dataset statistics.

The classifier DataModules normalise by per-channel mean/std and pad-crop their training images, which a generator
would have to imitate (including the black borders of the crops); these subclasses keep the same files, layouts and
splits and change only the pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.transforms import v2

from lit_papers.data.cifar import CIFAR10DataModule


class CIFAR10GANDataModule(CIFAR10DataModule):
    """CIFAR-10 images in [-1, 1], optionally with horizontal flips; the labels come along and the GAN ignores them.

    Args:
        root: folder with `cifar-10-batches-py/` or `train/<class>/` + `test/<class>/` image folders.
        batch_size: images per batch on each device (128 in the DCGAN paper).
        num_workers: loader worker processes.
        pin_memory: page-locked host memory; `None` pins when the Trainer runs on CUDA.
        persistent_workers: keep workers alive between epochs.
        seed: seeds shuffling and the workers' random streams.
        download: fetch the official files into `root` when neither layout is there.
        val_size: 0 validates on the test set; e.g. 5000 holds out a fixed, stratified part of the training set.
        flip: random horizontal flips of training images (the DCGAN paper uses no augmentation).
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 128,
        num_workers: int = 4,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        seed: int = 0,
        download: bool = True,
        val_size: int = 0,
        flip: bool = False,
    ) -> None:
        super().__init__(root, batch_size, num_workers, pin_memory, persistent_workers, seed, download, val_size)
        self.flip = flip

    def transforms(self) -> tuple[v2.Compose, v2.Compose]:
        to_range = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]  # uint8 -> [-1, 1]
        return v2.Compose(([v2.RandomHorizontalFlip()] if self.flip else []) + to_range), v2.Compose(to_range)
