"""Exact resume: a run stopped after epoch 1 and resumed to epoch 3 ends bitwise equal to an uninterrupted 3-epoch run.

Every run goes through `lit_papers.cli.main([...])` as a user's would, with `deterministic: true` and a seed, on CPU.
Both tasks draw random numbers in training: random crops and MixUp (classifier), noise and dropout (GAN).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import tiny_configs as tiny
import torch
from run_state import assert_bitwise_equal, training_state
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lit_papers.callbacks.resume import ResumeState
from lit_papers.cli import main

# The GAN draws noise and dropout in training.
GAN = """
model:
  class_path: lit_papers.tasks.gan.GAN
  init_args:
    generator:
      class_path: lit_papers.nets.gan.MLPGenerator
      init_args: {latent_dim: 8, hidden_dims: [32], sample_shape: [3, 8, 8]}
    discriminator:
      class_path: lit_papers.nets.gan.MaxoutDiscriminator
      init_args: {sample_shape: [3, 8, 8], hidden_dim: 16, num_pieces: 2, input_dropout: 0.2, dropout: 0.5}
    g_optimizer:
      class_path: torch.optim.Adam
      init_args: {lr: 0.001, betas: [0.5, 0.999]}
    d_optimizer:
      class_path: torch.optim.SGD
      init_args: {lr: 0.05, momentum: 0.5}
    g_lr_scheduler:
      class_path: torch.optim.lr_scheduler.StepLR
      init_args: {step_size: 1, gamma: 0.5}
    d_lr_scheduler:
      class_path: torch.optim.lr_scheduler.ExponentialLR
      init_args: {gamma: 0.9}
    num_fixed_samples: 4
data:
  class_path: lit_papers.data.digits.DigitsDataModule
  init_args: {image_size: 8, augment: true, normalize: false, batch_size: 16, num_workers: 0}
"""


def fit(config: Path, root: str, *args: str):
    return main(["fit", "--config", str(config), f"--trainer.default_root_dir={root}", *args])


def count_tensors(state) -> int:
    if isinstance(state, torch.Tensor):
        return 1
    if isinstance(state, dict):
        return sum(count_tensors(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(count_tensors(v) for v in state)
    return 0


@pytest.mark.parametrize("resume_from", ["last", "path"])
@pytest.mark.parametrize("task", ["classifier", "gan"])
def test_resumed_run_matches_uninterrupted_run_bitwise(tmp_path, task, resume_from):
    config = tiny.write(tiny.config(tiny.CLASSIFIER if task == "classifier" else GAN), tmp_path / f"{task}.yaml")
    expected = training_state(fit(config, "whole"))
    assert expected["epoch"] == 3 and expected["global_step"] == (12 if task == "classifier" else 24)

    first = fit(config, "parts", "--trainer.max_epochs=1")
    assert first.trainer.current_epoch == 1
    ckpt = first.trainer.checkpoint_callback.last_model_path
    resumed = fit(config, "parts", f"--ckpt_path={'last' if resume_from == 'last' else ckpt}")
    actual = training_state(resumed)

    assert_bitwise_equal(actual, expected)
    # Both optimizers and both schedulers for the GAN; momentum/Adam buffers, not only the weights.
    n_opt = 2 if task == "gan" else 1
    assert len(actual["optimizers"]) == n_opt and len(actual["schedulers"]) == n_opt
    assert count_tensors(actual["optimizers"]) > count_tensors(actual["model"]) // 2
    assert [config.scheduler.last_epoch for config in resumed.trainer.lr_scheduler_configs] == [3] * n_opt


def test_resume_without_saved_random_streams_diverges(tmp_path):
    """The check above can fail: without the RNG states in the checkpoint the resumed run draws other crops/MixUp."""
    config = tiny.write(tiny.config(), tmp_path / "classifier.yaml")
    expected = training_state(fit(config, "whole", "--trainer.max_epochs=2"))
    first = fit(config, "parts", "--trainer.max_epochs=1")
    ckpt = first.trainer.checkpoint_callback.last_model_path
    checkpoint = torch.load(ckpt, weights_only=True)
    assert "rng" in checkpoint["callbacks"]["ResumeState"], "the RNG states are saved"
    del checkpoint["callbacks"]["ResumeState"]
    torch.save(checkpoint, ckpt)
    actual = training_state(fit(config, "parts", "--trainer.max_epochs=2", f"--ckpt_path={ckpt}"))
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_bitwise_equal(actual["model"], expected["model"])


def test_checkpoint_holds_the_loader_streams_and_loads_weights_only(tmp_path):
    config = tiny.write(tiny.config(), tmp_path / "classifier.yaml")
    cli = fit(config, "run", "--trainer.max_epochs=1")
    checkpoint = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)
    streams = checkpoint["DigitsDataModule"]
    assert torch.equal(streams["shuffle_generator"], cli.datamodule.shuffle_generator.get_state())
    assert not torch.equal(streams["shuffle_generator"], torch.Generator().manual_seed(0).get_state()), "it advanced"
    assert set(checkpoint["callbacks"]["ResumeState"]["rng"]) >= {"torch", "numpy", "python"}


class EpochOrder(L.LightningModule):
    """Records the samples of every training batch; its loader shuffles by epoch (a one-replica DistributedSampler,
    as under DDP and in the translation DataModules) with worker processes."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.batches: dict[int, list[list[int]]] = {}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.batches.setdefault(self.current_epoch, []).append(batch[0].flatten().tolist())
        return self.layer(batch[0].float()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(torch.arange(32).view(-1, 1))
        sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
        return DataLoader(data, batch_size=8, sampler=sampler, num_workers=2)


def test_resumed_epoch_keeps_its_shuffle_order_with_workers(tmp_path):
    """Lightning 2.6 alone replays epoch 0's order in the first resumed epoch when the loader has workers (#21938)."""

    def run(root: str, max_epochs: int, ckpt: str | None = None) -> tuple[EpochOrder, L.Trainer]:
        task = EpochOrder()
        trainer = L.Trainer(max_epochs=max_epochs, default_root_dir=root, callbacks=[ResumeState()], logger=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(task, ckpt_path=ckpt)
        return task, trainer

    whole, _ = run("whole", 2)
    _, first = run("parts", 1)
    resumed, _ = run("parts", 2, first.checkpoint_callback.last_model_path or first.checkpoint_callback.best_model_path)
    assert whole.batches[0] != whole.batches[1], "epochs are shuffled differently"
    assert resumed.batches[1] == whole.batches[1]
