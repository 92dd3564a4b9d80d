"""DataModules on small files written here in the real formats: ImageNet-layout JPEG folders (with broken and odd
files), CIFAR python pickles and image folders, MNIST IDX (raw and .gz); the statistics command; offline errors."""

from __future__ import annotations

import logging
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fakedata import (
    CLASSES,
    add_bad_files,
    write_cifar_pickles,
    write_idx,
    write_imagenet_folder,
)
from PIL import Image

from lit_papers.data import transforms as T
from lit_papers.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lit_papers.data.imagenet import (
    BadImageError,
    ImageFolderDataset,
    ImageNetDataModule,
    load_rgb,
)
from lit_papers.data.mnist import FashionMNISTDataModule, MNISTDataModule, read_idx
from lit_papers.data.stats import main as stats_main


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture
def bad_root(tmp_path, imagenet_root) -> tuple[Path, dict[str, Path]]:
    for split in ("train", "val"):
        for name in CLASSES:
            (tmp_path / split / name).mkdir(parents=True)
            for f in (imagenet_root / split / name).iterdir():
                (tmp_path / split / name / f.name).write_bytes(f.read_bytes())
    return tmp_path, add_bad_files(tmp_path / "train" / CLASSES[0])


def pil_eval_crop(path: Path, resample: int) -> torch.Tensor:
    """The evaluation view computed with PIL alone: short side resized to 256 with `resample`, the centre 224 x 224,
    normalised with ImageNet's mean and std; (3, 224, 224)."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    img = img.resize((int(w * 256 / h), 256) if h < w else (256, int(h * 256 / w)), resample)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    ref = torch.from_numpy(np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255)
    return ((ref - torch.tensor(T.IMAGENET_MEAN)) / torch.tensor(T.IMAGENET_STD)).permute(2, 0, 1)


def test_imagenet_batches_are_normalised_224_crops(imagenet_root):
    dm = ImageNetDataModule(imagenet_root, batch_size=4, num_workers=0)
    assert dm.num_classes == 3 and dm.classes == CLASSES  # known before setup, for linking to the model
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and set(y.tolist()) <= {0, 1, 2}
    assert len(dm.train_set) == 12 and len(dm.val_set) == 6
    # Validation image 0 against an independent PIL computation: short side 256, centre 224, ImageNet mean/std.
    xv, yv = next(iter(dm.val_dataloader()))
    ref = pil_eval_crop(dm.val_set.path(0), Image.BILINEAR)
    assert yv[0] == 0 and (xv[0] - ref).abs().mean() < 0.03


@pytest.mark.parametrize("pipeline", ["resnet", "mae", "mae_finetune"])
def test_imagenet_other_pipelines_and_ten_crop(imagenet_root, pipeline):
    dm = ImageNetDataModule(imagenet_root, pipeline=pipeline, batch_size=2, num_workers=0, ten_crop=True)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].shape == (2, 3, 224, 224)
    assert next(iter(dm.val_dataloader()))[0].shape == (2, 10, 3, 224, 224)


def test_mae_pipelines_evaluate_with_a_bicubic_resize_and_crop_as_the_reference(imagenet_root):
    """MAE's reference: Resize(256, bicubic) + CenterCrop(224) for evaluation; RandomResizedCrop scale (0.08, 1)
    for the probe (`min_scale`) and fine-tuning, (0.2, 1) for pre-training."""
    dm = ImageNetDataModule(imagenet_root, pipeline="mae_finetune", batch_size=2, num_workers=0)
    dm.setup("fit")
    xv, _ = next(iter(dm.val_dataloader()))
    assert (xv[0] - pil_eval_crop(dm.val_set.path(0), Image.BICUBIC)).abs().mean() < 0.005  # bilinear: 0.03 away
    assert dm.val_set.transform.transforms[0].interpolation == T.v2.InterpolationMode.BICUBIC
    erase = dm.train_set.transform.transforms[-1]
    assert isinstance(erase, T.v2.RandomErasing) and erase.p == 0.25 and dm.min_scale == 0.08
    assert ImageNetDataModule(imagenet_root, pipeline="mae").min_scale == 0.2
    probe = ImageNetDataModule(imagenet_root, pipeline="mae", min_scale=0.08, num_workers=0)
    probe.setup("fit")
    assert probe.train_set.transform.transforms[0].scale == (0.08, 1.0)
    with pytest.raises(ValueError, match="gpu_augment"):
        ImageNetDataModule(imagenet_root, pipeline="mae_finetune", gpu_augment=True)


def test_missing_imagenet_folder_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found or empty: .*/nowhere/train\. Expected the ImageNet layout "
                       r".*/nowhere/train/<class>/<image> and .*/nowhere/val/<class>/<image>"):
        ImageNetDataModule(tmp_path / "nowhere")
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "x.jpg")
    dm = ImageNetDataModule(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"/val\. Expected"):
        dm.setup("validate")


def test_odd_formats_become_rgb(bad_root):
    _, files = bad_root
    for kind in ("cmyk", "gray", "png", "palette"):
        img = load_rgb(files[kind])
        assert img.mode == "RGB" and img.size == Image.open(files["png"]).size, kind
    gray = np.asarray(load_rgb(files["gray"]))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    cmyk, png = np.asarray(load_rgb(files["cmyk"]), dtype=float), np.asarray(load_rgb(files["png"]), dtype=float)
    assert np.abs(cmyk - png).mean() < 8  # CMYK decoded to the same photo, not garbage


@pytest.mark.parametrize("kind", ["truncated", "empty"])
def test_bad_image_raise_names_the_file(bad_root, kind):
    root, files = bad_root
    dm = ImageNetDataModule(root, batch_size=2, num_workers=0, bad_images="raise")
    dm.setup("fit")
    index = [dm.train_set.path(i) for i in range(len(dm.train_set))].index(files[kind])
    with pytest.raises(BadImageError, match=rf"cannot read image {files[kind]}.*bad_images='skip'"):
        dm.train_set[index]


def test_bad_image_raise_from_a_worker_process(bad_root):
    root, files = bad_root
    dm = ImageNetDataModule(root, batch_size=6, num_workers=1, bad_images="raise", persistent_workers=False)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    with pytest.raises(BadImageError, match=r"cannot read image .*/n01/(empty|truncated)\.JPEG"):
        for _ in batches:
            pass
    batches._shutdown_workers()  # else torch waits 5 s for the worker when the failed iterator is garbage-collected


def test_bad_image_skip_logs_counts_and_keeps_batches_full(bad_root, caplog):
    root, files = bad_root
    dm = ImageNetDataModule(root, batch_size=6, num_workers=0, bad_images="skip")
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="lit_papers.data.imagenet"):
        for _ in range(2):  # a second epoch neither re-logs nor re-decodes the bad files
            batches = [x for x, _ in dm.train_dataloader()]
    assert sorted(dm.train_set.skipped) == sorted([str(files["empty"]), str(files["truncated"])])
    assert len(caplog.records) == 2 and "2 skipped so far" in caplog.records[-1].getMessage()
    named = [str(files["empty"]) in r.getMessage() or str(files["truncated"]) in r.getMessage() for r in caplog.records]
    assert all(named)
    assert len(batches) == len(dm.train_set) // 6 and all(x.shape == (6, 3, 224, 224) for x in batches)


def test_gpu_augment_finishes_batches_like_the_per_image_path(imagenet_root):
    kw = dict(batch_size=12, num_workers=0, crop_size=32, resize=40)
    torch.manual_seed(0)
    gpu = ImageNetDataModule(imagenet_root, gpu_augment=True, **kw)
    cpu = ImageNetDataModule(imagenet_root, **kw)
    gpu.setup("fit"), cpu.setup("fit")
    raw, labels = next(iter(gpu.train_dataloader()))
    assert raw.dtype == torch.uint8 and raw.shape == (12, 3, 40, 40)  # workers ship bytes of a fixed size
    gpu.trainer = SimpleNamespace(training=False)
    assert gpu.on_after_batch_transfer((raw, labels), 0)[0] is raw  # validation batches pass through
    gpu.trainer = SimpleNamespace(training=True)
    a = torch.cat([gpu.on_after_batch_transfer((raw, labels), 0)[0] for _ in range(30)])
    b = torch.stack([cpu.train_set[i][0] for i in range(12) for _ in range(30)])
    assert a.shape == b.shape == (360, 3, 32, 32) and a.dtype == b.dtype
    assert torch.allclose(a.mean((0, 2, 3)), b.mean((0, 2, 3)), atol=0.03)
    assert torch.allclose(a.std((0, 2, 3)), b.std((0, 2, 3)), rtol=0.03)


def test_stats_command_recovers_a_known_colour_covariance(tmp_path, capsys):
    rng = np.random.default_rng(0)
    mu = np.array([0.5, 0.45, 0.4])
    basis = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    cov = basis @ np.diag([0.01, 0.002, 0.0005]) @ basis.T
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
    train_images = []
    for i in range(16):  # lossless PNG: JPEG's chroma subsampling would smooth iid pixel noise away
        pixels = np.clip(np.round(rng.multivariate_normal(mu, cov, size=(48, 48)) * 255), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / ("val" if i == 15 else "train") / "a" / f"{i}.png")
        train_images += [pixels] if i < 15 else []
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"")
    stats_main([str(tmp_path), "--out", str(tmp_path / "stats.pt"), "--size", "48"])
    assert "15 images (1 unreadable, skipped)" in capsys.readouterr().out
    stats = T.DatasetStats.load(tmp_path / "stats.pt")
    got = stats.eigvec @ torch.diag(stats.eigval) @ stats.eigvec.T
    assert torch.allclose(got, torch.tensor(cov, dtype=torch.float32), atol=3e-4)
    assert torch.allclose(stats.eigval, torch.tensor([0.01, 0.002, 0.0005]), rtol=0.1)
    assert torch.allclose(stats.mean, torch.tensor(mu, dtype=torch.float32), atol=3e-3)
    assert torch.allclose(stats.std, torch.tensor(np.sqrt(np.diag(cov)), dtype=torch.float32), rtol=0.03)
    mean_image = torch.from_numpy(np.mean(train_images, axis=0) / 255).permute(2, 0, 1).float()
    assert stats.mean_image.shape == (3, 48, 48) and torch.allclose(stats.mean_image, mean_image, atol=1e-5)
    # The file is what the DataModules' `stats=` takes, down to the per-pixel mean.
    dm = ImageNetDataModule(tmp_path, batch_size=5, num_workers=0, stats=tmp_path / "stats.pt", per_pixel_mean=True,
                            crop_size=40, resize=48)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 40, 40) and x.mean().abs() < 0.2 and 0.6 < x.std() < 1.4


def test_cifar10_pickles_and_validation_split(tmp_path):
    images, labels = write_cifar_pickles(tmp_path)
    dm = CIFAR10DataModule(tmp_path, batch_size=8, num_workers=0, download=False)
    dm.prepare_data(), dm.setup("fit")
    assert dm.num_classes == 10 and dm.val_set is dm.test_set and len(dm.test_set) == 20
    assert torch.equal(dm.train_set.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert dm.train_set.labels.tolist() == labels
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    split = [CIFAR10DataModule(tmp_path, num_workers=0, download=False, val_size=20, seed=s) for s in (0, 1)]
    for d in split:
        d.setup("fit")
    assert len(split[0].train_set) == 80 and len(split[0].val_set) == 20
    assert split[0].val_set.labels.bincount(minlength=10).tolist() == [2] * 10  # stratified
    assert torch.equal(split[0].val_set.images, split[1].val_set.images)  # the same held-out images every run
    train_rows = {t.numpy().tobytes() for t in split[0].train_set.images}
    assert not any(v.numpy().tobytes() in train_rows for v in split[0].val_set.images)


def test_cifar100_pickles_use_fine_labels(tmp_path):
    _, labels = write_cifar_pickles(tmp_path, hundred=True)
    dm = CIFAR100DataModule(tmp_path, num_workers=0, download=False)
    dm.setup("fit")
    assert dm.num_classes == 100 and dm.train_set.labels.tolist() == labels and len(dm.train_set) == 20


def test_cifar_image_folder_layout_and_gpu_augment(tmp_path):
    rng = np.random.default_rng(1)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    expected = {}
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            (tmp_path / split / name).mkdir(parents=True)
            img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / split / name / "0001.png")
            expected[split, c] = img
    dm = CIFAR10DataModule(tmp_path, batch_size=10, num_workers=0, gpu_augment=True)
    dm.prepare_data(), dm.setup("fit")  # no download: the folder layout is detected
    for c in range(10):
        i = dm.train_set.labels.tolist().index(c)
        assert np.array_equal(dm.train_set.images[i].permute(1, 2, 0).numpy(), expected["train", c])
    raw, y = next(iter(dm.train_dataloader()))
    assert raw.dtype == torch.uint8
    dm.trainer = SimpleNamespace(training=True)
    x, _ = dm.on_after_batch_transfer((raw, y), 0)
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32


def test_cifar_missing_offline_says_where_and_how(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"CIFAR10 not found in .*: looked for .*/cifar-10-batches-py/"
                       r"\{data_batch_1, .*test_batch\} .* and for image folders .*/train/<class>/\*\.jpg .*"
                       r"Download https://www\.cs\.toronto\.edu/~kriz/cifar-10-python\.tar\.gz"):
        CIFAR10DataModule(tmp_path, download=False).setup("fit")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/\{train, test\}.*Download failed: URLError"):
        CIFAR100DataModule(tmp_path, download=True).prepare_data()


@pytest.mark.parametrize(
    ("cls", "where", "suffix"), [(MNISTDataModule, "", ""), (FashionMNISTDataModule, "FashionMNIST/raw", ".gz")]
)
def test_mnist_idx_files_raw_and_gz(tmp_path, cls, where, suffix):
    rng = np.random.default_rng(2)
    folder = tmp_path / where
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", 30), ("t10k", 10)):
        data[prefix] = rng.integers(0, 256, size=(n, 28, 28)), rng.integers(0, 10, size=n)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", data[prefix][0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", data[prefix][1])
    dm = cls(tmp_path, batch_size=10, download=False)
    dm.prepare_data(), dm.setup("fit")
    assert dm.num_classes == 10 and len(dm.train_set) == 30 and len(dm.val_set) == 10
    x, y = dm.train_set[3]
    assert x.shape == (1, 28, 28) and torch.allclose(x[0], torch.tensor(data["train"][0][3] / 255, dtype=torch.float32))
    assert y == data["train"][1][3]
    normed = cls(tmp_path, download=False, normalize=True, val_size=10)
    normed.setup("fit")
    assert len(normed.train_set) == 20 and normed.train_set[0][0].min() < 0
    with pytest.raises(ValueError, match="not an IDX file"):
        (tmp_path / "bogus").write_bytes(b"\x00\x00\x0d\x01abcd")
        read_idx(tmp_path / "bogus")


def test_mnist_missing_offline_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNIST not found: looked in .* and .*/MNIST/raw for "
                       r"train-images-idx3-ubyte, .* \(raw or \.gz\)\. Download the four \.gz files from https://"):
        MNISTDataModule(tmp_path, download=False).setup("fit")


def test_unknown_validation_class_is_an_error(imagenet_root, tmp_path):
    (tmp_path / "extra").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "extra" / "x.jpg")
    with pytest.raises(ValueError, match="class folders that the training split lacks"):
        ImageFolderDataset(tmp_path, ["other"])


def test_gpu_augment_inside_a_lightning_fit(imagenet_root):
    """The real Trainer calls the hook: training batches arrive finished, validation batches untouched."""
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(3, 3)
            self.seen: list[tuple[str, torch.dtype, tuple]] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append(("train", x.dtype, tuple(x.shape)))
            return torch.nn.functional.cross_entropy(self.head(x.mean((2, 3))), y)

        def validation_step(self, batch, batch_idx):
            self.seen.append(("val", batch[0].dtype, tuple(batch[0].shape)))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ImageNetDataModule(imagenet_root, batch_size=4, num_workers=0, crop_size=32, resize=40, gpu_augment=True)
    probe = Probe()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(probe, datamodule=dm)
    assert set(probe.seen) == {("train", torch.float32, (4, 3, 32, 32)), ("val", torch.float32, (4, 3, 32, 32)),
                                       ("val", torch.float32, (2, 3, 32, 32))}


CIFAR_JPG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_JPG.is_file(), reason="needs ../shared/data/cifar10-jpg.tar.gz")
def test_cifar10_real_jpeg_copy(tmp_path):
    import tarfile

    with tarfile.open(CIFAR_JPG) as archive:
        archive.extractall(tmp_path, filter="data")
    dm = CIFAR10DataModule(tmp_path, batch_size=500, num_workers=0, download=False)
    dm.prepare_data(), dm.setup("fit")
    assert len(dm.train_set) == 50000 and len(dm.test_set) == 10000
    assert dm.train_set.labels.bincount().tolist() == [5000] * 10
    x = torch.cat([x for x, _ in dm.test_dataloader()])  # normalised with the standard CIFAR-10 mean/std
    assert x.mean((0, 2, 3)).abs().max() < 0.05 and (x.std((0, 2, 3)) - 1).abs().max() < 0.05
