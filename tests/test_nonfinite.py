"""The non-finite loss policy of every task (`lit_papers.tasks.base.Task`): "stop" names the step and the loss,
"skip" leaves parameters, optimizer state and buffers bitwise as they were and counts the skip. The two-process DDP
case is in `tests/test_ddp.py`."""

from __future__ import annotations

import copy
import functools
import sys

import lightning as L
import pytest
import torch
from conftest import REPO_ROOT
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_papers.cli import console_main
from lit_papers.nets.gan import MLPDiscriminator, MLPGenerator
from lit_papers.tasks.base import NonFiniteLossError
from lit_papers.tasks.classification import ImageClassifier
from lit_papers.tasks.gan import GAN

BATCH, NUM_BATCHES, BAD_BATCH = 4, 6, 2


class BNNet(nn.Module):
    """Linear -> BatchNorm -> Linear: a NaN input batch would poison the BatchNorm running statistics."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def nan_batches() -> DataLoader:
    """`NUM_BATCHES` batches in order; batch `BAD_BATCH` holds a NaN image, so its loss is NaN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_BATCHES * BATCH, 8, generator=g)
    x[BAD_BATCH * BATCH] = float("nan")
    return DataLoader(TensorDataset(x, torch.randint(3, (len(x),), generator=g)), batch_size=BATCH)


class Snapshots(L.Callback):
    """The task's state dict (parameters and buffers) and the optimizers' states before each batch and at the end."""

    def __init__(self) -> None:
        self.before: list[tuple[dict, list[dict]]] = []

    def _take(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        self.before.append(copy.deepcopy((task.state_dict(), [o.state_dict() for o in trainer.optimizers])))

    def on_train_batch_start(self, trainer, task, batch, batch_idx) -> None:
        self._take(trainer, task)

    def on_train_end(self, trainer, task) -> None:
        self._take(trainer, task)


def fit(task: L.LightningModule, data: DataLoader, snapshots: Snapshots | None = None, **kwargs) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[snapshots or Snapshots()],
                        **kwargs)
    trainer.fit(task, data)
    return trainer


def assert_same(a, b) -> None:
    """Bitwise equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())
    else:
        assert a == b


def classifier(policy: str) -> ImageClassifier:
    torch.manual_seed(0)
    # Momentum and weight decay: a skipped step that still ran the optimizer would move the weights anyway.
    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.1)
    return ImageClassifier(BNNet(), optimizer=sgd, nonfinite_loss=policy)


def test_stop_names_the_step_and_the_loss_before_touching_the_weights():
    task, snapshots = classifier("stop"), Snapshots()
    with pytest.raises(NonFiniteLossError, match=rf"^loss nan at global step {BAD_BATCH} \(epoch 0\)") as error:
        fit(task, nan_batches(), snapshots)
    assert "nonfinite_loss: skip" in str(error.value)
    weights = {k: v for k, v in task.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert_same(weights, {k: snapshots.before[BAD_BATCH][0][k] for k in weights})  # as before the bad batch


@pytest.mark.parametrize("accumulate", [1, 2])
def test_skip_leaves_weights_optimizer_state_and_buffers_bitwise_unchanged(accumulate):
    task, snapshots = classifier("skip"), Snapshots()
    trainer = fit(task, nan_batches(), snapshots, accumulate_grad_batches=accumulate)
    steps = NUM_BATCHES // accumulate
    first, after = BAD_BATCH - BAD_BATCH % accumulate, BAD_BATCH - BAD_BATCH % accumulate + accumulate
    assert task.skipped_steps == 1 and float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert trainer.global_step == steps  # the skipped step still counts, like AMP's skipped steps
    assert_same(snapshots.before[after], snapshots.before[first])  # params, BN statistics, momentum buffers
    for i in range(0, NUM_BATCHES, accumulate):  # every other step changed the weights
        if i != first:
            assert not torch.equal(snapshots.before[i][0]["net.body.1.weight"],
                                   snapshots.before[i + accumulate][0]["net.body.1.weight"])
    assert all(torch.isfinite(v).all() for v in task.state_dict().values())


def test_skip_count_survives_a_checkpoint(tmp_path):
    task = classifier("skip")
    trainer = fit(task, nan_batches())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "last.ckpt", net=BNNet())
    assert restored.skipped_steps == 1 and restored.nonfinite_loss == "skip"


class NaNOnCall(nn.Module):
    """Runs `net`, but returns NaN on its `bad_call`-th call in training mode."""

    def __init__(self, net: nn.Module, bad_call: int) -> None:
        super().__init__()
        self.net, self.bad_call, self.calls = net, bad_call, 0
        self.latent_dim = getattr(net, "latent_dim", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls - 1 == self.bad_call:
                out = out * float("nan")
        return out


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_gan_discriminator_step_with_nan_fakes(policy):
    torch.manual_seed(0)
    # Generator calls: batch 0 -> D step (0), G step (1); batch 1 -> D step (2): NaN fakes, so D's loss is NaN at
    # global step 2, while the G step after it draws new, finite fakes.
    generator = NaNOnCall(MLPGenerator(latent_dim=2, hidden_dims=(8,), sample_shape=(1,), output="sigmoid"), bad_call=2)
    adam = functools.partial(torch.optim.Adam, lr=1e-2)
    task = GAN(generator, MLPDiscriminator((1,), (8,)), adam, adam, latent_dim=2, num_fixed_samples=4,
               nonfinite_loss=policy)
    data = DataLoader(TensorDataset(torch.randn(12, 1)), batch_size=4)
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match=r"^loss nan at global step 2 \(epoch 0\)"):
            fit(task, data)
        return
    snapshots = Snapshots()
    trainer = fit(task, data, snapshots)
    assert task.skipped_steps == 1 and trainer.global_step == 6
    (before, (g_before, d_before)), (after, (g_after, d_after)) = snapshots.before[1], snapshots.before[2]
    assert_same({k: v for k, v in after.items() if k.startswith("discriminator")},
                {k: v for k, v in before.items() if k.startswith("discriminator")})
    assert_same(d_after, d_before)  # Adam's moments and step count
    assert g_after["state"][0]["step"] == g_before["state"][0]["step"] + 1  # G stepped as usual
    assert not torch.equal(after["generator.net.net.0.weight"], before["generator.net.net.0.weight"])


def test_cli_prints_one_line_and_exits_non_zero(monkeypatch, capsys):
    # An absurd learning rate makes the quickstart's loss NaN after the first step.
    args = ["lit-papers", "fit", "--config", str(REPO_ROOT / "configs" / "quickstart.yaml"),
            "--model.init_args.optimizer.init_args.lr=1e30", "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=.",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "lit-papers: error: loss nan at global step 1 (epoch 0)" in err and "Traceback" not in err
