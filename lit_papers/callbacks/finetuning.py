"""Freeze-then-unfreeze fine-tuning: train the new classifier head alone first, then the whole net.

A head initialised from scratch on top of a pre-trained encoder sends large, random gradients into it during the first
steps; training the head alone for an epoch or two first is a common remedy (the MAE recipe itself fine-tunes
everything from the start, so this is optional). Built on Lightning's `BaseFinetuning`, which records the added
parameter groups in checkpoints so a resumed run rebuilds the same optimizer.

    callbacks:
      - class_path: lit_papers.callbacks.finetuning.FreezeBackbone
        init_args:
          unfreeze_at_epoch: 1
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.optim import Optimizer

from lit_papers.optim import param_groups


def classifier(net: nn.Module) -> nn.Module:
    """The net's classifier head: timm's `get_classifier()`, else its `head` attribute (ViT, linear probe)."""
    head = net.get_classifier() if hasattr(net, "get_classifier") else getattr(net, "head", None)
    if not isinstance(head, nn.Module):
        raise TypeError(f"{type(net).__name__} has neither `get_classifier()` nor a `head` module to keep trainable")
    return head


class FreezeBackbone(BaseFinetuning):
    """Freeze everything but `classifier(pl_module.net)` until epoch `unfreeze_at_epoch`, then train it all.

    The backbone is frozen before the task builds its optimizer, so the optimizer starts with the head's groups only.
    At the start of epoch `unfreeze_at_epoch` the backbone's parameters join the optimizer in the groups the task's own
    rule makes (`lit_papers.optim.param_groups` with the task's `decay_norm_and_bias` and `layer_decay`: no weight
    decay on biases/norms/tokens, layer-wise lr decay), each at peak lr x its `lr_scale` x the factor the schedule has
    reached, and every LR scheduler of that optimizer learns their base lrs, so warm-up/cosine continue over them.
    Parameters that were frozen by design (a fixed position table) stay frozen. Modules stay in train mode: only
    gradients are switched off, so dropout, drop path and BatchNorm statistics behave as usual.

    Args:
        unfreeze_at_epoch: first epoch (0-based) that trains the whole net; 0 never freezes.
    """

    def __init__(self, unfreeze_at_epoch: int = 1) -> None:
        super().__init__()
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self._frozen: list[str] = []  # names of the backbone parameters this callback froze

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # not for a later validate/test, which would freeze a fine-tuned net again
            super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if self.unfreeze_at_epoch <= 0:
            return
        head = {id(p) for p in classifier(pl_module.net).parameters()}
        backbone = [(n, p) for n, p in pl_module.net.named_parameters() if p.requires_grad and id(p) not in head]
        self._frozen = [n for n, _ in backbone]
        for _, p in backbone:
            p.requires_grad_(False)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        # `>=`, not `==`: a run resumed after the unfreezing epoch must unfreeze too (its optimizer already has the
        # groups, restored by `BaseFinetuning`, so none are added twice).
        if epoch < self.unfreeze_at_epoch or not self._frozen:
            return
        params = dict(pl_module.net.named_parameters())
        for name in self._frozen:
            params[name].requires_grad_(True)
        self._frozen = []
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        groups = param_groups(
            pl_module.net, getattr(pl_module, "decay_norm_and_bias", True), getattr(pl_module, "layer_decay", None)
        )
        groups = [g | {"params": [p for p in g["params"] if id(p) not in present]} for g in groups]
        groups = [g for g in groups if g["params"]]
        # Peak lr and schedule progress, read off a group the optimizer already has (`initial_lr` is set by schedulers).
        ref = optimizer.param_groups[0]
        peak = ref.get("initial_lr", ref["lr"]) / ref.get("lr_scale", 1.0)
        progress = ref["lr"] / ref["initial_lr"] if ref.get("initial_lr") else 1.0
        for group in groups:
            group["initial_lr"] = peak * group["lr_scale"]
            group["lr"] = group["initial_lr"] * progress
            optimizer.add_param_group(group)
        for config in pl_module.trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is optimizer:
                _extend_scheduler(config.scheduler, groups)


def _extend_scheduler(scheduler, groups: list[dict]) -> None:
    """Tell a torch LR scheduler about optimizer groups added after it was built (it keeps per-group lists)."""
    for group in groups:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs.append(group["initial_lr"])
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr.append(group["lr"])
        if hasattr(scheduler, "lr_lambdas"):  # LambdaLR: the schedules here use one function for every group
            scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
