"""Optimisation pieces the papers use that torch does not ship: schedules, parameter groups, lr scaling, LARS.

`WarmupMultiStepLR` is ResNet's CIFAR schedule. The rest serves MAE (He et al. 2022) and any later recipe:
`param_groups` (no weight decay on biases/norms/tokens, layer-wise lr decay), `build_optimizer` (base lr x effective
batch / 256), `WarmupCosineLR` (per-step warm-up + cosine) and `LARS` (the linear probe's optimizer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


class WarmupMultiStepLR(LambdaLR):
    """Multiply the lr by `gamma` at each milestone, after an optional constant warm-up at `warmup_factor` x lr.

    ResNet's CIFAR recipe (He et al. 2016, sec. 4.2): lr 0.1, divided by 10 at 32k and 48k iterations; ResNet-110 first
    trains at 0.01 "until the training error is below 80% (about 400 iterations)", which is `warmup_steps=400,
    warmup_factor=0.1` here (a fixed count instead of watching the training error). Step it every iteration.

    Args:
        optimizer: the wrapped optimizer.
        milestones: steps at which the lr is multiplied by `gamma`.
        gamma: the multiplicative factor at each milestone.
        warmup_steps: how many initial steps run at `warmup_factor` x lr.
        warmup_factor: lr multiplier during warm-up.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_steps: int = 0,
        warmup_factor: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        self.milestones = sorted(milestones)
        self.gamma = gamma
        self.warmup_steps = warmup_steps
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_factor
        return self.gamma ** sum(step >= m for m in self.milestones)


# ---------------------------------------------------------------- parameter groups, lr scaling (MAE and after)

TOKEN_NAMES = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer index of a ViT parameter for layer-wise lr decay (BEiT/MAE rule).

    0 for the patch embedding, [cls] token and position table; `k + 1` for `blocks.k.*`; `num_layers` (= depth + 1)
    for everything after the blocks (final norm, fc_norm, head).
    """
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups(net: nn.Module, decay_norm_and_bias: bool = True, layer_decay: float | None = None) -> list[dict]:
    """Split `net`'s trainable parameters into optimizer groups.

    Args:
        net: the module whose `named_parameters()` are grouped (frozen ones are left out).
        decay_norm_and_bias: `False` puts 1-D parameters (biases, norm scales and shifts) and the tokens/position
            tables (`TOKEN_NAMES`) in a group with `weight_decay=0`; other groups keep the optimizer's weight decay.
        layer_decay: multiply the lr of a ViT layer by `layer_decay ** (num_layers - layer_id)` (see `vit_layer_id`;
            `net` needs `blocks`); each group carries its factor as `lr_scale`, applied by `set_lr`.
    """
    num_layers = len(net.blocks) + 1 if layer_decay is not None else 0
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = not decay_norm_and_bias and (p.ndim <= 1 or name.rsplit(".", 1)[-1] in TOKEN_NAMES)
        layer = vit_layer_id(name, num_layers) if layer_decay is not None else 0
        if (layer, no_decay) not in groups:
            group = {"params": [], "lr_scale": layer_decay ** (num_layers - layer) if layer_decay is not None else 1.0}
            groups[layer, no_decay] = group | ({"weight_decay": 0.0} if no_decay else {})
        groups[layer, no_decay]["params"].append(p)
    return list(groups.values())


def effective_batch_size(trainer: L.Trainer) -> int:
    """Images per optimizer step over all devices: per-device batch x world size x gradient accumulation."""
    per_device = getattr(trainer.datamodule, "batch_size", None)
    if per_device is None:
        trainer.estimated_stepping_batches  # noqa: B018 -- makes Lightning load the train dataloader
        per_device = getattr(trainer.train_dataloader, "batch_size", None)
    if per_device is None:
        raise ValueError("cannot find the batch size: use a DataModule with a `batch_size` attribute")
    return per_device * trainer.world_size * trainer.accumulate_grad_batches


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set every group's lr to `lr x lr_scale` (layer-wise decay); schedulers built afterwards start from these."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_optimizer(
    task: L.LightningModule,
    net: nn.Module,
    factory: Callable[..., Optimizer],
    base_lr: float | None = None,
    decay_norm_and_bias: bool = True,
    layer_decay: float | None = None,
) -> Optimizer:
    """The optimizer of every task: `param_groups(net, ...)`, then `lr = base_lr x effective batch / 256` if `base_lr`
    is given (the linear scaling rule of Goyal et al. used by MAE; the batch comes from `task.trainer`), else the
    optimizer's own lr, times each group's `lr_scale`."""
    # Under FSDP each parameter is by now a flat 1-D view of this rank's shard, which the 1-D rule of `param_groups`
    # would take for a bias or norm scale (no weight decay anywhere): group the same parameters while FSDP shows them
    # whole, in their real shapes.
    strategy = getattr(task.trainer, "strategy", None)
    whole = FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False) \
        if isinstance(strategy, FSDPStrategy) else nullcontext()
    with whole:
        groups = param_groups(net, decay_norm_and_bias, layer_decay)
    optimizer = factory(groups)
    lr = base_lr * effective_batch_size(task.trainer) / 256 if base_lr is not None else optimizer.defaults["lr"]
    set_lr(optimizer, lr)
    return optimizer


def build_lr_scheduler(factory: Callable[[Optimizer], LRScheduler], optimizer: Optimizer, trainer: L.Trainer) -> LRScheduler:
    """`factory(optimizer)`, telling schedulers that need the run's length (`set_run_length`) how many steps it has."""
    scheduler = factory(optimizer)
    if hasattr(scheduler, "set_run_length"):
        total = int(trainer.estimated_stepping_batches)  # also loads the train dataloader, so its length is known
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        scheduler.set_run_length(total, per_epoch if math.isfinite(per_epoch) else total)
    return scheduler


