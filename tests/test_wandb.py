"""W&B logging read back from the offline run files: config once and whole, metrics and images in the history,
resumed runs continue the same run, no credentials means offline without a prompt."""

from __future__ import annotations

from collections import Counter

import pytest

from lit_papers.cli import main
from lit_papers.loggers import WandbLogger
from conftest import REPO_ROOT
from wandb_records import run_contents

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")
TINY = ["--trainer.log_every_n_steps=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false"]


def _runs(tmp_path):
    return sorted((tmp_path / "runs/quickstart/wandb").glob("offline-run-*"))


def test_quickstart_run_files_hold_config_once_and_metrics(tmp_path):
    main(["fit", "--config", QUICKSTART, "--trainer.max_epochs=1", *TINY])
    (run_dir,) = _runs(tmp_path)
    run_id, configs, history = run_contents(run_dir)
    keys = Counter(key for update in configs for key in update if not key.startswith("_"))
    assert {"model", "data", "trainer", "seed_everything"} <= set(keys)
    assert all(count == 1 for count in keys.values()), f"config keys logged more than once: {keys}"
    config = {k: v for update in configs for k, v in update.items()}
    model = config["model"]["init_args"]
    assert model["optimizer"]["init_args"]["lr"] == 0.1 and model["net"]["init_args"]["depth"] == 20
    assert config["data"]["class_path"] == "lit_papers.data.digits.DigitsDataModule"
    logged = {key for row in history for key in row}
    assert {"train/loss", "val/acc1", "val/loss", "lr-SGD", "trainer/global_step"} <= logged
    assert {"perf/images_per_sec", "perf/epoch_time"} <= logged
    for image in ("val/predictions", "val/confusion_matrix"):  # W&B image entries, their files under media/
        assert any("image" in row.get(f"{image}/_type", "") for row in history), f"no {image} image in the history"
        assert list((run_dir / "files/media/images").glob(f"{image}_*.png"))


def test_resume_continues_the_same_run(tmp_path):
    first = main(["fit", "--config", QUICKSTART, "--trainer.max_epochs=1", *TINY])
    second = main(["fit", "--config", QUICKSTART, "--trainer.max_epochs=2", *TINY, "--ckpt_path=last"])
    assert second.trainer.logger.version == first.trainer.logger.version
    run_id, _, history = run_contents(_runs(tmp_path)[-1])  # folders are named by start time
    assert run_id == first.trainer.logger.version
    steps = [row["trainer/global_step"] for row in history if "train/loss" in row]
    assert min(steps) >= first.trainer.global_step, "the resumed run's steps continue after the first run's"


def test_no_credentials_means_offline_without_a_prompt(tmp_path, monkeypatch, caplog):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    logger = WandbLogger(save_dir=tmp_path / "runs")
    assert logger._offline
    assert "wandb sync" in caplog.text


def test_credentials_mean_online(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not WandbLogger(save_dir=tmp_path / "runs")._offline


@pytest.mark.parametrize("logger", ["lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger"])
def test_switching_logger_is_one_option(tmp_path, logger):
    cli = main(["fit", "--config", QUICKSTART, "--trainer.max_epochs=1", *TINY, f"--trainer.logger={logger}"])
    assert type(cli.trainer.logger).__name__ == logger.rsplit(".", 1)[1]
    assert not (tmp_path / "runs/quickstart/wandb").exists()
