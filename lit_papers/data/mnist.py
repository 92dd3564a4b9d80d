"""MNIST and Fashion-MNIST from the original IDX files (raw or .gz), held in memory as uint8 `(N, 1, 28, 28)`.

Files are looked for in `root` itself and in `root/<MNIST|FashionMNIST>/raw` (where torchvision downloads them):
`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each
optionally gzipped. If they are missing, `download=True` uses torchvision's downloader; offline, a `FileNotFoundError`
says where it looked and how to get the files.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision import datasets
from torchvision.transforms import v2

from lit_papers.data.base import ImageDataModule, InMemoryDataset
from lit_papers.data.cifar import stratified_split

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> Tensor:
    """Read an IDX file of unsigned bytes (magic `0x00 0x00 0x08 ndim`, big-endian int32 dims, then the data)."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes, file holds {array.size}")
    return torch.from_numpy(array.copy()).view(*dims)


class MNISTDataModule(ImageDataModule):
    """MNIST digits: `(B, 1, 28, 28)` float batches in [0, 1] (what a sigmoid generator outputs), or normalised.

    Args:
        root: folder with the IDX files, or a torchvision download root (`root/MNIST/raw`).
        batch_size: images per batch on each device (the GAN paper's MNIST runs use 100).
        num_workers: loader worker processes (0 is fine: the data are in memory).
        pin_memory: page-locked host memory; `None` pins when the Trainer runs on CUDA.
        persistent_workers: keep workers alive between epochs.
        seed: seeds shuffling and the workers' random streams.
        download: fetch the official files into `root/<name>/raw` when they are missing.
        val_size: 0 validates on the test set; e.g. 10000 holds out a stratified, fixed part of the training set.
        normalize: subtract the dataset mean and divide by its std (for classifiers) instead of keeping [0, 1].
        on_device: hold the whole dataset on the accelerator as uint8 and make every batch there (shuffle, scale,
            normalise: `lit_papers.data.on_device`); no workers, no copies.
    """

    num_classes = 10
    torchvision_class = datasets.MNIST
    mean_std = ((0.1307,), (0.3081,))

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        seed: int = 0,
        download: bool = True,
        val_size: int = 0,
        normalize: bool = False,
        on_device: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed)
        self.root, self.download, self.val_size, self.normalize = Path(root).expanduser(), download, val_size, normalize
        self.on_device = on_device

    @property
    def search_dirs(self) -> list[Path]:
        return [self.root, self.root / self.torchvision_class.__name__ / "raw"]

    def _find(self, name: str) -> Path | None:
        for folder in self.search_dirs:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    def _complete(self) -> bool:
        return all(self._find(name) is not None for pair in FILES.values() for name in pair)

    def _missing_error(self, reason: str = "") -> FileNotFoundError:
        names = ", ".join(name for pair in FILES.values() for name in pair)
        where = " and ".join(str(d) for d in self.search_dirs)
        mirror = self.torchvision_class.mirrors[0]
        return FileNotFoundError(
            f"{self.torchvision_class.__name__} not found: looked in {where} for {names} (raw or .gz). Download the "
            f"four .gz files from {mirror} into {self.root}, or pass download=True on a machine with internet access."
            + (f" {reason}" if reason else "")
        )

    def prepare_data(self) -> None:
        if not self._complete() and self.download:
            try:
                self.torchvision_class(str(self.root), train=True, download=True)
            except Exception as err:  # offline: URLError, timeouts, SSL errors...
                raise self._missing_error(f"Download failed: {type(err).__name__}: {err}") from err

    def _read(self, split: str) -> tuple[Tensor, Tensor]:
        if not self._complete():
            raise self._missing_error()
        images_file, labels_file = (self._find(name) for name in FILES[split])
        images, labels = read_idx(images_file), read_idx(labels_file).long()
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(f"{images_file} / {labels_file}: {tuple(images.shape)} images for {len(labels)} labels")
        return images[:, None], labels  # (N, 1, 28, 28) uint8

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        ops = [v2.ToDtype(torch.float32, scale=True)]  # per image or, on the device, per batch: both work
        if self.normalize:
            ops.append(v2.Normalize(*self.mean_std))
        transform = v2.Compose(ops)
        images, labels = self._read("train")
        self.test_set = InMemoryDataset(*self._read("test"), transform)
        if self.val_size > 0:
            train_idx, val_idx = stratified_split(labels, self.val_size)
            self.train_set = InMemoryDataset(images[train_idx], labels[train_idx], transform)
            self.val_set = InMemoryDataset(images[val_idx], labels[val_idx], transform)
        else:
            self.train_set = InMemoryDataset(images, labels, transform)
            self.val_set = self.test_set


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Zalando's clothing images, same file names and format); same arguments as `MNISTDataModule`."""

    torchvision_class = datasets.FashionMNIST
    mean_std = ((0.2860,), (0.3530,))
