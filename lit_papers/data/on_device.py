"""Small datasets held whole on the accelerator: batches are gathered, shuffled and augmented there, with no workers.

CIFAR-10's 50k training images are 150 MB as uint8, MNIST's 47 MB: they fit on any GPU many times over. Indexing
them there and augmenting the whole batch at once (`transforms.BatchAugment`: one gather for crop + flip) replaces
the loader workers, the per-image transforms, the host-to-device copy and the Python overhead of collating
(the trick behind the fastest CIFAR-10 trainers). The DataModules of CIFAR, MNIST and digits use it with
`on_device=True`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor, nn
from torch.utils.data import DistributedSampler


class DeviceLoader:
    """Batches `(transform(images[idx]), labels[idx])` from tensors copied once to `device`.

    Training order comes from a `DistributedSampler` (also with one process): a permutation seeded by `seed + epoch`,
    the same on every rank, of which rank r takes every world_size-th index, so the ranks' shards are disjoint.
    Lightning calls `loader.sampler.set_epoch(epoch)` before each epoch, so every epoch has its own order, also after
    resuming. Evaluation (`shuffle=False`) keeps the dataset order and splits it without repeating samples (the last
    rank may get one batch fewer), as `ImageDataModule` does for its loaders, so metrics equal single-process ones.

    Args:
        images: the whole split, `(N, C, H, W)`, uint8 or float.
        labels: `(N,)` class indices.
        transform: applied to each batch of images on the device (must accept batches, e.g. `BatchAugment`); `None`
            yields the stored images.
        batch_size: images per batch on each rank.
        shuffle: reshuffle every epoch (training).
        drop_last: drop the last incomplete batch (training).
        seed: seed of the permutation.
        device: where the data live and the batches are made.
        rank: this process's rank among `world_size`.
        world_size: number of processes sharing the data.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transform: Callable[[Tensor], Tensor] | None,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.labels = images.to(device), torch.as_tensor(labels).to(device)
        self.transform = transform.to(device) if isinstance(transform, nn.Module) else transform
        self.batch_size, self.drop_last = batch_size, drop_last
        sampler = DistributedSampler if shuffle else UnrepeatedDistributedSampler
        self.sampler = sampler(range(len(images)), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_sampler = None  # Lightning reads `batch_sampler` of anything that has a `sampler`

    def __len__(self) -> int:
        n = len(self.sampler)  # this rank's share
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.tensor(list(self.sampler), device=self.images.device)  # (N / world_size,)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start : start + self.batch_size]
            images = self.images[idx]  # (B, C, H, W), gathered on the device
            yield (self.transform(images) if self.transform is not None else images), self.labels[idx]
