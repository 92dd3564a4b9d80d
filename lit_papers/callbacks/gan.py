"""What a GAN run shows while it trains: sample grids from fixed noise, and the 1-D picture of the paper's Fig. 1.

Both callbacks use only the task's interface (`sample`, `fixed_noise`, `discriminate`, `generator.output_range`) and
log through `lit_papers.callbacks.images.log_images`, so they work with any logger.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import lightning as L
import torch
import torch.nn.functional as F

from lit_papers.callbacks.images import (
    figure_to_tensor,
    local_log_dir,
    log_images,
    logging_step,
    min_max_scale,
    save_png,
)


@contextmanager
def _eval_mode(module: torch.nn.Module):
    """`module` in eval mode inside the block (no dropout, BatchNorm running statistics), its mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class SampleGrid(L.Callback):
    """Log G(fixed_noise) as an image grid after every `every_n_epochs` training epochs (and after the last one).

    The same noise every time, so the grids show how the generator's mapping evolves. Samples are mapped to [0, 1] by
    the generator's `output_range` (sigmoid: as is, tanh: (x + 1) / 2), or per image by min-max when it has none.

    Args:
        every_n_epochs: log after every n-th epoch.
        nrow: images per row of the grid.
        upscale: enlarge each image this many times (nearest neighbour), so tiny images stay readable.
    """

    def __init__(self, every_n_epochs: int = 1, nrow: int = 8, upscale: int = 1) -> None:
        self.every_n_epochs, self.nrow, self.upscale = every_n_epochs, nrow, upscale

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = trainer.current_epoch + 1 == trainer.max_epochs
        if (trainer.current_epoch + 1) % self.every_n_epochs and not last:
            return
        if not trainer.is_global_zero or len(pl_module.fixed_noise) == 0:
            return
        with _eval_mode(pl_module.generator):
            samples = pl_module.sample(z=pl_module.fixed_noise).float().cpu()  # (N, C, H, W)
        if samples.ndim != 4:
            raise ValueError(f"SampleGrid shows images (N, C, H, W); the generator gives {tuple(samples.shape)}")
        value_range = getattr(pl_module.generator, "output_range", None)
        if value_range is None:
            images = min_max_scale(samples)
        else:
            lo, hi = value_range
            images = ((samples - lo) / (hi - lo)).clamp(0, 1)
        if self.upscale > 1:
            images = F.interpolate(images, scale_factor=self.upscale, mode="nearest")
        log_images(trainer, "samples", images, nrow=self.nrow)


