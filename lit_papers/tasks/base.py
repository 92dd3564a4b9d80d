"""What every task shares: hyperparameter saving, and the policy for non-finite losses (`Task`)."""

from __future__ import annotations

import inspect
import logging
import math
import random
from typing import Any, Literal

import lightning as L
import numpy as np
import torch

from lit_papers.errors import UserInputError

NonFiniteLoss = Literal["stop", "skip"]
log = logging.getLogger(__name__)


class NonFiniteLossError(UserInputError, FloatingPointError):
    """A training loss was NaN or infinite and the policy is "stop"; the message names the step and the loss.

    A `UserInputError`, so `lit-papers` prints the message alone and exits non-zero: the remedy is a config change.
    """


def built_by_cli() -> bool:
    """True while LightningCLI instantiates a task.

    The CLI hands the task its resolved config (net and optimizer as `class_path`/`init_args`), which
    `save_hyperparameters` stores, so `load_from_checkpoint(path)` rebuilds the whole task without arguments. A task built
    by hand in Python receives live objects instead, which cannot go into a checkpoint's hyperparameters.
    """
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    return _given_hyperparameters.get() is not None


def save_task_hyperparameters(task: L.LightningModule, live_objects: list[str]) -> None:
    """Save the calling task's `__init__` arguments, leaving out `live_objects` unless the CLI described them as config.

    Tasks built in Python must pass those objects again to `load_from_checkpoint(path, net=...)`.
    """
    init_frame = inspect.currentframe().f_back  # the task's __init__, whose arguments are saved
    # The CLI logs the whole resolved config once (`SaveAndLogConfig`); logging the task's part again would repeat it.
    cli = built_by_cli()
    task.save_hyperparameters(ignore=[] if cli else live_objects, frame=init_frame, logger=not cli)


