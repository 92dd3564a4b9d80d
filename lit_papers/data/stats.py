"""Training-set statistics for the pipelines: `python -m lit_papers.data.stats ROOT --out stats.pt [--size 256]`.

Streams once over every image under `ROOT/train` (or `ROOT` itself when it has no `train/`), with memory bounded by one
batch: each image becomes the AlexNet frame (short side `size`, centre `size` x `size` crop) in [0, 1], and float64
running sums give the per-channel mean/std, the per-pixel mean image and the RGB covariance, whose eigen-decomposition
is PCA lighting's `eigval`/`eigvec`. The file loads with `DatasetStats.load`; the DataModules' `stats=` takes its path.
Unreadable files are skipped and counted.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from lit_papers.data.imagenet import BadImageError, list_images, load_rgb
from lit_papers.data.transforms import DatasetStats

log = logging.getLogger(__name__)


class _Frames(Dataset):
    """uint8 `(3, size, size)` frames, or `None` for a file that cannot be read."""

    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.size = files, size
        self.frame = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor | None:
        try:
            return self.frame(pil_to_tensor(load_rgb(self.files[index], self.size)))
        except BadImageError as err:
            log.warning("skipping %s", err)
            return None


def _stack_readable(batch: list[Tensor | None]) -> Tensor | None:
    frames = [x for x in batch if x is not None]
    return torch.stack(frames) if frames else None


def compute_stats(
    root: str | Path, size: int = 256, num_workers: int = 0, batch_size: int = 64, max_images: int | None = None
) -> tuple[DatasetStats, int, int]:
    """Statistics of the training images under `root`.

    Args:
        root: dataset root with `train/`, or a folder of images (any depth).
        size: frame size: short side -> `size`, centre `size` x `size` crop; also the mean image's size.
        num_workers: loader processes decoding images.
        batch_size: frames summed per step (memory is one batch).
        max_images: use an evenly spaced subset of this many files (the statistics converge long before 1.28M).

    Returns:
        The statistics, the number of images used and the number skipped as unreadable.
    """
    root = Path(root)
    folder = root / "train" if (root / "train").is_dir() else root
    files = [folder / f for f in list_images(folder)]
    if not files:
        raise FileNotFoundError(f"no images under {folder}")
    if max_images is not None and max_images < len(files):
        step = len(files) / max_images
        files = [files[int(i * step)] for i in range(max_images)]
    frames = _Frames(files, size)
    loader = DataLoader(frames, batch_size=batch_size, num_workers=num_workers, collate_fn=_stack_readable)
    image_sum = torch.zeros(3, size, size, dtype=torch.float64)
    channel_sum = torch.zeros(3, dtype=torch.float64)
    outer_sum = torch.zeros(3, 3, dtype=torch.float64)  # sum over pixels of rgb rgb^T
    n_images = 0
    for frames in loader:
        if frames is None:
            continue
        x = frames.double().div_(255)  # (B, 3, S, S)
        pixels = x.transpose(0, 1).reshape(3, -1)  # (3, B*S*S)
        image_sum += x.sum(0)
        channel_sum += pixels.sum(1)
        outer_sum += pixels @ pixels.T
        n_images += len(x)
    if n_images == 0:
        raise BadImageError(f"none of the {len(files)} files under {folder} could be read")
    n_pixels = n_images * size * size
    mean = channel_sum / n_pixels
    cov = outer_sum / n_pixels - torch.outer(mean, mean)
    eigval, eigvec = torch.linalg.eigh(cov)  # ascending; columns are eigenvectors
    order = eigval.argsort(descending=True)
    stats = DatasetStats(
        mean=mean.float(),
        std=cov.diagonal().sqrt().float(),
        eigval=eigval[order].clamp_min(0).float(),
        eigvec=eigvec[:, order].float(),
        mean_image=(image_sum / n_images).float(),
    )
    return stats, n_images, len(files) - n_images


def _fmt(values: Tensor) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values.tolist()) + ")"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="dataset root with train/<class>/..., or a folder of images")
    parser.add_argument("--out", type=Path, required=True, help="output file (torch.save of a dict of tensors)")
    parser.add_argument("--size", type=int, default=256, help="frame size and mean-image size (default 256)")
    parser.add_argument("--workers", type=int, default=0, help="loader processes (default 0)")
    parser.add_argument("--max-images", type=int, default=None, help="evenly spaced subset of this many files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stats, used, skipped = compute_stats(args.root, args.size, args.workers, max_images=args.max_images)
    stats.save(args.out)
    print(f"{used} images ({skipped} unreadable, skipped) -> {args.out}")
    print(f"mean {_fmt(stats.mean)}  std {_fmt(stats.std)}  eigval {_fmt(stats.eigval)}")
    print("eigvec (columns): " + ", ".join(_fmt(row) for row in stats.eigvec))


if __name__ == "__main__":
    main()
