"""Shared fixtures: every test runs on CPU, offline, deterministic, in its own temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Run each test inside its own folder, so relative paths in configs (runs/...) never touch the repository."""
    monkeypatch.chdir(tmp_path)
