"""Adversarial training: Goodfellow et al. 2014, Algorithm 1, with Lightning's manual optimization.

    for each iteration:
        k times:  draw m noise vectors z and the NEXT real minibatch x (a different one every time), and ascend
                  (1/m) sum_i [log D(x_i) + log(1 - D(G(z_i)))] on D's parameters
        once:     draw m fresh z and descend (1/m) sum_i log(1 - D(G(z_i)))  ("minimax", the paper's objective),
                  or ascend (1/m) sum_i log D(G(z_i))  ("non_saturating", what the paper recommends in practice)

How Lightning's counters read when k > 1 (N = training batches per epoch):
- One batch (one `training_step`) is one D step; a G step follows every k-th batch, in the same `training_step`.
  An epoch therefore holds N D steps and about N/k G steps; an iteration cut by the epoch's end continues in the next
  epoch. `limit_train_batches`, `val_check_interval` and `log_every_n_steps` count batches, i.e. D steps.
- `trainer.global_step` counts optimizer steps of both nets: k + 1 per iteration. `max_steps` counts the same, so
  `max_steps = iterations * (k + 1)` stops on a complete iteration. The task reads its position in the iteration from
  `global_step`, which checkpoints restore, so a resumed run continues the same iteration.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.utilities.distributed import gather_all_tensors

from lit_papers.metrics.parzen import DEFAULT_SIGMAS, parzen_estimate, select_sigma
from lit_papers.tasks.base import NonFiniteLoss, Task, save_task_hyperparameters

GeneratorLoss = Literal["non_saturating", "minimax"]


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-(1/2)[mean log D(x) + mean log(1 - D(G(z)))]: D's objective, negated to be minimised.

    The 1/2 is the reference code's (`AdversaryCost2`), so its learning rate of 0.1 means the same step size here.
    """
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))  # -mean log D(x)
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))  # -mean log(1 - D(G(z)))
    return 0.5 * (real + fake)


def generator_loss(fake_logits: torch.Tensor, loss: GeneratorLoss = "non_saturating") -> torch.Tensor:
    """G's loss, minimised: mean log(1 - D(G(z))) ("minimax") or -mean log D(G(z)) ("non_saturating")."""
    if loss == "minimax":
        # log(1 - sigmoid(l)) = -softplus(l): its gradient vanishes when D confidently rejects the samples.
        return -F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    if loss == "non_saturating":
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    raise ValueError(f"unknown generator loss {loss!r}; use 'non_saturating' or 'minimax'")


def gather_in_dataset_order(data: torch.Tensor) -> torch.Tensor:
    """Every DDP rank's evaluation examples `(N_r, D)`, together in dataset order `(N, D)`, on every rank.

    Evaluation samplers (Lightning's and `UnrepeatedDistributedSampler`, unshuffled) deal example i to rank
    i % world_size, so the ranks' shards can differ in length by one: torchmetrics' gather pads and trims them, where
    `LightningModule.all_gather` needs equal shapes. In dataset order, the examples that choose the Parzen sigma are
    the same whatever the number of processes.
    """
    shards = gather_all_tensors(data)
    world_size = len(shards)
    index = torch.cat([torch.arange(len(shard), device=data.device) * world_size + rank
                       for rank, shard in enumerate(shards)])  # each example's index in the dataset
    return torch.cat(shards)[index.argsort()]


