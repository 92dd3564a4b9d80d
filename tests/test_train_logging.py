"""`Task.log_train_step`: per-batch training values reach the loggers as means over the batches since the last write,
with `self.log` called only on the batches Lightning writes and at each epoch's end."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lit_papers.tasks.base import Task


class BatchValueLogger(Task):
    """Logs each batch's value `x` (the global batch index here) with `weight` w; trains one dummy parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.log_calls = 0

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, w = batch
        self.log_train_step("train/x", x.sum(), weight=w.sum())
        return (self.w - 1) ** 2

    def log(self, *args, **kwargs) -> None:
        self.log_calls += 1
        super().log(*args, **kwargs)

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)


def fit(tmp_path, values, weights=None, **trainer_kwargs):
    weights = torch.ones(len(values)) if weights is None else torch.tensor(weights, dtype=torch.float)
    loader = DataLoader(TensorDataset(torch.tensor(values, dtype=torch.float), weights), batch_size=1)
    task = BatchValueLogger()
    trainer = L.Trainer(logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, **trainer_kwargs)
    trainer.fit(task, loader)
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = [(int(r["step"]), float(r["train/x"])) for r in csv.DictReader(f) if r.get("train/x")]
    return task, trainer, rows


def test_written_values_are_window_means_and_log_runs_only_when_needed(tmp_path):
    # 2 epochs of 7 batches (values 0..6 each epoch); the loggers write every 3rd batch: global batches 2, 5, 8, 11.
    task, trainer, rows = fit(tmp_path, list(range(7)), max_epochs=2, log_every_n_steps=3)
    # windows: {0,1,2}, {3,4,5}, {6 | 0,1} across the epoch boundary, {2,3,4}
    assert rows == [(2, 1.0), (5, 4.0), (8, pytest.approx(7 / 3)), (11, 3.0)]
    assert float(trainer.callback_metrics["train/x"]) == pytest.approx(5.5)  # the open window at the end: {5, 6}
    assert task.log_calls == 4 + 2  # the 4 written batches and the 2 epoch ends, not all 14 batches


def test_gradient_accumulation_writes_the_mean_over_the_micro_batches(tmp_path):
    _, _, rows = fit(tmp_path, [1.0, 2.0, 3.0, 5.0], max_epochs=1, log_every_n_steps=1, accumulate_grad_batches=2)
    assert rows == [(0, 1.5), (1, 4.0)]  # one write per optimizer step, each over its two micro-batches


def test_weights_make_a_weighted_mean(tmp_path):
    # As the Transformer logs its loss per token, weighted by the batch's token count.
    _, _, rows = fit(tmp_path, [2.0, 12.0], weights=[1, 3], max_epochs=1, log_every_n_steps=2)
    assert rows == [(1, pytest.approx((2.0 * 1 + 12.0 * 3) / 4))]
