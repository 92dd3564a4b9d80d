"""The `lit-papers` CLI and the classifier task, driven through `main([...])` as users and notebooks do."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from lit_papers.cli import main
from lit_papers.nets.resnet import CifarResNet
from lit_papers.tasks.classification import ImageClassifier

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")
TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false"]


def test_main_ignores_sys_argv_and_trains(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sys, "argv", ["pytest", "--not-a-cli-flag"])
    cli = main(["fit", "--config", QUICKSTART, *TINY])
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/acc1", "val/acc5"} <= set(metrics)
    assert 0.0 <= float(metrics["val/acc1"]) <= 1.0
    assert (tmp_path / "runs/quickstart/config.yaml").exists(), "the resolved config is saved with every run"
    best = cli.trainer.checkpoint_callback.best_model_path
    assert best and (tmp_path / best).exists() and "best-epoch=00" in best, "the best checkpoint is saved"
    assert "best val/acc1" in caplog.text and best in caplog.text and "W&B run" in caplog.text


def test_second_run_in_same_folder_does_not_fail_on_saved_config(tmp_path):
    main(["fit", "--config", QUICKSTART, *TINY])
    first = (tmp_path / "runs/quickstart/config.yaml").stat().st_mtime_ns
    main(["fit", "--config", QUICKSTART, *TINY])
    assert (tmp_path / "runs/quickstart/config.yaml").stat().st_mtime_ns > first


def test_print_config_output_reruns_unchanged(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed
    cli = main(["fit", "--config", str(tmp_path / "printed.yaml"), *TINY])
    assert "val/acc1" in cli.trainer.callback_metrics


def test_load_from_checkpoint_rebuilds_the_net_without_arguments(tmp_path):
    cli = main(["fit", "--config", QUICKSTART, *TINY])
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    restored = ImageClassifier.load_from_checkpoint(ckpt)
    assert isinstance(restored.net, CifarResNet) and restored.net.num_classes == 10
    x = torch.randn(2, 3, 32, 32)
    cli.model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), cli.model(x))


def test_console_script_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "from lit_papers.cli import console_main; console_main()", "fit", "--help"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "--model" in result.stdout and "--data" in result.stdout


def test_choosing_another_optimizer_gets_its_own_defaults(tmp_path):
    """A class default for a task's optimizer would make jsonargparse carry its values (SGD's `weight_decay: 0`) into
    the optimizer a config picks by `class_path`: AdamW must keep its own `weight_decay` of 0.01."""
    adamw = "{class_path: torch.optim.AdamW, init_args: {lr: 0.001}}"
    config = tmp_path / "adamw.yaml"
    config.write_text(f"""
model:
  class_path: lit_papers.tasks.classification.ImageClassifier
  init_args:
    net: {{class_path: lit_papers.nets.resnet.CifarResNet, init_args: {{depth: 8, num_classes: 10}}}}
    optimizer: {adamw}
data: {{class_path: lit_papers.data.digits.DigitsDataModule}}
""")
    gan = REPO_ROOT / "configs/gan/toy1d.yaml"  # its optimizers are Adam; switching D's to AdamW on the command line
    classifier = main(["--config", str(config)], run=False).model.optimizer_factory
    discriminator = main(["--config", str(gan), f"--model.init_args.d_optimizer={adamw}"], run=False).model
    for factory in (classifier, discriminator.optimizer_factories[1]):
        optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
        assert isinstance(optimizer, torch.optim.AdamW)
        assert optimizer.defaults["weight_decay"] == 0.01 and optimizer.defaults["lr"] == 0.001


def test_default_progress_bar_is_rich_drawn_ten_times_a_second(tmp_path):
    """Lightning's rich bar redraws 100 times a second, which cost ~0.5 ms of a ~2 ms training step here."""
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

    trainer = main(["--config", QUICKSTART, f"--trainer.default_root_dir={tmp_path}"], run=False).trainer
    bars = [c for c in trainer.callbacks if isinstance(c, ProgressBar)]
    assert len(bars) == 1 and isinstance(bars[0], RichProgressBar) and bars[0].refresh_rate == 10
    tqdm = "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"  # a config's own bar is kept
    trainer = main(["--config", QUICKSTART, tqdm, f"--trainer.default_root_dir={tmp_path}"], run=False).trainer
    assert [type(c).__name__ for c in trainer.callbacks if isinstance(c, ProgressBar)] == ["TQDMProgressBar"]
