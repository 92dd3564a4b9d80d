"""Training speed on the dashboard: images/s, epoch time and, where the net's FLOPs are known, model FLOPs utilisation."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops


class Throughput(L.Callback):
    """Log `perf/images_per_sec` (all devices together), `perf/epoch_time` (s) and `perf/mfu` once per training epoch.

    MFU = achieved training FLOP/s / the devices' peak. Training costs ~3x the forward pass (forward + two backward
    matmuls per forward one), so with `macs_per_image` multiply-adds in the forward pass a training image costs
    `6 * macs_per_image` FLOPs. The peak comes from Lightning's table of GPUs for the run's precision, or `peak_flops`.

    Args:
        macs_per_image: forward multiply-adds per image (e.g. ResNet-50 at 224: 4.09e9); `None` skips MFU.
        peak_flops: peak FLOP/s of one device; `None` looks the GPU up (no MFU on CPU).
    """

    def __init__(self, macs_per_image: float | None = None, peak_flops: float | None = None) -> None:
        self.macs_per_image = macs_per_image
        self.peak_flops = peak_flops

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._images = 0
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._images += len(images)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # GPU work is asynchronous: wait for it before reading the clock
        seconds = time.perf_counter() - self._start
        images_per_sec = self._images * trainer.world_size / seconds
        pl_module.log("perf/epoch_time", seconds, sync_dist=False, rank_zero_only=True)
        pl_module.log("perf/images_per_sec", images_per_sec, sync_dist=False, rank_zero_only=True)
        peak = self.peak_flops or self._lookup_peak(trainer, pl_module)
        if self.macs_per_image and peak:
            mfu = 6 * self.macs_per_image * images_per_sec / (peak * trainer.world_size)
            pl_module.log("perf/mfu", mfu, sync_dist=False, rank_zero_only=True)

    @staticmethod
    def _lookup_peak(trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        if pl_module.device.type != "cuda":
            return None
        precision = str(trainer.precision)
        dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
        return get_available_flops(pl_module.device, dtype)
