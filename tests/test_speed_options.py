"""GPU fast paths, checked on CPU: channels_last, torch.compile, bf16 autocast, fused optimizers, pinned memory, datasets
held on the device, the throughput/MFU callback and the MAC figures in the configs, and benchmarks/gpu_check.sh."""

from __future__ import annotations

import copy
import functools
import importlib
import os
import subprocess
import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import CONFIGS, REPO_ROOT
from fakedata import write_cifar_pickles, write_idx
from torch import nn

from lit_papers.callbacks.throughput import (
    Throughput,
    compute_dtype,
    forward_macs,
    peak_flops,
)
from lit_papers.data.cifar import CIFAR10DataModule
from lit_papers.data.digits import DigitsDataModule
from lit_papers.data.mnist import MNISTDataModule
from lit_papers.data.on_device import DeviceLoader
from lit_papers.nets.mae import mae_vit_micro_patch4_32
from lit_papers.nets.resnet import cifar_resnet20
from lit_papers.tasks.classification import ImageClassifier
from lit_papers.tasks.mae import MAEPretraining

SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4)


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**(defaults | kwargs))


# ---------------------------------------------------------------- channels_last, compile, precision


def test_channels_last_makes_activations_nhwc_and_keeps_outputs():
    torch.manual_seed(0)
    net = cifar_resnet20()
    reference = copy.deepcopy(net).eval()
    task = ImageClassifier(net, channels_last=True)
    task.eval()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    layouts = []
    hooks = [c.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last)))
             for c in convs]
    x = torch.randn(4, 3, 32, 32)  # a plain NCHW batch: the weights alone switch the layout
    torch.testing.assert_close(task(x), reference(x), atol=1e-4, rtol=1e-4)
    assert len(layouts) == len(convs) and all(layouts)
    for h in hooks:
        h.remove()
    # A checkpoint round trip keeps the values whatever the memory format.
    plain = ImageClassifier(cifar_resnet20())
    plain.load_state_dict(task.state_dict())
    torch.testing.assert_close(plain.eval()(x), reference(x), atol=1e-4, rtol=1e-4)


