"""Writing checkpoints so that a crash never destroys one, and finding the one to resume from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import callbacks
from lightning.pytorch.plugins.io import TorchCheckpointIO

# A checkpoint is written under this suffix first; `find_last_checkpoint` and Lightning's own searches (`*.ckpt`)
# never take such a file for a checkpoint.
PARTIAL_SUFFIX = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a hidden `.<name>.partial` file in the same folder, flush it to disk, then rename it.

    A process killed while saving (SIGKILL, out of memory, a node going down) leaves the previous checkpoint of that
    name intact and loadable: `os.replace` swaps the complete new file in at once. Lightning's own writer goes through
    a temporary file in `/tmp` and `shutil.move`, which copies (not atomic) when `/tmp` is another file system, and
    does not `fsync`. The partial file of a killed save has a fixed name, so the next save of that checkpoint
    overwrites it instead of leaving another. Remote paths (`s3://`, ...) go to Lightning's writer.

    The `lit-papers` command installs it unless the config's `trainer.plugins` has a CheckpointIO already; in Python:
    `Trainer(plugins=[AtomicCheckpointIO()])`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
        with open(partial, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the name points at it
        os.replace(partial, path)
        fsync_directory(path.parent)  # ... and the rename itself survives a power cut


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, except that `save_last=True` rewrites `last.ckpt` at every epoch's save point.

    Lightning 2.6 writes `last.ckpt` only when it writes a top-k checkpoint, so with a monitored metric `last.ckpt`
    holds the last improvement, not the latest state, and `--ckpt_path last` after a crash would redo every epoch since.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: L.Trainer) -> None:
        # Skipped when Lightning saved at this step already, during the sanity check and with fast_dev_run.
        if self.save_last is True and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def fsync_directory(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def find_last_checkpoint(*roots: str | Path) -> Path | None:
    """The newest `last*.ckpt` anywhere under `roots`, or None.

    Each run of an experiment writes into its own version folder, so a resumed run (`--ckpt_path last`) must look in
    the earlier runs' folders, not only in its own new one as Lightning does. Lightning's SLURM requeue checkpoints
    (`hpc_ckpt_<n>.ckpt`, saved on SIGUSR1) count too. Partial files of interrupted saves do not match.
    """
    found = [p for root in roots if Path(root).is_dir() for pattern in ("last*.ckpt", "hpc_ckpt_*.ckpt")
             for p in Path(root).rglob(pattern)]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def peek_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's metadata cheaply: tensors are memory-mapped, not read."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
