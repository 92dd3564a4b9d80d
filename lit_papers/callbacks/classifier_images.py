"""What a classifier gets right and wrong, on the dashboard: validation images labelled with the predicted and true
class, and the confusion matrix of the last validation epoch at the end of fit."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from lit_papers.callbacks.images import figure_to_tensor, log_images, min_max_scale


class ClassifierImages(L.Callback):
    """Log a grid of the first validation images with "predicted / true" labels every `every_n_epochs` epochs, and
    the confusion matrix of the last validation epoch once fit ends. Uses the (B, num_classes) log-probabilities
    that the classifier task's `validation_step` returns.

    Args:
        num_images: how many images the grid shows.
        every_n_epochs: how often the grid is logged.
        class_names: labels to print instead of class indices (e.g. the DataModule's `classes`).
    """

    def __init__(self, num_images: int = 16, every_n_epochs: int = 1, class_names: list[str] | None = None) -> None:
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.class_names = class_names
        self.confusion: MulticlassConfusionMatrix | None = None

    def _name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.confusion = MulticlassConfusionMatrix(pl_module.net.num_classes).to(pl_module.device)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or outputs is None:
            return
        images, targets = batch
        predictions = outputs.argmax(-1)
        self.confusion.update(predictions, targets)
        if batch_idx == 0 and trainer.current_epoch % self.every_n_epochs == 0:
            self._log_grid(trainer, images[: self.num_images], predictions, targets)

    def _log_grid(self, trainer: L.Trainer, images: torch.Tensor, predictions, targets) -> None:
        import matplotlib.pyplot as plt

        if images.ndim == 5:  # multi-crop batches: show the first crop
            images = images[:, 0]
        images = min_max_scale(images.float()).cpu()
        cols = min(8, len(images))
        rows = -(-len(images) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, image, pred, true in zip(axes.flat, images, predictions.tolist(), targets.tolist()):
            ax.imshow(image.permute(1, 2, 0).numpy())
            ax.set_title(f"{self._name(pred)} / {self._name(true)}", fontsize=8, color="green" if pred == true else "red")
        fig.suptitle("predicted / true", fontsize=9)
        log_images(trainer, "val/predictions", figure_to_tensor(fig)[None], nrow=1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.confusion is None or not self.confusion.update_called:
            return
        import matplotlib.pyplot as plt

        matrix = self.confusion.compute().cpu().numpy()  # (true, predicted) counts, synced over devices
        n = len(matrix)
        side = min(12.0, max(4.0, 0.45 * n))  # inches; 1000 ImageNet classes still make a readable 1200-pixel image
        fig, ax = plt.subplots(figsize=(side, side))
        ax.imshow(matrix, cmap="Blues")
        ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title("validation confusion matrix")
        if n <= 20:
            ticks = [self._name(i) for i in range(n)]
            ax.set_xticks(range(n), ticks, fontsize=7), ax.set_yticks(range(n), ticks, fontsize=7)
            for (i, j), count in np.ndenumerate(matrix):
                ax.text(j, i, int(count), ha="center", va="center", fontsize=6, color="white" if count > matrix.max() / 2 else "black")
        log_images(trainer, "val/confusion_matrix", figure_to_tensor(fig)[None], nrow=1)
