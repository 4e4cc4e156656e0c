"""``recsys --version`` names the installed package version."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from recsys.cli import main


def test_version_flag_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"recsys {version('recsys-serving')}"
