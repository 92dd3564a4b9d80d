"""What every DataModule here shares: the loaders (settings, seeded shuffling and worker streams kept in checkpoints,
disjoint evaluation shards under DDP), the image DataModules' `num_classes` contract, in-memory datasets and, for
those, the option to hold them on the accelerator (`on_device`)."""

from __future__ import annotations

import functools
import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lit_papers.data.on_device import DeviceLoader


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """Seed a loader worker's torch, numpy and `random` streams from the seed torch gave it and the process's rank.

    torch seeds each worker as `base_seed + worker_id`, where `base_seed` comes from the loader's generator; numpy and
    `random` are not reseeded by torch, so without this every worker would draw the same numpy augmentations. The
    generator is the same on every DDP rank, so rank r > 0 derives its own seed (as Lightning's
    `pl_worker_init_function` does, which loaders with their own `worker_init_fn` do not get): otherwise worker w of
    every rank would draw the same crops, flips and lighting for its (different) images.
    """
    if rank:
        torch.manual_seed(int(np.random.SeedSequence([torch.initial_seed(), rank]).generate_state(1, np.uint64)[0]))
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def stream_seed(seed: int) -> int:
    """`seed` combined with the run's seed from `seed_everything` (which Lightning keeps in `PL_GLOBAL_SEED`), or `seed`
    alone when no run seed is set.

    So `--seed_everything N` changes the shuffling order and the workers' augmentations too, as Lightning's
    `seed_everything(workers=True)` (what LightningCLI calls) promises, while the DataModule's own `seed` still varies
    the data stream on its own. Under DDP, Lightning's DistributedSampler shuffles with the run seed alone.
    """
    run_seed = os.environ.get("PL_GLOBAL_SEED")
    if run_seed is None:
        return seed
    return int(np.random.SeedSequence([seed, int(run_seed)]).generate_state(1, np.uint64)[0] >> 1)  # 63 bits


class InMemoryDataset(Dataset):
    """`(transform(images[i]), labels[i])` over images `(N, C, H, W)` (uint8, or float) held in memory.

    With `on_device`, the DataModule hands `images`, `labels` and `transform` to a `DeviceLoader` instead, which
    applies the transform to whole batches: the transform must then accept `(B, C, H, W)`.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img = self.images[index]
        return (self.transform(img) if self.transform else img), int(self.labels[index])


class LoaderDataModule(L.LightningDataModule):
    """Base class of every DataModule here: the loaders' settings, seeded random streams and distributed sampling.

    Subclasses build `train_set`, `val_set` (and optionally `test_set`) in `setup` and say how samples form batches
    (`_batching`).

    Args:
        num_workers: loader worker processes (0 loads in the main process).
        pin_memory: page-locked host memory, so batches are copied to the GPU asynchronously (Lightning copies with
            `non_blocking=True`); `None` pins only when the Trainer runs on CUDA (on CPU pinning only costs time).
        persistent_workers: keep workers alive between epochs (only meaningful with `num_workers > 0`).
        seed: seeds the shuffling order and the workers' random streams, together with `seed_everything`'s seed
            (`stream_seed`), so two runs with the same seeds see the same batches.
    """

    def __init__(self, num_workers: int = 0, pin_memory: bool | None = None, persistent_workers: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.stream_seed = stream_seed(seed)  # the run's seed is set before the CLI builds the DataModule
        # The training loader's random streams live here, continue across epochs and go into checkpoints
        # (`state_dict`), so a resumed run shuffles and seeds its workers as an uninterrupted one would. Two streams,
        # because every new loader iterator draws the workers' base seed, which must not shift the shuffle order.
        self.shuffle_generator = torch.Generator().manual_seed(self.stream_seed)
        self.worker_generator = torch.Generator().manual_seed(self.stream_seed + 1)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _placement(self) -> tuple[torch.device, int, int]:
        """The device batches go to, this process's rank and the world size (CPU, 0, 1 without a Trainer)."""
        trainer = self.trainer
        if trainer is None:  # the DataModule used on its own
            return torch.device("cpu"), 0, 1
        return trainer.strategy.root_device, trainer.global_rank, trainer.world_size

    def _batching(self, dataset: Dataset, train: bool, rank: int, world: int) -> dict[str, Any]:
        """The DataLoader arguments that group `dataset`'s samples into batches (`batch_size` and `sampler`, or a
        `batch_sampler`) on rank `rank` of `world`, and `collate_fn` where the default one does not fit."""
        raise NotImplementedError

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no dataset for this stage; was setup() called?")
        device, rank, world = self._placement()
        generator = self.worker_generator if train else torch.Generator().manual_seed(self.stream_seed)
        return DataLoader(
            dataset,
            **self._batching(dataset, train, rank, world),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory if self.pin_memory is not None else device.type == "cuda",
            persistent_workers=self.persistent_workers,
            worker_init_fn=functools.partial(seed_worker, rank=rank),
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

    def state_dict(self) -> dict[str, Any]:
        return {"shuffle_generator": self.shuffle_generator.get_state(),
                "worker_generator": self.worker_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "shuffle_generator" not in state_dict:  # a checkpoint from before the streams were saved: fresh streams
            return
        self.shuffle_generator.set_state(state_dict["shuffle_generator"])
        self.worker_generator.set_state(state_dict["worker_generator"])


class ImageDataModule(LoaderDataModule):
    """Base class: subclasses set `num_classes` and build `train_set`, `val_set` (and optionally `test_set`) in `setup`.

    Args:
        batch_size: images per batch on each device.
        num_workers, pin_memory, persistent_workers, seed: see `LoaderDataModule`.
    """

    num_classes: int
    on_device: bool = False  # set by DataModules of in-memory data that offer the option (`DeviceLoader`)

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(num_workers, pin_memory, persistent_workers, seed)
        self.batch_size = batch_size

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader | DeviceLoader:
        if not self.on_device or dataset is None:  # the base class names the missing dataset
            return super()._loader(dataset, train)
        device, rank, world = self._placement()
        return DeviceLoader(dataset.images, dataset.labels, dataset.transform, self.batch_size, shuffle=train,
                            drop_last=train, seed=self.stream_seed, device=device, rank=rank, world_size=world)

    def _batching(self, dataset: Dataset, train: bool, rank: int, world: int) -> dict[str, Any]:
        sampler = RandomSampler(dataset, generator=self.shuffle_generator) if train else None  # DDP: Lightning's own
        if not train and world > 1:
            # Lightning's DistributedSampler would pad the ranks' shards to equal length by repeating samples, which
            # then count twice in validation and test metrics. Disjoint shards instead (one rank may get one batch
            # fewer). The tasks' epoch metrics are torchmetrics states summed over the ranks, so they equal the
            # single-process ones; `self.log(..., sync_dist=True)` would average the ranks' means (Lightning #21838).
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return {"batch_size": self.batch_size, "sampler": sampler, "drop_last": train}