class Task(L.LightningModule):
    """Base class of the tasks: checks every loss that is backpropagated and applies the `nonfinite_loss` policy
    before each optimizer step, in automatic and manual optimization (the GAN's D and G steps) alike.

    - "stop" raises `NonFiniteLossError` naming the global step and the loss, before the step touches the weights.
    - "skip" drops the optimizer step: the gradients are discarded, so no parameter or optimizer state changes (no
      momentum, no weight decay, no Adam step count), and buffers such as BatchNorm running statistics are put back as
      they were before the batch. `train/skipped_steps` counts the skips (logged like `log_train_step`'s values); the
      count is kept in checkpoints. The global step and step-wise LR schedules still advance, as with AMP's skipped
      steps.

    With gradient accumulation, one non-finite micro-batch decides for the whole step. Under DDP/FSDP the ranks add up
    their losses (one all-reduce of one number per step), so all of them stop or skip together and none waits for
    the others in a collective. The check costs one device-to-host read per optimizer step, made after the backward
    pass has been queued, where AMP's gradient scaler makes its own.

    Args:
        nonfinite_loss: "stop" (default) or "skip".
    """

    def __init__(self, nonfinite_loss: NonFiniteLoss = "stop") -> None:
        super().__init__()
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss must be 'stop' or 'skip', got {nonfinite_loss!r}")
        self.nonfinite_loss = nonfinite_loss
        self.skipped_steps = 0
        self._pending_loss: torch.Tensor | None = None  # sum of the losses backpropagated since the last step
        self._saved_buffers: list[torch.Tensor] | None = None  # "skip": buffers as they were before the batch
        self._step_sums: dict[str, tuple[torch.Tensor, Any, bool]] = {}  # `log_train_step`: sum, weights, prog_bar

    def log_train_step(self, name: str, value: torch.Tensor, prog_bar: bool = False,
                       weight: int | torch.Tensor = 1) -> None:
        """Log a per-batch training value as its `weight`-weighted mean over the batches since the loggers last wrote.

        Use it instead of `self.log(name, value)` in a training step. Lightning writes step values to the loggers only
        every `log_every_n_steps` batches, but `self.log` costs ~0.3 ms on every call (Lightning 2.6 moves the value's
        whole record to the device each time): a fifth of a small net's step on a CPU and, on a GPU, host time the next
        kernels wait for. Here each call adds on the device (no sync), and the windows go to `self.log` only at the end
        of the batches whose values Lightning writes and of each epoch: the loggers and the progress bar show the mean
        since the last write, and callbacks that read the value at an epoch's end (checkpoints monitoring it) find it.
        A subclass that overrides `on_train_batch_end` must call `super().on_train_batch_end(...)`, which logs.
        """
        value = value.detach().float()
        if not (isinstance(weight, int) and weight == 1):  # spares a tensor operation in the common case
            value = value * weight
        total, count, _ = self._step_sums.get(name, (0.0, 0, prog_bar))
        self._step_sums[name] = (total + value, count + weight, prog_bar)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        written, last = self._train_batch_role()
        if not (written or last):
            return
        for name, (total, count, prog_bar) in self._step_sums.items():
            self.log(name, total / count, prog_bar=prog_bar)
        if written:  # the window closes when the loggers take it; at an epoch's end only the callbacks read it
            self._step_sums.clear()
        if self.nonfinite_loss == "skip":
            self.log("train/skipped_steps", float(self.skipped_steps))

    def _train_batch_role(self) -> tuple[bool, bool]:
        """Whether Lightning writes this batch's step values to the loggers (it asks the same for its own
        `LearningRateMonitor`), and whether the batch is the last of its epoch or of the run, after which callbacks
        (checkpoints, early stopping) read the values."""
        try:  # private in Lightning 2.6: if it moves, log every batch (correct, only slower)
            epoch_loop = self.trainer.fit_loop.epoch_loop
            accumulating = self.automatic_optimization and epoch_loop._should_accumulate()
            written = self.trainer._logger_connector.should_update_logs and not accumulating
            return written, epoch_loop._is_training_done
        except AttributeError:
            return True, True

    def on_fit_start(self) -> None:
        # `seed_everything` (and a resumed checkpoint, which holds rank 0's streams) starts every rank on the same
        # random streams, so every rank would draw the same MAE masks, dropout masks, MixUp pairs and batch-side crops.
        # Derive each rank's streams from the shared one and the rank: reproducible, and one process is left untouched
        # (exact resume).
        if self.trainer.world_size > 1:
            shared = int(torch.randint(2**62, ()))  # the same draw on every rank
            seed = (shared + 0x9E3779B97F4A7C15 * (self.trainer.global_rank + 1)) % 2**63
            torch.manual_seed(seed)  # CPU and every CUDA device
            np.random.seed(seed % 2**32)
            random.seed(seed)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # "skip" puts buffers (BatchNorm statistics) back as they were before the first batch of the step.
        if self.nonfinite_loss == "skip" and batch_idx % self.trainer.accumulate_grad_batches == 0:
            buffers = [b.detach() for b in self.buffers()]
            if self._saved_buffers is None or len(self._saved_buffers) != len(buffers):
                self._saved_buffers = [b.clone() for b in buffers]
            elif buffers:
                torch._foreach_copy_(self._saved_buffers, buffers)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        # Summed (no sync here; the verdict is read before the step): a sum is finite only if every term is.
        loss = loss.detach().float()
        self._pending_loss = loss if self._pending_loss is None else self._pending_loss + loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._pending_loss is None:
            return
        local, self._pending_loss = self._pending_loss, None  # this rank's losses since the last step, summed
        total = local
        if self.trainer.world_size > 1:  # all ranks' sum (reduced in place, hence the copy): non-finite if any is
            total = self.trainer.strategy.reduce(local.clone(), reduce_op="sum")
        if math.isfinite(total.item()):
            return
        loss = f"loss {local.item()}" if not math.isfinite(local.item()) else "a non-finite loss on another process"
        where = f"global step {self.trainer.global_step} (epoch {self.current_epoch})"
        if self.nonfinite_loss == "stop":
            raise NonFiniteLossError(
                f"{loss} at {where}: training stopped before this step changed the weights. Lower the learning rate, "
                "clip gradients, check the data, or set `nonfinite_loss: skip` in the task's init_args to skip such steps."
            )
        optimizer.zero_grad(set_to_none=True)  # optimizers leave parameters without gradients untouched
        if self._saved_buffers:
            torch._foreach_copy_([b.detach() for b in self.buffers()], self._saved_buffers)
        self.skipped_steps += 1  # logged with the per-batch values (`on_train_batch_end`)
        if self.trainer.is_global_zero:
            log.warning("skipped the optimizer step at %s: %s (%d skipped so far)", where, loss, self.skipped_steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
