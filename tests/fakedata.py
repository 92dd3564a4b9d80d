"""Small files in the real dataset formats, written by the tests: ImageNet-layout JPEG folders (and the broken files
found in real scrapes), CIFAR python pickles, MNIST IDX files."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

CLASSES = ["n01", "n02", "n03"]


def photo_crops(n: int, seed: int) -> list[np.ndarray]:
    """`n` different photo crops of about 300 x 260 from sklearn's sample images (real JPEG-like content)."""
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    crops = []
    for i in range(n):
        photo = photos[i % 2]
        h, w = rng.integers(240, 300), rng.integers(260, 340)
        top, left = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
        crops.append(photo[top : top + h, left : left + w])
    return crops


def write_imagenet_folder(root: Path, classes: list[str] = CLASSES, train_per_class: int = 4, val_per_class: int = 2) -> Path:
    """`root/{train,val}/<class>/*.JPEG` with real photo crops; returns `root`."""
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i, crop in enumerate(photo_crops(per_class, seed=10 * c + (split == "val"))):
                Image.fromarray(crop).save(root / split / name / f"{name}_{i}.JPEG", quality=90)
    return root


def add_bad_files(folder: Path) -> dict[str, Path]:
    """The zoo of files found in real scrapes, next to good ones; returns them by kind."""
    good = next(folder.glob("*.JPEG")).read_bytes()
    photo = Image.fromarray(photo_crops(1, seed=99)[0])
    files = {kind: folder / f"{kind}.JPEG" for kind in ("truncated", "empty", "cmyk", "gray", "png", "palette")}
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["empty"].write_bytes(b"")
    photo.convert("CMYK").save(files["cmyk"], format="JPEG")
    photo.convert("L").save(files["gray"], format="JPEG")
    photo.save(files["png"], format="PNG")  # PNG content behind a .JPEG name
    photo.convert("P").save(files["palette"], format="PNG")
    return files


def write_cifar_pickles(root: Path, hundred: bool = False) -> tuple[np.ndarray, list[int]]:
    """Official python-version batches with random images; returns the training images (N, 32, 32, 3) and labels."""
    rng = np.random.default_rng(0)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    key = b"fine_labels" if hundred else b"labels"
    images, labels = [], []
    for name in names:
        hwc = rng.integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)
        batch_labels = [int(v) for v in rng.permutation(20) % (100 if hundred else 10)]
        batch = {b"data": hwc.transpose(0, 3, 1, 2).reshape(20, 3072), key: batch_labels, b"batch_label": b"x"}
        if hundred:
            batch[b"coarse_labels"] = [v // 5 for v in batch_labels]
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        if "test" not in name:
            images.append(hwc), labels.extend(batch_labels)
    return np.concatenate(images), labels


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
