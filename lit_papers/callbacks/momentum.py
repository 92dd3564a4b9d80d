"""Momentum schedules: the GAN paper's "momentum 0.5 rising to 0.7" (pylearn2's `MomentumAdjustor`)."""

from __future__ import annotations

import lightning as L


class MomentumRamp(L.Callback):
    """Move every optimizer's momentum linearly from its configured value to `final_momentum`, epoch by epoch.

    At epoch e (counted from 0) the momentum is `m0 + clip((e - start_epoch) / (saturate_epoch - start_epoch), 0, 1)
    * (final_momentum - m0)`, where m0 is the momentum the optimizer was built with (kept in its param groups as
    `initial_momentum`, so a resumed run continues the same ramp). The GAN paper's MNIST run: SGD momentum 0.5, ramp
    from epoch 1 to 250 towards 0.7.

    Args:
        final_momentum: momentum from `saturate_epoch` on.
        start_epoch: last epoch at the initial momentum.
        saturate_epoch: first epoch at `final_momentum`.
    """

    def __init__(self, final_momentum: float = 0.7, start_epoch: int = 1, saturate_epoch: int = 250) -> None:
        if saturate_epoch <= start_epoch:
            raise ValueError(f"saturate_epoch ({saturate_epoch}) must come after start_epoch ({start_epoch})")
        self.final_momentum, self.start_epoch, self.saturate_epoch = final_momentum, start_epoch, saturate_epoch

    def momentum(self, initial: float, epoch: int) -> float:
        alpha = min(max((epoch - self.start_epoch) / (self.saturate_epoch - self.start_epoch), 0.0), 1.0)
        return initial + alpha * (self.final_momentum - initial)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if "momentum" not in group:
                    raise ValueError(f"{type(optimizer).__name__} has no momentum to ramp")
                initial = group.setdefault("initial_momentum", group["momentum"])
                group["momentum"] = self.momentum(initial, trainer.current_epoch)
