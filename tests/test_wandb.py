"""W&B logging read back from the offline run files: config once and whole, metrics and images in the history,
resumed runs continue the same run, no credentials means offline without a prompt, checkpoints as artifacts only when
asked, and one run per experiment under DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from lightning.fabric.loggers.logger import _DummyExperiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from wandb_records import read_records, run_contents

from lit_papers.callbacks.images import logging_step
from lit_papers.cli import main
from lit_papers.loggers import WandbLogger, WandbRunId

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")
GAN_CONFIGS = REPO_ROOT / "configs" / "gan"
TINY = ["--trainer.log_every_n_steps=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false"]
GAN_DIGITS = [str(GAN_CONFIGS / "digits.yaml"), "--model.init_args.parzen_samples=200"]  # Parzen on 200 samples: fast


def _runs(tmp_path):
    return sorted(tmp_path.glob("runs/**/wandb/offline-run-*"))  # folders are named by start time


def _config_logged_once(configs: list[dict]) -> dict:
    """The run's config, checked to be the CLI's resolved config, sent once, with nothing beside it (no task
    hyperparameters such as `k` or `generator` repeated at the top level)."""
    keys = Counter(key for update in configs for key in update if not key.startswith("_"))
    assert all(count == 1 for count in keys.values()), f"config keys logged more than once: {keys}"
    assert set(keys) - {"ckpt_path", "weights_only"} == {"seed_everything", "trainer", "model", "data"}, set(keys)
    return {k: v for update in configs for k, v in update.items()}


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    """Paths `a/b/c` of the config tree's leaves."""
    paths = []
    for key, value in tree.items():
        paths += _leaves(value, f"{prefix}{key}/") if isinstance(value, dict) else [f"{prefix}{key}"]
    return paths


def _assert_image_logged(run_dir, history: list[dict], key: str) -> None:
    """A W&B image entry `key` in the history, and its file under the run's media/."""
    assert any("image" in row.get(f"{key}/_type", "") for row in history), f"no {key} image in the history"
    assert list((run_dir / "files/media/images").glob(f"{key}_*.png"))


def test_quickstart_run_files_hold_config_once_and_metrics(tmp_path):
    main(["fit", "--config", QUICKSTART, "--trainer.max_epochs=1", *TINY])
    (run_dir,) = _runs(tmp_path)
    run_id, configs, history = run_contents(run_dir)
    config = _config_logged_once(configs)
    model = config["model"]["init_args"]
    assert model["optimizer"]["init_args"]["lr"] == 0.1 and model["net"]["init_args"]["depth"] == 20
    assert config["data"]["class_path"] == "lit_papers.data.digits.DigitsDataModule"
    logged = {key for row in history for key in row}
    assert {"train/loss", "val/acc1", "val/loss", "lr-SGD", "trainer/global_step"} <= logged
    assert {"perf/images_per_sec", "perf/epoch_time"} <= logged
    for image in ("val/predictions", "val/confusion_matrix"):
        _assert_image_logged(run_dir, history, image)


# config file and overrides, training batches, image key, metrics beyond the losses
GAN_RUNS = {
    "digits": ([*GAN_DIGITS, "--trainer.check_val_every_n_epoch=1"], 2, "samples",
               {"val/parzen_ll", "perf/images_per_sec"}),
    "toy1d": ([str(GAN_CONFIGS / "toy1d.yaml")], 4, "density", {"lr-generator", "lr-discriminator"}),  # k=3: 4 D, 1 G
}


@pytest.mark.parametrize("name", GAN_RUNS)
def test_gan_run_files_hold_config_once_losses_and_images(tmp_path, name):
    args, batches, image, metrics = GAN_RUNS[name]
    main(["fit", "--config", *args, "--trainer.max_epochs=1", *TINY, f"--trainer.limit_train_batches={batches}"])
    (run_dir,) = _runs(tmp_path)
    _, configs, history = run_contents(run_dir)
    config = _config_logged_once(configs)

    shipped = yaml.safe_load(Path(args[0]).read_text())
    assert config["model"]["class_path"] == "lit_papers.tasks.gan.GAN"
    model, shipped_model = config["model"]["init_args"], shipped["model"]["init_args"]
    pairs = [(model["g_optimizer"], shipped_model["g_optimizer"]), (model["d_optimizer"], shipped_model["d_optimizer"])]
    for logged, expected in [*pairs, (config["data"], shipped["data"])]:  # the file's settings, as written there
        assert logged["class_path"] == expected["class_path"]
        assert {k: logged["init_args"][k] for k in expected["init_args"]} == expected["init_args"]
    paths = _leaves(config)  # each setting in one place only
    lr_paths = [f"model/init_args/{net}_optimizer/init_args/lr" for net in "dg"]
    assert sorted(p for p in paths if p.endswith("/lr")) == lr_paths
    assert [p for p in paths if p.endswith("/batch_size")] == ["data/init_args/batch_size"]

    logged = {key for row in history for key in row}
    assert {"train/d_real", "train/d_fake", "val/d_real", "val/d_fake", "trainer/global_step"} | metrics <= logged
    # log_every_n_steps=1: D's loss at every batch; G's from its first step on, the k-th batch. (Lightning repeats a
    # step metric's last value at later batches of the epoch, so G's loss shows up at every batch after that.)
    assert sum("train/d_loss" in row for row in history) == batches
    g_steps = [row["trainer/global_step"] for row in history if "train/g_loss" in row]
    assert g_steps[0] == shipped_model["k"] - 1 and len(g_steps) == batches - shipped_model["k"] + 1
    _assert_image_logged(run_dir, history, image)


