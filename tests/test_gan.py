"""The GAN task (Algorithm 1 under manual optimization), its nets, the Parzen metric and the Fig. 1 toy."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from _ddp_run import Recorder, adam_steps
from conftest import REPO_ROOT
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_papers.callbacks.momentum import MomentumRamp
from lit_papers.cli import main
from lit_papers.data.toy import Gaussian1dDataModule
from lit_papers.metrics.parzen import (
    parzen_estimate,
    parzen_log_likelihood,
    select_sigma,
)
from lit_papers.nets.gan import (
    DCGANDiscriminator,
    DCGANGenerator,
    Maxout,
    MaxoutDiscriminator,
    MLPDiscriminator,
    MLPGenerator,
)
from lit_papers.tasks.gan import GAN, discriminator_loss, generator_loss

CONFIGS = REPO_ROOT / "configs" / "gan"


def tiny_gan(k: int = 1, optimizer=functools.partial(torch.optim.Adam, lr=1e-3), **kwargs) -> GAN:
    torch.manual_seed(0)
    generator = Recorder(MLPGenerator(latent_dim=2, hidden_dims=(8,), sample_shape=(1,), output="sigmoid"))
    discriminator = Recorder(MLPDiscriminator((1,), (8,)))
    return GAN(generator, discriminator, optimizer, optimizer, k=k, latent_dim=2, num_fixed_samples=4, **kwargs)


def batches(n: int, batch_size: int = 4) -> DataLoader:
    # Real points are >= 1000 and distinct, the sigmoid generator's samples lie in (0, 1): every D input is tagged.
    data = TensorDataset(1000 + torch.arange(n * batch_size, dtype=torch.float32).view(-1, 1))
    return DataLoader(data, batch_size=batch_size, shuffle=True)


def fit(model: GAN, train: DataLoader, val: DataLoader | None = None, **trainer_kwargs) -> L.Trainer:
    kwargs = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(**{**kwargs, **trainer_kwargs})
    trainer.fit(model, train, val)
    return trainer


# ------------------------------------------------------------------------------------------- Algorithm 1


def test_k3_takes_k_discriminator_steps_on_distinct_real_batches_then_one_generator_step():
    model = tiny_gan(k=3)
    trainer = fit(model, batches(9))
    d, g = model.discriminator, model.generator
    assert adam_steps(trainer, d) == 9 and adam_steps(trainer, g) == 3
    assert trainer.global_step == 12, "global_step counts k + 1 optimizer steps per iteration"
    kinds = "".join("R" if x.min() >= 1 else "F" for x in d.inputs)
    assert kinds == ("RF" * 3 + "F") * 3, "D step = D(real), D(fake); after every 3rd one G's step scores D(G(z))"
    real = [tuple(x.flatten().tolist()) for x in d.inputs if x.min() >= 1]
    seen = sorted(v for batch in real for v in batch)
    assert len(set(real)) == 9 and seen == [1000.0 + i for i in range(36)], "each D step on its own real batch"
    noise = [tuple(z.flatten().tolist()) for z in g.inputs]
    assert len(noise) == 12 and len(set(noise)) == 12, "fresh noise for every D step and every G step"


def test_iterations_carry_over_epoch_ends_and_max_steps_counts_both_nets():
    model = tiny_gan(k=3)
    trainer = fit(model, batches(5), max_epochs=2)  # 10 batches: G steps after the 3rd, 6th and 9th
    assert (adam_steps(trainer, model.discriminator), adam_steps(trainer, model.generator)) == (10, 3)
    model = tiny_gan(k=3)
    trainer = fit(model, batches(9), max_steps=8)  # exactly two iterations of 3 + 1 steps
    assert (adam_steps(trainer, model.discriminator), adam_steps(trainer, model.generator)) == (6, 2)


def test_a_resumed_run_continues_the_interrupted_iteration(tmp_path):
    # 5 batches per epoch, k = 3: the first epoch ends two D steps into its second iteration.
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(tiny_gan(k=3), batches(5), enable_checkpointing=True, callbacks=[checkpoint])
    model = tiny_gan(k=3)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, batches(5), ckpt_path=checkpoint.last_model_path)
    assert (adam_steps(trainer, model.discriminator), adam_steps(trainer, model.generator)) == (10, 3)


def test_losses_match_the_papers_formulas():
    torch.manual_seed(0)
    real_logits, fake_logits = torch.randn(16) * 3, torch.randn(16) * 3
    d_real, d_fake = real_logits.sigmoid(), fake_logits.sigmoid()
    expected_d = -0.5 * (d_real.log().mean() + (1 - d_fake).log().mean())
    torch.testing.assert_close(discriminator_loss(real_logits, fake_logits), expected_d)
    torch.testing.assert_close(generator_loss(fake_logits, "minimax"), (1 - d_fake).log().mean())
    torch.testing.assert_close(generator_loss(fake_logits, "non_saturating"), -d_fake.log().mean())
    # The paper's reason for the non-saturating loss: when D rejects G's samples, log(1 - D(G(z))) has no gradient.
    rejected = torch.full((4,), -10.0, requires_grad=True)
    for loss, expected_grad in (("minimax", 0.0), ("non_saturating", -1.0)):
        (grad,) = torch.autograd.grad(generator_loss(rejected, loss) * 4, rejected)
        torch.testing.assert_close(grad, torch.full((4,), expected_grad), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="unknown generator loss"):
        tiny_gan(loss="wasserstein")


@pytest.mark.parametrize("loss", ["minimax", "non_saturating"])
def test_training_uses_the_chosen_generator_loss(loss):
    trainer = fit(tiny_gan(loss=loss), batches(2))
    metrics = trainer.callback_metrics
    g_loss, d_fake = float(metrics["train/g_loss"]), float(metrics["train/d_fake"])
    assert {"train/d_loss", "train/g_loss", "train/d_real", "train/d_fake"} <= set(metrics)
    assert (g_loss < 0) if loss == "minimax" else (g_loss > 0)  # mean log(1 - D) < 0 < -mean log D
    assert 0 < d_fake < 1


@pytest.mark.parametrize("interval, epochs, expected", [("step", 1, (3, 6)), ("epoch", 2, (2, 2))])
def test_each_scheduler_steps_with_its_own_optimizer(interval, epochs, expected):
    halve = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    model = tiny_gan(k=2, g_lr_scheduler=halve, d_lr_scheduler=halve, scheduler_interval=interval)
    trainer = fit(model, batches(6 // epochs), max_epochs=epochs)  # 6 D steps and 3 G steps either way
    g_opt, d_opt = trainer.optimizers
    assert g_opt.param_groups[0]["params"][0] is next(model.generator.parameters())
    g_halvings, d_halvings = expected
    assert g_opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**g_halvings)
    assert d_opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**d_halvings)


@pytest.mark.parametrize("algorithm", ["norm", "value", None])
def test_gradient_clipping_bounds_each_step(algorithm):
    # Plain SGD with lr 1: a step moves the parameters by exactly minus the (clipped) gradient.
    clip = 1e-3
    sgd = functools.partial(torch.optim.SGD, lr=1.0)
    model = tiny_gan(optimizer=sgd, gradient_clip_val=clip if algorithm else None,
                     gradient_clip_algorithm=algorithm or "norm")
    before = [p.detach().clone() for p in model.parameters()]
    fit(model, batches(1))  # one D step and one G step
    for net in (model.generator, model.discriminator):
        deltas = [p.detach() - b for p, b in zip(model.parameters(), before) if any(p is q for q in net.parameters())]
        norm = torch.cat([d.flatten() for d in deltas]).norm()
        largest = max(float(d.abs().max()) for d in deltas)
        if algorithm == "norm":
            assert clip * 0.99 < norm <= clip * 1.0001
        elif algorithm == "value":
            assert largest <= clip * 1.0001 and norm > clip
        else:
            assert norm > 10 * clip, "without clipping the step is much larger (so the bounds above can fail)"


@pytest.mark.parametrize("latent_distribution", ["normal", "uniform"])
def test_sample_and_fixed_noise(latent_distribution):
    model = tiny_gan(latent_distribution=latent_distribution)
    z = model.noise(20000)
    assert z.shape == (20000, 2) and abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    if latent_distribution == "uniform":
        assert float(z.abs().max()) <= math.sqrt(3)
    assert model.sample(5).shape == (5, 1)
    torch.testing.assert_close(model.sample(z=model.fixed_noise), model.sample(z=model.fixed_noise))
    torch.testing.assert_close(tiny_gan(latent_distribution=latent_distribution).fixed_noise, model.fixed_noise)


def test_bf16_mixed_precision_runs_on_cpu():
    model = tiny_gan(k=2)
    trainer = fit(model, batches(4), precision="bf16-mixed")
    assert (adam_steps(trainer, model.discriminator), adam_steps(trainer, model.generator)) == (4, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_loss_scaling_is_undone_before_clipping():
    # 16-mixed on a GPU scales each loss, so gradients must be unscaled before they are clipped. A CPU GradScaler
    # runs the same code path here: with scale 2^10, clipping scaled gradients would move the weights 1024x too little.
    clip, scaler = 1e-3, torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = tiny_gan(optimizer=functools.partial(torch.optim.SGD, lr=1.0), gradient_clip_val=clip)
    before = [p.detach().clone() for p in model.parameters()]
    data = DataLoader(TensorDataset(torch.randn(8, 1)), batch_size=8)  # one D step and one G step
    trainer = fit(model, data, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert trainer.global_step == 2 and scaler.get_scale() == 2.0**10, "no step skipped for overflow"
    for net in (model.generator, model.discriminator):
        deltas = [p.detach() - b for p, b in zip(model.parameters(), before) if any(p is q for q in net.parameters())]
        assert float(torch.cat([d.flatten() for d in deltas]).norm()) == pytest.approx(clip, rel=1e-3)


# ------------------------------------------------------------------------------------------- nets


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_paper_mnist_nets():
    generator, discriminator = MLPGenerator(), MaxoutDiscriminator()
    assert n_params(generator) == (100 * 1200 + 1200) + (1200 * 1200 + 1200) + (1200 * 784 + 784)
    assert n_params(discriminator) == (784 * 1200 + 1200) + (240 * 1200 + 1200) + (240 + 1)
    x = generator(torch.randn(6, 100))
    assert x.shape == (6, 1, 28, 28) and 0 < x.min() and x.max() < 1 and generator.output_range == (0.0, 1.0)
    discriminator.eval()
    assert discriminator(x).shape == (6,)
    torch.testing.assert_close(discriminator(x), discriminator(x))  # dropout only in training
    maxout = Maxout(3, 2, num_pieces=4)
    h = torch.randn(5, 3)
    expected = maxout.linear(h).view(5, 2, 4).max(-1).values  # unit j = max over its own 4 pieces
    torch.testing.assert_close(maxout(h), expected)


@pytest.mark.parametrize("size", [32, 64])
def test_dcgan_nets(size):
    generator, discriminator = DCGANGenerator(image_size=size), DCGANDiscriminator(image_size=size)
    x = generator(torch.randn(2, 100))
    assert x.shape == (2, 3, size, size) and x.abs().max() <= 1
    assert discriminator(x).shape == (2,)
    if size == 64:  # the DCGAN reference architecture (nz 100, ngf = ndf = 64, 3 channels)
        assert (n_params(generator), n_params(discriminator)) == (3_576_704, 2_765_568)
    with pytest.raises(ValueError, match="32 or 64"):
        DCGANGenerator(image_size=48)


# ------------------------------------------------------------------------------------------- Parzen


def test_parzen_matches_a_direct_computation_in_any_chunking():
    torch.manual_seed(0)
    x, samples, sigma = torch.randn(20, 3), torch.randn(50, 3), 0.3
    kernels = torch.distributions.Normal(samples[None].double(), sigma)  # one isotropic Gaussian per sample
    direct = kernels.log_prob(x[:, None].double()).sum(-1).logsumexp(-1) - math.log(50)  # (20,)
    for chunk_size in (7, 1000):
        torch.testing.assert_close(parzen_log_likelihood(x, samples, sigma, chunk_size=chunk_size), direct)
    grid = [0.1, 0.3, 1.0]
    per_sigma = parzen_log_likelihood(x, samples, grid, chunk_size=7)
    assert per_sigma.shape == (3, 20)
    torch.testing.assert_close(per_sigma[1], direct)
    assert select_sigma(x, samples, grid) == grid[int(per_sigma.mean(1).argmax())]


def test_parzen_on_a_known_gaussian():
    # Samples and test points from N(0, I_2): the window's density tends to N(0, (1 + sigma^2) I), whose expected
    # log-likelihood of N(0, I) points is known in closed form.
    torch.manual_seed(0)
    d, sigma = 2, 0.5
    samples, test = torch.randn(5000, d), torch.randn(1000, d)
    result = parzen_estimate(test, samples, sigma, chunk_size=2500)
    var = 1 + sigma**2
    expected = -0.5 * d * math.log(2 * math.pi * var) - 0.5 * d / var
    assert abs(result.mean - expected) < 3 * result.stderr + 0.01
    ll = parzen_log_likelihood(test, samples, sigma, chunk_size=2500)
    assert result.stderr == pytest.approx(float(ll.std()) / math.sqrt(1000))
    # Data far from the samples is less likely, and a sigma far too small over-fits the samples.
    assert parzen_estimate(test + 3, samples, sigma, chunk_size=2500).mean < result.mean - 5
    assert parzen_estimate(test, samples, 0.01, chunk_size=2500).mean < result.mean


def test_task_logs_parzen_with_sigma_chosen_on_validation_and_reused_for_test():
    model = tiny_gan(parzen_samples=300, parzen_sigmas=[1.0, 3.0, 10.0, 30.0], parzen_select_size=12)
    val = DataLoader(batches(10).dataset, batch_size=4)  # 40 points in order: 12 choose sigma, 28 are scored
    trainer = fit(model, batches(2), val)
    metrics = trainer.callback_metrics
    sigma = float(metrics["val/parzen_sigma"])
    assert sigma in (1.0, 3.0, 10.0, 30.0) and float(model.parzen_sigma) == sigma
    data = val.dataset.tensors[0]
    model.eval()
    expected = parzen_estimate(data[12:], model.parzen_reference_samples(), sigma)
    assert float(metrics["val/parzen_ll"]) == pytest.approx(expected.mean, rel=1e-5)
    assert float(metrics["val/parzen_stderr"]) == pytest.approx(expected.stderr, rel=1e-5)
    trainer.test(model, val, verbose=False)
    assert float(trainer.callback_metrics["test/parzen_sigma"]) == sigma, "test reuses the validation's sigma"


# ------------------------------------------------------------------------------------------- callbacks, CLI


def test_momentum_ramp():
    ramp = MomentumRamp(final_momentum=0.7, start_epoch=1, saturate_epoch=3)
    assert [ramp.momentum(0.5, e) for e in range(5)] == pytest.approx([0.5, 0.5, 0.6, 0.7, 0.7])
    seen = []

    class Spy(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.extend(g["momentum"] for opt in trainer.optimizers for g in opt.param_groups)

    sgd = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.5)
    fit(tiny_gan(optimizer=sgd), batches(1), max_epochs=4, callbacks=[ramp, Spy()])
    assert seen == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.6, 0.6, 0.7, 0.7])  # G's and D's optimizer, epochs 0-3


def test_digits_config_logs_sample_grids_and_restores_from_checkpoint(tmp_path):
    tiny = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
            "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false"]
    cli = main(["fit", "--config", str(CONFIGS / "digits.yaml"), *tiny, "--model.init_args.parzen_samples=200"])
    grids = tmp_path.glob("runs/gan_digits/wandb/offline-run-*/files/media/images/samples_*.png")  # the W&B run's media
    assert list(grids), "the fixed-noise grid is logged"
    assert "val/parzen_ll" in cli.trainer.callback_metrics
    images = next(iter(cli.datamodule.train_dataloader()))[0]
    assert 0 <= images.min() and images.max() <= 1, "digits in [0, 1] for the sigmoid generator"
    restored = GAN.load_from_checkpoint(cli.trainer.checkpoint_callback.last_model_path)
    cli.model.eval(), restored.eval()
    torch.testing.assert_close(restored.sample(z=restored.fixed_noise), cli.model.sample(z=cli.model.fixed_noise))


def test_gaussian_toy_data():
    data = Gaussian1dDataModule(mean=4.0, std=0.5, num_train=5000, num_val=1000, batch_size=100)
    data.setup()
    (x,) = next(iter(data.train_dataloader()))
    assert x.shape == (100, 1)
    train = data.train_set.tensors[0]
    assert abs(float(train.mean()) - 4) < 0.03 and abs(float(train.std()) - 0.5) < 0.02
    grid = torch.linspace(0, 8, 2001)
    assert float(torch.trapezoid(data.density(grid), grid)) == pytest.approx(1.0, abs=1e-4)


def test_toy1d_config_draws_the_figure(tmp_path):
    main(["fit", "--config", str(CONFIGS / "toy1d.yaml"), "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
          "--trainer.enable_progress_bar=false"])
    (png,) = (tmp_path / "runs/gan_toy1d/images").glob("density_*.png")
    from torchvision.io import read_image

    image = read_image(str(png))
    assert image.shape[0] == 3 and min(image.shape[1:]) > 200 and image.float().std() > 10  # a drawn figure


def test_toy1d_config_matches_the_data_distribution(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny MLPs: one thread avoids oversubscribing shared CPUs (10x slower otherwise)
    try:
        cli = main(["fit", "--config", str(CONFIGS / "toy1d.yaml"), "--trainer.enable_progress_bar=false"])
    finally:
        torch.set_num_threads(threads)
    model = cli.model.eval()
    data = cli.datamodule.val_set.tensors[0]  # held-out N(4, 0.5^2) points
    samples = model.sample(20000)
    assert abs(float(samples.mean() - data.mean())) < 0.05
    assert abs(float(samples.std() / data.std()) - 1) < 0.1
    d_of_x = model.discriminate(data)
    torch.testing.assert_close(d_of_x, model.discriminator(data).sigmoid())  # the net gives logits
    assert abs(float(d_of_x.mean()) - 0.5) < 0.03
    assert float(((d_of_x - 0.5).abs() < 0.1).float().mean()) > 0.85, "D(x) ~ 1/2 over the data"
    assert len(list((tmp_path / "runs/gan_toy1d/images").glob("density_*.png"))) == 4