def kde(points: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Gaussian kernel density estimate of 1-D `points` on `grid`, Scott's bandwidth (n^-1/5 * std)."""
    bandwidth = points.std() * len(points) ** -0.2
    z = (grid[:, None] - points[None, :]) / bandwidth  # (G, N)
    return torch.exp(-0.5 * z**2).mean(1) / (bandwidth * math.sqrt(2 * math.pi))


def density_figure(task: L.LightningModule, real: torch.Tensor, num_samples: int = 10_000, title: str | None = None):
    """The paper's Fig. 1 for a 1-D GAN `task`: p_data, p_g and D(x) over x, and the map z -> x = G(z) below.

    Args:
        task: a 1-D GAN (`lit_papers.tasks.gan.GAN` interface: `sample`, `discriminate`, `latent_dim`,
            `latent_distribution`); evaluated in eval mode, its mode restored after.
        real: held-out data points, any shape (flattened); p_data is their kernel density estimate.
        num_samples: generator samples behind p_g's kernel density estimate.
        title: the figure's title; by default it says the figure is from a run (the paper's Fig. 1 is a schematic).

    Returns:
        A matplotlib `Figure` outside pyplot (a notebook shows it with `display(figure)`).
    """
    real = real.float().flatten().cpu()
    with _eval_mode(task), torch.no_grad():
        fake = task.sample(num_samples).float().flatten().cpu()
        lo, hi = float(min(real.min(), fake.min())), float(max(real.max(), fake.max()))
        lo, hi = lo - 0.15 * (hi - lo), hi + 0.15 * (hi - lo)
        grid = torch.linspace(lo, hi, 400)
        d_of_x = task.discriminate(grid.view(-1, 1)).float().cpu()
        z_to_x = None
        if task.latent_dim == 1:  # the lower panel of Fig. 1: where G sends evenly spaced z
            half_width = math.sqrt(3) if task.latent_distribution == "uniform" else 2.0  # support / 2 sd
            z = torch.linspace(-half_width, half_width, 25).view(-1, 1)
            z_to_x = (z.flatten(), task.sample(z=z).float().flatten().cpu())
    title = title or "Our 1-D GAN run (the paper's Fig. 1 is a schematic)"
    return _draw(grid, kde(real, grid), kde(fake, grid), d_of_x, z_to_x, title)


def _draw(grid, p_data, p_g, d_of_x, z_to_x, title: str):
    # A bare Figure, not pyplot: no backend or display needed, and the caller's own pyplot figures are untouched.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot(grid, p_data, "k:", lw=2, label=r"$p_{data}$ (KDE of held-out data)")
    top.plot(grid, p_g, "g-", lw=2, label=r"$p_g$ (KDE of G's samples)")
    top.plot(grid, d_of_x, "b--", lw=2, label=r"$D(x)$")
    top.axhline(0.5, color="0.7", lw=0.8)
    top.set_ylim(0, max(1.05, float(max(p_data.max(), p_g.max())) * 1.1))
    top.legend(loc="upper right", fontsize=8, frameon=False)
    top.set_title(title, fontsize=10)
    if z_to_x is not None:  # lines from z (spread evenly over the x-axis for display) up to x = G(z)
        z, x_of_z = z_to_x
        z_display = grid[0] + (z - z[0]) / (z[-1] - z[0]) * (grid[-1] - grid[0])
        for zd, x in zip(z_display.tolist(), x_of_z.tolist()):
            bottom.annotate("", xy=(x, 1), xytext=(zd, 0), arrowprops=dict(arrowstyle="->", color="0.4", lw=0.8))
    bottom.set_ylim(0, 1)
    bottom.set_yticks([0, 1], ["z", "x"])
    bottom.set_xlabel("x")
    fig.tight_layout()
    return fig


class Density1dPlot(L.Callback):
    """Draw `density_figure` (the paper's Fig. 1 from a real run) after every `every_n_epochs` training epochs.

    p_data comes from held-out data (the validation loader). The figure goes to the run's loggers and is also kept as
    a PNG, `<log_dir>/images/density_step*.png`, whatever the logger.

    Args:
        every_n_epochs: draw after every n-th training epoch (and after the last one).
        num_samples: generator samples (and at most as many held-out points) behind the density estimates.
    """

    def __init__(self, every_n_epochs: int = 10, num_samples: int = 10_000) -> None:
        self.every_n_epochs, self.num_samples = every_n_epochs, num_samples

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = trainer.current_epoch + 1 == trainer.max_epochs
        if ((trainer.current_epoch + 1) % self.every_n_epochs and not last) or not trainer.is_global_zero:
            return
        title = f"Our 1-D GAN run after epoch {trainer.current_epoch + 1} (the paper's Fig. 1 is a schematic)"
        figure = density_figure(pl_module, self._held_out(trainer), self.num_samples, title)
        image = figure_to_tensor(figure)  # (3, H, W)
        if log_images(trainer, "density", image[None], nrow=1) is None:  # TensorBoard / W&B: keep a PNG as well
            save_png(image, local_log_dir(trainer), "density", logging_step(trainer))

    def _held_out(self, trainer: L.Trainer) -> torch.Tensor:
        loader = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else trainer.val_dataloaders
        points, count = [], 0
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            points.append(x.float().flatten())
            count += len(points[-1])
            if count >= self.num_samples:
                break
        return torch.cat(points)[: self.num_samples]
