"""What a checkpoint needs beyond Lightning's own state for a resumed run to continue exactly, and a clean stop on
SIGTERM/SIGINT that leaves such a checkpoint behind.

Lightning's checkpoints restore the weights, optimizers, LR schedulers, loop counters, callbacks' and the DataModule's
`state_dict`, but not the random number generators. `ResumeState` saves those of torch (CPU and CUDA), numpy and
Python, so dropout, MixUp, GAN noise and main-process augmentations draw after a resume what they would have drawn
without the interruption. The DataModules save their own loader generators (shuffle order, worker seeds); see
`lit_papers.data.base.ImageDataModule.state_dict`.

`Preemption` builds on Lightning's SIGTERM handling: Lightning's handler sets `trainer.received_sigterm` and its loops
raise `SIGTERMException` after the current batch. This callback also routes the first Ctrl+C (SIGINT) there, writes
`last.ckpt` where `--ckpt_path last` finds it, and makes the process exit non-zero (Lightning's exception is a
`SystemExit` with status 0, which a job scheduler would read as "finished").
"""

from __future__ import annotations

import os
import random
import signal
import threading
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


def rng_state() -> dict[str, Any]:
    """The global random streams of torch (CPU and CUDA), numpy and Python, as tensors and plain numbers.

    Plain types only, so checkpoints still load with `torch.load(weights_only=True)`.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "cached_gaussian": cached},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(Callback):
    """Save the global random number generators in every checkpoint and restore them when training resumes.

    Restored while Lightning loads the checkpoint, before the first training batch; the sanity check in between runs
    under Lightning's `isolate_rng`, so it does not shift the streams. Under DDP the checkpoint holds rank 0's streams
    and every rank restores them, as `seed_everything` starts all ranks on the same streams; the tasks then derive
    a distinct stream per rank from the shared one (`lit_papers.tasks.base.Task.on_fit_start`).
    """

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state()}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2.6 creates a resumed run's first training iterator before it sets the samplers' epoch, and an
        # iterator with workers draws its first indices at once, so the resumed epoch would replay epoch 0's order
        # (Lightning issue #21938; it concerns DistributedSampler, i.e. DDP, and epoch-seeded batch samplers). Set
        # the epoch and start that iterator again.
        fit_loop, epoch = trainer.fit_loop, trainer.fit_loop.epoch_progress.current.processed
        loaders = fit_loop._combined_loader.flattened if fit_loop._combined_loader is not None else []
        stale = [loader for loader in loaders if getattr(loader, "num_workers", 0) > 0 and any(
            getattr(sampler, "epoch", epoch) != epoch for sampler in _samplers(loader))]
        for loader in stale:
            _set_sampler_epoch(loader, epoch)
        if stale and fit_loop._data_fetcher is not None:
            iter(fit_loop._data_fetcher)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            set_rng_state(state_dict["rng"])


def _samplers(loader: Any) -> list[Any]:
    """The sampler and the batch sampler's sampler of a DataLoader (where Lightning looks for `set_epoch`)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    return [s for s in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)) if s is not None]


class Preemption(Callback):
    """Stop cleanly on SIGTERM or a first Ctrl+C: finish the current batch, save `last.ckpt`, exit non-zero.

    The exit status is 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process killed
    by that signal. A second Ctrl+C interrupts at once, without saving, since a step may be half done.

    The checkpoint goes to the first `ModelCheckpoint`'s folder as its `last.ckpt` (whether or not it has
    `save_last`), or to `<default_root_dir>/checkpoints/last.ckpt` without one.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous_sigint: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum = None
        # Python's own SIGINT handler raises KeyboardInterrupt wherever the code is, e.g. halfway through an optimizer
        # step, and the state saved then would not be consistent. Handlers can only be set from the main thread.
        if in_main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT:  # the second Ctrl+C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        rank_zero_info("Ctrl+C: stopping after this batch and saving last.ckpt (Ctrl+C again to stop at once).")
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM path: flag, DDP broadcast, stop after the batch

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and in_main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        path = self.last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # every rank calls it (a collective for sharded strategies); rank 0 writes
        signum = signal.Signals(self.signum or signal.SIGTERM)
        rank_zero_info(f"Stopped by {signum.name}; saved {path}. Rerun with `--ckpt_path last` to continue.")
        # SIGTERMException is a SystemExit; its code becomes the process's exit status (None would mean success).
        exception.code = 128 + signum

    @staticmethod
    def last_checkpoint_path(trainer: L.Trainer) -> str:
        """Where the interrupted run's checkpoint goes: the `last.ckpt` of the first `ModelCheckpoint`."""
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST)  # <dirpath>/last.ckpt
        return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
