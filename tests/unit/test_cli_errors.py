"""Operator mistakes on ``recsys serve``: one line naming the problem, exit code 2."""

from __future__ import annotations

import socket

import pytest

from recsys.cli import main


@pytest.fixture(autouse=True)
def _no_service_needed(monkeypatch, tmp_path):
    for name in ("RECSYS_CONFIG", "RECSYS_REDIS_URL", "RECSYS_MODEL_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RECSYS_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("RECSYS_REDIS_URL", "redis://127.0.0.1:1/0")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "retrieval", "--workers", "100"], "invalid flag: --workers: "),
        (["serve", "retrieval", "--port", "-1"], "invalid flag: --port: "),
        (["serve", "ranking", "--metrics-port", "-5"], "invalid flag: --metrics-port: "),
        (
            ["serve", "retrieval", "--port", "0", "--port-file", "/nonexistent/dir/port"],
            "cannot write the port file /nonexistent/dir/port",
        ),
        # Empty values (an unset variable in a script) are checked, not dropped.
        (["serve", "ranking", "--retrieval-address", ""], "invalid flag: --retrieval-address"),
        (["publish", "--redis-url", ""], "redis_url: Value error, not a valid"),
        (["serve", "ranking", "--log-level", ""], "log_level: Input should be"),
    ],
)
def test_a_bad_flag_is_one_clear_line(argv, message, capsys):
    """Retrieval took these as they came: 100 workers, port 65535, a traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_metrics_port_in_use_is_one_clear_line(capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        assert main(["serve", "retrieval", "--port", "0", "--metrics-port", str(port)]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_publish_names_the_directory_it_looked_for(tmp_path, monkeypatch, capsys):
    """``publish 9`` looks in the model dir, and says where: it said "version 9 does not exist"."""
    monkeypatch.chdir(tmp_path)
    assert main(["publish", "9"]) == 2
    err = capsys.readouterr().err
    assert f"model version {tmp_path / 'models' / '9'} does not exist" in err, err
    # A path is taken as it is, and named from the root.
    assert main(["publish", "elsewhere/9"]) == 2
    assert f"model version {tmp_path / 'elsewhere' / '9'} does not exist" in capsys.readouterr().err


def test_train_refuses_a_model_dir_it_cannot_write_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code = main(["train", "--model-dir", str(blocker / "models"), "--epochs", "1", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"model dir {blocker / 'models'}: cannot write a version there" in err


def test_generate_data_refuses_a_file_as_its_output(tmp_path, capsys):
    out = tmp_path / "ratings.csv"
    out.write_text("x")
    assert main(["generate-data", str(out)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_recommend_refuses_a_k_the_wire_cannot_carry(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["recommend", "--user", "1", "--k", "99999999999"])
    assert exit_.value.code == 2
    assert "outside 0..2147483647" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--k", "--candidates"])
def test_loadtest_refuses_counts_the_wire_cannot_carry(capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        main(["loadtest", "--target", "127.0.0.1:1", "--requests", "1", flag, "3000000000"])
    assert exit_.value.code == 2
    assert "outside 0..2147483647" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["recommend", "--user", "\udcff", "--target", "127.0.0.1:1"], "--user"),
        (["loadtest", "--variant", "a\udcff", "--target", "127.0.0.1:1"], "--variant"),
    ],
)
def test_an_argument_that_is_not_utf8_is_one_clear_line(argv, flag, capsys):
    """Bytes a terminal could not decode reached the request builder: a traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: not valid UTF-8 text" in err and "Traceback" not in err


def test_a_dataset_path_that_is_not_utf8_is_not_refused_as_text(tmp_path):
    """Linux paths may be any bytes: only what goes into a request must be UTF-8."""
    import os
    import subprocess
    import sys

    bad = os.fsencode(tmp_path) + b"/caf\xe9"  # a folder name in Latin-1: not UTF-8
    done = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "train", "--data", b"csv:" + bad, "--quiet"],
        capture_output=True,
        timeout=120,
        env={**os.environ, "RECSYS_MODEL_DIR": str(tmp_path / "models")},
    )
    assert b"not valid UTF-8" not in done.stderr
    # The loader looked for the folder (missing here) rather than the CLI refusing its name.
    assert done.returncode == 2 and b"no such directory" in done.stderr, done.stderr