class WarmupCosineLR(LRScheduler):
    """Linear warm-up from 0 then half-cosine decay, updated every optimizer step (MAE, after Goyal et al. and SGDR).

    `lr(t) = peak x t / warmup` for `t < warmup`, then `min + (peak - min) x (1 + cos(pi x progress)) / 2`, with
    `warmup = warmup_epochs x steps_per_epoch` and `progress` going from 0 to 1 over the remaining steps. `peak` is each
    group's lr when the scheduler is built. The tasks fill in the run's length (`set_run_length`), so a config only
    gives `warmup_epochs`; step it every iteration (`scheduler_interval: step`).

    Args:
        optimizer: the wrapped optimizer.
        warmup_epochs: length of the linear warm-up, in epochs (fractions allowed).
        min_lr_ratio: final lr as a fraction of the peak lr.
        total_steps: optimizer steps in the whole run; `None` until a task calls `set_run_length`.
        steps_per_epoch: optimizer steps per epoch; `None` until a task calls `set_run_length`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_epochs, self.min_lr_ratio = warmup_epochs, min_lr_ratio
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        super().__init__(optimizer, last_epoch)

    def set_run_length(self, total_steps: int, steps_per_epoch: int) -> None:
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def factor(self, step: int) -> float:
        if self.total_steps is None or self.steps_per_epoch is None:
            if step == 0:  # built, not yet told the run's length: nothing has been trained with this value
                return 0.0 if self.warmup_epochs > 0 else 1.0
            raise RuntimeError("WarmupCosineLR needs total_steps and steps_per_epoch (the tasks set them)")
        warmup = self.warmup_epochs * self.steps_per_epoch
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1.0, self.total_steps - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


# ---------------------------------------------------------------- LARS (linear probing)


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017, https://arxiv.org/abs/1708.03888).

    For each parameter with more than one dimension the update `g + wd x w` is rescaled by the trust ratio
    `trust_coefficient x ||w|| / ||g + wd x w||` (1 if either norm is 0); 1-D parameters (biases, norms) get neither
    weight decay nor scaling. Then `v = momentum x v + update`, `w -= lr x v`. This is the variant of MoCo v3 and the
    MAE linear probe.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        weight_decay: decoupled into the update before the trust ratio (0 for MAE's linear probe).
        momentum: heavy-ball momentum.
        trust_coefficient: eta of the paper.
    """

    def __init__(self, params, lr: float = 0.1, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = group["trust_coefficient"] * w_norm / u_norm
                    update = update * torch.where((w_norm > 0) & (u_norm > 0), trust, torch.ones_like(trust))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss
