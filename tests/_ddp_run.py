"""Runs for `tests/test_ddp.py` (not collected by pytest): the classifier, MAE and GAN tasks on the digits, the GAN's
k discriminator steps per generator step, a Transformer's validation, and a classifier whose rank 1 meets a NaN loss.

Run by the test as two processes started like `torchrun` starts them (MASTER_ADDR/PORT, WORLD_SIZE, RANK, LOCAL_RANK
in the environment, so Lightning's DDP launches nothing itself):

    python tests/_ddp_run.py OUT_DIR classifier gan_k_steps translation mae gan nan_skip nan_stop

Each rank writes `OUT_DIR/<scenario>.rank<r>.json`. The test calls the same functions with `world_size=1` in its own
process for the single-process references, at the same global batch.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lit_papers.data.digits import DigitsDataModule
from lit_papers.data.translation import ReverseDataModule
from lit_papers.metrics.parzen import parzen_estimate, select_sigma
from lit_papers.nets.gan import MLPDiscriminator, MLPGenerator
from lit_papers.nets.mae import mae_vit_micro_patch4_32
from lit_papers.nets.transformer import Transformer
from lit_papers.tasks.base import NonFiniteLossError
from lit_papers.tasks.classification import ImageClassifier
from lit_papers.tasks.gan import GAN
from lit_papers.tasks.mae import MAEPretraining
from lit_papers.tasks.translation import Translation

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


BatchMeans = Callable[[L.LightningModule, Any], dict[str, float]]


class Record(L.Callback):
    """What the test compares: this rank's first training batch (dataset indices), the validation samples it scored,
    the final metrics and parameters; with `batch_means`, also each validation batch's size and means, recomputed
    from the random numbers that its step drew (MAE's masks, the GAN's noise)."""

    def __init__(self, batch_means: BatchMeans | None = None) -> None:
        self.batch_means = batch_means
        self.result: dict = {"val_samples": 0, "val_batches": []}

    def on_train_start(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        indices = list(iter(loader.sampler))[: loader.batch_size]
        # A draw from the global stream (the classifier run uses no randomness in training, so it changes nothing).
        self.result |= {"first_batch": indices, "sampler": type(loader.sampler).__name__, "draw": torch.rand(4).tolist()}

    def on_validation_batch_start(self, trainer, task, batch, batch_idx, dataloader_idx=0) -> None:
        self.rng_before_step = torch.get_rng_state()

    def on_validation_batch_end(self, trainer, task, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.result["val_samples"] += len(batch[0])
        if self.batch_means is not None:
            rng_after_step = torch.get_rng_state()
            torch.set_rng_state(self.rng_before_step)  # draw the step's masks or noise again
            self.result["val_batches"].append({"size": len(batch[0]), **self.batch_means(task, batch)})
            torch.set_rng_state(rng_after_step)

    def on_train_end(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        self.result |= {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "skipped_steps": getattr(task, "skipped_steps", 0),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "params": torch.cat([p.detach().flatten() for p in task.parameters()]).tolist(),
        }


def trainer(world_size: int, *callbacks: L.Callback, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=world_size, strategy="ddp" if world_size > 1 else "auto", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=list(callbacks), **kwargs,
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


def mae_loss(task: MAEPretraining, batch) -> dict[str, float]:
    loss, _, _ = task(batch[0])
    return {"val/loss": float(loss)}


def mae(world_size: int) -> dict:
    """20 steps of the micro MAE on the 32 x 32 digits, then validation."""
    L.seed_everything(SEED)
    task = MAEPretraining(mae_vit_micro_patch4_32(norm_pix_loss=False), base_lr=0.016, log_images_every_n_epochs=0)
    record = Record(batch_means=mae_loss)
    data = Digits(world_size, image_size=32)
    trainer(world_size, record, max_epochs=1, limit_train_batches=20).fit(task, datamodule=data)
    return record.result


def gan_outputs(task: GAN, batch) -> dict[str, float]:
    real = batch[0]
    return {"val/d_real": float(task.discriminate(real).mean()),
            "val/d_fake": float(task.discriminate(task.sample(len(real))).mean())}


def parzen_in_one_process(task: GAN, data: DigitsDataModule) -> dict[str, float]:
    """The Parzen protocol of `GAN` on the whole validation set in dataset order, computed here in one process."""
    images = data.val_set.images.flatten(1)  # the validation images as the loader yields them (normalize=False)
    n_select = min(task.parzen_select_size, len(images) // 2)
    samples = task.eval().parzen_reference_samples()
    sigma = select_sigma(images[:n_select], samples, task.parzen_sigmas)
    result = parzen_estimate(images[n_select:], samples, sigma)
    return {"val/parzen_ll": result.mean, "val/parzen_stderr": result.stderr, "val/parzen_sigma": result.sigma}


def gan(world_size: int) -> dict:
    """40 iterations (a D and a G step each) of a small MLP GAN on the 8 x 8 digits, then validation."""
    L.seed_everything(SEED)
    generator = MLPGenerator(latent_dim=16, hidden_dims=(64,), sample_shape=(3, 8, 8), output="sigmoid")
    adam = functools.partial(torch.optim.Adam, lr=2e-3, betas=(0.5, 0.999))
    task = GAN(generator, MLPDiscriminator((3, 8, 8), (64,)), adam, adam, latent_dim=16, num_fixed_samples=4,
               parzen_samples=500, parzen_select_size=60)
    record, data = Record(batch_means=gan_outputs), Digits(world_size, normalize=False)
    trainer(world_size, record, max_epochs=1, limit_train_batches=40).fit(task, datamodule=data)
    return record.result | {"parzen_one_process": parzen_in_one_process(task, data)}


class Recorder(nn.Module):
    """Runs `net` and keeps a copy of every input batch."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.net(x)


