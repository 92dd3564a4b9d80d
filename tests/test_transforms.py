"""Transforms against the papers' definitions: PCA lighting statistics, mean subtraction, crop geometry, and the
GPU-side `BatchAugment` matching the per-image pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_sample_images
from torchvision.transforms import v2

from lit_papers.data import transforms as T
from lit_papers.data.randaugment import RANDAUGMENT_OPS, RandAugment

EIGVAL = torch.tensor(T.IMAGENET_EIGVAL)
EIGVEC = torch.tensor(T.IMAGENET_EIGVEC)
EXPECTED_COV = EIGVEC @ torch.diag((0.1 * EIGVAL) ** 2) @ EIGVEC.T  # covariance of the colour shifts
IDENTITY_STATS = T.DatasetStats.constants((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), T.IMAGENET_EIGVAL, T.IMAGENET_EIGVEC)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return torch.from_numpy(load_sample_images().images[0].copy()).permute(2, 0, 1).contiguous()  # (3, 427, 640) uint8


def assert_shift_cov(shifts: torch.Tensor) -> None:
    """`shifts` (N, 3) against eigvec diag((0.1 eigval)^2) eigvec^T, also along each eigenvector (the small ones)."""
    cov = torch.cov(shifts.T.double()).float()
    assert torch.allclose(cov, EXPECTED_COV, atol=0.05 * EXPECTED_COV.abs().max()), (cov, EXPECTED_COV)
    spread = (shifts @ EIGVEC).std(0)  # std of the coefficient along each principal direction
    assert torch.allclose(spread, 0.1 * EIGVAL, rtol=0.05), (spread, 0.1 * EIGVAL)
    assert shifts.mean(0).abs().max() < 4 * 0.1 * EIGVAL[0] / len(shifts) ** 0.5


def test_lighting_covariance_over_many_calls():
    lighting, image = T.Lighting(), torch.full((3, 4, 5), 0.5)
    shifts = []
    for _ in range(6000):
        out = lighting(image)
        assert torch.allclose(out, out[:, :1, :1].expand_as(out))  # the same shift on every pixel
        shifts.append(out[:, 0, 0] - 0.5)
    assert_shift_cov(torch.stack(shifts))


def test_lighting_batch_draws_one_alpha_per_image():
    out = T.Lighting()(torch.full((20000, 3, 2, 2), 0.5))
    shifts = out[:, :, 0, 0] - 0.5
    assert torch.equal(out, shifts[:, :, None, None].expand_as(out) + 0.5)
    assert len(shifts.unique(dim=0)) == len(shifts)  # every image its own draw
    assert_shift_cov(shifts)


def test_lighting_never_decomposes_per_image(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("per-image decomposition")

    for name in ("svd", "eigh", "eig", "svdvals"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    monkeypatch.setattr(torch, "svd", forbidden)
    monkeypatch.setattr(torch, "pca_lowrank", forbidden)
    T.Lighting()(torch.rand(2, 3, 8, 8))
    T.alexnet_train(crop_size=8, resize=12)(torch.randint(0, 256, (3, 12, 16), dtype=torch.uint8))


def test_subtract_mean_image_exact_and_resized():
    mean = torch.rand(3, 8, 8)
    img = torch.rand(3, 8, 8)
    assert torch.equal(T.SubtractMeanImage(mean)(img), img - mean)
    flat = T.SubtractMeanImage(torch.full((3, 8, 8), 0.25))(torch.ones(2, 3, 5, 6))  # resized to the frame
    assert flat.shape == (2, 3, 5, 6) and torch.allclose(flat, torch.full_like(flat, 0.75))


def test_alexnet_eval_matches_direct_computation(photo):
    out = T.alexnet_eval()(photo)
    frame = v2.functional.resize(photo, 256, antialias=True)  # (3, 256, 383)
    crop = v2.functional.center_crop(frame, 224).float() / 255
    expected = (crop - torch.tensor(T.IMAGENET_MEAN)[:, None, None]) / torch.tensor(T.IMAGENET_STD)[:, None, None]
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-5)


def test_ten_crop_eval_corners_centre_and_flips(photo):
    out = T.ten_crop_eval()(photo)
    assert out.shape == (10, 3, 224, 224)
    frame = T.alexnet_eval(crop_size=256)(photo)  # the normalised 256 x 256 frame
    assert torch.allclose(out[0], frame[:, :224, :224], atol=1e-6)  # top-left corner
    assert torch.allclose(out[3], frame[:, 32:, 32:], atol=1e-6)  # bottom-right corner
    assert torch.allclose(out[4], frame[:, 16:240, 16:240], atol=1e-6)  # centre
    # then the same five of the mirrored frame: the mirror of top-right is the mirrored frame's top-left, etc.
    assert torch.allclose(out[5:], out[[1, 0, 3, 2, 4]].flip(-1), atol=1e-6)


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: T.alexnet_train(), (3, 224, 224)),
        (lambda: T.resnet_train(), (3, 224, 224)),
        (lambda: T.mae_train(), (3, 224, 224)),
        (lambda: T.cifar_train(), (3, 32, 32)),
    ],
)
def test_train_pipelines_shapes(make, shape, photo):
    img = photo if shape[-1] == 224 else photo[:, :32, :32]
    out = make()(img)
    assert out.shape == shape and out.dtype == torch.float32 and out.isfinite().all()


def test_resnet_scale_augmentation_range():
    shortest = T.resnet_train(crop_size=8).transforms[0]
    assert isinstance(shortest, v2.RandomShortestSize) and list(shortest.min_size) == list(range(256, 481))
    small = T.resnet_train(crop_size=8, scale_range=(10, 20)).transforms[0]
    sizes = [small(torch.zeros(3, 4, 6, dtype=torch.uint8)).shape[1] for _ in range(200)]
    assert min(sizes) == 10 and max(sizes) == 20


def coordinate_image(size: int, step: int) -> torch.Tensor:
    """uint8 (3, size, size): R = (row + 1) * step, G = (col + 1) * step: a crop reveals its offset (0 = padding)."""
    idx = (torch.arange(size) + 1) * step
    rows, cols = idx[:, None].expand(size, size), idx[None, :].expand(size, size)
    return torch.stack([rows, cols, torch.zeros(size, size)]).byte()


def recover_geometry(out: torch.Tensor, img: torch.Tensor, pad: int, step: int) -> tuple[int, int, bool]:
    """(top, left, flip) of a crop of the zero-padded coordinate image; asserts the crop is pixel-exact."""
    c = out.shape[-1] // 2  # the centre pixel is never padding
    rows, cols = (out[:2] * 255 / step).round().long() - 1  # image coordinates
    flip = bool(cols[c, c + 1] < cols[c, c])
    top = int(rows[c, c]) + pad - c
    left = int(cols[c, c]) + pad - (out.shape[-1] - 1 - c if flip else c)
    size = out.shape[-1]
    expected = F.pad(img.float() / 255, [pad] * 4)[:, top : top + size, left : left + size]
    assert torch.allclose(out, expected.flip(-1) if flip else expected, atol=1e-6)
    return top, left, flip


@pytest.mark.parametrize(("name", "size", "crop", "pad"), [("alexnet", 12, 8, 0), ("cifar", 32, 32, 4)])
def test_batch_augment_geometry_matches_per_image(name, size, crop, pad):
    """Same crop offsets and flips, pixel-exact, uniformly over the same support, on both paths."""
    step = 200 // (size + 1)
    img = coordinate_image(size, step)
    if name == "alexnet":
        per_image = T.alexnet_train(crop_size=crop, resize=size, stats=IDENTITY_STATS, alphastd=0)
    else:
        per_image = T.cifar_train(crop_size=crop, padding=pad, stats=IDENTITY_STATS)
    worker, batch_aug = T.device_train_pipeline(name, crop_size=crop, resize=size, padding=pad, stats=IDENTITY_STATS,
                                                alphastd=0)
    n = 3000
    cells = (size + 2 * pad - crop + 1) ** 2 * 2
    a = [recover_geometry(per_image(img), img, pad, step) for _ in range(n)]
    b = [recover_geometry(x, img, pad, step) for x in batch_aug(worker(img).expand(n, -1, -1, -1))]
    for draws in (a, b):
        counts = np.unique(np.array(draws), axis=0, return_counts=True)[1]
        assert len(counts) == cells  # every offset and flip occurs
        chi2 = ((counts - n / cells) ** 2 / (n / cells)).sum()
        assert chi2 < cells + 5 * (2 * cells) ** 0.5  # uniform (dof = cells - 1)
    for i in range(3):
        assert abs(np.mean([d[i] for d in a]) - np.mean([d[i] for d in b])) < 0.15


def test_batch_augment_lighting_and_normalisation_match_per_image():
    img = torch.full((3, 12, 12), 128, dtype=torch.uint8)
    stats = T.DatasetStats.imagenet()
    mean, std = stats.mean[:, None, None], stats.std[:, None, None]
    per_image = T.alexnet_train(crop_size=8, resize=12)
    worker, batch_aug = T.device_train_pipeline("alexnet", crop_size=8, resize=12)
    a = torch.stack([per_image(img) for _ in range(4000)])
    b = batch_aug(worker(img).expand(4000, -1, -1, -1))
    for out in (a, b):
        assert out.shape == (4000, 3, 8, 8)
        shifts = (out * std + mean - 128 / 255)[:, :, 0, 0]
        assert_shift_cov(shifts)


def test_per_pixel_mean_is_subtracted_before_the_crop_on_both_paths(photo):
    frame = v2.functional.center_crop(v2.functional.resize(photo, 40, antialias=True), 40)
    stats = T.DatasetStats(torch.zeros(3), torch.ones(3), mean_image=frame.float() / 255)
    per_image = T.alexnet_train(crop_size=32, resize=40, stats=stats, alphastd=0, per_pixel_mean=True)
    worker, batch_aug = T.device_train_pipeline("alexnet", crop_size=32, resize=40, stats=stats, alphastd=0,
                                                per_pixel_mean=True)
    # Image minus its own mean image is zero wherever the crop lands: only a matching crop of the mean gives that.
    assert per_image(photo).abs().max() < 1e-6
    assert batch_aug(worker(photo)[None].expand(16, -1, -1, -1)).abs().max() < 1e-6
    plain = T.alexnet_train(crop_size=32, resize=40, stats=stats, alphastd=0)(photo)
    assert plain.abs().max() > 0.1  # and the flag really changes something


def test_missing_statistics_are_reported():
    plain = T.DatasetStats.constants(T.CIFAR10_MEAN, T.CIFAR10_STD)
    with pytest.raises(ValueError, match="mean image"):
        T.alexnet_train(stats=plain, per_pixel_mean=True)
    with pytest.raises(ValueError, match="eigval"):
        T.alexnet_train(stats=plain)
    with pytest.raises(ValueError, match="unknown pipeline"):
        T.device_train_pipeline("lenet")


@pytest.mark.parametrize("name", ["resnet", "mae"])
def test_device_split_of_resnet_and_mae_matches_per_image(name, photo):
    small = photo[:, ::8, ::8]  # (3, 54, 80)
    kw = dict(crop_size=24, stats=T.DatasetStats.imagenet())
    if name == "resnet":
        per_image = T.resnet_train(scale_range=(28, 40), **kw)
        worker, batch_aug = T.device_train_pipeline("resnet", scale_range=(28, 40), **kw)
    else:
        per_image = T.mae_train(**kw)
        worker, batch_aug = T.device_train_pipeline("mae", **kw)
    shipped = torch.stack([worker(small) for _ in range(400)])
    assert shipped.dtype == torch.uint8 and shipped.shape == (400, 3, 24, 24)
    a, b = torch.stack([per_image(small) for _ in range(400)]), batch_aug(shipped)
    assert b.shape == a.shape and b.dtype == a.dtype
    assert torch.allclose(a.mean((0, 2, 3)), b.mean((0, 2, 3)), atol=0.05)
    assert torch.allclose(a.std((0, 2, 3)), b.std((0, 2, 3)), rtol=0.05)


def test_randaugment_ops_match_timm(photo):
    """Each op at magnitude 9, both signs, against timm's PIL op (MAE's reference pipeline) with the same argument."""
    timm_aa = pytest.importorskip("timm.data.auto_augment")
    import random

    from PIL import Image

    img = photo[:, 100:300:2, 200:400:2].contiguous()  # (3, 100, 100)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    fill = (124, 116, 104)
    hparams = dict(img_mean=fill, interpolation=Image.BILINEAR)  # timm's bicubic has no tensor kernel: see RandAugment
    geo = dict(interpolation=v2.InterpolationMode.BILINEAR, fill=[float(v) for v in fill])
    assert sorted(RANDAUGMENT_OPS) == sorted(timm_aa._RAND_INCREASING_TRANSFORMS)
    for name, op in RANDAUGMENT_OPS.items():
        for seed in (0, 1):  # timm draws the sign from Python's `random`: these seeds give one of each
            random.seed(seed)
            level_fn = timm_aa.LEVEL_TO_ARG[name]
            args = level_fn(9.0, hparams) if level_fn else ()
            ref = torch.from_numpy(np.asarray(timm_aa.NAME_TO_OP[name](pil, *args, fillcolor=fill, resample=Image.BILINEAR)))
            centre = 1.0 if "Increasing" in name and name[:-10] in ("Color", "Contrast", "Brightness", "Sharpness") else 0.0
            sign = 1.0 if not args or args[0] >= centre else -1.0
            diff = (op(img, 0.9, sign, geo).permute(1, 2, 0).float() - ref.float()).abs()
            if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
                assert diff.mean() < 1.5, (name, args, diff.mean())  # resampling differences; a wrong sign gives > 10
            else:
                assert diff.max() <= 1, (name, args, diff.max())  # rounding only


def test_randaugment_draws_two_ops_with_prob_half_and_noisy_magnitude():
    ra = RandAugment()  # rand-m9-mstd0.5-inc1
    plans = [ra.sample() for _ in range(6000)]
    counts = torch.tensor([float(len(p)) for p in plans])
    assert counts.mean() == pytest.approx(1.0, abs=0.04) and set(counts.tolist()) == {0.0, 1.0, 2.0}  # Binomial(2, 0.5)
    names = [name for p in plans for name, _, _ in p]
    freq = torch.tensor([names.count(n) for n in RANDAUGMENT_OPS], dtype=torch.float) / len(names)
    assert len(freq) == 15 and (freq - 1 / 15).abs().max() < 0.015
    magnitudes = torch.tensor([10 * level for p in plans for _, level, _ in p])
    assert magnitudes.max() <= 10 and magnitudes.mean() == pytest.approx(9.0, abs=0.03)
    assert magnitudes.std() == pytest.approx(0.5, abs=0.04)  # N(9, 0.5), the 2% above 10 clipped
    signs = torch.tensor([sign for p in plans for _, _, sign in p])
    assert signs.abs().eq(1).all() and signs.mean().abs() < 0.05
    assert all(len(p) == 2 and all(level == 0.9 for _, level, _ in p)
               for p in (RandAugment(prob=1.0, magnitude_std=0.0).sample() for _ in range(20)))


def test_mae_finetune_pipeline_composition_and_erasing(photo):
    chain, erase = T.mae_finetune_train().transforms
    rrc, flip, ra, to_float, normalize = chain.transforms
    assert rrc.scale == (0.08, 1.0) and rrc.interpolation == v2.InterpolationMode.BICUBIC and tuple(rrc.size) == (224, 224)
    assert isinstance(flip, v2.RandomHorizontalFlip) and isinstance(to_float, T.ToFloat)
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.prob, ra.fill) == (2, 9.0, 0.5, 0.5, [124.0, 116.0, 104.0])
    assert isinstance(erase, v2.RandomErasing) and erase.p == 0.25
    # Erasing comes after normalisation and writes N(0, 1) noise, one rectangle of 2%-33% of the image.
    plain = T.mae_finetune_train(crop_size=64, randaugment_magnitude=0, erase_prob=0)
    erased = T.mae_finetune_train(crop_size=64, randaugment_magnitude=0, erase_prob=1.0)
    assert len(plain.transforms[0].transforms) == 4 and len(plain.transforms) == 1
    torch.manual_seed(0)
    a = plain(photo)
    torch.manual_seed(0)
    b = erased(photo)
    changed = (a != b).all(0)  # (64, 64)
    rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
    box = b[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert 0.02 * 64 * 64 <= changed.sum() <= 0.34 * 64 * 64 and changed.sum() == box[0].numel()
    assert box.mean().abs() < 0.15 and box.std() == pytest.approx(1.0, abs=0.15)
    out = T.mae_finetune_train()(photo)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32 and out.isfinite().all()
