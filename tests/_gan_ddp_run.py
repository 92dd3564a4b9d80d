"""A two-process CPU DDP fit of the GAN task, run by `tests/test_gan.py` in a subprocess (not collected by pytest).

Lightning's `ddp` launcher starts rank 1 by re-running this file with the same arguments. Each rank writes what it
saw and how far its optimizers stepped to `<out_dir>/rank<r>.json`.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_papers.nets.gan import MLPDiscriminator, MLPGenerator
from lit_papers.tasks.gan import GAN

K, N_POINTS, BATCH = 2, 80, 10  # 40 points and 4 batches per rank: 4 D steps and 2 G steps


class Recorder(nn.Module):
    """Runs `net` and keeps a copy of every input batch."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.net(x)


def main(out_dir: Path) -> None:
    L.seed_everything(0)
    generator = Recorder(MLPGenerator(latent_dim=2, hidden_dims=(8,), sample_shape=(1,), output="sigmoid"))
    discriminator = Recorder(MLPDiscriminator((1,), (8,)))
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    model = GAN(generator, discriminator, adam, adam, k=K, latent_dim=2, num_fixed_samples=4)
    data = TensorDataset(1000 + torch.arange(N_POINTS, dtype=torch.float32).view(-1, 1))  # reals >= 1, fakes in (0, 1)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=BATCH, shuffle=True))

    def adam_steps(net: nn.Module) -> int:
        first = next(net.parameters())
        return next(int(opt.state[first]["step"]) for opt in trainer.optimizers if first in opt.state)

    real = [x.flatten().tolist() for x in discriminator.inputs if x.min() >= 1]
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "d_steps": adam_steps(discriminator),
        "g_steps": adam_steps(generator),
        "real_batches": real,
        "first_noise": generator.inputs[0].flatten().tolist(),
        "params": [p.detach().double().sum().item() for p in model.parameters()],
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
