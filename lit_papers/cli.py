"""The `lit-papers` command: LightningCLI with tasks and DataModules chosen by `class_path` in a YAML config.

    lit-papers fit --config configs/quickstart.yaml
    lit-papers fit --config configs/quickstart.yaml --trainer.max_epochs 5
    lit-papers fit --config configs/quickstart.yaml --print_config > my_experiment.yaml

From Python (notebooks, tests), `main([...])` takes the same arguments and returns the CLI, whose `trainer` and
`model` can be inspected after the run.
"""

from __future__ import annotations

import warnings

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from lit_papers.callbacks.summary import RunSummary

# `main(args)` ignores sys.argv on purpose (notebooks, pytest), so Lightning's warning about both being present is noise.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")


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
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [RunSummary()]},
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


def main(args: list[str] | None = None, run: bool = True) -> LitPapersCLI:
    """Run the CLI. `args=None` reads `sys.argv`; an explicit list ignores it (so it works under pytest and in notebooks)."""
    return LitPapersCLI(args=args, run=run)


def console_main() -> None:
    """Entry point of the `lit-papers` console script (returns nothing, so the process exits 0 on success)."""
    main()


if __name__ == "__main__":
    console_main()
