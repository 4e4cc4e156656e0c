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
