"""Each subcommand takes the setting overrides its handler reads and refuses the rest.

``--model-dir``, ``--redis-url`` and ``--log-level`` were added to every
subcommand: ``recsys recommend --model-dir X`` or ``recsys evaluate --redis-url
U`` parsed and did nothing, so a user could not tell the flag was ignored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from recsys.cli import _HANDLERS, _settings_for, build_parser, main

# Each override flag, a valid value and what it becomes in the settings.
OVERRIDES = {
    "--model-dir": ("var/other-models", lambda s: s.model_dir == Path("var/other-models")),
    "--redis-url": (
        "redis://127.0.0.1:1/3",
        lambda s: s.redis_url.get_secret_value() == "redis://127.0.0.1:1/3",
    ),
    "--log-level": ("DEBUG", lambda s: s.log_level == "DEBUG"),
}
EVERY = set(OVERRIDES)

# Handler -> (the arguments it needs to parse, the overrides its handler reads).
COMMANDS: dict[str, tuple[list[str], set[str]]] = {
    # Writes CSV files to OUT: no model dir, no Redis, no logging.
    "generate-data": (["out"], set()),
    # The model dir it exports to; Redis for --publish (refused without it).
    "train": ([], {"--model-dir", "--redis-url"}),
    # Reads versions from the model dir only.
    "evaluate": ([], {"--model-dir"}),
    "publish": ([], {"--model-dir", "--redis-url"}),
    # Reads the users' interaction logs from Redis into OUT.
    "export-interactions": (["out"], {"--redis-url"}),
    # Services: versions from the model dir, Redis, and configure_logging.
    "serve retrieval": ([], EVERY),
    "serve ranking": ([], EVERY),
    # Hands all three to the processes it starts.
    "up": ([], EVERY),
    # Talks to the ranking service only (its address and token from the config).
    "recommend": (["--user", "1"], set()),
    # Ids from the model dir's version that Redis names as current.
    "loadtest": ([], {"--model-dir", "--redis-url"}),
}


@pytest.fixture(autouse=True)
def _no_outside_settings(monkeypatch):
    for name in ("RECSYS_CONFIG", "RECSYS_MODEL_DIR", "RECSYS_REDIS_URL", "RECSYS_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


def test_every_subcommand_is_listed():
    assert set(COMMANDS) == set(_HANDLERS)


@pytest.mark.parametrize("flag", OVERRIDES)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_subcommand_takes_exactly_the_overrides_it_reads(command, flag, capsys):
    needed, reads = COMMANDS[command]
    value, applied = OVERRIDES[flag]
    argv = [*command.split(), *needed, flag, value]
    if flag in reads:
        assert applied(_settings_for(build_parser().parse_args(argv)))
        return
    # Parsed, not run: a flag wrongly taken would start the command (train, publish).
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    # Not "{flag} {value}": publish takes the value as its optional VERSION_DIR.
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_train_refuses_a_redis_url_without_publish(tmp_path, capsys):
    # A model dir that cannot be written: the URL is refused before anything else is checked.
    (tmp_path / "a-file").write_text("")
    argv = ["train", "--model-dir", str(tmp_path / "a-file" / "models"), "--epochs", "1"]
    assert main([*argv, "--quiet", "--redis-url", "redis://127.0.0.1:1/0"]) == 2
    assert "--redis-url is for --publish" in capsys.readouterr().err


def _options(parser: argparse.ArgumentParser, name: str = "recsys"):
    """(command, option) for every option of every subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _options(child, f"{name} {sub}")
        elif action.option_strings:
            yield name, action


def test_every_option_has_help_that_shows_its_default():
    """``generate-data --users`` and ``train --batch-size`` showed a bare name in --help."""
    missing = []
    for command, action in _options(build_parser()):
        flag = action.option_strings[-1]
        shown = action.default in (None, False, "", argparse.SUPPRESS) or (
            action.help is not None
            and ("%(default)s" in action.help or str(action.default) in action.help)
        )
        if not action.help or not shown:
            missing.append(f"{command} {flag}")
    assert not missing, missing


def test_a_config_backed_flag_names_the_setting_and_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "[trainer] batch_size, else 256" in " ".join(capsys.readouterr().out.split())
