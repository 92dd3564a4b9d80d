"""Finding and reading checkpoints when a run is resumed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def find_last_checkpoint(*roots: str | Path) -> Path | None:
    """The newest `last*.ckpt` anywhere under `roots`, or None.

    Each run of an experiment writes into its own version folder, so a resumed run (`--ckpt_path last`) must look in
    the earlier runs' folders, not only in its own new one as Lightning does.
    """
    found = [p for root in roots if Path(root).is_dir() for p in Path(root).rglob("last*.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def peek_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's metadata cheaply: tensors are memory-mapped, not read."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
