"""What the Trainer and our `ImageClassifier` cost per step, against a hand-written PyTorch loop, in one process.

    python benchmarks/task_overhead.py                           # both nets, default sizes for the device
    python benchmarks/task_overhead.py --net mlp --steps 400 --batch 64
    python benchmarks/task_overhead.py --device cuda --repeats 7

Both sides train the same net (a deep copy of one initialisation) with the same `torch.optim.SGD` settings on the same
in-memory `TensorDataset` of random images, through identically configured `DataLoader`s (shuffled, `num_workers=0`,
pinned memory on a GPU), for the same number of steps, epochs chained:

- raw PyTorch loop: `for images, targets in loader`: copy to the device, forward, cross-entropy, `zero_grad`,
  backward, `step`.
- Lightning floor (loss-only module): a minimal LightningModule whose `training_step` only returns the loss, under the
  same Trainer: what Lightning's loop and hooks cost by themselves, which no task can go below.
- ImageClassifier, bare Trainer: `ImageClassifier` under `L.Trainer` with logger, progress bar, checkpointing and model
  summary off. The like-for-like line: everything the task does per step (train accuracy update, `self.log` of the
  loss, the non-finite-loss check) and all of Lightning's hooks, but no extra work a user chose. Its distance to the
  floor is what our task costs.
- ImageClassifier, our callbacks + W&B: the same plus what `lit-papers fit` with configs/resnet/cifar10_resnet20.yaml
  adds per step: the W&B logger (offline), the rich progress bar as `lit-papers` draws it (10 times a second),
  `ModelCheckpoint(save_last=True)`, `LearningRateMonitor`, `Throughput`, `RunSummary` and `WandbRunId`. It shows
  what those conveniences cost; it is not part of the 0.97 goal.

Two nets: CifarResNet-20 on 3x32x32 images (a real workload, where per-step costs should vanish) and a 784-128-10 MLP
on 1x28x28 images (so little compute per step that any per-step framework cost shows). The clock starts at the end of
step `--warmup` and stops at the end of the last step (CUDA synchronised at both), so start-up (Trainer construction,
`fit` setup, W&B start, first-call allocations) is excluded and epoch ends inside the window are included. The variants
alternate in each of `--repeats` rounds (order reversed every other round); each reports its median images/s and the
median over rounds of its ratio to the raw loop of the same round, so load from other processes on a shared machine,
which drifts over minutes, hits the two sides of a ratio alike. Goal: ImageClassifier (bare Trainer) / raw >= 0.97.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import logging
import os
import statistics
import tempfile
import time
import warnings
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_papers.callbacks.summary import RunSummary
from lit_papers.callbacks.throughput import Throughput
from lit_papers.loggers import WandbLogger, WandbRunId
from lit_papers.nets.resnet import CifarResNet
from lit_papers.tasks.classification import ImageClassifier

os.environ.setdefault("WANDB_SILENT", "true")  # no W&B banners between the timings


class LossOnly(L.LightningModule):
    """The least a LightningModule can do: forward, loss, one optimizer."""

    def __init__(self, net: nn.Module, optimizer: functools.partial) -> None:
        super().__init__()
        self.net, self.optimizer_factory = net, optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        return F.cross_entropy(self.net(images), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.net.parameters())


class TinyMLP(nn.Module):
    """Flatten -> Linear -> ReLU -> Linear: ~0.1 MFLOP per image, so per-step overhead dominates."""

    def __init__(self, in_features: int = 784, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes  # ImageClassifier sizes its metrics from it
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                    nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, num_classes)


# name -> (builder, image shape, default batch on CPU, default batch on GPU, default timed steps on CPU, on GPU)
NETS = {
    "resnet20": (lambda: CifarResNet(depth=20), (3, 32, 32), 32, 128, 20, 200),
    "mlp": (TinyMLP, (1, 28, 28), 128, 128, 300, 1000),
}


def make_loader(shape: tuple[int, ...], batch: int, batches: int, device: torch.device) -> DataLoader:
    """`batches` batches of N(0, 1) images and random labels, held in memory."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batches * batch, *shape, generator=g)
    targets = torch.randint(0, 10, (batches * batch,), generator=g)
    return DataLoader(TensorDataset(images, targets), batch_size=batch, shuffle=True, drop_last=True, num_workers=0,
                      pin_memory=device.type == "cuda")


