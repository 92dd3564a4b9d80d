"""Weights & Biases logging that never blocks a job.

Lightning's `WandbLogger` asks for an API key interactively when none is configured, which hangs a batch job or a
notebook. `WandbLogger` here logs online when credentials exist and offline otherwise (printing the `wandb sync`
command to upload later), and carries the run id in checkpoints so a resumed job continues the same run.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

WANDB_HOST = "api.wandb.ai"


def wandb_credentials_available() -> bool:
    """True when W&B has an API key: `WANDB_API_KEY`, or a `wandb login` entry in ~/.netrc (or `$NETRC`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}").split("://")[-1].rstrip("/")
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger, online when credentials exist, offline otherwise, never prompting.

    Args:
        project: W&B project.
        name: run name shown on the dashboard.
        group: groups runs on the dashboard; the configs here use the paper ("resnet", "mae", "gan").
        job_type: what the run does: "fit", "linear_probe", "fine_tune", ...
        tags: free-form labels.
        save_dir: where the local run files go (`<save_dir>/wandb/...`).
        offline: force offline (`True`) or online (`False`); `None` decides from the credentials (and `WANDB_MODE`).
        log_model: upload checkpoints as W&B artifacts (`True`: at the end, `"all"`: every checkpoint); needs online.
        id: the run id; set it to continue a run. `lit-papers fit --ckpt_path ...` sets it from the checkpoint.
        **kwargs: passed to `wandb.init` (e.g. `entity`, `notes`).
    """

    def __init__(
        self,
        project: str = "lit-papers",
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = "fit",
        tags: list[str] | None = None,
        save_dir: str | Path = "runs",
        offline: bool | None = None,
        log_model: bool | str = False,
        id: str | None = None,
        **kwargs: Any,
    ) -> None:
        mode = os.environ.get("WANDB_MODE", "").lower()
        if offline is None:
            offline = mode in ("offline", "dryrun") or (mode != "disabled" and not wandb_credentials_available())
            if offline and mode not in ("offline", "dryrun"):
                rank_zero_info(
                    "W&B: no API key found (WANDB_API_KEY or `wandb login`), so this run logs offline to "
                    f"{Path(save_dir) / 'wandb'}. Upload it later with `wandb sync {Path(save_dir) / 'wandb'}/offline-run-*`."
                )
        if offline and log_model:
            rank_zero_info("W&B: offline runs cannot upload checkpoints; `log_model` is ignored.")
            log_model = False
        # Absolute: W&B's service process outlives a `chdir` (notebooks, tests) and resolves relative paths against its
        # own working directory. The folder must exist, or wandb silently falls back to a temporary one.
        save_dir = Path(save_dir).absolute()
        save_dir.mkdir(parents=True, exist_ok=True)
        if offline:
            kwargs.setdefault("mode", "offline")  # for wandb.init: see `experiment`
        super().__init__(
            project=project,
            name=name,
            save_dir=save_dir,
            offline=offline,
            log_model=log_model,
            id=id,
            group=group,
            job_type=job_type,
            tags=tags,
            **kwargs,
        )

    @property
    def experiment(self):
        """The W&B run, started on first use (rank 0; other ranks get a dummy).

        Lightning's property sets `os.environ["WANDB_MODE"] = "dryrun"` to start an offline run, which would keep every
        later run of the process (a notebook) offline even with credentials; `wandb.init(mode=...)` is told instead.
        """
        saved = os.environ.get("WANDB_MODE")
        try:
            return super().experiment
        finally:
            if saved is None:
                os.environ.pop("WANDB_MODE", None)
            else:
                os.environ["WANDB_MODE"] = saved

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Finish the W&B run, so its last metrics are written now, not when the process exits.

        A later `fit`/`test` with this logger in the same process (a notebook) continues the same run.
        """
        super().finalize(status)
        if self._experiment is not None:
            run_id = self._experiment.id
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None
            self.resume_run(run_id)

    def resume_run(self, run_id: str) -> None:
        """Continue the run `run_id` instead of starting a new one (before anything has been logged)."""
        if self._experiment is not None:
            raise RuntimeError("the W&B run has already started; set the id before training starts")
        self._id = run_id
        self._wandb_init["id"] = run_id


class WandbRunId(L.Callback):
    """Store the W&B run id in every checkpoint, so `fit --ckpt_path` continues the same run (see `lit_papers.cli`)."""

    def state_dict(self) -> dict[str, Any]:
        trainer_logger = getattr(self, "_logger", None)
        return {"run_id": trainer_logger.version} if trainer_logger is not None else {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._logger = next((lg for lg in trainer.loggers if isinstance(lg, LightningWandbLogger)), None)


def run_id_from_checkpoint(checkpoint: dict[str, Any]) -> str | None:
    """The W&B run id that `WandbRunId` stored in a loaded checkpoint, if any."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("WandbRunId") and state.get("run_id"):
            return state["run_id"]
    return None
