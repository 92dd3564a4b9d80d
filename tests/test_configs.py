"""Every experiment file in configs/ parses, round-trips through --print_config, and smoke-runs one step on small
fake data in its DataModule's real format."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CONFIGS, REPO_ROOT
from fakedata import write_cifar_pickles, write_idx, write_imagenet_folder

from lit_papers.cli import main


def _ids(paths):
    return [str(p.relative_to(REPO_ROOT / "configs")) for p in paths]


@pytest.mark.parametrize("config", CONFIGS, ids=_ids(CONFIGS))
def test_config_parses_and_round_trips(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert resolved["model"]["class_path"].startswith("lit_papers.tasks.")
    assert resolved["data"]["class_path"].startswith("lit_papers.data.")
    (tmp_path / "resolved.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "resolved.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed


# For each DataModule: write small fake data in its real format under `root`, return the CLI overrides that use it.
def _imagenet(root: Path) -> list[str]:
    write_imagenet_folder(root / "imagenet", train_per_class=2, val_per_class=1)
    return [f"--data.init_args.root={root / 'imagenet'}", "--data.init_args.batch_size=2", "--data.init_args.num_workers=0"]


def _cifar10(root: Path) -> list[str]:
    write_cifar_pickles(root / "cifar10")
    return [f"--data.init_args.root={root / 'cifar10'}", "--data.init_args.batch_size=4", "--data.init_args.num_workers=0"]


def _mnist(root: Path) -> list[str]:
    rng = np.random.default_rng(0)
    (root / "mnist").mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(root / "mnist" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28)))
        write_idx(root / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, size=n))
    return [f"--data.init_args.root={root / 'mnist'}", "--data.init_args.batch_size=4", "--data.init_args.download=false",
            "--data.init_args.val_size=10"]


def _in_memory(root: Path) -> list[str]:
    return ["--data.init_args.batch_size=4"]


def _parallel_text(root: Path) -> list[str]:
    pairs = [("Ein Mann fährt Fahrrad.", "A man rides a bike."), ("Zwei Hunde spielen im Schnee.", "Two dogs play in the snow.")] * 8
    root = root / "parallel"
    root.mkdir(parents=True)
    for prefix in ("train", "val", "test"):
        for lang, i in (("de", 0), ("en", 1)):
            (root / f"{prefix}.{lang}").write_text("".join(p[i] + "\n" for p in pairs), encoding="utf-8")
    return [f"--data.init_args.root={root}", "--data.init_args.src_lang=de", "--data.init_args.tgt_lang=en",
            "--data.init_args.val_prefix=val", "--data.init_args.test_prefix=test",
            "--data.init_args.vocab_size=300", "--data.init_args.min_frequency=1"]


FAKE_DATA = {
    "lit_papers.data.imagenet.ImageNetDataModule": _imagenet,
    "lit_papers.data.cifar.CIFAR10DataModule": _cifar10,
    "lit_papers.data.gan.CIFAR10GANDataModule": _cifar10,
    "lit_papers.data.mnist.MNISTDataModule": _mnist,
    "lit_papers.data.digits.DigitsDataModule": _in_memory,
    "lit_papers.data.toy.Gaussian1dDataModule": _in_memory,
    "lit_papers.data.translation.ReverseDataModule": lambda root: [],
    "lit_papers.data.translation.ParallelTextDataModule": _parallel_text,
}


@pytest.mark.parametrize("config", CONFIGS, ids=_ids(CONFIGS))
def test_config_smoke_runs_one_step(config, tmp_path):
    data_class = yaml.safe_load(config.read_text())["data"]["class_path"]
    assert data_class in FAKE_DATA, f"no fake data for {data_class}: add a writer to FAKE_DATA in {__file__}"
    cli = main(
        ["fit", "--config", str(config), *FAKE_DATA[data_class](tmp_path)]
        # One CPU process: multi-GPU strategies (FSDP needs CUDA) fall back to Lightning's default.
        + ["--trainer.fast_dev_run=1", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1",
           "--trainer.strategy=auto", f"--trainer.default_root_dir={tmp_path}"]
    )
    assert cli.trainer.state.finished and cli.trainer.global_step > 0
    for name, value in cli.trainer.callback_metrics.items():
        assert math.isfinite(float(value)), f"{name} is {float(value)}"