def _counting_compile(monkeypatch) -> list:
    """Make `torch.compile` use a backend that records each graph it is given and runs it eagerly (fast on CPU)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    torch._dynamo.reset()
    return graphs


def test_compile_happens_in_configure_model_and_keeps_parameter_names(monkeypatch, tmp_path):
    graphs = _counting_compile(monkeypatch)
    L.seed_everything(0)
    task = ImageClassifier(cifar_resnet20(), optimizer=SGD, compile=True)
    names = set(task.state_dict())
    assert task.net._compiled_call_impl is None  # nothing happens before the Trainer calls configure_model
    trainer = _trainer(default_root_dir=tmp_path, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=True)
    trainer.fit(task, DigitsDataModule(batch_size=16))
    assert task.net._compiled_call_impl is not None and len(graphs) >= 2  # a training graph and an eval graph
    assert set(task.state_dict()) == names and not any("_orig_mod" in k for k in names)
    ckpt = torch.load(trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path,
                      weights_only=False)
    fresh = ImageClassifier(cifar_resnet20())
    fresh.load_state_dict(ckpt["state_dict"])  # strict: same names as an uncompiled task
    torch._dynamo.reset()


@pytest.mark.slow  # inductor compiles C++ training and evaluation graphs on CPU: ~1-2 min on 2 cores
def test_inductor_compiled_net_matches_eager():
    torch.manual_seed(0)
    task = ImageClassifier(cifar_resnet20(), channels_last=True, compile=True)
    reference = copy.deepcopy(task.net)
    task.configure_model()
    images, targets = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    loss, expected = task.training_step((images, targets), 0), F.cross_entropy(reference(images), targets)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    (loss + expected).backward()
    grads = [torch.cat([p.grad.flatten() for p in net.parameters()]) for net in (task.net, reference)]
    assert (grads[0] - grads[1]).norm() < 1e-2 * grads[1].norm()  # reordered float32 reductions (BatchNorm), no more
    task.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(task(images), reference(images), atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


def test_mae_options_compile_and_channels_last(monkeypatch):
    graphs = _counting_compile(monkeypatch)
    torch.manual_seed(0)
    net = mae_vit_micro_patch4_32()
    reference = copy.deepcopy(net)
    task = MAEPretraining(net, channels_last=True, compile=True)
    assert net.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    task.configure_model()
    task.configure_model()  # Lightning calls it again for validate/test: compiles once
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    loss = task.training_step((images, torch.zeros(4)), 0)
    torch.manual_seed(1)
    expected, _, _ = reference(images, 0.75)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert len(graphs) >= 1 and set(task.state_dict()) == {f"net.{k}" for k in reference.state_dict()}
    torch._dynamo.reset()


def test_losses_and_log_probs_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    task = ImageClassifier(cifar_resnet20()).eval()
    images, targets = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        log_probs = task.validation_step((images, targets), 0)
        ten_crop = task.validation_step((images[:2, None].expand(2, 10, 3, 32, 32), targets[:2]), 0)
        probs = task.predict_step((images, targets), 0)
        logits = task.net(images)
    assert log_probs.dtype == ten_crop.dtype == probs.dtype == torch.float32
    # The log-softmax of the bf16 logits, computed in float32: exp sums to 1 to float32 accuracy, not bf16's 1e-2.
    torch.testing.assert_close(log_probs, logits.float().log_softmax(-1))
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(8), atol=1e-6, rtol=0)
    mae = MAEPretraining(mae_vit_micro_patch4_32())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mae.training_step(torch.randn(2, 3, 32, 32), 0).dtype == torch.float32


def test_bf16_mixed_fit_on_cpu_matches_float32_evaluation(tmp_path):
    L.seed_everything(0)
    task = ImageClassifier(cifar_resnet20(), optimizer=SGD, channels_last=True)
    data = DigitsDataModule(batch_size=32)
    trainer = _trainer(precision="bf16-mixed", limit_train_batches=4, limit_val_batches=2)
    trainer.fit(task, data)
    logged = float(trainer.callback_metrics["val/loss"])
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))
    # The same weights evaluated in float32: bf16 autocast changes the loss by bf16 rounding only.
    task.eval()
    with torch.no_grad():
        batches = [b for _, b in zip(range(2), data.val_dataloader())]
        losses = [F.cross_entropy(task(x), y, reduction="sum") for x, y in batches]
    fp32 = float(sum(losses)) / sum(len(y) for _, y in batches)
    assert logged == pytest.approx(fp32, rel=0.03)


# ---------------------------------------------------------------- fused optimizers, pinned memory


def test_fused_sgd_from_the_optimizer_config_matches_foreach():
    params = []
    for fused in (True, False):
        L.seed_everything(0)
        task = ImageClassifier(cifar_resnet20(), optimizer=functools.partial(SGD, fused=fused, foreach=not fused))
        trainer = _trainer(limit_train_batches=3, limit_val_batches=0)
        trainer.fit(task, DigitsDataModule(batch_size=16, augment=False))
        assert trainer.optimizers[0].defaults["fused"] is fused  # passed through build_optimizer untouched
        params.append(torch.cat([p.detach().flatten() for p in task.parameters()]))
    torch.testing.assert_close(params[0], params[1], atol=1e-5, rtol=1e-4)


def test_pin_memory_only_when_the_trainer_runs_on_cuda():
    data = DigitsDataModule(num_workers=0)
    data.setup("fit")
    assert data.train_dataloader().pin_memory is False  # no Trainer: CPU
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), global_rank=0,
                                   world_size=1)
    assert data.train_dataloader().pin_memory is True
    data.pin_memory = False  # an explicit choice wins
    assert data.train_dataloader().pin_memory is False


# ---------------------------------------------------------------- datasets on the device


def test_device_loader_shards_ranks_and_reshuffles_epochs():
    images, labels = torch.arange(10).view(10, 1, 1, 1), torch.arange(10)
    loaders = [DeviceLoader(images, labels, None, 2, shuffle=True, drop_last=True, seed=3, rank=r, world_size=2)
               for r in range(2)]
    assert [len(dl) for dl in loaders] == [2, 2]  # 5 samples per rank, last incomplete batch dropped
    orders = [list(dl.sampler) for dl in loaders]
    assert sorted(orders[0] + orders[1]) == list(range(10))  # disjoint shards covering the data
    first = [torch.cat([x.flatten() for x, _ in dl]).tolist() for dl in loaders]
    assert first == [orders[0][:4], orders[1][:4]]
    assert all(torch.equal(x.flatten(), y) for x, y in loaders[0])  # images and labels stay paired
    loaders[0].sampler.set_epoch(1)
    assert list(loaders[0].sampler) != orders[0]
    loaders[0].sampler.set_epoch(0)
    assert list(loaders[0].sampler) == orders[0]  # seeded: the same epoch gives the same order
    evaluation = [DeviceLoader(images[:9], labels[:9], None, 4, False, False, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([y for _, y in dl]).tolist() for dl in evaluation]
    assert seen == [[0, 2, 4, 6, 8], [1, 3, 5, 7]]  # in order, each sample once


def _cifar(root, on_device: bool) -> CIFAR10DataModule:
    data = CIFAR10DataModule(root, batch_size=8, num_workers=0, download=False, on_device=on_device)
    data.setup("fit")
    return data


def test_cifar_on_device_batches_follow_the_worker_pipeline(tmp_path):
    write_cifar_pickles(tmp_path)
    on_device, workers = _cifar(tmp_path, True), _cifar(tmp_path, False)
    assert isinstance(on_device.val_dataloader(), DeviceLoader)
    for (x, y), (x_ref, y_ref) in zip(on_device.val_dataloader(), workers.val_dataloader(), strict=True):
        torch.testing.assert_close(x, x_ref)  # evaluation: identical batches
        assert torch.equal(y, y_ref)
    # Training: each image is one of the 9x9 crops of the black-padded source image, or its mirror, normalised (what
    # the workers' RandomCrop(32, padding=4) + flip + normalisation give).
    torch.manual_seed(0)
    loader = on_device.train_dataloader()
    order = list(loader.sampler)
    eval_tf = workers.val_dataloader().dataset.transform
    offsets = set()
    for b, (x, y) in enumerate(loader):
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
        for i in range(len(x)):
            source = on_device.train_set.images[order[b * 8 + i]]
            assert y[i] == on_device.train_set.labels[order[b * 8 + i]]
            padded = eval_tf(F.pad(source, [4] * 4))  # (3, 40, 40)
            crops = {(top, left): padded[:, top:top + 32, left:left + 32] for top in range(9) for left in range(9)}
            matches = [(pos, flip) for pos, crop in crops.items() for flip in (False, True)
                       if torch.allclose(x[i], crop.flip(-1) if flip else crop)]
            assert len(matches) == 1
            offsets.add(matches[0])
    assert len(offsets) > 20  # the crops and flips are random per image


def test_mnist_on_device_evaluation_batches_equal_the_worker_ones(tmp_path):
    gen = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 20), ("t10k", 12)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=gen).numpy())
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", torch.randint(0, 10, (n,), generator=gen).numpy())
    batches = []
    for on_device in (True, False):
        data = MNISTDataModule(tmp_path, batch_size=5, download=False, normalize=True, on_device=on_device)
        data.setup("fit")
        batches.append(list(data.val_dataloader()))
        assert len(data.train_dataloader()) == 4
    for (x, y), (x_ref, y_ref) in zip(*batches, strict=True):
        assert x.shape[1:] == (1, 28, 28)
        torch.testing.assert_close(x, x_ref)
        assert torch.equal(y, y_ref)


class _FirstLabels(L.Callback):
    def __init__(self) -> None:
        self.labels = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.labels.append(batch[1].tolist())


def test_digits_on_device_fit_reshuffles_every_epoch():
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=32, on_device=True)
    record = _FirstLabels()
    trainer = _trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[record])
    trainer.fit(ImageClassifier(cifar_resnet20(), optimizer=SGD), data)
    assert isinstance(trainer.train_dataloader, DeviceLoader)
    assert len(trainer.train_dataloader) == len(data.train_set) // 32
    assert len(record.labels) == 2 and record.labels[0] != record.labels[1]
    assert float(trainer.callback_metrics["train/loss"]) > 0


# ---------------------------------------------------------------- throughput, MFU, MACs


class _SlowValidation(L.Callback):
    def on_validation_batch_end(self, *args, **kwargs) -> None:
        time.sleep(0.5)


class _EpochClock(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


def test_throughput_leaves_validation_out_and_computes_mfu():
    L.seed_everything(0)
    clock = _EpochClock()
    throughput = Throughput(macs_per_image=4e7, peak_flops=1e12)
    trainer = _trainer(limit_train_batches=3, limit_val_batches=2,
                       callbacks=[clock, throughput, _SlowValidation()])
    trainer.fit(ImageClassifier(cifar_resnet20(), optimizer=SGD), DigitsDataModule(batch_size=16, on_device=True))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["perf/epoch_time"] < clock.seconds - 0.9  # the 2 x 0.5 s of validation are not counted
    assert metrics["perf/images_per_sec"] * metrics["perf/epoch_time"] == pytest.approx(48, rel=1e-3)
    assert metrics["perf/mfu"] == pytest.approx(6 * 4e7 * metrics["perf/images_per_sec"] / 1e12, rel=1e-4)


def test_throughput_counts_all_ranks():
    logged = {}
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda name, value, **kw: logged.__setitem__(name, value))
    trainer = SimpleNamespace(world_size=4, precision="bf16-mixed")
    callback = Throughput(macs_per_image=1e9, peak_flops=1e12)
    callback.on_train_epoch_start(trainer, module)
    for i in range(3):
        callback.on_train_batch_end(trainer, module, None, (torch.zeros(10, 3, 2, 2), torch.zeros(10)), i)
    callback.on_train_epoch_end(trainer, module)
    assert logged["perf/images_per_sec"] == pytest.approx(30 * 4 / logged["perf/epoch_time"])
    assert logged["perf/mfu"] == pytest.approx(6e9 * logged["perf/images_per_sec"] / (1e12 * 4))


def test_peak_flops_follow_the_precision(monkeypatch):
    assert compute_dtype("bf16-mixed") is compute_dtype("bf16-true") is torch.bfloat16
    assert compute_dtype("16-mixed") is torch.float16 and compute_dtype("32-true") is torch.float32
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    cuda = torch.device("cuda", 0)
    gpus = (("NVIDIA H200", 989.4e12), ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA A100-SXM4-80GB", 312e12))
    for name, bf16 in gpus:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops(cuda, torch.bfloat16) == pytest.approx(bf16)  # dense tensor-core peaks, not 2:4 sparse
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert peak_flops(cuda, torch.float32) == pytest.approx(494.7e12)  # H200 with TF32 allowed
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert peak_flops(cuda, torch.float32) == pytest.approx(66.9e12)


def _configs_with_macs() -> list:
    found = []
    for path in CONFIGS:
        config = yaml.safe_load(path.read_text())
        for cb in config.get("trainer", {}).get("callbacks") or []:
            if cb["class_path"].endswith("Throughput") and cb.get("init_args", {}).get("macs_per_image"):
                found.append(pytest.param(path, float(cb["init_args"]["macs_per_image"]),
                                          id=str(path.relative_to(REPO_ROOT / "configs"))))
    return found


@pytest.mark.parametrize("config, macs", _configs_with_macs())
def test_config_macs_per_image_match_a_flop_counter(config, macs):
    cfg = yaml.safe_load(config.read_text())
    module, name = cfg["model"]["init_args"]["net"]["class_path"].rsplit(".", 1)
    data = cfg["data"]["init_args"]
    size = data.get("crop_size", 224) if "imagenet" in cfg["data"]["class_path"] else data.get("image_size", 32)
    with torch.device("meta"):  # no memory, no compute: VGG-16 costs nothing
        net = getattr(importlib.import_module(module), name)(**cfg["model"]["init_args"]["net"].get("init_args", {}))
        counted = forward_macs(net, torch.zeros(2, 3, size, size)) / 2  # train mode, as trained (GoogLeNet's aux heads)
    assert macs == pytest.approx(counted, rel=0.002)


def test_macs_of_the_classic_nets_match_published_figures():
    from lit_papers.nets.resnet import resnet50
    from lit_papers.nets.vgg import vgg16

    with torch.device("meta"):
        assert forward_macs(resnet50(), torch.zeros(1, 3, 224, 224)) == pytest.approx(4.09e9, rel=0.005)  # torchvision
        assert forward_macs(vgg16(), torch.zeros(1, 3, 224, 224)) == pytest.approx(15.47e9, rel=0.005)  # torchvision
        assert forward_macs(cifar_resnet20(), torch.zeros(1, 3, 32, 32)) == pytest.approx(40.8e6, rel=0.01)  # ~41M


# ---------------------------------------------------------------- benchmarks/gpu_check.sh

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_stops_with_a_message_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_DRY_RUN"} | {"PATH": "/usr/bin:/bin"}  # no nvidia-smi
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0 and "no NVIDIA GPU found" in run.stdout


@pytest.mark.slow  # ~2 min on 2 cores: four tiny two-epoch fits and two benchmarks
def test_gpu_check_dry_run_prints_every_figure(tmp_path):
    env = os.environ | {"GPU_CHECK_DRY_RUN": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if "images/s" in line]
    assert [line.split()[0] for line in lines] == ["ResNet-50", "MAE", "AlexNet", "CIFAR-10"]
    assert "FAILED" not in run.stdout
    # the task-overhead benchmark for both nets and the nets benchmark ran too
    assert run.stdout.count("ImageClassifier, bare Trainer") == 2 and "ratio ours / reference" in run.stdout
