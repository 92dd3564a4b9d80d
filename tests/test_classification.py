"""ImageClassifier's loss, metrics, multi-crop evaluation and schedules, checked against hand computations."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_papers.optim import WarmupMultiStepLR
from lit_papers.tasks.classification import ImageClassifier


class LinearNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_features: int = 3 * 8 * 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _loader(n: int = 32, num_classes: int = 10, crops: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    shape = (n, crops, 3, 8, 8) if crops else (n, 3, 8, 8)
    return DataLoader(TensorDataset(torch.randn(shape, generator=g), torch.randint(num_classes, (n,), generator=g)), batch_size=8)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_ten_crop_evaluation_averages_softmax_over_crops():
    torch.manual_seed(0)
    task = ImageClassifier(LinearNet())
    loader = _loader(crops=10)
    metrics = _trainer().validate(task, loader)[0]
    images, targets = loader.dataset.tensors
    with torch.no_grad():
        probs = task.net(images.flatten(0, 1)).softmax(-1).view(32, 10, -1).mean(1)  # (B, classes)
    expected_loss = F.nll_loss(probs.log(), targets)
    expected_acc = (probs.argmax(-1) == targets).float().mean()
    assert metrics["val/loss"] == pytest.approx(float(expected_loss), rel=1e-4)
    assert metrics["val/acc1"] == pytest.approx(float(expected_acc))


def test_top5_only_with_at_least_five_classes():
    task = ImageClassifier(LinearNet(num_classes=3))
    metrics = _trainer().validate(task, _loader(num_classes=3))[0]
    assert "val/acc1" in metrics and "val/acc5" not in metrics
    metrics = _trainer().test(ImageClassifier(LinearNet()), _loader())[0]
    assert {"test/loss", "test/acc1", "test/acc5"} <= set(metrics)


def test_label_smoothing_changes_the_training_loss():
    torch.manual_seed(0)
    net = LinearNet()
    batch = next(iter(_loader()))
    with torch.no_grad():
        plain = ImageClassifier(net).training_step(batch, 0)
        smooth = ImageClassifier(net, label_smoothing=0.1).training_step(batch, 0)
        logits = net(batch[0])
    assert float(smooth) == pytest.approx(float(F.cross_entropy(logits, batch[1], label_smoothing=0.1)))
    assert float(plain) != pytest.approx(float(smooth))


def test_step_interval_scheduler_steps_every_iteration():
    task = ImageClassifier(
        LinearNet(),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=functools.partial(WarmupMultiStepLR, milestones=[6], warmup_steps=2, warmup_factor=0.1),
        scheduler_interval="step",
    )
    _trainer(max_steps=8).fit(task, _loader())  # 4 batches per epoch
    assert task.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.1)  # past the milestone at step 6


def test_reduce_on_plateau_watches_the_monitored_metric():
    from lightning.pytorch.cli import ReduceLROnPlateau

    task = ImageClassifier(
        LinearNet(),
        optimizer=functools.partial(torch.optim.SGD, lr=1e-12),  # too small to move val/acc1: it plateaus at once
        lr_scheduler=functools.partial(ReduceLROnPlateau, monitor="val/acc1", mode="max", patience=0, factor=0.1),
        monitor="val/acc1",
    )
    trainer = _trainer(max_epochs=3)
    trainer.fit(task, _loader(), _loader())
    # epoch 0 sets the best val/acc1; epochs 1 and 2 do not improve on it, and patience 0 cuts the lr after each
    assert task.optimizers().param_groups[0]["lr"] == pytest.approx(1e-14, rel=1e-6)


def test_warmup_multistep_matches_the_resnet_recipe():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = WarmupMultiStepLR(opt, milestones=[32000, 48000], warmup_steps=400, warmup_factor=0.1)
    factors = [sched.factor(s) for s in (0, 399, 400, 31999, 32000, 47999, 48000)]
    assert factors == pytest.approx([0.1, 0.1, 1.0, 1.0, 0.1, 0.1, 0.01])


def test_net_without_num_classes_is_rejected_with_a_clear_error():
    with pytest.raises(TypeError, match="num_classes"):
        ImageClassifier(nn.Linear(4, 2))


def test_python_built_task_checkpoint_loads_with_the_net_passed_again(tmp_path):
    task = ImageClassifier(LinearNet())
    trainer = _trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(task, _loader())
    trainer.save_checkpoint(tmp_path / "task.ckpt")
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "task.ckpt", net=LinearNet())
    torch.testing.assert_close(restored.net.fc.weight, task.net.fc.weight)
