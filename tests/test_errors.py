"""Wrong input to the `lit-papers` command ends with one message naming the problem and a non-zero status."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO_ROOT

from lit_papers.cli import console_main, main

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")
TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.callbacks=[]"]


def run_command(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["lit-papers", *args])
    monkeypatch.delenv("LIT_PAPERS_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, err


def test_unknown_config_key(monkeypatch, capsys):
    code, err = run_command(monkeypatch, capsys, "fit", "--config", QUICKSTART, "--model.init_args.lable_smoothing=0.1")
    assert code == 2
    assert "Option 'lable_smoothing' is not accepted" in err and 'key "model"' in err
    assert "NoneType" not in err and "usage:" not in err


def test_wrong_type(monkeypatch, capsys):
    code, err = run_command(monkeypatch, capsys, "fit", "--config", QUICKSTART, "--trainer.max_epochs=abc")
    assert code == 2 and 'key "trainer.max_epochs"' in err and "Expected a <class 'int'>" in err and "abc" in err


def test_missing_config_file(monkeypatch, capsys, tmp_path):
    code, err = run_command(monkeypatch, capsys, "fit", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in err


def test_missing_data_folder(monkeypatch, capsys, tmp_path):
    config = str(REPO_ROOT / "configs" / "alexnet" / "imagenet.yaml")
    code, err = run_command(monkeypatch, capsys, "fit", "--config", config, f"--data.init_args.root={tmp_path / 'nope'}")
    assert code == 1 and f"{tmp_path / 'nope' / 'train'}" in err and "Expected the ImageNet layout" in err


def test_checkpoint_of_another_task(monkeypatch, capsys, tmp_path):
    cli = main(["fit", "--config", QUICKSTART, *TINY, f"--trainer.default_root_dir={tmp_path}"])
    ckpt = tmp_path / "classifier.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    toy_gan = str(REPO_ROOT / "configs" / "gan" / "toy1d.yaml")
    code, err = run_command(monkeypatch, capsys, "fit", "--config", toy_gan, f"--ckpt_path={ckpt}")
    assert code == 1 and str(ckpt) in err and "saved by lit_papers.tasks.classification.ImageClassifier" in err


def test_missing_checkpoint(monkeypatch, capsys, tmp_path):
    code, err = run_command(monkeypatch, capsys, "test", "--config", QUICKSTART, f"--ckpt_path={tmp_path / 'gone.ckpt'}")
    assert code == 1 and "checkpoint not found" in err and "gone.ckpt" in err
