"""The embedded Redis `recsys up` and the tests start: failures that say why, and only ours."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from recsys.embedded_redis import EmbeddedRedis, RedisStartError
from recsys.errors import UserFacingError


def test_a_server_that_will_not_start_says_why(tmp_path):
    """Its output went to /dev/null: "redis-server exited with 1:" and a traceback."""
    data = tmp_path / "redis"
    data.mkdir()
    (data / "appendonly.aof").write_bytes(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\nthis is not RESP")
    server = EmbeddedRedis(data_dir=data, persist=True)
    with pytest.raises(RedisStartError) as err:
        server.start()
    assert isinstance(err.value, UserFacingError)  # `recsys up` prints it as one line
    message = str(err.value)
    assert message.startswith("redis-server exited with 1: ")
    assert len(message) > len("redis-server exited with 1: ") + 10, message
    assert server.proc is None or server.proc.poll() is not None


def test_another_redis_answering_on_the_port_is_not_taken_for_ours():
    """The port is picked free, then bound a moment later: whoever answers PING there
    was taken for ours, so a stack wrote into someone else's data."""
    other = EmbeddedRedis().start()
    try:
        mine = EmbeddedRedis(port=other.port)
        with pytest.raises(RedisStartError, match=str(other.port)):
            mine.start()
        assert mine.proc is None
        assert other.ping()  # untouched
    finally:
        other.stop()
        other.cleanup()


def test_a_port_held_by_something_else_says_why():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        stop = threading.Event()

        def accept_and_close():
            s.settimeout(0.1)
            while not stop.is_set():
                try:
                    conn, _ = s.accept()
                    conn.close()
                except OSError:
                    pass

        t = threading.Thread(target=accept_and_close, daemon=True)
        t.start()
        try:
            server = EmbeddedRedis(port=s.getsockname()[1])
            with pytest.raises(RedisStartError, match=r"(?i)address already in use|bind"):
                server.start(timeout_s=5)
        finally:
            stop.set()
            t.join()


def test_two_servers_never_share_a_data_directory(tmp_path):
    """`up --demo` beside a running `up` used the same var/redis: both appended to one
    file, and a rewrite by either lost the other's later writes on restart."""
    from recsys.embedded_redis import RedisDirBusy

    first = EmbeddedRedis(data_dir=tmp_path / "redis").start()
    try:
        second = EmbeddedRedis(data_dir=tmp_path / "redis")
        with pytest.raises(RedisDirBusy, match="another running Redis"):
            second.start()
        assert second.proc is None
    finally:
        first.stop()
    again = EmbeddedRedis(data_dir=tmp_path / "redis").start()  # free once it stopped
    again.stop()


def _script(path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_a_server_that_never_answers_says_what_it_printed(tmp_path, monkeypatch):
    """The log was closed before it was read: "did not answer ... in 1s: " and nothing."""
    fake = _script(
        tmp_path / "fake-redis", 'echo "cannot open the socket: out of luck"\nsleep 30\n'
    )
    monkeypatch.setenv("RECSYS_REDIS_SERVER", fake)
    server = EmbeddedRedis()
    with pytest.raises(RedisStartError, match=r"did not answer.*out of luck"):
        server.start(timeout_s=1.0)
    assert server.proc is None
    server.cleanup()


def test_a_wrapper_script_that_does_not_exec_is_ours_and_stops_whole(tmp_path, monkeypatch):
    """Its server's pid is not the wrapper's: refused as someone else's, then left
    running when only the wrapper got SIGTERM."""
    from recsys.embedded_redis import redis_server_binary

    real = redis_server_binary()
    wrapper = _script(tmp_path / "wrapped-redis", f'"{real}" "$@"\n')
    monkeypatch.setenv("RECSYS_REDIS_SERVER", wrapper)
    server = EmbeddedRedis().start()
    try:
        pid = server._server_pid()
        assert pid is not None and pid != server.proc.pid  # the wrapper's child
    finally:
        server.stop()
    with pytest.raises(ProcessLookupError):  # gone, not orphaned
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)
    server.cleanup()


def test_the_server_itself_holds_its_directorys_lock(tmp_path):
    """Held by the Python parent alone, the lock went with a parent that died while its
    server lived on (no parent-death signal), and a second server shared the file."""
    from recsys.embedded_redis import RedisDirBusy

    first = EmbeddedRedis(data_dir=tmp_path / "redis").start()
    try:
        os.close(first._lock_fd)  # as if this process had gone
        first._lock_fd = None
        with pytest.raises(RedisDirBusy):
            EmbeddedRedis(data_dir=tmp_path / "redis").start()
    finally:
        first.stop()
