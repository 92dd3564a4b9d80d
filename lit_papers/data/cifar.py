"""CIFAR-10 and CIFAR-100, held in memory as uint8 tensors (50k x 3x32x32 is 150 MB), with the ResNet CIFAR pipeline.

`root` may hold either layout, detected in this order:
1. the official python-pickle batches: `root/cifar-10-batches-py/{data_batch_1..5,test_batch}` (CIFAR-100:
   `root/cifar-100-python/{train,test}`, fine labels), as torchvision downloads them;
2. image folders: `root/train/<class>/*.jpg` and `root/test/<class>/*.jpg` (e.g. a re-encoded JPEG copy).
If neither is there, `download=True` fetches (1) with torchvision's downloader; offline, a `FileNotFoundError` says
where it looked and how to get the files.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2.functional import pil_to_tensor

from lit_papers.data.base import ImageDataModule, InMemoryDataset
from lit_papers.data.imagenet import ImageFolderDataset, find_classes, load_rgb
from lit_papers.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DatasetStats,
    DeviceAugmentMixin,
    cifar_eval,
    cifar_train,
    device_train_pipeline,
)


def stratified_split(labels: Tensor, val_size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices `(train, val)` holding out `val_size` samples in equal class shares; a given seed gives one split."""
    generator = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [val_size // len(classes) + (i < val_size % len(classes)) for i in range(len(classes))]
    val = []
    for cls, k in zip(classes, per_class):
        members = (labels == cls).nonzero().flatten()
        val.append(members[torch.randperm(len(members), generator=generator)[:k]])
    val_idx = torch.cat(val).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_idx] = False
    return keep.nonzero().flatten(), val_idx


def _decode(path: Path) -> Tensor:
    # torchvision's decoder costs ~60 us on a 32x32 file against ~240 us through PIL (60k files: 4 s instead of 15 s);
    # anything it cannot read goes through PIL, which converts odd formats or raises BadImageError naming the file.
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except Exception:
        return pil_to_tensor(load_rgb(path))


def read_image_folder(split_dir: Path, classes: list[str]) -> tuple[Tensor, Tensor]:
    """Decode every image of `split_dir/<class>/*` into one uint8 tensor `(N, 3, H, W)` (all images the same size)."""
    dataset = ImageFolderDataset(split_dir, classes)
    images = [_decode(dataset.path(i)) for i in range(len(dataset))]
    sizes = {tuple(img.shape) for img in images}
    if len(sizes) > 1:
        raise ValueError(f"images in {split_dir} differ in size ({sorted(sizes)[:3]}...); CIFAR needs one size")
    return torch.stack(images), torch.from_numpy(dataset.labels)


