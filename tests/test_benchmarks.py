"""The benchmark scripts run end to end at tiny sizes, so they cannot rot (real figures: benchmarks/README.md)."""

from __future__ import annotations

import functools
import math
import sys

import pytest
import torch
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # the scripts import each other as top-level modules
import nets_speed  # noqa: E402
import task_overhead  # noqa: E402


def test_raw_loop_and_trainer_run_the_same_number_of_steps(tmp_path):
    cpu = torch.device("cpu")
    loader = task_overhead.make_loader((1, 28, 28), batch=4, batches=2, device=cpu)  # 3 steps span 2 epochs
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    net = task_overhead.TinyMLP()
    raw_clock, lightning_clock = task_overhead.StepClock(1, 2, cpu), task_overhead.StepClock(1, 2, cpu)
    task_overhead.run_raw(net, sgd(net.parameters()), loader, raw_clock)
    task = task_overhead.ImageClassifier(task_overhead.TinyMLP(), optimizer=sgd)
    task_overhead.run_lightning(task, loader, lightning_clock, defaults=False, root=str(tmp_path))
    assert raw_clock.count == lightning_clock.count == 3
    assert task.trainer.global_step == 3
    assert raw_clock.seconds > 0 and lightning_clock.seconds > 0


def test_task_overhead_main_prints_every_variant(capsys):
    results = task_overhead.main(["--steps", "2", "--batch", "4", "--warmup", "1", "--repeats", "1", "--clock", "cpu"])
    assert set(results) == {"resnet20", "mlp"}
    for rates in results.values():
        assert len(rates) == 4  # raw, Lightning floor, bare Trainer, our callbacks + W&B
        assert all(math.isfinite(r) and r > 0 for r in rates.values())
    assert capsys.readouterr().out.count("ratio") == 6


def test_nets_speed_checks_the_pair_and_times_it(capsys):
    results = nets_speed.main(["--net", "resnet50", "--batch", "1", "--warmup", "0", "--repeats", "1"])
    r = results["resnet50"]
    assert r["params"] == 25_557_032  # torchvision's ResNet-50
    assert r["max_diff"] < 1e-5  # torchvision's weights loaded into ours give the same logits
    assert r["ours"] > 0 and r["reference"] > 0
    assert "ratio ours / reference" in capsys.readouterr().out


def test_nets_speed_refuses_pairs_of_different_sizes(monkeypatch):
    from lit_papers.nets.resnet import resnet18

    monkeypatch.setitem(nets_speed.PAIRS, "resnet50", ("mismatch", resnet18, nets_speed.torchvision.models.resnet50))
    with pytest.raises(SystemExit, match="parameters"):
        nets_speed.benchmark("resnet50", 1, torch.device("cpu"), False, False, False, 0, 1)


class _ConstantNet(torch.nn.Module):
    """Predicts class `self.choice` for every image (a callback flips it between epochs)."""

    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))  # something for the optimizer; its gradient is 0
        self.choice = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.one_hot(torch.full((len(x),), self.choice), 2).float()
        return logits + 0 * self.w


def test_train_accuracy_is_logged_once_per_epoch_and_reset(tmp_path):
    """The task-overhead fix logs `train/acc1` from `on_train_epoch_end`; it must still be each epoch's own accuracy."""
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    class Flip(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            pl_module.net.choice = trainer.current_epoch  # epoch 0 predicts class 0, epoch 1 class 1

    targets = torch.tensor([0, 0, 0, 1] * 2)  # 3/4 zeros: accuracy 0.75 in epoch 0, 0.25 in epoch 1 if reset
    loader = DataLoader(TensorDataset(torch.zeros(8, 1), targets), batch_size=4)
    task = task_overhead.ImageClassifier(_ConstantNet(), optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    trainer = L.Trainer(max_epochs=2, logger=CSVLogger(tmp_path), callbacks=[Flip()], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(task, loader)
    with open(trainer.logger.experiment.metrics_file_path) as f:
        acc = [float(row["train/acc1"]) for row in csv.DictReader(f) if row["train/acc1"]]
    assert acc == [0.75, 0.25]
