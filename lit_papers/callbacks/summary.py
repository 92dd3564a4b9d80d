"""A closing summary in the terminal: the best metric, where the checkpoint and the logs are."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info


class RunSummary(L.Callback):
    """Print, once fit ends, the monitored metric's best value, the best checkpoint and the log directory."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lines = ["Run summary:"]
        for ckpt in trainer.checkpoint_callbacks:
            if not isinstance(ckpt, ModelCheckpoint):
                continue
            if ckpt.monitor and ckpt.best_model_score is not None:
                lines.append(f"  best {ckpt.monitor}: {ckpt.best_model_score.item():.4f} (mode {ckpt.mode})")
            if ckpt.best_model_path:
                lines.append(f"  best checkpoint: {ckpt.best_model_path}")
            if ckpt.last_model_path:
                lines.append(f"  last checkpoint: {ckpt.last_model_path}")
        final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        if final:
            lines.append("  final epoch: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items())))
        lines.append(f"  logs: {trainer.log_dir}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                run = logger.experiment
                where = run.url or f"offline in {Path(run.dir).parent} (upload: wandb sync {Path(run.dir).parent})"
                lines.append(f"  W&B run {run.id}: {where}")
        rank_zero_info("\n".join(lines))
