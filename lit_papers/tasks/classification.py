"""Supervised image classification: the training objective of AlexNet, VGG, GoogLeNet and ResNet.

The task owns the loss, the metrics and the optimisation schedule; the architecture comes in as `net` (any module from
`lit_papers.nets`, or any `nn.Module` that maps images to logits and has `num_classes`). Optimizer and LR scheduler are
callables injected from the config, so a new recipe is a YAML file, not new code.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from lit_papers.optim import build_lr_scheduler, build_optimizer
from lit_papers.tasks.base import NonFiniteLoss, Task, save_task_hyperparameters
from lit_papers.tasks.speed import FastPathsMixin


class ImageClassifier(FastPathsMixin, Task):
    """Train and evaluate an image classifier with cross-entropy.

    Logs `train/loss` (the mean since the loggers last wrote, see `Task.log_train_step`), `train/acc1` (per epoch),
    `val/loss`, `val/acc1`, `val/acc5` (top-5 only with >= 5 classes) and the same under `test/`. Evaluation batches
    of shape `(B, ncrops, C, H, W)` (10-crop testing) are scored by averaging the softmax over the crops, as in AlexNet
    and ResNet.

    Args:
        net: the architecture; must map `(B, C, H, W)` images to `(B, num_classes)` logits and expose `num_classes`.
        optimizer: builds the optimizer from the parameters, e.g. `torch.optim.SGD` with its `init_args` in the config;
            `None` is SGD with torch's defaults. (A class default here would make the CLI carry its argument values,
            e.g. SGD's `weight_decay: 0`, into another optimizer chosen by `class_path`, such as AdamW or LARS.)
        lr_scheduler: builds an LR scheduler from the optimizer; `None` keeps the learning rate constant.
        scheduler_interval: step the scheduler every "epoch" or every optimizer "step" (iteration-based recipes).
        monitor: the metric a `ReduceLROnPlateau` scheduler watches (AlexNet's "divide by 10 when validation error
            stops improving").
        label_smoothing: cross-entropy label smoothing (0 = plain cross-entropy, as in all the CNN papers here).
        base_lr: if given, the lr is `base_lr x effective batch / 256` (batch over all devices and accumulated steps,
            MAE's rule) instead of the optimizer's own `lr`.
        decay_norm_and_bias: `False` exempts biases, norm parameters and ViT tokens from weight decay.
        layer_decay: layer-wise lr decay for ViTs (MAE fine-tuning: 0.75); `None` = same lr everywhere.
        mixup_alpha: Beta(alpha, alpha) of MixUp on training batches (0 = off; MAE fine-tuning: 0.8).
        cutmix_alpha: Beta(alpha, alpha) of CutMix (0 = off; MAE: 1.0). With both on, each batch uses one of the two at
            random. Mixed batches train against soft targets; `train/acc1` then scores the dominant label.
        aux_loss_weight: weight of each auxiliary classifier's loss for nets that return `(logits, *aux_logits)` in
            training mode (GoogLeNet: 0.3). `train/loss` is the weighted total, `train/aux_loss` the unweighted sum of
            the auxiliary losses; evaluation (nets in eval mode) scores the main logits only.
        channels_last: NHWC memory format for the net's convolutions (faster on GPUs under bf16/fp16).
        compile: `torch.compile` the net at the start of fitting; checkpoints keep the uncompiled parameter names.
        nonfinite_loss: what a NaN or infinite training loss does: "stop" with an error naming the step, or "skip"
            the optimizer step (see `lit_papers.tasks.base.Task`).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        monitor: str = "val/loss",
        label_smoothing: float = 0.0,
        base_lr: float | None = None,
        decay_norm_and_bias: bool = True,
        layer_decay: float | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        aux_loss_weight: float = 0.3,
        channels_last: bool = False,
        compile: bool = False,
        nonfinite_loss: NonFiniteLoss = "stop",
    ) -> None:
        super().__init__(nonfinite_loss)
        save_task_hyperparameters(self, live_objects=["net", "optimizer", "lr_scheduler"])
        if not hasattr(net, "num_classes"):
            raise TypeError(f"{type(net).__name__} has no `num_classes` attribute; the classifier task needs it for metrics.")
        self.net = net
        self.set_fast_paths(channels_last, compile)
        self.optimizer_factory = optimizer or torch.optim.SGD
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.monitor = monitor
        self.label_smoothing = label_smoothing
        self.base_lr, self.decay_norm_and_bias, self.layer_decay = base_lr, decay_norm_and_bias, layer_decay
        mixers = [m(alpha=a, num_classes=net.num_classes) for m, a in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if a > 0]
        self.batch_mix = v2.RandomChoice(mixers) if mixers else None
        self.aux_loss_weight = aux_loss_weight

        num_classes = net.num_classes
        topk = {"acc1": 1, "acc5": 5} if num_classes >= 5 else {"acc1": 1}
        metrics = MetricCollection(
            # validate_args=False: the check calls torch.unique on the targets, a GPU sync every step; cross-entropy
            # on the same targets already rejects labels out of range.
            {name: MulticlassAccuracy(num_classes, top_k=k, average="micro", validate_args=False)
             for name, k in topk.items()}
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # Evaluation losses as torchmetrics means weighted by batch size: summed over DDP ranks exactly, where
        # `self.log(..., sync_dist=True)` overstates the mean when the ranks' shards differ in size (Lightning #21838).
        self.eval_losses = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self.train_acc1 = MeanMetric()  # fed once per epoch from the counts of `training_step`
        self._zero_train_counts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.batch_mix is not None:
            images, targets = self.batch_mix(images, targets)  # soft targets (B, num_classes)
        outputs = self.net(images)  # (B, num_classes), or (logits, *aux_logits) from nets with auxiliary classifiers
        logits, *aux_logits = outputs if isinstance(outputs, tuple) else (outputs,)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        if aux_logits:  # GoogLeNet: loss = main + 0.3 x each auxiliary loss
            aux_loss = sum(F.cross_entropy(a, targets, label_smoothing=self.label_smoothing) for a in aux_logits)
            loss = loss + self.aux_loss_weight * aux_loss
            self.log_train_step("train/aux_loss", aux_loss)
        hard_targets = targets.argmax(-1) if targets.ndim == 2 else targets
        self._train_hits += (logits.detach().argmax(-1) == hard_targets).sum()
        self._train_seen += len(hard_targets)  # a Python int: no tensor operation
        self.log_train_step("train/loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_start(self) -> None:
        self._zero_train_counts()

    def _zero_train_counts(self) -> None:
        # The epoch's top-1 hits, counted on the device, and images: three small tensor operations per step, where a
        # torchmetrics update costs ~0.1 ms of host time and `self.log` of a metric object per step ~1 ms.
        self._train_hits = torch.zeros((), dtype=torch.long, device=self.device)
        self._train_seen = 0

    def on_train_epoch_end(self) -> None:
        # One torchmetrics update per epoch: weighted by the images, it sums exactly over DDP ranks when logged.
        self.train_acc1.update(self._train_hits / max(self._train_seen, 1), weight=self._train_seen)
        self.log("train/acc1", self.train_acc1)  # Lightning computes it, then resets it for the next epoch

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection, stage: str) -> torch.Tensor:
        images, targets = batch
        if images.ndim == 5:  # (B, ncrops, C, H, W): average the crops' softmax, as in the papers' 10-crop testing
            b, ncrops = images.shape[:2]
            # .float(): CPU autocast leaves log_softmax in bf16 (CUDA autocast upcasts it); losses want float32
            logits = self.net(images.flatten(0, 1)).view(b, ncrops, -1).float()
            log_probs = logits.log_softmax(-1).logsumexp(1) - math.log(ncrops)  # log of the mean probability
        else:
            log_probs = self.net(images).float().log_softmax(-1)  # (B, num_classes)
        loss = F.nll_loss(log_probs, targets)
        metrics.update(log_probs, targets)
        self.eval_losses[stage].update(loss, weight=len(targets))
        self.log(f"{stage}/loss", self.eval_losses[stage], prog_bar=stage == "val")
        self.log_dict(metrics, prog_bar=stage == "val")
        return log_probs

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.val_metrics, "val")  # (B, num_classes) log-probabilities, for callbacks

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor] | torch.Tensor, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if images.ndim == 5:
            return self.net(images.flatten(0, 1)).view(*images.shape[:2], -1).float().softmax(-1).mean(1)
        return self.net(images).float().softmax(-1)  # (B, num_classes) class probabilities

    def configure_optimizers(self):
        optimizer = build_optimizer(
            self, self.net, self.optimizer_factory, self.base_lr, self.decay_norm_and_bias, self.layer_decay
        )
        if self.scheduler_factory is None:
            return optimizer
        scheduler = build_lr_scheduler(self.scheduler_factory, optimizer, self.trainer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval, "monitor": self.monitor},
        }