@pytest.mark.parametrize(("config", "loss"), [([QUICKSTART], "train/loss"), (GAN_DIGITS, "train/d_loss")],
                         ids=["quickstart", "gan"])
def test_resume_continues_the_same_run(tmp_path, config, loss):
    first = main(["fit", "--config", *config, "--trainer.max_epochs=1", *TINY])
    second = main(["fit", "--config", *config, "--trainer.max_epochs=2", *TINY, "--ckpt_path=last"])
    assert second.trainer.logger.version == first.trainer.logger.version
    runs = _runs(tmp_path)
    assert len(runs) == 2, "one offline folder per process run, both for the same run id"
    run_id, _, history = run_contents(runs[-1])
    assert run_id == first.trainer.logger.version
    steps = [row["trainer/global_step"] for row in history if loss in row]
    assert steps and min(steps) >= logging_step(first.trainer), "the resumed run's steps continue after the first's"


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


def test_an_offline_run_leaves_wandb_mode_alone(tmp_path, monkeypatch):
    """Lightning starts offline runs by setting WANDB_MODE for the whole process; a notebook's next run, after
    `wandb login`, must still go online."""
    monkeypatch.delenv("WANDB_MODE")
    logger = WandbLogger(save_dir=tmp_path, offline=True)
    assert logger.experiment.settings.mode == "offline"
    logger.finalize("success")
    assert "WANDB_MODE" not in os.environ
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 1


LOGGERS = ["lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger", "false"]


@pytest.mark.parametrize("logger", LOGGERS)  # "false": no logger (LearningRateMonitor is dropped, not an error)
def test_switching_logger_is_one_option(tmp_path, logger):
    cli = main(["fit", "--config", QUICKSTART, "--trainer.max_epochs=1", *TINY, f"--trainer.logger={logger}"])
    expected = [] if logger == "false" else [logger.rsplit(".", 1)[1]]
    assert [type(lg).__name__ for lg in cli.trainer.loggers] == expected
    assert not (tmp_path / "runs/quickstart/wandb").exists()


# ------------------------------------------------------------------------------------------- log_model


def test_log_model_is_ignored_offline_and_kept_online(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert WandbLogger(save_dir=tmp_path, log_model=True)._log_model is False
    assert "`log_model` is ignored" in caplog.text
    monkeypatch.delenv("WANDB_MODE")
    for log_model in (True, "all"):  # offline=False: no network is touched until `experiment` is read
        assert WandbLogger(save_dir=tmp_path, offline=False, log_model=log_model)._log_model == log_model
    assert not (tmp_path / "wandb").exists(), "constructing the logger starts no run"


def test_log_model_logs_the_checkpoint_as_an_artifact(tmp_path, monkeypatch):
    # The logger believes it is online (so keeps log_model), WANDB_MODE=offline keeps W&B off the network: the
    # artifact is recorded in the run file, as `wandb sync` would upload it. Staged copies go to WANDB_DATA_DIR.
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    cli = main(["fit", "--config", *GAN_DIGITS, "--trainer.max_epochs=1", *TINY,
                "--trainer.logger.init_args.offline=false", "--trainer.logger.init_args.log_model=true"])
    (run_dir,) = _runs(tmp_path)
    run_id, _, _ = run_contents(run_dir)
    records = read_records(next(run_dir.glob("run-*.wandb")))
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert [(a.type, a.name) for a in artifacts] == [("model", f"model-{run_id}")], "logged once, at the end of fit"
    assert [entry.path for entry in artifacts[0].manifest.contents] == ["model.ckpt"]
    assert cli.trainer.checkpoint_callback.last_model_path


# ------------------------------------------------------------------------------------------- DDP: rank 0 only


def test_other_ranks_start_no_run(tmp_path, monkeypatch):
    """What rank > 0 does with the logger under DDP (Lightning sets `rank_zero_only.rank`): nothing reaches W&B."""
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = WandbLogger(save_dir=tmp_path / "runs")
    assert isinstance(logger.experiment, _DummyExperiment)
    logger.log_hyperparams({"model": {"k": 1}})
    logger.log_metrics({"train/d_loss": 0.5}, step=0)
    logger.log_image(key="samples", images=[[[0]]], step=0)
    callback = WandbRunId()
    callback._logger = logger
    assert callback.state_dict() == {"run_id": None}
    logger.finalize("success")
    logger.resume_run("abc123")  # `fit --ckpt_path` runs this on every rank
    assert logger.version == "abc123" and logger._experiment is None
    assert not list((tmp_path / "runs").rglob("*run-*")), "no W&B run folder from rank 1"


@pytest.mark.slow  # two processes each importing torch and Lightning: about a minute on a busy 2-core machine
def test_ddp_gan_run_makes_one_wandb_run(tmp_path):
    command = [sys.executable, "-m", "lit_papers.cli", "fit", "--config", str(GAN_CONFIGS / "toy1d.yaml"), *TINY,
               "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.strategy=ddp",
               "--trainer.devices=2"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = _runs(tmp_path)  # Lightning's launcher re-runs the command for rank 1, which must start no run
    _, configs, history = run_contents(run_dir)
    _config_logged_once(configs)
    assert sum("train/d_loss" in row for row in history) == 4, "rank 0 logs each of its 4 D steps once"
