"""What ``recsys up`` watches once the stack is up: its services and its embedded Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from recsys.embedded_redis import EmbeddedRedis
from recsys.stack import Stack, watch


def _service() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_up_stops_when_its_embedded_redis_dies(tmp_path: Path, capsys):
    redis = EmbeddedRedis().start()
    service = _service()
    stack = Stack(redis.url, "", "", tmp_path, redis, [service])
    try:
        polls = iter(range(1000))
        assert watch(stack, lambda: next(polls) == 3, poll_s=0.01) == 0  # all well: runs on
        assert redis.proc is not None
        redis.proc.kill()
        assert watch(stack, lambda: False, poll_s=0.01) == 1
        assert "embedded Redis exited" in capsys.readouterr().err
    finally:
        stack.stop()


def test_up_stops_when_a_service_dies(tmp_path: Path, capsys):
    service = _service()
    stack = Stack("", "", "", tmp_path, None, [service])
    try:
        service.kill()
        assert watch(stack, lambda: False, poll_s=0.01) == 1
        assert "a service exited" in capsys.readouterr().err
    finally:
        stack.stop()


class _Stopped(Exception):
    """What the test's signal raises in the waiting parent (Ctrl-C's stand-in)."""


def test_an_interrupted_step_gets_sigterm_and_time_to_clean_up(tmp_path: Path, monkeypatch):
    """The trainer removes its temporary export on SIGTERM; a SIGKILL left it behind."""
    import os
    import signal
    import threading
    import time

    from recsys import stack as stack_module

    started, cleaned = tmp_path / "started", tmp_path / "cleaned"
    child = (
        "import pathlib, signal, sys, time\n"
        "def stop(*_):\n"
        "    time.sleep(0.5)  # an unwinding that takes a moment\n"
        f"    pathlib.Path({str(cleaned)!r}).touch()\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        "time.sleep(60)\n"
    )

    def interrupt(*_a: object) -> None:
        raise _Stopped

    monkeypatch.setattr(stack_module, "SAME_SIGNAL_WAIT_S", 0.1)
    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:

        def send_when_started() -> None:
            deadline = time.monotonic() + 30
            while not started.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGUSR1)

        threading.Thread(target=send_when_started, daemon=True).start()
        t0 = time.monotonic()
        try:
            stack_module.run_step([sys.executable, "-c", child], dict(os.environ), stop_s=10)
        except _Stopped:
            pass
        else:
            raise AssertionError("the step was not interrupted")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert cleaned.exists(), "the step was killed before it could clean up"
    assert time.monotonic() - t0 < 10


def test_a_failed_step_names_its_exit_code(tmp_path: Path):
    import os

    from recsys.stack import run_step

    try:
        run_step([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))
    except subprocess.CalledProcessError as exc:
        assert exc.returncode == 3
    else:
        raise AssertionError("a failing step passed")


def test_a_service_that_exits_while_starting_shows_the_end_of_its_log(tmp_path: Path):
    """Its own message (an unknown config key) was only in a temporary log file."""
    import pytest

    from recsys.errors import UserFacingError
    from recsys.stack import _wait_file

    log = tmp_path / "retrieval.log"
    log.write_text("starting\nretrieval.sources[0]: unknown key 'budgett'\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    proc.wait()
    with pytest.raises(UserFacingError) as err:
        _wait_file(tmp_path / "never", 5, proc, "recsys.v1.RetrievalService", log)
    msg = str(err.value)
    assert "exited with code 2" in msg and str(log) in msg
    assert "unknown key 'budgett'" in msg


def test_up_names_the_log_of_a_service_that_dies(tmp_path: Path, capsys):
    log = tmp_path / "ranking.log"
    log.write_text("Traceback ...\nMemoryError\n")
    service = _service()
    stack = Stack("", "", "", tmp_path, None, [service], [log])
    try:
        service.kill()
        assert watch(stack, lambda: False, poll_s=0.01) == 1
        err = capsys.readouterr().err
        assert str(log) in err and "MemoryError" in err
    finally:
        stack.stop()


def test_up_knows_which_data_a_version_was_trained_on(tmp_path: Path, monkeypatch):
    import json

    from recsys.stack import _trained_on

    data = tmp_path / "ml"
    data.mkdir()
    version = tmp_path / "models" / "1"
    version.mkdir(parents=True)
    info = {"spec": "movielens-100k:ml", "source": f"movielens-100k:{data.resolve()}"}
    (version / "manifest.json").write_text(json.dumps({"dataset": info}))
    monkeypatch.chdir(tmp_path)
    assert _trained_on(version, "movielens-100k:ml")  # as typed
    assert _trained_on(version, f"movielens-100k:{data}")  # another spelling of the same dir
    assert not _trained_on(version, "synthetic")
    assert not _trained_on(version, f"csv:{data}")
    synthetic = {"spec": "synthetic", "source": "synthetic:users=2000,seed=0"}
    (version / "manifest.json").write_text(json.dumps({"dataset": synthetic}))
    assert _trained_on(version, "synthetic")
    assert not _trained_on(version, "movielens-100k:ml")


def test_up_demo_over_tls_is_refused_before_anything_starts(tmp_path: Path):
    import argparse

    import pytest

    from recsys.config import load_settings
    from recsys.errors import UserFacingError
    from recsys.stack import cli_up

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    settings = load_settings(
        model_dir=tmp_path / "models",
        ranking={"tls": {"cert_file": str(cert), "key_file": str(key)}},
    )
    args = argparse.Namespace(demo=True, data=None, retrain=False, config=None)
    with pytest.raises(UserFacingError, match="--demo does not speak TLS"):
        cli_up(args, settings)
    assert not (tmp_path / "models").exists() and not (tmp_path / "redis").exists()
