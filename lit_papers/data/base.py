"""What every DataModule here shares: loader settings, deterministic worker seeding, the `num_classes` contract."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a loader worker from the seed torch gave it.

    torch seeds each worker as `base_seed + worker_id`, where `base_seed` comes from the loader's generator; numpy and
    `random` are not reseeded by torch, so without this every worker would draw the same numpy augmentations.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses set `num_classes` and build `train_set`, `val_set` (and optionally `test_set`) in `setup`.

    Args:
        batch_size: images per batch on each device.
        num_workers: loader worker processes (0 loads in the main process).
        pin_memory: page-locked host memory for faster host-to-GPU copies; `None` turns it on when CUDA is available.
        persistent_workers: keep workers alive between epochs (only meaningful with `num_workers > 0`).
        seed: seeds the shuffling order and the workers' random streams, so two runs see the same batches.
    """

    num_classes: int

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no dataset for this stage; was setup() called?")
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            worker_init_fn=seed_worker,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        # Datasets without a separate labelled test split (ImageNet, digits) test on the validation split.
        return self._loader(self.test_set if self.test_set is not None else self.val_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
