"""The `lit-papers` command: LightningCLI with tasks and DataModules chosen by `class_path` in a YAML config.

    lit-papers fit --config configs/quickstart.yaml
    lit-papers fit --config configs/quickstart.yaml --trainer.max_epochs 5
    lit-papers fit --config configs/quickstart.yaml --print_config > my_experiment.yaml

From Python (notebooks, tests), `main([...])` takes the same arguments and returns the CLI, whose `trainer` and
`model` can be inspected after the run.
"""

from __future__ import annotations

import json
import warnings

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lit_papers.callbacks.summary import RunSummary
from lit_papers.checkpointing import find_last_checkpoint, peek_checkpoint
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
            trainer_defaults={"callbacks": [RunSummary(), WandbRunId()]},
            args=args,
            run=run,
        )

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        # A rich progress bar by default, unless the config chose its own bar or turned bars off.
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_config.get("callbacks") or [])
        wants_bar = trainer_config.get("enable_progress_bar", True) is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = callbacks + [RichProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Resolve `--ckpt_path last` across the experiment's earlier runs, and continue their W&B run."""
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
    """Entry point of the `lit-papers` console script (returns nothing, so the process exits 0 on success)."""
    main()


if __name__ == "__main__":
    console_main()
