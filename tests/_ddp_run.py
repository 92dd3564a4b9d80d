"""Training runs for `tests/test_ddp.py` (not collected by pytest): the classifier, MAE and GAN tasks on the digits,
and a classifier whose rank 1 meets a NaN loss.

Run by the test as two processes started like `torchrun` starts them (MASTER_ADDR/PORT, WORLD_SIZE, RANK, LOCAL_RANK
in the environment, so Lightning's DDP launches nothing itself):

    python tests/_ddp_run.py OUT_DIR classifier mae gan nan_skip nan_stop

Each rank writes `OUT_DIR/<scenario>.rank<r>.json`. The test calls the same functions with `world_size=1` in its own
process for the single-process references, at the same global batch.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lit_papers.data.digits import DigitsDataModule
from lit_papers.nets.gan import MLPDiscriminator, MLPGenerator
from lit_papers.nets.mae import mae_vit_micro_patch4_32
from lit_papers.tasks.base import NonFiniteLossError
from lit_papers.tasks.classification import ImageClassifier
from lit_papers.tasks.gan import GAN
from lit_papers.tasks.mae import MAEPretraining

GLOBAL_BATCH = 16  # 8 per rank under DDP, 16 in one process
VAL_FRACTION = 0.105  # 189 validation digits: odd, so a padding DistributedSampler would repeat one
SEED = 0


class Digits(DigitsDataModule):
    """The digits at `GLOBAL_BATCH // world_size` per process. In one process, the training order is that of
    Lightning's DistributedSampler with the same seed, so batch j holds exactly the samples that the DDP ranks' batches
    j hold together and the two runs can be compared step for step."""

    def __init__(self, world_size: int, image_size: int = 8, normalize: bool = True) -> None:
        super().__init__(val_fraction=VAL_FRACTION, image_size=image_size, augment=False, normalize=normalize,
                         batch_size=GLOBAL_BATCH // world_size, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        if self.trainer.world_size > 1:
            return super().train_dataloader()  # Lightning replaces its sampler with a DistributedSampler
        sampler = DistributedSampler(self.train_set, num_replicas=1, rank=0, shuffle=True, seed=SEED)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True)


class Record(L.Callback):
    """What the test compares: this rank's first training batch (dataset indices), the validation samples it scored,
    the final metrics and parameters."""

    def __init__(self) -> None:
        self.result: dict = {"val_samples": 0}

    def on_train_start(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        indices = list(iter(loader.sampler))[: loader.batch_size]
        # A draw from the global stream (the classifier run uses no randomness in training, so it changes nothing).
        self.result |= {"first_batch": indices, "sampler": type(loader.sampler).__name__, "draw": torch.rand(4).tolist()}

    def on_validation_batch_end(self, trainer, task, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.result["val_samples"] += len(batch[0])

    def on_train_end(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        self.result |= {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "skipped_steps": getattr(task, "skipped_steps", 0),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "params": torch.cat([p.detach().flatten() for p in task.parameters()]).tolist(),
        }


def trainer(world_size: int, record: Record, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=world_size, strategy="ddp" if world_size > 1 else "auto", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[record], **kwargs,
    )


class MLP(nn.Module):
    def __init__(self, in_features: int = 3 * 8 * 8, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def classifier(world_size: int) -> dict:
    """One epoch of an MLP on the digits (100 steps), then validation."""
    L.seed_everything(SEED)
    task = ImageClassifier(MLP(), optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    record = Record()
    trainer(world_size, record, max_epochs=1).fit(task, datamodule=Digits(world_size))
    return record.result


def mae(world_size: int) -> dict:
    """20 steps of the micro MAE on the 32 x 32 digits, then validation."""
    L.seed_everything(SEED)
    task = MAEPretraining(mae_vit_micro_patch4_32(norm_pix_loss=False), base_lr=0.016, log_images_every_n_epochs=0)
    record = Record()
    data = Digits(world_size, image_size=32)
    trainer(world_size, record, max_epochs=1, limit_train_batches=20).fit(task, datamodule=data)
    return record.result


def gan(world_size: int) -> dict:
    """40 iterations (a D and a G step each) of a small MLP GAN on the 8 x 8 digits, then validation."""
    L.seed_everything(SEED)
    generator = MLPGenerator(latent_dim=16, hidden_dims=(64,), sample_shape=(3, 8, 8), output="sigmoid")
    adam = functools.partial(torch.optim.Adam, lr=2e-3, betas=(0.5, 0.999))
    task = GAN(generator, MLPDiscriminator((3, 8, 8), (64,)), adam, adam, latent_dim=16, num_fixed_samples=4)
    record = Record()
    trainer(world_size, record, max_epochs=1, limit_train_batches=40).fit(
        task, datamodule=Digits(world_size, normalize=False))
    return record.result


NAN_STEP = 2  # the NaN image is the second sample of rank 1's third batch


class StepParams(L.Callback):
    """The parameters before every training batch."""

    def __init__(self) -> None:
        self.before: list[list[float]] = []

    def on_train_batch_start(self, trainer, task, batch, batch_idx) -> None:
        self.before.append(torch.cat([p.detach().flatten() for p in task.parameters()]).tolist())


def nan_run(world_size: int, policy: str) -> dict:
    """A classifier whose data hold one NaN image, in rank 1's shard at step `NAN_STEP`."""
    L.seed_everything(SEED)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 8, 8, generator=g), torch.randint(10, (48,), generator=g)
    # Lightning shuffles every training set under DDP, with this sampler: find rank 1's sample at step NAN_STEP.
    rank1_order = list(DistributedSampler(range(len(x)), num_replicas=2, rank=1, shuffle=True, seed=SEED))
    x[rank1_order[4 * NAN_STEP + 1]] = float("nan")
    task = ImageClassifier(MLP(), optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                           nonfinite_loss=policy)
    record, steps = Record(), StepParams()
    fit = trainer(world_size, record, max_epochs=1)
    fit.callbacks.append(steps)
    try:
        fit.fit(task, DataLoader(TensorDataset(x, y), batch_size=8 // world_size))
    except NonFiniteLossError as error:
        return {"rank": fit.global_rank, "error": str(error), "steps_done": len(steps.before)}
    return record.result | {"before": steps.before}


SCENARIOS = {
    "classifier": classifier,
    "mae": mae,
    "gan": gan,
    "nan_skip": functools.partial(nan_run, policy="skip"),
    "nan_stop": functools.partial(nan_run, policy="stop"),  # last: a raising fit tears the process group down
}


def main(out_dir: Path, scenarios: list[str]) -> None:
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    for name in scenarios:
        start = time.perf_counter()
        result = SCENARIOS[name](world_size) | {"seconds": time.perf_counter() - start}
        (out_dir / f"{name}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