class StepClock:
    """Seconds from the end of step `warmup` to the end of step `warmup + steps`; `tick()` after every step.

    `clock` is `time.perf_counter` (wall time) or `time.process_time` (CPU time of this process, which other jobs on a
    shared CPU do not inflate by taking turns with it; only meaningful on a CPU device).
    """

    def __init__(self, warmup: int, steps: int, device: torch.device,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.warmup, self.total, self.device, self.clock = warmup, warmup + steps, device, clock
        self.count, self.start, self.seconds = 0, 0.0, float("nan")

    def tick(self) -> bool:
        """Count a finished step; True once the last timed step is done."""
        self.count += 1
        if self.count in (self.warmup, self.total):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # wait for the queued GPU work before reading the clock
            now = self.clock()
            if self.count == self.warmup:
                self.start = now
            else:
                self.seconds = now - self.start
        return self.count >= self.total


class _Tick(L.Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.clock.tick()


def run_raw(net: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, clock: StepClock) -> float:
    """The hand-written loop; returns the timed seconds."""
    net.train()
    while True:  # epochs
        for images, targets in loader:
            images = images.to(clock.device, non_blocking=True)
            targets = targets.to(clock.device, non_blocking=True)
            loss = F.cross_entropy(net(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if clock.tick():
                return clock.seconds


def run_lightning(task: L.LightningModule, loader: DataLoader, clock: StepClock, defaults: bool, root: str) -> float:
    """`trainer.fit(task)` for `clock.total` steps, bare or with our default callbacks and logger; the timed seconds."""
    callbacks: list[L.Callback] = [_Tick(clock)]
    logger = False
    if defaults:
        callbacks += [ModelCheckpoint(save_last=True), LearningRateMonitor(logging_interval="step"), Throughput(),
                      RunSummary(), WandbRunId(),
                      # drawn as in a terminal (that work is part of its cost), into a buffer that nobody reads
                      RichProgressBar(refresh_rate=10, console_kwargs={"file": io.StringIO(), "force_terminal": True})]
        logger = WandbLogger(save_dir=root, name="task_overhead", offline=True)
    trainer = L.Trainer(accelerator=clock.device.type, devices=1, max_steps=clock.total, logger=logger,
                        callbacks=callbacks, enable_checkpointing=defaults, enable_progress_bar=defaults,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root)
    trainer.fit(task, train_dataloaders=loader)
    return clock.seconds


@contextlib.contextmanager
def quiet_lightning():
    """No per-fit banners or warnings ("few workers", "no validation loop") between the timings; restored after."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            yield
    finally:
        logger.setLevel(level)


def benchmark(name: str, batch: int, steps: int, warmup: int, repeats: int, device: torch.device,
              defaults: bool, root: str, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Images/s of each variant in each of `repeats` alternating rounds."""
    build, shape = NETS[name][:2]
    torch.manual_seed(0)
    net = build()
    sgd = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=1e-4)  # the task gets a factory
    raw_net = copy.deepcopy(net).to(device)
    raw_optimizer = sgd(raw_net.parameters())
    task = ImageClassifier(net, optimizer=sgd)
    floor = LossOnly(copy.deepcopy(net), optimizer=sgd)
    loader = make_loader(shape, batch, batches=max(8, (warmup + steps) // 3), device=device)  # ~3 epochs per run
    variants = {
        "raw PyTorch loop": lambda timer: run_raw(raw_net, raw_optimizer, loader, timer),
        "Lightning floor (loss-only module)": lambda timer: run_lightning(floor, loader, timer, False, root),
        "ImageClassifier, bare Trainer": lambda timer: run_lightning(task, loader, timer, False, root),
    }
    if defaults:
        variants["ImageClassifier, our callbacks + W&B"] = lambda timer: run_lightning(task, loader, timer, True, root)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for v in order:
            rates[v].append(steps * batch / variants[v](StepClock(warmup, steps, device, clock)))
    return rates


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Parse `argv`, run the benchmark, print the table; returns {net: {variant: median images/s}}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=[*NETS, "both"], default="both")
    parser.add_argument("--steps", type=int, help="timed steps per run (default per net and device)")
    parser.add_argument("--batch", type=int, help="batch size (default per net and device)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of every run")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds; the median counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time (default) or this process's CPU time, steadier on a CPU shared with other jobs")
    parser.add_argument("--no-defaults", dest="defaults", action="store_false",
                        help="skip the line with our default callbacks and the W&B logger")
    args = parser.parse_args(argv)

    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the clock starts at the end of the last warm-up step")
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu times CPU work only; GPU runs need --clock wall")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    names = list(NETS) if args.net == "both" else [args.net]
    print(f"torch {torch.__version__}, lightning {L.__version__}, {device.type}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, warm-up {args.warmup} steps, median of {args.repeats} alternating rounds")
    results = {}
    with tempfile.TemporaryDirectory() as root, quiet_lightning():
        for name in names:
            _, _, cpu_batch, gpu_batch, cpu_steps, gpu_steps = NETS[name]
            batch = args.batch or (gpu_batch if device.type == "cuda" else cpu_batch)
            steps = args.steps or (gpu_steps if device.type == "cuda" else cpu_steps)
            runs = benchmark(name, batch, steps, args.warmup, args.repeats, device, args.defaults, root, clock)
            results[name] = {variant: statistics.median(r) for variant, r in runs.items()}
            raw = runs["raw PyTorch loop"]
            print(f"{name}, batch {batch}, {steps} timed steps:")
            for variant, rate in results[name].items():
                ratio = statistics.median(r / r0 for r, r0 in zip(runs[variant], raw))
                ratio = f"ratio {ratio:.3f}" if runs[variant] is not raw else "reference"
                each = ", ".join(f"{r:.0f}" for r in runs[variant])
                print(f"  {variant:<38} {rate:9.1f} img/s  {ratio:<12} (runs: {each})")
            print("  goal: ImageClassifier (bare Trainer) / raw >= 0.97")
    return results


if __name__ == "__main__":
    main()
