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
