"""The `lit-papers` command: LightningCLI with tasks and DataModules chosen by `class_path` in a YAML config.

    lit-papers fit --config configs/quickstart.yaml
    lit-papers fit --config configs/quickstart.yaml --trainer.max_epochs 5
    lit-papers fit --config configs/quickstart.yaml --print_config > my_experiment.yaml

From Python (notebooks, tests), `main([...])` takes the same arguments and returns the CLI, whose `trainer` and
`model` can be inspected after the run.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from argparse import ArgumentError

import lightning as L
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO

from lit_papers.callbacks.resume import Preemption, ResumeState
from lit_papers.callbacks.summary import RunSummary
from lit_papers.checkpointing import (
    AtomicCheckpointIO,
    find_last_checkpoint,
    peek_checkpoint,
)
from lit_papers.errors import UserInputError, find_user_error, tidy_error
from lit_papers.loggers import WandbLogger, WandbRunId, run_id_from_checkpoint

# `main(args)` ignores sys.argv on purpose (notebooks, pytest), so Lightning's warning about both being present is noise.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")


class SaveAndLogConfig(SaveConfigCallback):
    """Save the resolved config next to the logs and send it, once and whole, to every logger (the W&B run config).

    Tasks built by the CLI do not log their own hyperparameters, so no key appears twice.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="json")
        for logger in trainer.loggers:
            logger.log_hyperparams(json.loads(config))


class LitPapersCLI(LightningCLI):
    """LightningCLI where `model:` is any task (LightningModule) and `data:` any LightningDataModule, both given by
    `class_path`/`init_args`. Optimizers and schedulers are not auto-configured: each task receives them as callables in
    its own `init_args`, so a task with two optimizers (the GAN) is configured the same way as one with a single optimizer.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            # A second run in the same log directory must not fail on the config.yaml the first one saved.
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},
            # Added to the config's own callbacks: exact resume (RNG states) and a checkpoint on SIGTERM/Ctrl+C.
            trainer_defaults={"callbacks": [RunSummary(), WandbRunId(), ResumeState(), Preemption()]},
            # Raise parse errors (one message, caught in `console_main`) instead of printing the whole usage.
            parser_kwargs={"exit_on_error": False},
            args=args,
            run=run,
        )

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        # A rich progress bar by default, unless the config chose its own bar or turned bars off.
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_config.get("callbacks") or [])
        if trainer_config.get("logger") is False:  # `--trainer.logger false`: LearningRateMonitor would refuse to run
            kwargs["callbacks"] = callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        wants_bar = trainer_config.get("enable_progress_bar", True) is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            # Drawn 10 times a second, not Lightning's 100: the drawing thread then costs ~0.08 instead of ~0.5 ms of
            # each training step (784-128-10 MLP on CPU, whose whole step is ~2 ms; benchmarks/README.md).
            kwargs["callbacks"] = callbacks + [RichProgressBar(refresh_rate=10)]
        # Atomic checkpoint writes by default, unless the config brings its own CheckpointIO.
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = plugins + [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # Lightning replaces the config's task with the one saved in `--ckpt_path`; check first that they are the same.
        config = self.config.get(str(self.config.get("subcommand")), {})
        path = config.get("ckpt_path") if config else None
        if path not in (None, "last", "best", "hpc", "registry"):  # Lightning resolves those names itself
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint not found: {path}")
            saved_by = peek_checkpoint(path).get("hyper_parameters", {}).get("_class_path")
            task = config["model"]["class_path"]
            if saved_by and saved_by != task:
                raise UserInputError(f"checkpoint {path} was saved by {saved_by}, but this config trains {task}")
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        """Resolve `--ckpt_path last` across the experiment's earlier runs, and continue the checkpoint's W&B run."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            roots = {self.trainer.default_root_dir, *(lg.save_dir for lg in self.trainer.loggers if lg.save_dir)}
            last = find_last_checkpoint(*roots)
            # None: nothing to resume, so the run starts fresh (rerunning a preempted job's command always works).
            config["ckpt_path"] = str(last) if last else None
            print(f"Resuming from {last}" if last else f"No last checkpoint under {sorted(roots)}: starting fresh.")
        wandb = next((lg for lg in self.trainer.loggers if isinstance(lg, WandbLogger)), None)
        if config.get("ckpt_path") and wandb is not None and wandb._wandb_init.get("id") is None:
            run_id = run_id_from_checkpoint(peek_checkpoint(config["ckpt_path"]))
            if run_id:
                wandb.resume_run(run_id)


def main(args: list[str] | None = None, run: bool = True) -> LitPapersCLI:
    """Run the CLI. `args=None` reads `sys.argv`; an explicit list ignores it (so it works under pytest and in notebooks)."""
    return LitPapersCLI(args=args, run=run)


def console_main() -> None:
    """Entry point of the `lit-papers` console script.

    A wrong config key or type, a missing data folder, an unreadable image or a checkpoint of another task ends the
    process with one message and a non-zero status; `LIT_PAPERS_DEBUG=1` shows the full traceback instead.
    """
    try:
        main()
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None or os.environ.get("LIT_PAPERS_DEBUG") == "1":
            raise
        print(f"lit-papers: error: {tidy_error(user_error)}", file=sys.stderr)
        print("(LIT_PAPERS_DEBUG=1 shows the full traceback; `lit-papers fit --help` lists the options.)", file=sys.stderr)
        sys.exit(2 if isinstance(user_error, ArgumentError) else 1)


if __name__ == "__main__":
    console_main()
