"""MAE's optimisation and protocols: parameter groups, lr scaling, schedules, LARS, the probes, image logging, recipes."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from wandb_records import read_records, run_contents

from lit_papers.callbacks.finetuning import FreezeBackbone
from lit_papers.callbacks.images import log_images
from lit_papers.callbacks.linear_probe import OnlineLinearProbe
from lit_papers.cli import main
from lit_papers.nets.linear_probe import LinearProbeNet
from lit_papers.nets.mae import MaskedAutoencoderViT
from lit_papers.nets.vit import (
    VisionTransformer,
    encoder_state_dict,
    vit_from_mae_checkpoint,
)
from lit_papers.optim import (
    LARS,
    WarmupCosineLR,
    build_optimizer,
    effective_batch_size,
    param_groups,
    vit_layer_id,
)
from lit_papers.tasks.classification import ImageClassifier
from lit_papers.tasks.mae import MAEPretraining

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
MAE = dict(VIT, decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=3)
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(10, (n,), generator=g)),
                      batch_size=batch_size)


def _trainer(**kwargs) -> L.Trainer:
    kwargs = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False) | kwargs
    return L.Trainer(**kwargs)


def test_no_decay_group_holds_biases_norms_and_tokens():
    net = MaskedAutoencoderViT(**MAE)
    groups = param_groups(net, decay_norm_and_bias=False)
    names = {id(p): n for n, p in net.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if "weight_decay" not in g for p in g["params"]}
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "decoder_norm.bias"} <= no_decay
    assert all(p.ndim == 2 or n == "patch_embed.proj.weight" for n, p in net.named_parameters() if n in decay)
    assert "pos_embed" not in no_decay | decay, "frozen position tables are not optimised at all"
    assert len(no_decay | decay) == sum(p.requires_grad for p in net.parameters())


def test_layer_decay_follows_the_paper_rule():
    net = VisionTransformer(**VIT, num_classes=10, global_pool=True, pos_embed_trainable=True)  # 2 blocks: 3 layers
    groups = param_groups(net, decay_norm_and_bias=False, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for p in g["params"] for n, q in net.named_parameters() if q is p}
    assert scale["patch_embed.proj.weight"] == scale["cls_token"] == scale["pos_embed"] == 0.5**3
    assert scale["blocks.0.attn.qkv.weight"] == 0.5**2 and scale["blocks.1.mlp.fc2.bias"] == 0.5
    assert scale["fc_norm.weight"] == scale["head.weight"] == 1.0
    assert [vit_layer_id(n, 13) for n in ("cls_token", "blocks.11.norm1.weight", "norm.weight")] == [0, 12, 13]


def test_lr_scales_with_devices_and_gradient_accumulation():
    fake = SimpleNamespace(datamodule=SimpleNamespace(batch_size=64), world_size=8, accumulate_grad_batches=4)
    assert effective_batch_size(fake) == 2048
    task = SimpleNamespace(trainer=fake)
    optimizer = build_optimizer(task, VisionTransformer(**VIT), torch.optim.AdamW, base_lr=1.5e-4, layer_decay=0.5)
    assert max(g["lr"] for g in optimizer.param_groups) == pytest.approx(1.5e-4 * 2048 / 256)
    assert min(g["lr"] for g in optimizer.param_groups) == pytest.approx(1.5e-4 * 2048 / 256 * 0.5**3)


def test_pretraining_task_sets_the_scaled_lr_and_warmup_cosine_per_step():
    torch.manual_seed(0)
    task = MAEPretraining(MaskedAutoencoderViT(**MAE), base_lr=1e-3,
                          lr_scheduler=functools.partial(WarmupCosineLR, warmup_epochs=1))
    trainer = _trainer(max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(task, _loader(n=32, batch_size=4))  # 8 batches = 4 optimizer steps per epoch
    optimizer = trainer.optimizers[0]
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["weight_decay"] == 0.05
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    peak = 1e-3 * 4 * 2 / 256
    assert scheduler.base_lrs == pytest.approx([peak, peak])
    assert (scheduler.total_steps, scheduler.steps_per_epoch, scheduler.last_epoch) == (8, 4, 8)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine reached its end
    assert "train/loss" in trainer.callback_metrics


def test_warmup_cosine_values():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = WarmupCosineLR(opt, warmup_epochs=2, min_lr_ratio=0.1)
    assert opt.param_groups[0]["lr"] == 0.0
    with pytest.raises(RuntimeError, match="total_steps"):
        sched.factor(1)
    sched.set_run_length(total_steps=110, steps_per_epoch=5)  # warm-up = 10 steps
    factors = [sched.factor(s) for s in (0, 5, 10, 60, 110)]
    assert factors == pytest.approx([0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1])
    for _ in range(5):
        opt.step(), sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)


def test_lars_matches_a_hand_computed_step():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    opt.step()
    update = torch.tensor([[0.3, 1.4]])  # grad + 0.1 * w
    trust = 0.01 * 5.0 / update.norm()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * trust * update)
    torch.testing.assert_close(b.detach(), torch.tensor([0.0]))  # 1-D: no decay, no trust ratio: 1 - 0.5 * 2
    b.grad = torch.tensor([2.0])
    opt.step()
    torch.testing.assert_close(b.detach(), torch.tensor([0.0 - 0.5 * (0.9 * 2.0 + 2.0)]))  # heavy-ball momentum
    zero = nn.Parameter(torch.zeros(2, 2))
    zero.grad = torch.ones(2, 2)
    LARS([zero], lr=1.0).step()  # ||w|| = 0: the trust ratio falls back to 1
    torch.testing.assert_close(zero.detach(), -torch.ones(2, 2))


def test_offline_probe_keeps_the_encoder_frozen_in_eval_mode():
    torch.manual_seed(0)
    encoder = VisionTransformer(**VIT, num_classes=0, drop_path_rate=0.5)  # drop path would make train mode visible
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    net = LinearProbeNet(encoder, num_classes=10)
    task = ImageClassifier(net, optimizer=functools.partial(LARS, weight_decay=0.0), base_lr=0.1)
    trainer = _trainer(max_epochs=1)
    trainer.fit(task, _loader(), _loader())
    assert net.training and not encoder.training
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimised == {id(p) for p in net.head.parameters()}
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 8 / 256)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    feats = net.forward_features(x)
    assert not feats.requires_grad and torch.equal(feats, net.forward_features(x))
    assert isinstance(net.head[0], nn.BatchNorm1d) and not net.head[0].affine


def test_online_probe_trains_on_detached_features_and_logs_accuracy():
    torch.manual_seed(0)
    task = MAEPretraining(MaskedAutoencoderViT(**MAE), log_images_every_n_epochs=0)
    probe = OnlineLinearProbe(num_classes=10, lr=1e-2)
    trainer = _trainer(max_epochs=1, callbacks=[probe])
    trainer.fit(task, _loader(), _loader())
    assert {"probe/acc1", "probe/loss", "probe/train_loss"} <= set(trainer.callback_metrics)
    feats = probe._features(trainer, task, torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 32) and not feats.requires_grad and task.net.training
    state = probe.state_dict()
    fresh = OnlineLinearProbe(num_classes=10)
    fresh.load_state_dict(state)  # before fit: kept until the head exists
    fresh.on_fit_start(trainer, task)
    torch.testing.assert_close(fresh.head[1].weight, probe.head[1].weight)


def test_reconstruction_panels_and_image_logging(tmp_path):
    torch.manual_seed(0)
    task = MAEPretraining(MaskedAutoencoderViT(**MAE))
    images = torch.randn(3, 3, 32, 32)
    panels = task.reconstruction_panels(images)  # (4 * 3, 3, 32, 32)
    assert panels.shape == (12, 3, 32, 32) and 0 <= panels.min() and panels.max() <= 1
    original, masked, pasted = panels[0::4], panels[1::4], panels[3::4]
    visible = masked != 0.5
    torch.testing.assert_close(pasted[visible], original[visible])
    assert torch.equal(task.reconstruction_panels(images), panels), "fixed masks for comparable epochs"
    tb, csv = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    trainer = L.Trainer(logger=[tb, csv], default_root_dir=tmp_path)
    path = log_images(trainer, "val/reconstructions", panels, nrow=4)
    assert path is not None and path.exists() and path.parent.parent == tmp_path / "csv" / "version_0"
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))
    assert log_images(L.Trainer(logger=False, default_root_dir=tmp_path / "none"), "x", panels).exists()


def test_mixup_cutmix_train_against_soft_targets():
    net = VisionTransformer(**VIT, num_classes=10)
    task = ImageClassifier(net, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    images, labels = next(iter(_loader()))
    torch.manual_seed(3)
    with torch.no_grad():
        loss = task.training_step((images, labels), 0)
    torch.manual_seed(3)
    mixed, soft = task.batch_mix(images, labels)
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(-1), torch.ones(8))
    with torch.no_grad():
        expected = F.cross_entropy(net(mixed), soft, label_smoothing=0.1)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def _wandb_run(run_dir):
    """The run record of an offline W&B run folder: group, job type, tags."""
    (log,) = run_dir.glob("run-*.wandb")
    return next(r.run for r in read_records(log) if r.WhichOneof("record_type") == "run")


def test_digits_recipes_log_to_wandb_then_probe_from_the_checkpoint(tmp_path):
    cli = main(["fit", "--config", str(REPO_ROOT / "configs/mae/pretrain_digits.yaml"), *FAST,
                "--model.init_args.log_images_every_n_epochs=1", "--data.init_args.batch_size=16",
                "--trainer.log_every_n_steps=1"])
    assert {"train/loss", "val/loss", "probe/acc1"} <= set(cli.trainer.callback_metrics)
    # What W&B recorded offline: metrics, and the reconstruction grid (8 images x 4 panels of 32 x 32, 2 px padding).
    (run_dir,) = sorted((tmp_path / "runs/mae/pretrain_digits/wandb").glob("offline-run-*"))
    _, _, history = run_contents(run_dir)
    assert {"train/loss", "val/loss", "probe/acc1", "trainer/global_step"} <= {key for row in history for key in row}
    assert any("image" in row.get("val/reconstructions/_type", "") for row in history)
    (png,) = (run_dir / "files/media/images").glob("val/reconstructions_*.png")
    assert Image.open(png).size == (2 + 4 * 34, 2 + 8 * 34)
    run = _wandb_run(run_dir)
    assert (run.run_group, run.job_type, run.display_name) == ("mae", "pretrain", "digits_pretrain")
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    encoder = vit_from_mae_checkpoint(ckpt, arch="vit_micro_patch4_32", num_classes=0, global_pool=False)
    torch.testing.assert_close(encoder.blocks[3].attn.qkv.weight, cli.model.net.blocks[3].attn.qkv.weight)
    assert "decoder_embed.weight" not in encoder_state_dict(ckpt)
    restored = MAEPretraining.load_from_checkpoint(ckpt)  # rebuilt from the saved config, no arguments
    torch.testing.assert_close(restored.net.decoder_pred.weight, cli.model.net.decoder_pred.weight)
    probe = main(["fit", "--config", str(REPO_ROOT / "configs/mae/linprobe_digits.yaml"), *FAST,
                  f"--model.init_args.net.init_args.encoder.init_args.checkpoint={ckpt}"])
    torch.testing.assert_close(probe.model.net.encoder.blocks[3].attn.qkv.weight, encoder.blocks[3].attn.qkv.weight)
    lars = probe.trainer.optimizers[0]
    assert isinstance(lars, LARS) and lars.defaults["momentum"] == 0.9, "not SGD's momentum 0 carried over by the CLI"
    assert math.isfinite(float(probe.trainer.callback_metrics["val/acc1"]))
    (probe_run,) = sorted((tmp_path / "runs/mae/linprobe_digits/wandb").glob("offline-run-*"))
    assert "val/acc1" in {key for row in run_contents(probe_run)[2] for key in row}
    assert _wandb_run(probe_run).job_type == "linear_probe"


class _EpochSnapshots(L.Callback):
    """The net's parameters at the end of every training epoch."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.stop_after = stop_after

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.snapshots.append({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})
        trainer.should_stop = len(self.snapshots) == self.stop_after  # a run interrupted mid-schedule


