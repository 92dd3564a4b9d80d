"""Preemption and atomic checkpoints: a run sent SIGTERM or Ctrl+C mid-epoch saves `last.ckpt`, exits non-zero and
continues with `--ckpt_path last`; a save killed with SIGKILL leaves the previous checkpoint loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_configs as tiny
import torch
from conftest import REPO_ROOT
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.precision import DoublePrecision

from lit_papers.checkpointing import AtomicCheckpointIO, find_last_checkpoint
from lit_papers.cli import main

TESTS = Path(__file__).resolve().parent

@pytest.fixture
def helpers_importable(monkeypatch):
    """The config names `_signal_at_step.SignalAtStep`, which lives next to the tests."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))


def write_config(path: Path, signum: int | None) -> Path:
    """The tiny classifier run (3 epochs of 4 steps) keeping its best epoch by val/acc1 and `last.ckpt`; with a
    `signum`, a signal comes at step 6, in the middle of the second epoch (0: the test sends it from outside)."""
    config = tiny.config()
    trainer = config["trainer"]
    trainer["default_root_dir"] = "runs/tiny"
    checkpoint = trainer["callbacks"][0]["init_args"]
    checkpoint |= {"monitor": "val/acc1", "mode": "max", "save_top_k": 1, "filename": "best-{epoch}"}
    if signum is not None:
        trainer["callbacks"].append({"class_path": "_signal_at_step.SignalAtStep",
                                     "init_args": {"marker": "marker.txt", "step": 6, "signum": int(signum)}})
    return tiny.write(config, path)


def signal_callback(cli):
    return next(c for c in cli.trainer.callbacks if type(c).__name__ == "SignalAtStep")


def assert_resumes_and_finishes(config: Path) -> None:
    """Rerunning the command with `--ckpt_path last` continues from step 6 and completes the 3 planned epochs."""
    cli = main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert signal_callback(cli).start_step == 6, "training continued from the interrupted step, not from scratch"
    assert cli.trainer.current_epoch == 3 and cli.trainer.global_step == 12


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_epoch_saves_last_and_exits_nonzero(tmp_path, helpers_importable, signum):
    config = write_config(tmp_path / "tiny.yaml", signum)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config)])
    assert stop.value.code == 128 + signum  # 143 (SIGTERM) or 130 (SIGINT), never 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "Ctrl+C handling is given back"
    last = find_last_checkpoint("runs/tiny")
    assert last is not None and last.name == "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 6 and checkpoint["epoch"] == 1, "saved mid-epoch, after the signalled step"
    assert_resumes_and_finishes(config)


@pytest.mark.slow  # two fresh interpreters: ~30 s on 2 shared cores
def test_sigterm_from_outside_to_the_console_command(tmp_path, helpers_importable):
    config = write_config(tmp_path / "tiny.yaml", 0)  # 0: wait at step 6 for the signal this test sends
    command = [sys.executable, "-m", "lit_papers.cli", "fit", "--config", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "marker.txt").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before reaching step 6"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, output
    assert "Stopped by SIGTERM" in output and "Rerun with `--ckpt_path last`" in output
    assert torch.load(find_last_checkpoint("runs/tiny"), weights_only=True)["global_step"] == 6
    rerun = subprocess.run([*command, "--ckpt_path", "last"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "Resuming from" in rerun.stdout
    assert torch.load(find_last_checkpoint("runs/tiny"), weights_only=True)["global_step"] == 12


# ----------------------------------------------------------------------------------------------- atomic checkpoints


def test_save_killed_mid_write_leaves_previous_checkpoint(tmp_path):
    child = subprocess.Popen([sys.executable, str(TESTS / "_slow_checkpoint_writer.py"), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "saved 1", "the first checkpoint was written"
        assert child.stdout.readline().strip() == "writing 2", "the second save started"
        time.sleep(0.3)  # well inside the ~5 s the slow writer takes
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL
    partial = tmp_path / ".last.ckpt.partial"
    assert 0 < partial.stat().st_size < (tmp_path / "last.ckpt").stat().st_size, "the kill cut a write short"
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["version"] == 1 and torch.equal(checkpoint["weights"], torch.full((4_000_000,), 1.0))
    assert find_last_checkpoint(tmp_path) == tmp_path / "last.ckpt", "a partial file is never taken for a checkpoint"

    AtomicCheckpointIO().save_checkpoint({"version": 3}, tmp_path / "last.ckpt")  # the next save replaces the partial
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"version": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_cli_writes_checkpoints_atomically_and_keeps_top_k_and_last(tmp_path):
    cli = main(["fit", "--config", str(write_config(tmp_path / "tiny.yaml", None))])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    folder = Path(cli.trainer.checkpoint_callback.dirpath)
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and "last.ckpt" in names and names[0].startswith("best-"), names  # top-1 kept, rest removed
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 12


@pytest.mark.parametrize("plugins, expected_io", [
    (["lightning.pytorch.plugins.precision.DoublePrecision"], AtomicCheckpointIO),
    (["lightning.pytorch.plugins.io.TorchCheckpointIO"], TorchCheckpointIO),
])
def test_users_own_plugins_are_kept(tmp_path, plugins, expected_io):
    args = [f"--trainer.plugins+={p}" for p in plugins]
    cli = main(["--config", str(REPO_ROOT / "configs/quickstart.yaml"), *args], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is expected_io
    if expected_io is AtomicCheckpointIO:
        assert isinstance(cli.trainer.precision_plugin, DoublePrecision)