class GAN(Task):
    """A generator and a discriminator trained against each other (Algorithm 1).

    Logs `train/d_loss`, `train/g_loss`, `train/d_real` and `train/d_fake` (mean D output on real and generated
    samples), `val/d_real`, `val/d_fake` and, when `parzen_samples > 0`, `val/parzen_ll`, `val/parzen_stderr` and
    `val/parzen_sigma` (`test/` likewise). Sample grids come from `lit_papers.callbacks.gan.SampleGrid`, drawn from
    `fixed_noise`. Under DDP the task turns on DDP's `find_unused_parameters` itself (see `setup`).

    Args:
        generator: maps `(B, latent_dim)` noise to samples (e.g. from `lit_papers.nets.gan`).
        discriminator: maps samples to `(B,)` or `(B, 1)` logits: no sigmoid, the losses apply it.
        g_optimizer: builds G's optimizer from G's parameters (`None`: Adam with torch's defaults).
        d_optimizer: builds D's optimizer from D's parameters (`None`: Adam with torch's defaults).
        g_lr_scheduler: builds G's LR scheduler from G's optimizer (`None`: constant).
        d_lr_scheduler: builds D's LR scheduler from D's optimizer (`None`: constant).
        scheduler_interval: step schedulers every "epoch" or after every step of their own optimizer ("step").
        k: discriminator steps per generator step, each on its own real minibatch (1 in the paper's experiments).
        loss: generator loss, "non_saturating" (max log D(G(z))) or "minimax" (min log(1 - D(G(z)))).
        latent_dim: size of z; `None` takes `generator.latent_dim`, or 100 (the paper's) if it has none.
        latent_distribution: p_z, "normal" (N(0, I), the reference code's) or "uniform" (U(-sqrt 3, sqrt 3), unit
            variance; the paper's Fig. 1).
        gradient_clip_val: clip each net's gradients to this norm (or value) before its step; `None` does not clip.
            Lightning forbids `Trainer(gradient_clip_val=...)` under manual optimization, so the task takes it.
        gradient_clip_algorithm: "norm" or "value".
        num_fixed_samples: size of the fixed noise batch behind comparable sample grids across epochs.
        parzen_samples: generator samples for the Parzen-window log-likelihood at each validation (10,000 in the
            paper); 0 turns the metric off.
        parzen_sigmas: the bandwidth grid searched on the first `parzen_select_size` validation examples.
        parzen_select_size: validation examples that choose sigma; the rest are scored. Testing scores the whole test
            set with the sigma chosen at the last validation (the paper's protocol), or, without one, like validation.
        nonfinite_loss: what a NaN or infinite training loss does: "stop" with an error naming the step, or "skip"
            the optimizer step of the net whose loss it is (see `lit_papers.tasks.base.Task`).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        g_optimizer: OptimizerCallable | None = None,
        d_optimizer: OptimizerCallable | None = None,
        g_lr_scheduler: LRSchedulerCallable | None = None,
        d_lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        k: int = 1,
        loss: GeneratorLoss = "non_saturating",
        latent_dim: int | None = None,
        latent_distribution: Literal["normal", "uniform"] = "normal",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        num_fixed_samples: int = 64,
        parzen_samples: int = 0,
        parzen_sigmas: Sequence[float] = DEFAULT_SIGMAS,
        parzen_select_size: int = 1000,
        nonfinite_loss: NonFiniteLoss = "stop",
    ) -> None:
        super().__init__(nonfinite_loss)
        live = ["generator", "discriminator", "g_optimizer", "d_optimizer", "g_lr_scheduler", "d_lr_scheduler"]
        save_task_hyperparameters(self, live_objects=live)
        if k < 1:
            raise ValueError(f"k must be >= 1 discriminator steps per generator step, got {k}")
        generator_loss(torch.zeros(1), loss)  # fail at construction on an unknown loss, not after the first D step
        self.automatic_optimization = False  # two optimizers stepped in a fixed order: Lightning 2.x needs manual mode
        self.generator, self.discriminator = generator, discriminator
        self.optimizer_factories = (g_optimizer or torch.optim.Adam, d_optimizer or torch.optim.Adam)
        self.scheduler_factories = (g_lr_scheduler, d_lr_scheduler)
        self.scheduler_interval = scheduler_interval
        self.k, self.loss, self.latent_distribution = k, loss, latent_distribution
        self.latent_dim = latent_dim if latent_dim is not None else getattr(generator, "latent_dim", 100)
        self.gradient_clip_val, self.gradient_clip_algorithm = gradient_clip_val, gradient_clip_algorithm
        self.parzen_samples, self.parzen_sigmas = parzen_samples, tuple(parzen_sigmas)
        self.parzen_select_size = parzen_select_size
        # Drawn from a fixed seed, so every run, process and resumed run shows the same noise in its sample grids.
        fixed = self.noise(num_fixed_samples, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
        self.register_buffer("fixed_noise", fixed, persistent=False)
        self.register_buffer("parzen_sigma", torch.tensor(0.0))  # chosen at validation, used at test; 0 = not yet
        self._parzen_data: list[torch.Tensor] = []
        # D's mean output on real and on generated samples, as torchmetrics means over samples: summed over DDP ranks
        # exactly, where `self.log(..., sync_dist=True)` averages the ranks' means, wrong when their shards differ in
        # size (Lightning #21838).
        self.eval_means = nn.ModuleDict({
            stage: nn.ModuleDict({"d_real": MeanMetric(), "d_fake": MeanMetric()}) for stage in ("val", "test")
        })

    # ------------------------------------------------------------------------------------------------- sampling

    def noise(self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None):
        """`n` draws of z ~ p_z, `(n, latent_dim)`; by default from the global stream, which is each rank's own under
        DDP (`Task.on_fit_start`), so a step sees world_size x m distinct fakes."""
        device = device if device is not None else self.device
        shape = (n, self.latent_dim)
        if self.latent_distribution == "normal":
            return torch.randn(shape, generator=generator, device=device)
        return (2 * torch.rand(shape, generator=generator, device=device) - 1) * math.sqrt(3)

    @torch.no_grad()
    def sample(self, n: int | None = None, z: torch.Tensor | None = None) -> torch.Tensor:
        """`n` generated samples `(n, *sample_shape)` from fresh noise, or G(z) for the given noise.

        The generator runs in its current mode (Lightning sets eval mode during validation); call `.eval()` first for
        deterministic nets with BatchNorm or dropout.
        """
        if (n is None) == (z is None):
            raise ValueError("pass either n or z")
        return self.generator(self.noise(n) if z is None else z.to(self.device))

    @torch.no_grad()
    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """D(x) as the paper writes it: the probability that each sample is real, `(B,)` (the net gives logits)."""
        return self._logits(x.to(self.device)).sigmoid()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(x).view(x.shape[0])  # (B,): accepts nets returning (B,) or (B, 1)

    @staticmethod
    def _real(batch) -> torch.Tensor:
        # Datasets yield images alone or (images, labels); the labels play no part in the GAN game.
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    # ------------------------------------------------------------------------------------------------- training

    def setup(self, stage: str) -> None:
        # Each backward reaches one net only (the other is frozen by toggle_optimizer), so DDP must look for parameters
        # without gradients, or its reducer waits for them and fails at the next step. Set here, before the strategy
        # wraps the module, so a plain `strategy: ddp` works. `_ddp_kwargs` (DDPStrategy's DDP arguments) is private,
        # but Lightning 2.6 gives a module no public way to set them; the public ones are the user's (the strategy
        # "ddp_find_unused_parameters_true" or `DDPStrategy(find_unused_parameters=True)`, named by Lightning's error).
        kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
        if isinstance(self.trainer.strategy, DDPStrategy) and isinstance(kwargs, dict):
            kwargs["find_unused_parameters"] = True

    def training_step(self, batch, batch_idx: int) -> None:
        g_opt, d_opt = self.optimizers()
        real = self._real(batch)
        m = real.shape[0]

        # D step on this batch's real images and fresh noise; G is fixed (frozen by the toggle, no graph through it).
        self.toggle_optimizer(d_opt)
        with torch.no_grad():
            fake = self.generator(self.noise(m))
        real_logits, fake_logits = self._logits(real), self._logits(fake)
        d_loss = discriminator_loss(real_logits, fake_logits)
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()  # gradients are clipped in on_before_optimizer_step, after AMP has unscaled them
        self.untoggle_optimizer(d_opt)
        self._step_schedulers(d_opt, "step")
        self.log_train_step("train/d_loss", d_loss, prog_bar=True)
        self.log_train_step("train/d_real", real_logits.sigmoid().mean(), prog_bar=True)
        self.log_train_step("train/d_fake", fake_logits.sigmoid().mean(), prog_bar=True)

        # global_step counts k + 1 steps per iteration, so after this D step it reads k exactly when it was the k-th.
        if self.trainer.global_step % (self.k + 1) != self.k:
            return
        self.toggle_optimizer(g_opt)
        g_loss = generator_loss(self._logits(self.generator(self.noise(m))), self.loss)  # fresh noise
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        self.untoggle_optimizer(g_opt)
        self._step_schedulers(g_opt, "step")
        self.log_train_step("train/g_loss", g_loss, prog_bar=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)  # the non-finite loss policy, before clipping
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)

    def on_train_epoch_end(self) -> None:
        for opt in self.optimizers():
            self._step_schedulers(opt, "epoch")

    def _step_schedulers(self, optimizer, interval: str) -> None:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the torch one
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == interval and config.scheduler.optimizer is optimizer:
                config.scheduler.step()

    def configure_optimizers(self):
        configs = []
        for name, net, make_optimizer, make_scheduler in zip(
            ("generator", "discriminator"), (self.generator, self.discriminator), self.optimizer_factories,
            self.scheduler_factories,
        ):
            optimizer = make_optimizer(net.parameters())
            config = {"optimizer": optimizer}
            if make_scheduler is not None:
                scheduler = make_scheduler(optimizer)
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    raise ValueError("ReduceLROnPlateau needs a monitored metric; the GAN losses are not one")
                # named, so LearningRateMonitor logs `lr-generator`/`lr-discriminator`, not `lr-Adam`/`lr-Adam-1`
                interval = self.scheduler_interval
                config["lr_scheduler"] = {"scheduler": scheduler, "interval": interval, "name": f"lr-{name}"}
            configs.append(config)
        return configs  # [G, D], the order of the constructor's arguments

    # ----------------------------------------------------------------------------------------------- evaluation

    def _evaluate(self, batch, stage: str) -> None:
        real = self._real(batch)
        real_logits, fake_logits = self._logits(real), self._logits(self.generator(self.noise(real.shape[0])))
        for name, logits in (("d_real", real_logits), ("d_fake", fake_logits)):
            mean = self.eval_means[stage][name]
            mean.update(logits.sigmoid())  # (B,): one value per sample
            self.log(f"{stage}/{name}", mean)
        if self.parzen_samples > 0 and not self.trainer.sanity_checking:
            self._parzen_data.append(real.flatten(1).float())

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_parzen("val")

    def on_test_epoch_end(self) -> None:
        self._log_parzen("test")

    @torch.no_grad()
    def parzen_reference_samples(self) -> torch.Tensor:
        """`parzen_samples` generated samples `(M, D)`, from a fixed seed so every process and epoch uses the same z."""
        generator = torch.Generator(self.device).manual_seed(1)
        z = self.noise(self.parzen_samples, generator=generator)
        return torch.cat([self.generator(chunk).flatten(1).float() for chunk in z.split(1000)])

    def _log_parzen(self, stage: str) -> None:
        if not self._parzen_data:
            return
        data = torch.cat(self._parzen_data)
        self._parzen_data.clear()
        if self.trainer.world_size > 1:  # every process scores all examples, so all choose the same sigma
            data = gather_in_dataset_order(data)
        samples = self.parzen_reference_samples()
        if stage == "test" and self.parzen_sigma > 0:
            scored, sigma = data, float(self.parzen_sigma)
        else:
            n_select = min(self.parzen_select_size, len(data) // 2)
            sigma = select_sigma(data[:n_select], samples, self.parzen_sigmas)
            scored = data[n_select:]
            self.parzen_sigma.fill_(sigma)
        result = parzen_estimate(scored, samples, sigma)
        self.log(f"{stage}/parzen_ll", result.mean, sync_dist=True)
        self.log(f"{stage}/parzen_stderr", result.stderr, sync_dist=True)
        self.log(f"{stage}/parzen_sigma", result.sigma, sync_dist=True)
