"""Training speed on the dashboard: images/s, epoch time and, where the net's FLOPs are known, model FLOPs utilisation."""

from __future__ import annotations

import copy
import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense (not 2:4 sparse) peaks that Lightning's table lacks or gets wrong: it files the H200 under names CUDA never
# reports ("h200 sxm1") and with the sparse figures. The H200 is an H100 SXM die with more memory: same tensor cores.
# Source: NVIDIA H100/H200 datasheets (the sparse figures halved).
_DENSE_PEAKS = {
    "h200 nvl": {torch.bfloat16: 835.5e12, torch.float16: 835.5e12, "tfloat32": 417.5e12, torch.float32: 60e12},
    "h200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12, torch.float32: 66.9e12},
}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matrix multiplies run in under a Trainer `precision` ("bf16-mixed" -> bfloat16, "32-true" ->
    float32): what the peak FLOP/s must be read for."""
    precision = str(precision)
    if precision.startswith("bf16") or precision.startswith("transformer-engine"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak dense FLOP/s of one `device` for `dtype`; `None` off CUDA or for GPUs no table knows.

    float32 counts as TF32 when matmuls may use it (`torch.set_float32_matmul_precision("high")`), as Lightning does.
    """
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    table = next((peaks for chip, peaks in _DENSE_PEAKS.items() if chip in name), None)
    if table is None:
        return get_available_flops(device, dtype)
    if dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest":
        dtype = "tfloat32"
    return table.get(dtype)


def forward_macs(net: nn.Module, *inputs: torch.Tensor) -> float:
    """Multiply-adds of one forward pass of `net` on `inputs`, counted by `torch.utils.flop_counter` (matmuls,
    convolutions, attention; not elementwise ops, as the papers count). Runs a copy on the meta device: no memory, no
    compute, any size. Divide by the batch size for MACs per image."""
    net = copy.deepcopy(net).to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(*(x.to("meta") for x in inputs))
    return counter.get_total_flops() / 2  # the counter reports FLOPs = 2 x MACs


class Throughput(L.Callback):
    """Log `perf/images_per_sec` (all devices together), `perf/epoch_time` (s) and `perf/mfu` once per training epoch.

    The clock runs from the start of the training epoch to its end and stops while validation runs, so the figures
    measure training alone (data loading included). GPU work is waited for at both ends. With several processes
    (DDP), every rank trains on as many images as rank 0, so images/s is rank 0's count x world size / its time.

    MFU = achieved training FLOP/s / the devices' peak. Training costs ~3x the forward pass (forward + two backward
    matmuls per forward one), so with `macs_per_image` multiply-adds in the forward pass a training image costs
    `6 * macs_per_image` FLOPs. The peak is read for the dtype the Trainer's `precision` computes in (bf16-mixed:
    bfloat16 tensor cores; 32-true: float32, or TF32 when enabled) and multiplied by the world size.

    Args:
        macs_per_image: forward multiply-adds per image (e.g. ResNet-50 at 224: 4.09e9; `forward_macs` counts them);
            `None` skips MFU.
        peak_flops: peak FLOP/s of one device; `None` looks the GPU up (no MFU on CPU).
    """

    def __init__(self, macs_per_image: float | None = None, peak_flops: float | None = None) -> None:
        self.macs_per_image = macs_per_image
        self.peak_flops = peak_flops
        self._start: float | None = None
        self._paused = self._images = 0

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # GPU work is asynchronous: wait for it before reading the clock
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._images, self._paused = 0, 0.0
        self._start = self._now(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._images += len(images)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = self._now(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None:  # not the sanity check before training
            self._paused += self._now(pl_module) - self._val_start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = self._now(pl_module) - self._start - self._paused
        images_per_sec = self._images * trainer.world_size / seconds
        pl_module.log("perf/epoch_time", seconds, sync_dist=False, rank_zero_only=True)
        pl_module.log("perf/images_per_sec", images_per_sec, sync_dist=False, rank_zero_only=True)
        peak = self.peak_flops or peak_flops(pl_module.device, compute_dtype(trainer.precision))
        if self.macs_per_image and peak:
            mfu = 6 * self.macs_per_image * images_per_sec / (peak * trainer.world_size)
            pl_module.log("perf/mfu", mfu, sync_dist=False, rank_zero_only=True)