def _finetune_task() -> ImageClassifier:
    net = VisionTransformer(**VIT, num_classes=10, global_pool=True)  # pos_embed fixed by design: stays frozen
    return ImageClassifier(net, optimizer=functools.partial(torch.optim.AdamW, weight_decay=0.05), base_lr=0.05,
                           layer_decay=0.75, decay_norm_and_bias=False, scheduler_interval="step",
                           lr_scheduler=functools.partial(WarmupCosineLR, warmup_epochs=1))


def test_freeze_backbone_then_unfreeze_into_the_task_param_groups(tmp_path):
    torch.manual_seed(0)
    task, snaps = _finetune_task(), _EpochSnapshots(stop_after=2)
    start = {n: p.detach().clone() for n, p in task.net.named_parameters()}
    trainer = _trainer(max_epochs=3, callbacks=[FreezeBackbone(unfreeze_at_epoch=1), snaps])
    trainer.fit(task, _loader())  # 4 steps per epoch
    first, second = snaps.snapshots
    head = {"head.weight", "head.bias"}
    assert {n for n in start if not torch.equal(first[n], start[n])} == head, "epoch 0 trains the head only"
    assert {n for n in start if not torch.equal(second[n], first[n])} == set(start) - {"pos_embed"}
    assert not task.net.pos_embed.requires_grad
    # Every parameter is now optimised with the lr scale and weight decay the task gives a fully trainable net.
    optimizer = trainer.optimizers[0]

    def settings(groups):
        return {id(p): (g["lr_scale"], g.get("weight_decay", 0.05)) for g in groups for p in g["params"]}

    assert settings(optimizer.param_groups) == settings(param_groups(task.net, decay_norm_and_bias=False, layer_decay=0.75))
    num_groups = len(optimizer.param_groups)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    peak = 0.05 * 8 / 256
    assert (scheduler.total_steps, scheduler.last_epoch) == (12, 8)
    assert scheduler.base_lrs == pytest.approx([peak * g["lr_scale"] for g in optimizer.param_groups])
    factor = scheduler.factor(scheduler.last_epoch)  # every group, old or new, follows the same schedule
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([b * factor for b in scheduler.base_lrs])
    # Resuming the interrupted run after the unfreezing epoch rebuilds the same optimizer and keeps the backbone trainable.
    trainer.save_checkpoint(tmp_path / "ft.ckpt")
    torch.manual_seed(1)
    resumed, snaps = _finetune_task(), _EpochSnapshots()
    trainer = _trainer(max_epochs=3, callbacks=[FreezeBackbone(unfreeze_at_epoch=1), snaps])
    trainer.fit(resumed, _loader(), ckpt_path=tmp_path / "ft.ckpt")
    assert len(trainer.optimizers[0].param_groups) == num_groups
    (third,) = snaps.snapshots
    assert all(not torch.equal(third[n], second[n]) for n in second if n != "pos_embed")
