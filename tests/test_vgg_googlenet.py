"""VGG and GoogLeNet against torchvision (state dicts, outputs) and the papers; GoogLeNet's auxiliary losses in the
classifier task; the VGG and GoogLeNet data pipelines. CPU only, small inputs, no downloads."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchvision
from fakedata import write_imagenet_folder
from sklearn.datasets import load_sample_images
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

from lit_papers.data import transforms as T
from lit_papers.data.imagenet import ImageNetDataModule
from lit_papers.nets import vgg as V
from lit_papers.nets.googlenet import GoogLeNet, GoogLeNetOutputs, googlenet
from lit_papers.tasks.classification import ImageClassifier

VGGS = ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]
# torchvision's model cards; the paper's Table 2 rounds them to 133, 133, 138, 144 million.
VGG_PARAMS = {"vgg11": 132_863_336, "vgg13": 133_047_848, "vgg16": 138_357_544, "vgg19": 143_667_240}


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def randomise_bn(net: nn.Module) -> None:
    # Fresh BNs are identities in eval mode; random statistics make a mis-wired BN visible.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def small_vgg(depth: int = 11, batch_norm: bool = False, **kw) -> V.VGG:
    """The VGG layout with a small head (fc 64 on a 1x1 pool) for cheap tests on 32x32 inputs."""
    return V.VGG(depth, batch_norm, num_classes=kw.pop("num_classes", 10), fc_width=64, pool_size=1, **kw)


# ---------------------------------------------------------------- VGG


@pytest.mark.parametrize("name", VGGS)
def test_vgg_state_dict_and_param_count_match_torchvision(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init
        net, ref = getattr(V, name)(), getattr(torchvision.models, name)()
    assert [(k, v.shape) for k, v in net.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    assert n_params(net) == n_params(ref)
    if not name.endswith("_bn"):
        assert n_params(net) == VGG_PARAMS[name]


# Each comparison moves ~1 GB of FC weights; the three largest run with `-m slow` to keep the default suite quick.
@pytest.mark.parametrize(
    "name", ["vgg11", "vgg11_bn", "vgg16", *(pytest.param(n, marks=pytest.mark.slow) for n in ("vgg16_bn", "vgg19", "vgg19_bn"))]
)
def test_vgg_outputs_match_torchvision(name: str) -> None:
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)()
    randomise_bn(ref)
    with torch.device("meta"):
        net = getattr(V, name)()
    net = net.to_empty(device="cpu")  # every tensor comes from the state dict: skip our own init here
    net.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), ref.eval()(x))
        torch.manual_seed(1)
        ours = net.train()(x)
        torch.manual_seed(1)
        torch.testing.assert_close(ours, ref.train()(x))  # dropout after fc6 and fc7, BN batch statistics


def test_vgg_layout_follows_table_1() -> None:
    for depth, letter in zip((11, 13, 16, 19), "ABDE"):
        with torch.device("meta"):
            net = V.VGG(depth)
        convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
        assert len(convs) + 3 == depth, letter  # weight layers = convs + 3 FC
        assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1) for c in convs)
        pools = [m for m in net.features if isinstance(m, nn.MaxPool2d)]
        assert len(pools) == 5 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    with torch.device("meta"):
        names, head = list(V.caffe_conv_layers(V.VGG(16))), V.vgg16().classifier
    assert names == ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
                     "conv4_3", "conv5_1", "conv5_2", "conv5_3"]
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]  # dropout on fc6, fc7 only
    with pytest.raises(ValueError, match="depth"):
        V.VGG(12)


def test_vgg_interface_and_backward() -> None:
    torch.manual_seed(0)
    net = small_vgg(batch_norm=True, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    assert out.shape == (2, 7) and net.num_classes == 7 and net.num_features == 64
    F.cross_entropy(out, torch.tensor([1, 5])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    net.eval()
    with torch.no_grad():
        feats = net.forward_features(x)
        assert feats.shape == (2, 512, 1, 1)
        pre = net.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(net.forward_head(feats), net(x))
        net.reset_classifier(0)
        torch.testing.assert_close(net(x), pre)


def test_vgg_inits() -> None:
    torch.manual_seed(0)
    paper, kaiming, glorot = (small_vgg(13, init=i) for i in ("paper", "kaiming", "glorot"))
    w = lambda net: net.features[7].weight
    assert abs(w(paper).std().item() - 0.01) < 5e-4  # sec. 3.1: N(0, 10^-2)
    assert abs(w(kaiming).std().item() / (2 / (128 * 9)) ** 0.5 - 1) < 0.03  # fan-out Kaiming normal
    bound = (6 / (2 * 128 * 9)) ** 0.5  # Glorot uniform: U(+-sqrt(6 / (fan_in + fan_out)))
    assert w(glorot).abs().max() <= bound and w(glorot).abs().max() > 0.99 * bound
    for net in (paper, kaiming, glorot):
        layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert all(bool((m.bias == 0).all()) for m in layers)
    fc6 = paper.classifier[0].weight
    assert abs(fc6.std().item() - 0.01) < 1e-3 and abs(kaiming.classifier[0].weight.std().item() - 0.01) < 1e-3
    with pytest.raises(ValueError, match="init"):
        small_vgg(init="xavier")


@pytest.mark.parametrize(("depth", "batch_norm"), [(13, False), (16, False), (19, True)])
def test_init_from_vgg_a_copies_first_four_convs_and_the_fc_layers(depth: int, batch_norm: bool) -> None:
    torch.manual_seed(0)
    a = small_vgg(11, batch_norm)
    for p in a.parameters():  # "trained": values no fresh init produces
        p.data.uniform_(1.0, 2.0)
    if batch_norm:
        randomise_bn(a)
    deep = small_vgg(depth, batch_norm, init="paper")
    before = {k: v.clone() for k, v in deep.state_dict().items()}
    assert V.init_from_vgg_a(deep, a) is deep
    src, dst = V.caffe_conv_layers(a), V.caffe_conv_layers(deep)
    assert len(dst) == depth - 3
    for name, modules in dst.items():
        for target, source in zip(modules, src.get(name, [None] * len(modules))):
            copied = name in ("conv1_1", "conv2_1", "conv3_1", "conv3_2")
            for key, value in target.state_dict().items():
                if copied:
                    assert torch.equal(value, source.state_dict()[key]), (name, key)
                else:  # random init kept (the paper's "intermediate layers were initialised randomly")
                    prefix = next(k for k, m in deep.named_modules() if m is target)
                    assert torch.equal(value, before[f"{prefix}.{key}"]), (name, key)
    for i in (0, 3, 6):  # fc6, fc7, fc8
        assert torch.equal(deep.classifier[i].weight, a.classifier[i].weight)
        assert torch.equal(deep.classifier[i].bias, a.classifier[i].bias)


def test_init_from_vgg_a_rejects_mismatches() -> None:
    with pytest.raises(ValueError, match="VGG-11"):
        V.init_from_vgg_a(small_vgg(16), small_vgg(13))
    with pytest.raises(ValueError, match="batch_norm"):
        V.init_from_vgg_a(small_vgg(16, True), small_vgg(11, False))
    with pytest.raises(RuntimeError):  # fc8 of another width
        V.init_from_vgg_a(small_vgg(16, num_classes=5), small_vgg(11, num_classes=10))


# ---------------------------------------------------------------- GoogLeNet


def tv_googlenet(**kw) -> nn.Module:
    return torchvision.models.googlenet(init_weights=True, **kw)


def test_googlenet_matches_torchvision() -> None:
    torch.manual_seed(0)
    ref = tv_googlenet(aux_logits=True)
    randomise_bn(ref)
    net = googlenet()
    assert [(k, v.shape) for k, v in net.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    assert n_params(net) == n_params(ref) == 13_004_888
    net.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    for transform_input in (False, True):  # True: what torchvision's builder sets with its ported weights
        net.transform_input = ref.transform_input = transform_input
        with torch.no_grad():
            out = net.eval()(x)
            assert isinstance(out, torch.Tensor)
            torch.testing.assert_close(out, ref.eval()(x))
            torch.manual_seed(1)
            ours = net.train()(x)
            torch.manual_seed(1)
            theirs = ref.train()(x)  # torchvision orders them (logits, aux_logits2, aux_logits1)
        assert isinstance(ours, GoogLeNetOutputs)
        torch.testing.assert_close(tuple(ours), (theirs.logits, theirs.aux_logits1, theirs.aux_logits2))


def test_googlenet_without_aux_heads_matches_torchvision() -> None:
    with torch.device("meta"):
        net, ref = googlenet(aux_logits=False), tv_googlenet(aux_logits=False)
    assert [(k, v.shape) for k, v in net.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    assert n_params(net) == 6_624_904  # torchvision's model card
    net = googlenet(aux_logits=False).train()
    assert isinstance(net(torch.randn(2, 3, 32, 32)), torch.Tensor)  # nothing auxiliary to return


def test_googlenet_aux_heads_run_only_in_training() -> None:
    torch.manual_seed(0)
    net = googlenet(num_classes=5)
    calls = []
    for head in (net.aux1, net.aux2):
        head.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    x = torch.randn(2, 3, 32, 32)
    out = net.train()(x)
    assert isinstance(out, GoogLeNetOutputs) and [o.shape for o in out] == [(2, 5)] * 3
    assert calls == [(2, 5), (2, 5)]
    calls.clear()
    with torch.no_grad():
        assert net.eval()(x).shape == (2, 5)
    assert calls == []
    assert net.aux1.fc1.in_features == 128 * 4 * 4 and net.aux1.dropout.p == 0.7 and net.dropout.p == 0.2


def test_googlenet_interface() -> None:
    torch.manual_seed(0)
    net = googlenet(num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = net.forward_features(x)
        assert feats.shape == (2, 1024, 1, 1) and net.num_features == 1024
        pre = net.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, 1024)
        torch.testing.assert_close(net.forward_head(feats), net(x))
        net.reset_classifier(3)
        assert net.fc.out_features == net.aux1.fc2.out_features == net.aux2.fc2.out_features == 3
        net.reset_classifier(0)
        assert net.num_classes == 0 and net.aux1 is None and net.aux2 is None
        torch.testing.assert_close(net(x), pre)
    out = net.train()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1024)  # no auxiliary heads left to return


def test_googlenet_paper_variant() -> None:
    torch.manual_seed(0)
    net = GoogLeNet(variant="paper")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in net.modules()) == 2
    assert net.inception3a.branch3[1].conv.kernel_size == (5, 5)  # a real 5x5 branch
    assert net.maxpool4.kernel_size == 3 and net.dropout.p == 0.4
    assert isinstance(net.aux1.pool, nn.AvgPool2d) and net.aux1.pool.kernel_size == 5 and net.aux1.pool.stride == 3
    assert torch.allclose(net.conv1.conv.bias, torch.tensor(0.2)) and bool((net.fc.bias == 0).all())
    assert n_params(GoogLeNet(variant="paper", aux_logits=False)) == 6_998_552
    with torch.no_grad():
        out = net.train()(torch.randn(1, 3, 224, 224))  # the paper's 5x5/3 aux pool needs 224 inputs
    assert [o.shape for o in out] == [(1, 1000)] * 3


# ---------------------------------------------------------------- auxiliary losses in the classifier task


def _tiny_googlenet() -> nn.Module:
    torch.manual_seed(0)
    return googlenet(num_classes=5, dropout=0.0, dropout_aux=0.0)  # deterministic training-mode outputs


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 4])


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


def test_training_step_weights_main_and_auxiliary_losses() -> None:
    weight = 0.3
    net = _tiny_googlenet()
    images, targets = _batch()
    with torch.no_grad():
        logits, aux1, aux2 = net.train()(images)
    main, a1, a2 = (F.cross_entropy(o, targets) for o in (logits, aux1, aux2))
    assert not torch.allclose(a1, main) and not torch.allclose(a2, main)  # distinct heads: weights are identifiable
    task = ImageClassifier(net, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))  # default aux_loss_weight: 0.3
    trainer = _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(task, DataLoader(TensorDataset(images, targets), batch_size=4))
    logged = trainer.callback_metrics
    assert float(logged["train/loss"]) == pytest.approx(float(main + weight * (a1 + a2)), rel=1e-5)
    assert float(logged["train/aux_loss"]) == pytest.approx(float(a1 + a2), rel=1e-5)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_aux_loss_weight_is_configurable_and_trains_the_auxiliary_heads() -> None:
    net = _tiny_googlenet().train()
    images, targets = _batch()
    with torch.no_grad():
        main, a1, a2 = (F.cross_entropy(o, targets) for o in net(images))
    loss = ImageClassifier(net, aux_loss_weight=1.0).training_step((images, targets), 0)
    assert float(loss.detach()) == pytest.approx(float(main + a1 + a2), rel=1e-5)
    loss.backward()
    for head in (net.aux1, net.aux2):
        assert head.fc2.weight.grad is not None and head.fc2.weight.grad.abs().sum() > 0


def test_evaluation_scores_the_main_head_only() -> None:
    net = _tiny_googlenet()
    calls = []
    for head in (net.aux1, net.aux2):
        head.register_forward_hook(lambda m, i, o: calls.append(1))
    images, targets = _batch()
    metrics = _trainer().validate(ImageClassifier(net), DataLoader(TensorDataset(images, targets), batch_size=4))[0]
    with torch.no_grad():
        expected = F.cross_entropy(net.eval()(images), targets)
    assert calls == []
    assert metrics["val/loss"] == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return torch.from_numpy(load_sample_images().images[0].copy()).permute(2, 0, 1).contiguous()  # (3, 427, 640)


def test_vgg_scale_jittering_range(photo: torch.Tensor) -> None:
    shortest = T.vgg_train().transforms[0]
    assert isinstance(shortest, v2.RandomShortestSize) and list(shortest.min_size) == list(range(256, 513))
    small = T.vgg_train(crop_size=8, scale_range=(10, 20)).transforms[0]
    sizes = {small(torch.zeros(3, 4, 6, dtype=torch.uint8)).shape[1] for _ in range(300)}
    assert sizes == set(range(10, 21))
    out = T.vgg_train()(photo)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32


def test_googlenet_crop_sampling(photo: torch.Tensor) -> None:
    rrc = T.googlenet_train().transforms[0]
    assert isinstance(rrc, v2.RandomResizedCrop) and list(rrc.size) == [224, 224]
    assert rrc.scale == (0.08, 1.0) and rrc.ratio == pytest.approx((3 / 4, 4 / 3))
    assert T.googlenet_train()(photo).shape == (3, 224, 224)


def test_device_split_matches_per_image(photo: torch.Tensor) -> None:
    small = photo[:, ::8, ::8]  # (3, 54, 80)
    kw = {"crop_size": 24, "stats": T.DatasetStats.imagenet()}
    # GoogLeNet: no lighting, so both halves draw the same random numbers in the same order: identical crops.
    torch.manual_seed(0)
    a = torch.stack([T.googlenet_train(**kw)(small) for _ in range(50)])
    torch.manual_seed(0)
    worker, batch_aug = T.device_train_pipeline("googlenet", min_scale=0.08, **kw)
    shipped = torch.stack([worker(small) for _ in range(50)])
    assert shipped.dtype == torch.uint8
    torch.testing.assert_close(batch_aug(shipped), a, atol=1e-5, rtol=0)
    # VGG: lighting draws differ in order, so compare the distributions.
    per_image = T.vgg_train(scale_range=(28, 40), **kw)
    worker, batch_aug = T.device_train_pipeline("vgg", scale_range=(28, 40), **kw)
    assert batch_aug.lighting is not None  # the paper's RGB colour shift
    shipped = torch.stack([worker(small) for _ in range(400)])
    assert shipped.dtype == torch.uint8 and shipped.shape == (400, 3, 24, 24)
    a, b = torch.stack([per_image(small) for _ in range(400)]), batch_aug(shipped)
    assert torch.allclose(a.mean((0, 2, 3)), b.mean((0, 2, 3)), atol=0.05)
    assert torch.allclose(a.std((0, 2, 3)), b.std((0, 2, 3)), rtol=0.05)


def test_multi_scale_eval_views(photo: torch.Tensor) -> None:
    out = T.multi_scale_eval()(photo)
    assert out.shape == (6, 3, 224, 224)  # 3 scales x (centre + mirror)
    for i, q in enumerate((256, 384, 512)):
        torch.testing.assert_close(out[i], T.alexnet_eval(resize=q)(photo), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[3:], out[:3].flip(-1))
    grid = T.multi_scale_eval(scales=(256,), grid=5, flip=False)(photo)
    frame = T.alexnet_eval(crop_size=256, resize=256)(photo)  # 256 x 256 centre of the 256 x 383 frame
    assert grid.shape == (25, 3, 224, 224)
    wide = v2.functional.resize(photo, 256, antialias=True)  # (3, 256, 383): crops span all of it
    norm = T.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)
    torch.testing.assert_close(grid[0], norm(wide[:, :224, :224].float() / 255), atol=1e-5, rtol=0)
    torch.testing.assert_close(grid[24], norm(wide[:, -224:, -224:].float() / 255), atol=1e-5, rtol=0)
    torch.testing.assert_close(grid[12], frame[:, 16:240, 16:240], atol=1e-5, rtol=0)  # the centre crop
    with pytest.raises(ValueError):
        T.multi_scale_eval(scales=(200, 256))


def test_imagenet_datamodule_vgg_and_googlenet_pipelines(tmp_path) -> None:
    root = write_imagenet_folder(tmp_path / "imagenet", train_per_class=1, val_per_class=1)
    vgg = ImageNetDataModule(root, pipeline="vgg", num_workers=0, eval_scales=[256, 288], batch_size=2)
    assert vgg.scale_range == (256, 512)
    assert ImageNetDataModule(root, pipeline="resnet").scale_range == (256, 480)
    assert ImageNetDataModule(root, pipeline="googlenet").min_scale == 0.08
    assert ImageNetDataModule(root, pipeline="mae").min_scale == 0.2
    vgg.setup("fit")
    assert vgg.train_set.draft_size == 512 and vgg.val_set.draft_size == 288
    images, _ = next(iter(vgg.val_dataloader()))
    assert images.shape == (2, 4, 3, 224, 224)  # 2 scales x (centre + mirror), averaged by the classifier
    gl = ImageNetDataModule(root, pipeline="googlenet", num_workers=0, batch_size=2, gpu_augment=True)
    gl.setup("fit")
    assert gl.train_set[0][0].shape == (3, 224, 224) and gl.train_set[0][0].dtype == torch.uint8
    with pytest.raises(ValueError, match="eval_scales"):
        ImageNetDataModule(root, eval_scales=[256], ten_crop=True)
