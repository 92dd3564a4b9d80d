"""Same seed, same first batches (random crops, flips and AlexNet's PCA lighting, drawn in 2 loader workers); another
seed, other batches; DDP ranks draw their own augmentations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from fakedata import write_imagenet_folder
from torch.utils.data import Dataset

from lit_papers.cli import main
from lit_papers.data.base import ImageDataModule


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet"), train_per_class=4, val_per_class=1)


def first_batch(imagenet, gpu_augment: bool, *args: str) -> torch.Tensor:
    """The first training batch of the AlexNet ImageNet config, built by the CLI (which calls seed_everything).

    With `gpu_augment` the workers return 256 x 256 frames and the crop, flip and lighting are drawn in the main
    process (on the device in training; here on the CPU); without, all of it is drawn in the workers.
    """
    config = REPO_ROOT / "configs" / "alexnet" / "imagenet.yaml"
    cli = main(["--config", str(config), f"--data.init_args.root={imagenet}",
                "--data.init_args.batch_size=6", "--data.init_args.num_workers=2", "--trainer.logger=false",
                f"--data.init_args.gpu_augment={gpu_augment}", *args], run=False)
    data = cli.datamodule
    data.setup("fit")
    images, _ = next(iter(data.train_dataloader()))
    if gpu_augment:
        images = data.train_batch_augment(images)
    return images  # (6, 3, 224, 224): random 224 crop of the 256 frame, flip, PCA lighting, normalised


@pytest.mark.parametrize("gpu_augment", [False, True])
def test_same_seed_same_batches_other_seed_other_batches(imagenet, gpu_augment):
    a = first_batch(imagenet, gpu_augment, "--seed_everything=1")
    b = first_batch(imagenet, gpu_augment, "--seed_everything=1")
    assert a.shape == (6, 3, 224, 224) and torch.equal(a, b)
    other_run_seed = first_batch(imagenet, gpu_augment, "--seed_everything=2")
    other_data_seed = first_batch(imagenet, gpu_augment, "--seed_everything=1", "--data.init_args.seed=5")
    for other in (other_run_seed, other_data_seed):
        assert not torch.equal(a, other)


def test_lighting_is_part_of_the_workers_seeded_stream(imagenet):
    # Without lighting the same seed gives other pixels: the lighting noise is drawn, and reproduced, in the workers.
    lit = first_batch(imagenet, False, "--seed_everything=1")
    unlit = first_batch(imagenet, False, "--seed_everything=1", "--data.init_args.alphastd=0")
    assert not torch.equal(lit, unlit)
    # The first image has the same crop and flip in both (the next ones not: the lighting draws come in between), so
    # the two differ by the lighting's RGB shift alone, constant over the image.
    shift = (lit[0] - unlit[0]).flatten(1)  # (3, H*W)
    assert shift.std(-1).max() < 1e-4 and shift.abs().amax() > 1e-3


class RandomDraws(Dataset):
    """Each sample is what torch, numpy and `random` draw in the worker that loads it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        import random

        return torch.tensor([torch.rand(()).item(), np.random.rand(), random.random()])


def draws(rank: int, num_workers: int = 2) -> torch.Tensor:
    data = ImageDataModule(batch_size=4, num_workers=num_workers, seed=0)
    data.train_set = RandomDraws()
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    data.trainer = SimpleNamespace(global_rank=rank, world_size=2, strategy=cpu)  # what `_loader` reads
    return torch.cat(list(data.train_dataloader()))  # (8, 3): both workers' draws


def test_each_rank_has_its_own_worker_streams():
    rank0, rank1 = draws(0), draws(1)
    assert torch.equal(rank0, draws(0)) and torch.equal(rank1, draws(1))  # seeded
    assert len(set(rank0.flatten().tolist()) & set(rank1.flatten().tolist())) == 0  # no stream shared across ranks
    assert len(set(rank0.flatten().tolist())) == 24  # nor between workers, nor between torch, numpy and random
