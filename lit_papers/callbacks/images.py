"""Log image grids (MAE reconstructions, GAN samples, figures) to whichever loggers a run has configured.

    log_images(trainer, "val/reconstructions", images, nrow=4)  # images: (N, C, H, W), values in [0, 1]
    log_images(trainer, "val/confusion_matrix", figure_to_tensor(fig)[None], nrow=1)  # a matplotlib figure

TensorBoard gets `add_image`, Weights & Biases gets `log_image`; any other logger (CSV) or no logger at all gets a PNG
file under `<log_dir>/images/`, named after the key and the global step.
"""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid, save_image


def min_max_scale(images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Map each image to [0, 1] by the min and max of the matching image in `reference` (default: itself), clamped.

    Display helper for normalised data whose statistics the logger does not know: scaling several views of one
    image (original, reconstruction) by the original's range keeps them comparable.
    """
    ref = (images if reference is None else reference).flatten(1)  # (N, C*H*W)
    lo, hi = ref.min(1).values.view(-1, 1, 1, 1), ref.max(1).values.view(-1, 1, 1, 1)
    return ((images - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)


def figure_to_tensor(fig) -> torch.Tensor:
    """Render a matplotlib figure to a `(3, H, W)` tensor in [0, 1] and close it."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    image = np.asarray(Image.open(buffer).convert("RGB"))  # (H, W, 3) uint8
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255


def local_log_dir(trainer: L.Trainer, logger: Logger | None = None) -> Path:
    """`trainer.log_dir` without its broadcast, so rank 0 alone may call it: the `log_dir` of `logger` (default: the
    trainer's first) for CSV and TensorBoard, else its `save_dir` (W&B), else the trainer's `default_root_dir`."""
    logger = logger or trainer.logger
    return Path(getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir)


def logging_step(trainer: L.Trainer) -> int:
    """The step Lightning gives the loggers for metrics, so images line up with the curves on the same x-axis.

    It counts optimizer steps, except under manual optimization (the GAN), where it counts batches: there
    `trainer.global_step` counts the steps of both optimizers and would place images ahead of the losses.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def log_images(trainer: L.Trainer, key: str, images: torch.Tensor, nrow: int = 8, step: int | None = None) -> Path | None:
    """Log `images` `(N, C, H, W)` in [0, 1] as one grid of `nrow` columns to every logger of `trainer` (rank 0 only),
    at `step` (default: `logging_step(trainer)`).

    Returns the PNG path when a file was written (CSV logger or no logger), else None.
    """
    if not trainer.is_global_zero:
        return None
    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)  # (C, H', W')
    step = logging_step(trainer) if step is None else step
    written = None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, step)
        elif isinstance(logger, WandbLogger):
            # uint8 (H, W, C): W&B reads float tensors as 0-255 values, which would show [0, 1] images as black
            pixels = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            logger.log_image(key=key, images=[pixels], step=step)
        else:
            written = save_png(grid, local_log_dir(trainer, logger), key, step)
    if not trainer.loggers:
        written = save_png(grid, local_log_dir(trainer), key, step)
    return written


def save_png(grid: torch.Tensor, root: Path, key: str, step: int) -> Path:
    """Save a `(C, H, W)` image in [0, 1] as `<root>/images/<key>_step<step>.png` ("/" in the key becomes "_")."""
    path = root / "images" / f"{key.replace('/', '_')}_step{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path
