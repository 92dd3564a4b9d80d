"""Synthetic low-dimensional data: the 1-D Gaussian of the GAN paper's Fig. 1."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from lit_papers.data.base import ImageDataModule


class Gaussian1dDataModule(ImageDataModule):
    """Samples of N(mean, std^2), drawn once from `split_seed`: batches are `[x]` with `x` of shape `(B, 1)`.

    The loaders (shuffling, seeding, workers) are `ImageDataModule`'s; there are no classes and no images.

    Args:
        mean: mean of the data distribution.
        std: standard deviation of the data distribution.
        num_train: training points (one epoch is `num_train // batch_size` batches).
        num_val: held-out points for validation and testing.
        split_seed: fixes the drawn points, independently of the training seed.
        batch_size, num_workers, pin_memory, persistent_workers, seed: see `ImageDataModule`.
    """

    def __init__(
        self,
        mean: float = 4.0,
        std: float = 0.5,
        num_train: int = 10_000,
        num_val: int = 2_000,
        split_seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed)
        self.mean, self.std = mean, std
        self.num_train, self.num_val, self.split_seed = num_train, num_val, split_seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        points = torch.randn(self.num_train + self.num_val, 1, generator=torch.Generator().manual_seed(self.split_seed))
        points = self.mean + self.std * points  # (N, 1)
        self.train_set = TensorDataset(points[: self.num_train])
        self.val_set = TensorDataset(points[self.num_train :])

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """p_data(x), the exact density the points are drawn from."""
        return torch.exp(-0.5 * ((x - self.mean) / self.std) ** 2) / (self.std * (2 * torch.pi) ** 0.5)
