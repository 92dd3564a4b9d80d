"""Test helper for tests/test_preemption.py: save `last.ckpt` once, then start a second, slow save of it and print
progress, so the test can SIGKILL this process in the middle of the write.

    python tests/_slow_checkpoint_writer.py FOLDER
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import torch

from lit_papers.checkpointing import AtomicCheckpointIO

real_save = torch.save


def slow_save(obj, file) -> None:
    """torch.save in 1 MB pieces, 0.3 s apart: a 16 MB checkpoint takes ~5 s, a disk under load would do the same."""
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    for start in range(0, len(data), 2**20):
        file.write(data[start:start + 2**20])
        file.flush()
        time.sleep(0.3)


if __name__ == "__main__":
    path = Path(sys.argv[1]) / "last.ckpt"
    io_plugin = AtomicCheckpointIO()
    io_plugin.save_checkpoint({"version": 1, "weights": torch.full((4_000_000,), 1.0)}, path)  # 16 MB
    print("saved 1", flush=True)
    torch.save = slow_save  # in this process only
    print("writing 2", flush=True)
    io_plugin.save_checkpoint({"version": 2, "weights": torch.full((4_000_000,), 2.0)}, path)
    print("saved 2", flush=True)
