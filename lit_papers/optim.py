"""Learning-rate schedules the papers use that torch does not ship as one class."""

from __future__ import annotations

from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


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
