"""Images/s of our AlexNet training loader against torchvision's reference preset, on the same JPEGs, in one run.

    python benchmarks/data_pipeline.py [--root IMAGENET_LAYOUT_ROOT] [--workers 2] [--batch-size 32] [--images 1024]

Ours: `ImageNetDataModule(pipeline="alexnet").train_dataloader()` (PIL decode -> uint8 short side 256 -> centre 256 ->
random 224 + flip -> float -> PCA lighting -> normalise). Reference: `torchvision.datasets.ImageFolder` with the v2
preset of torchvision's classification references (PIL RandomResizedCrop(224) + flip -> tensor -> float -> normalise).
Same folder, batch size, workers and shuffling; the two loaders alternate and the best of `--repeats` runs counts, so
other processes on a shared machine hurt both alike. Then a single-thread ablation of our per-image path gives the
cost share of lighting + mean subtraction. Without `--root`, a temporary ImageNet-layout folder of ~500x375
JPEGs cut from scikit-learn's sample photos is generated.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from lit_papers.data.imagenet import ImageNetDataModule, list_images, load_rgb
from lit_papers.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetStats,
    Lighting,
    Normalize,
    SubtractMeanImage,
    alexnet_train,
)


def make_folder(root: Path, n_images: int, n_classes: int = 8, seed: int = 0) -> None:
    """ImageNet-like JPEGs (~500x375, landscape and portrait, quality 90) cut from real photos at random scales."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 640x427
    for split, count in (("train", n_images), ("val", n_classes)):
        for i in range(count):
            folder = root / split / f"n{i % n_classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            photo = photos[i % len(photos)]
            w, h = int(rng.integers(300, 640)), int(rng.integers(250, 427))
            left, top = int(rng.integers(0, 640 - w + 1)), int(rng.integers(0, 427 - h + 1))
            size = (500, 375) if rng.random() < 0.75 else (375, 500)
            img = photo.crop((left, top, left + w, top + h)).resize(size, Image.BICUBIC)
            img.save(folder / f"{i:06d}.JPEG", quality=90)


def reference_loader(train_dir: Path, batch_size: int, workers: int) -> DataLoader:
    preset = v2.Compose([
        v2.RandomResizedCrop(224, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    dataset = datasets.ImageFolder(str(train_dir), transform=preset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0)


def images_per_second(loader: DataLoader, n_images: int) -> float:
    """Throughput over `n_images`, timed from the first batch on (worker start-up excluded), epochs chained."""
    seen, start = 0, None
    while True:
        for images, _ in loader:
            if start is None:
                start = time.perf_counter()  # the first batch only warms the workers up
                continue
            seen += len(images)
            if seen >= n_images:
                return seen / (time.perf_counter() - start)


def cost_share(files: list[Path], per_pixel_mean: bool, rounds: int = 7, n: int = 64) -> tuple[float, float]:
    """(ms per image of decode + pipeline, fraction of it spent in lighting + mean subtraction), one thread.

    Measured as an ablation: the same pipeline without `Lighting`, `SubtractMeanImage` and `Normalize`, timed in
    alternating rounds with decoding in the loop, so caches are as cold as in a real worker. The fastest round of
    each counts (as `timeit` does): other processes only ever add time.
    """
    stats = DatasetStats.imagenet()
    stats.mean_image = torch.rand(3, 256, 256)
    full = alexnet_train(stats=stats, per_pixel_mean=per_pixel_mean)
    ablated = v2.Compose([t for t in full.transforms if not isinstance(t, (Lighting, SubtractMeanImage, Normalize))])
    decode_s, pipe_s = [], {"full": [], "ablated": []}
    for _ in range(rounds):
        for name, pipeline in (("full", full), ("ablated", ablated)):
            decode, pipe = 0.0, 0.0
            for f in files[:n]:
                t0 = time.perf_counter()
                x = pil_to_tensor(load_rgb(f, 256))
                t1 = time.perf_counter()
                pipeline(x)
                decode, pipe = decode + t1 - t0, pipe + time.perf_counter() - t1
            decode_s.append(decode / n)
            pipe_s[name].append(pipe / n)
    total = min(decode_s) + min(pipe_s["full"])
    return 1e3 * total, (min(pipe_s["full"]) - min(pipe_s["ablated"])) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="ImageNet-layout folder (root/train/<class>/*, root/val/<class>/*)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=1024, help="images timed per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--generate", type=int, default=256, help="JPEGs to generate when --root is not given")
    args = parser.parse_args()

    tmp = None
    if args.root is None:
        tmp = tempfile.TemporaryDirectory()
        args.root = Path(tmp.name)
        make_folder(args.root, args.generate)
    files = [args.root / "train" / f for f in list_images(args.root / "train")]
    sizes = [Image.open(f).size for f in files[:200]]
    print(f"{len(files)} training images in {args.root}, median size {statistics.median(w for w, _ in sizes):.0f}x"
          f"{statistics.median(h for _, h in sizes):.0f}; workers {args.workers}, batch {args.batch_size}, "
          f"{args.images} images per run, best of {args.repeats}")

    dm = ImageNetDataModule(args.root, pipeline="alexnet", batch_size=args.batch_size, num_workers=args.workers,
                            pin_memory=False)
    dm.setup("fit")
    loaders = {
        "ours (alexnet_train)": dm.train_dataloader(),
        "torchvision reference (RRC preset)": reference_loader(args.root / "train", args.batch_size, args.workers),
    }
    results: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(args.repeats):
        for name, loader in loaders.items():
            results[name].append(images_per_second(loader, args.images))
    best = {name: max(v) for name, v in results.items()}
    for name, v in results.items():
        print(f"  {name:<36} {best[name]:7.1f} img/s   (runs: {', '.join(f'{r:.0f}' for r in v)})")
    ours, ref = best.values()
    print(f"  ratio ours / reference: {ours / ref:.2f}x   (goal >= 0.9x)")

    torch.set_num_threads(1)  # like a loader worker
    for per_pixel_mean in (False, True):
        total_ms, share = cost_share(files, per_pixel_mean)
        label = "per-pixel mean image" if per_pixel_mean else "per-channel mean/std"
        print(f"  lighting + mean subtraction ({label}): {100 * share:.1f}% of {total_ms:.2f} ms per image "
              "(decode + pipeline, 1 thread; goal < 10%)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