class CIFAR10DataModule(DeviceAugmentMixin, ImageDataModule):
    """CIFAR-10 with the ResNet paper's augmentation (pad 4, random 32 crop, flip).

    Args:
        root: folder with `cifar-10-batches-py/` or `train/<class>/` + `test/<class>/` image folders.
        batch_size: images per batch on each device.
        num_workers: loader worker processes.
        pin_memory: page-locked host memory; `None` pins when the Trainer runs on CUDA.
        persistent_workers: keep workers alive between epochs.
        seed: seeds shuffling and the workers' random streams.
        download: fetch the official files into `root` when neither layout is there.
        val_size: 0 validates on the test set (what the ResNet paper reports); e.g. 5000 holds out a stratified 45k/5k
            split of the training set (the same images for every run) for choosing hyper-parameters.
        stats: a file written by `python -m lit_papers.data.stats` (run on an image-folder copy); `None` uses the
            dataset's standard per-channel mean/std.
        per_pixel_mean: subtract the stats file's 32x32 mean image (the ResNet paper's "per-pixel mean").
        gpu_augment: pad/crop/flip/normalise training batches on the device instead of per image in the workers.
        on_device: hold the whole dataset on the accelerator as uint8 and make every batch there (shuffle,
            pad/crop/flip, normalise: `lit_papers.data.on_device`); no workers, no copies. Implies `gpu_augment`.
    """

    num_classes = 10
    pickle_dir = "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]
    label_key = b"labels"
    torchvision_class = datasets.CIFAR10
    mean_std = (CIFAR10_MEAN, CIFAR10_STD)

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
        stats: str | Path | None = None,
        per_pixel_mean: bool = False,
        gpu_augment: bool = False,
        on_device: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed)
        self.root, self.download, self.val_size = Path(root).expanduser(), download, val_size
        self.per_pixel_mean, self.gpu_augment, self.on_device = per_pixel_mean, gpu_augment, on_device
        self.stats = DatasetStats.load(stats) if stats is not None else DatasetStats.constants(*self.mean_std)

    def _layout(self) -> str | None:
        if all((self.root / self.pickle_dir / f).is_file() for f in self.train_files + self.test_files):
            return "pickle"
        if (self.root / "train").is_dir() and (self.root / "test").is_dir():
            return "folder"
        return None

    def _missing_error(self, reason: str = "") -> FileNotFoundError:
        name, url = type(self).__name__.replace("DataModule", ""), self.torchvision_class.url
        files = ", ".join(self.train_files + self.test_files)
        return FileNotFoundError(
            f"{name} not found in {self.root}: looked for {self.root / self.pickle_dir}/{{{files}}} (official python "
            f"version) and for image folders {self.root}/train/<class>/*.jpg + {self.root}/test/<class>/*.jpg. "
            f"Download {url} and extract it into {self.root}, or pass download=True on a machine with internet access."
            + (f" {reason}" if reason else "")
        )

    def prepare_data(self) -> None:
        if self._layout() is None and self.download:
            try:
                self.torchvision_class(str(self.root), train=True, download=True)
            except Exception as err:  # offline: URLError, timeouts, SSL errors, partial archives...
                raise self._missing_error(f"Download failed: {type(err).__name__}: {err}") from err

    def _read(self, split: str) -> tuple[Tensor, Tensor]:
        layout = self._layout()
        if layout == "folder":
            classes = find_classes(self.root / "train")
            if len(classes) != self.num_classes:
                raise ValueError(f"{self.root}/train has {len(classes)} class folders, expected {self.num_classes}")
            return read_image_folder(self.root / split, classes)
        if layout is None:
            raise self._missing_error()
        data, labels = [], []
        for name in self.train_files if split == "train" else self.test_files:
            # The official files are pickled dicts; only load files from a source you trust.
            with open(self.root / self.pickle_dir / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data.append(np.asarray(batch[b"data"], dtype=np.uint8))
            labels += list(batch[self.label_key])
        images = torch.from_numpy(np.concatenate(data)).view(-1, 3, 32, 32)  # rows are R (1024), G, B planes
        return images, torch.tensor(labels, dtype=torch.int64)

    def transforms(self) -> tuple:
        """The training and evaluation transforms (subclasses with another pipeline override this alone)."""
        ppm = dict(stats=self.stats, per_pixel_mean=self.per_pixel_mean)
        if self.on_device:  # the batch half is the whole pipeline: the data are already uint8 32x32 on the device
            _, train_tf = device_train_pipeline("cifar", crop_size=32, padding=4, **ppm)
        elif self.gpu_augment:
            train_tf, self.train_batch_augment = device_train_pipeline("cifar", crop_size=32, padding=4, **ppm)
        else:
            train_tf = cifar_train(**ppm)
        return train_tf, cifar_eval(**ppm)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_tf, eval_tf = self.transforms()
        images, labels = self._read("train")
        test_images, test_labels = self._read("test")
        self.test_set = InMemoryDataset(test_images, test_labels, eval_tf)
        if self.val_size > 0:
            train_idx, val_idx = stratified_split(labels, self.val_size)
            self.train_set = InMemoryDataset(images[train_idx], labels[train_idx], train_tf)
            self.val_set = InMemoryDataset(images[val_idx], labels[val_idx], eval_tf)
        else:
            self.train_set = InMemoryDataset(images, labels, train_tf)
            self.val_set = self.test_set


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels, 100 classes); same arguments as `CIFAR10DataModule`, with `cifar-100-python/`."""

    num_classes = 100
    pickle_dir = "cifar-100-python"
    train_files, test_files = ["train"], ["test"]
    label_key = b"fine_labels"
    torchvision_class = datasets.CIFAR100
    mean_std = (CIFAR100_MEAN, CIFAR100_STD)