def adam_steps(fit: L.Trainer, net: nn.Module) -> int:
    """Steps taken by the optimizer that owns `net`, read from Adam's own state."""
    first = next(net.parameters())
    return next(int(opt.state[first]["step"]) for opt in fit.optimizers if first in opt.state)


def gan_k_steps(world_size: int) -> dict:
    """Algorithm 1 with k = 2 on 80 tagged points, batches of 10: each rank takes 4 D steps and 2 G steps.

    The real points are 1000, 1001, ..., the sigmoid generator's samples lie in (0, 1): every D input says what it is.
    """
    L.seed_everything(SEED)
    generator = Recorder(MLPGenerator(latent_dim=2, hidden_dims=(8,), sample_shape=(1,), output="sigmoid"))
    discriminator = Recorder(MLPDiscriminator((1,), (8,)))
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    task = GAN(generator, discriminator, adam, adam, k=2, latent_dim=2, num_fixed_samples=4)
    data = TensorDataset(1000 + torch.arange(80, dtype=torch.float32).view(-1, 1))
    record = Record()
    fit = trainer(world_size, record, max_epochs=1)
    fit.fit(task, DataLoader(data, batch_size=10, shuffle=True))
    return record.result | {
        "d_steps": adam_steps(fit, discriminator),
        "g_steps": adam_steps(fit, generator),
        "real_batches": [x.flatten().tolist() for x in discriminator.inputs if x.min() >= 1],
        "first_noise": generator.inputs[0].flatten().tolist(),
    }


def translation(world_size: int) -> dict:
    """Validation of an untrained tiny Transformer on 60 reversal pairs, in an even number of token batches (so each
    rank scores its own, and none twice) that hold different numbers of target tokens."""
    L.seed_everything(SEED)
    data = ReverseDataModule(num_train=8, num_val=60, max_tokens=64, pool_size=None)
    net = Transformer(src_vocab_size=13, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, d_ff=32,
                      dropout=0.0)
    task = Translation(net, max_len_offset=2, num_samples=0)
    fit = trainer(world_size)
    fit.validate(task, datamodule=data, verbose=False)
    batches = fit.val_dataloaders.batch_sampler
    return {"world_size": fit.world_size, "num_batches": len(batches.batches),
            "batches": list(batches),  # this rank's sentence indices
            "metrics": {k: float(v) for k, v in fit.callback_metrics.items()}}


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
    fit = trainer(world_size, record, steps, max_epochs=1)
    try:
        fit.fit(task, DataLoader(TensorDataset(x, y), batch_size=8 // world_size))
    except NonFiniteLossError as error:
        return {"rank": fit.global_rank, "error": str(error), "steps_done": len(steps.before)}
    return record.result | {"before": steps.before}


SCENARIOS = {
    "classifier": classifier,
    "gan_k_steps": gan_k_steps,
    "translation": translation,
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
