"""Online linear probe: watch how linearly separable the encoder's features become while a self-supervised task trains.

After every training batch the callback computes the encoder's pooled features of the batch's images (eval mode, no
gradients, so pre-training is untouched), and takes one optimizer step on its own `probe_head` (BatchNorm without
affine + Linear, the head of MAE's offline linear protocol, shared with `lit_papers.nets.linear_probe`). On validation
it logs `probe/acc1` and `probe/loss`. The number tracks, but does not replace, the offline protocol: the features move
while the probe learns, and the probe sees the pre-training augmentations.

Validation batches are normalised with their own statistics, not the BatchNorm's running averages: the encoder changes
every step, and MAE's [cls] features drift between steps by more than they vary between images, so running averages
taken over the last steps mis-normalise them (measured on digits: 17% with running averages vs 68% with batch
statistics, for the same head). The offline protocol, whose encoder is frozen, uses the running averages.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from lit_papers.nets.linear_probe import pooled_features, probe_head


class OnlineLinearProbe(L.Callback):
    """Train a linear classifier on detached features of `pl_module.net` (any net with the timm interface).

    Args:
        num_classes: classes of the labelled batches `(images, labels)`.
        lr: AdamW learning rate of the probe (no weight decay).

    Under DDP every process trains its own copy of the probe on its shard; `probe/acc1` and `probe/loss` count every
    process's validation images once, each scored by its own process's probe.
    """

    def __init__(self, num_classes: int, lr: float = 1e-3) -> None:
        self.num_classes, self.lr = num_classes, lr
        self.head: torch.nn.Sequential | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict | None = None
        self._val_sums: torch.Tensor | None = None  # this process's validation loss sum, hits and images

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.head = probe_head(pl_module.net.num_features, self.num_classes).to(pl_module.device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=0.0)
        if self._pending_state is not None:  # resuming: the checkpoint was read before the head existed
            self.load_state_dict(self._pending_state)

    def _features(self, trainer: L.Trainer, pl_module: L.LightningModule, images: torch.Tensor) -> torch.Tensor:
        net = pl_module.net
        was_training = net.training
        net.eval()  # probe the encoder as it would be used: no drop path/dropout, BN running statistics
        with torch.no_grad(), trainer.strategy.precision_plugin.forward_context():
            features = pooled_features(net, images)  # (B, num_features)
        net.train(was_training)
        return features.float()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        images, labels = batch[0], batch[1]
        features = self._features(trainer, pl_module, images)
        self.head.train()
        with torch.enable_grad():
            loss = F.cross_entropy(self.head(features), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        pl_module.log("probe/train_loss", loss.detach(), on_step=False, on_epoch=True, batch_size=len(labels))

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.head is None:  # validate() without fit: no probe has been trained
            return
        images, labels = batch[0], batch[1]
        norm, linear = self.head
        with torch.no_grad():
            features = F.batch_norm(self._features(trainer, pl_module, images), None, None, training=True, eps=norm.eps)
            logits = linear(features)  # (B, num_classes)
        sums = torch.stack([F.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(-1) == labels).sum(),
                            logits.new_tensor(len(labels))])  # loss sum, hits, images
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.head is None:
            return
        if self._val_sums is None:  # no validation batch on this process (all must join the reduction)
            self._val_sums = torch.zeros(3, device=pl_module.device)
        # Sums over all processes' images, so ranks whose shards differ in size weigh by their images (a mean of the
        # ranks' means would not; Lightning #21838). The reduced values are the same on every rank; `sync_dist`
        # averages those equal values, and keeps Lightning from warning that epoch values are not synchronised.
        loss_sum, hits, seen = trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        self._val_sums = None
        pl_module.log("probe/loss", loss_sum / seen, sync_dist=True)
        pl_module.log("probe/acc1", hits / seen, prog_bar=True, sync_dist=True)

    def state_dict(self) -> dict:
        if self.head is None:
            return {}
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.head is None:
            self._pending_state = state_dict
            return
        self.head.load_state_dict(state_dict["head"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._pending_state = None
