"""Every experiment file in configs/ parses, and its --print_config output parses again to the same config."""

from __future__ import annotations

import pytest
import yaml

from lit_papers.cli import main
from conftest import CONFIGS, REPO_ROOT


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
