"""Helpers every task shares."""

from __future__ import annotations

import inspect

import lightning as L


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
