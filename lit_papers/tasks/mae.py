"""Masked-autoencoder pre-training (He et al. 2022, https://arxiv.org/abs/2111.06377): the training objective of MAE.

The net (`lit_papers.nets.mae.MaskedAutoencoderViT`) computes the masked reconstruction loss itself; this task adds the
paper's optimisation (Table 8): AdamW with betas (0.9, 0.95) and weight decay 0.05 except on biases, norms and tokens,
lr = base lr x effective batch / 256, per-step linear warm-up then cosine decay (`lit_papers.optim.WarmupCosineLR`).
Labels in the batches are ignored. Validation reports the same loss on held-out images (with random masks) and, every
few epochs, logs reconstructions: original | masked | reconstruction | reconstruction with the visible patches pasted
back. Add `lit_papers.callbacks.linear_probe.OnlineLinearProbe` to watch `probe/acc1` while pre-training.

Deviations from the paper:
- [cls]/mask tokens and position tables get no weight decay (the reference script decays the two tokens, which are
  not 1-D); the paper states no rule for them.
"""

from __future__ import annotations

import functools

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from lit_papers.callbacks.images import log_images, min_max_scale
from lit_papers.nets.mae import MaskedAutoencoderViT
from lit_papers.optim import build_lr_scheduler, build_optimizer
from lit_papers.tasks.base import NonFiniteLoss, Task, save_task_hyperparameters
from lit_papers.tasks.speed import FastPathsMixin

Batch = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]


def _images(batch: Batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch  # (B, C, H, W); labels, if any, are unused


class MAEPretraining(FastPathsMixin, Task):
    """Pre-train a masked autoencoder; logs `train/loss`, `val/loss` and reconstruction images.

    Args:
        net: the masked autoencoder.
        optimizer: builds the optimizer from parameter groups; its `lr` is replaced by the scaled `base_lr`. `None` is
            the paper's AdamW(betas=(0.9, 0.95), weight_decay=0.05).
        lr_scheduler: stepped every optimizer step, e.g. `lit_papers.optim.WarmupCosineLR` with `warmup_epochs: 40`;
            `None` keeps the lr constant.
        base_lr: lr for an effective batch of 256 (paper: 1.5e-4); the lr is `base_lr x effective batch / 256`, where
            the effective batch counts devices and gradient accumulation.
        mask_ratio: share of patches removed from each image.
        log_images_every_n_epochs: log reconstructions of the first validation images every N epochs (0: never).
        num_log_images: how many validation images to reconstruct.
        channels_last: NHWC memory format for the patch embedding (its output is then already `(N, L, D)` in memory).
        compile: `torch.compile` the net at the start of fitting; checkpoints keep the uncompiled parameter names.
        nonfinite_loss: what a NaN or infinite training loss does: "stop" with an error naming the step, or "skip"
            the optimizer step (see `lit_papers.tasks.base.Task`).
    """

    def __init__(
        self,
        net: MaskedAutoencoderViT,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        base_lr: float = 1.5e-4,
        mask_ratio: float = 0.75,
        log_images_every_n_epochs: int = 1,
        num_log_images: int = 8,
        channels_last: bool = False,
        compile: bool = False,
        nonfinite_loss: NonFiniteLoss = "stop",
    ) -> None:
        super().__init__(nonfinite_loss)
        save_task_hyperparameters(self, live_objects=["net", "optimizer", "lr_scheduler"])
        self.net = net
        self.set_fast_paths(channels_last, compile)
        self.optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, betas=(0.9, 0.95), weight_decay=0.05)
        self.scheduler_factory = lr_scheduler
        self.base_lr, self.mask_ratio = base_lr, mask_ratio
        self.log_images_every_n_epochs, self.num_log_images = log_images_every_n_epochs, num_log_images
        self._val_images: torch.Tensor | None = None
        # A torchmetrics mean weighted by images: summed over DDP ranks exactly, where `self.log(..., sync_dist=True)`
        # averages the ranks' means, wrong when their shards differ in size (Lightning #21838).
        self.val_loss = MeanMetric()

    def forward(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.net(imgs, self.mask_ratio)  # loss, pred (B, L, P*P*C), mask (B, L)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self.net(_images(batch), self.mask_ratio)
        self.log_train_step("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images = _images(batch)
        if batch_idx == 0:
            self._val_images = images[: self.num_log_images]
        loss, _, _ = self.net(images, self.mask_ratio)
        # Every image has the same number of masked patches, so its share of the batch's loss is 1 / B.
        self.val_loss.update(loss, weight=len(images))
        self.log("val/loss", self.val_loss, prog_bar=True)

    @torch.no_grad()
    def reconstruction_panels(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Original | masked | reconstruction | reconstruction with visible patches pasted back, each image scaled to
        [0, 1] by its original's range: `(4 B, C, H, W)`, one image's panels in a row. `seed` fixes the masks."""
        with torch.random.fork_rng(devices=[images.device] if images.is_cuda else []):
            torch.manual_seed(seed)  # the same masks every epoch, without touching the training random stream
            _, pred, mask = self.net(images, self.mask_ratio)  # (B, L, P*P*C), (B, L)
        if self.net.norm_pix_loss:  # the net predicts normalised patches: undo with the true patches' statistics
            target = self.net.patchify(images)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        recon = self.net.unpatchify(pred)  # (B, C, H, W)
        masked = self.net.unpatchify(mask.unsqueeze(-1).expand_as(pred))  # 1 where a patch was removed
        original, recon = min_max_scale(images), min_max_scale(recon, images)
        panels = [original, original * (1 - masked) + 0.5 * masked, recon, original * (1 - masked) + recon * masked]
        return torch.stack(panels, dim=1).flatten(0, 1)

    def on_validation_epoch_end(self) -> None:
        n = self.log_images_every_n_epochs
        if self._val_images is None or n <= 0 or self.trainer.sanity_checking or (self.current_epoch + 1) % n:
            return
        log_images(self.trainer, "val/reconstructions", self.reconstruction_panels(self._val_images), nrow=4)

    def configure_optimizers(self):
        optimizer = build_optimizer(self, self.net, self.optimizer_factory, self.base_lr, decay_norm_and_bias=False)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = build_lr_scheduler(self.scheduler_factory, optimizer, self.trainer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
