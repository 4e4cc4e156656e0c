"""Multi-process serving: ``--workers 2`` share one port and one /metrics, SIGTERM stops all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from recsys.embedded_redis import free_port
from recsys.errors import UserFacingError
from recsys.serving import MULTIPROC_ENV, reserve_port
from recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from retrieval_service.server import SERVICE_NAME
from tests.conftest import ipv6_loopback


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


ESTABLISHED, TIME_WAIT = "01", "06"  # /proc/net/tcp's st column


def _server_inodes(port: int, state: str = ESTABLISHED) -> list[str]:
    """Inodes of the connections in ``state`` on local ``port`` (0 for TIME_WAIT's)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local_port = int(cols[1].rsplit(":", 1)[1], 16)
            if local_port == port and cols[3] == state:
                found.append(cols[9])
    return found


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if b"=" in e)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_reserve_port_shares_a_free_port():
    with reserve_port("127.0.0.1", 0) as port:
        assert port > 0
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))  # a worker can bind it too
        other.listen()
        other.close()
        plain = socket.socket()  # but a program without SO_REUSEPORT cannot
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        plain.close()


@pytest.mark.parametrize("reuseport", [False, True], ids=["plain", "reuseport"])
def test_reserve_port_refuses_a_taken_port(reuseport: bool):
    """Another service's workers (SO_REUSEPORT) were joined, not refused: traffic split."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with (
            pytest.raises(UserFacingError, match=rf"cannot listen on 127\.0\.0\.1:{port}: "),
            reserve_port("127.0.0.1", port),
        ):
            pass


def _port_in_time_wait() -> int:
    """A free port with a connection its server closed first, now in TIME_WAIT."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()  # closed by the server first, as a stopping service does
            assert client.recv(1) == b""
    deadline = time.monotonic() + 10
    while not _server_inodes(port, TIME_WAIT):  # once the client's FIN is in
        assert time.monotonic() < deadline, "no connection in TIME_WAIT"
        time.sleep(0.01)
    return port


def test_reserve_port_takes_a_port_whose_connections_wait_in_time_wait():
    """A multi-worker service stopped with clients connected could not start again
    on its port for a minute: 'cannot listen on ...: Address already in use'."""
    port = _port_in_time_wait()
    with reserve_port("127.0.0.1", port) as reserved:
        assert reserved == port


def test_a_second_reservation_of_a_port_is_refused():
    """Two supervisors starting at once both reserved the port (SO_REUSEADDR on
    both, neither listening yet) and their workers then split its traffic."""
    with reserve_port("127.0.0.1", 0) as port:
        with (
            pytest.raises(UserFacingError, match=rf"cannot listen on 127\.0\.0\.1:{port}: "),
            reserve_port("127.0.0.1", port),
        ):
            pass
        worker = socket.socket()  # the first one's workers still bind it
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", port))
        worker.close()


def test_a_reservation_through_time_wait_refuses_a_second_one():
    """The TIME_WAIT path binds with SO_REUSEADDR; clearing it after keeps the
    port from a second supervisor (on kernels that read the flag at each bind)."""
    port = _port_in_time_wait()
    with (
        reserve_port("127.0.0.1", port),
        pytest.raises(UserFacingError),
        reserve_port("127.0.0.1", port),
    ):
        pass


def _scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """Samples of ``/metrics`` as {'name{labels}': value} (``host`` as a URL writes it)."""
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def _serve_retrieval(
    version: Path,
    redis_url: str,
    port_file: Path,
    metrics_port: int,
    *,
    workers: int,
    stderr,
    env_extra: dict[str, str] | None = None,
    host: str | None = None,
    port: int = 0,
) -> subprocess.Popen:
    """``recsys serve retrieval`` with ``workers`` processes, clear of the caller's config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["RECSYS_RETRIEVAL__WORKERS"] = str(workers)
    env.update(env_extra or {})
    return subprocess.Popen(
        [
            sys.executable, "-m", "recsys.cli", "serve", "retrieval",
            "--model-dir", str(version.parent), "--redis-url", redis_url,
            "--port", str(port), "--metrics-port", str(metrics_port),
            "--port-file", str(port_file),
            *(("--host", host) if host else ()),
        ],
        env=env,
        stderr=stderr,
        text=True,
    )  # fmt: skip


def _wait_port_file(proc: subprocess.Popen, port_file: Path) -> None:
    """Until the supervisor writes its port file (every worker SERVING), or fails."""
    deadline = time.monotonic() + 120
    while not port_file.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no port file"
        time.sleep(0.05)


def _wait_serving(channel: grpc.Channel, deadline: float) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    while health.Check(check, timeout=5).status != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "never SERVING"
        time.sleep(0.05)


def test_two_workers_both_answer_and_sigterm_stops_all(
    published_version: Path, redis_url: str, tmp_path: Path
):
    port_file = tmp_path / "port"
    metrics_port = free_port()
    proc = _serve_retrieval(
        published_version, redis_url, port_file, metrics_port, workers=2, stderr=subprocess.PIPE
    )
    workers: list[int] = []
    channels: list[grpc.Channel] = []
    try:
        deadline = time.monotonic() + 120  # the port file and SERVING, together
        _wait_port_file(proc, port_file)
        port = int(port_file.read_text())
        workers = _children(proc.pid)
        assert len(workers) == 2
        # Each channel gets its own connection, which the kernel hands to one
        # of the listening workers; 24 of them all landing on one is ~1e-7.
        for _ in range(24):
            ch = grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            channels.append(ch)
            _wait_serving(ch, deadline)
            res = retrieval_pb2_grpc.RetrievalServiceStub(ch).Retrieve(
                retrieval_pb2.RetrieveRequest(
                    user=common_pb2.UserContext(user_id="worker-user"), budget=10
                ),
                timeout=5,
            )
            assert res.index_version == published_version.name and len(res.candidates) == 10
        accepted = set(_server_inodes(port))
        per_worker = {pid: len(_socket_inodes(pid) & accepted) for pid in workers}
        assert all(n > 0 for n in per_worker.values()), per_worker
        assert sum(per_worker.values()) == 24, per_worker
        # One /metrics for the pod: both workers' calls add up there.
        dirs = {_environ(pid).get("PROMETHEUS_MULTIPROC_DIR") for pid in workers}
        assert len(dirs) == 1 and None not in dirs, dirs
        metrics_dir = Path(dirs.pop())
        assert {p.name.rsplit("_", 1)[-1] for p in metrics_dir.glob("counter_*.db")} == {
            f"{pid}.db" for pid in workers
        }
        got = _scrape(metrics_port)
        ok = "recsys_rpc_total{code=OK,method=Retrieve,service=retrieval}"
        assert got.get(ok) == 24, {k: v for k, v in got.items() if "rpc_total" in k}
        version = f"recsys_model_version_info{{service=retrieval,version={published_version.name}}}"
        assert got.get(version) == 1, {k: v for k, v in got.items() if "version_info" in k}
        assert got.get("recsys_rpc_in_flight{service=retrieval}") == 0
        # Each worker's loop-lag probe, combined by the supervisor.
        assert got.get("recsys_event_loop_lag_seconds_count{service=retrieval}", 0) > 0
        for ch in channels:
            ch.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        gone = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < gone:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in workers), "a worker outlived its supervisor"
        logs = proc.stderr.read()
        assert logs.count('"msg": "stopped"') == 2, logs[-2000:]
        assert not metrics_dir.exists(), "the supervisor left its metrics directory"
    finally:
        for ch in channels:
            ch.close()
        _reap(proc)
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_one_worker_serves_its_own_registry(
    published_version: Path, redis_url: str, tmp_path: Path
):
    """Without workers there is no supervisor: plain registry, process series included."""
    port_file = tmp_path / "port"
    metrics_port = free_port()
    proc = _serve_retrieval(
        published_version, redis_url, port_file, metrics_port, workers=1, stderr=subprocess.DEVNULL
    )
    version = f"recsys_model_version_info{{service=retrieval,version={published_version.name}}}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "no version gauge"
            if port_file.exists():
                got = _scrape(metrics_port)
                if got.get(version) == 1:
                    break
            time.sleep(0.1)
        assert got["process_cpu_seconds_total{}"] > 0
        assert not _children(proc.pid), "one worker must not start a supervisor"
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_worker_lost_while_draining_makes_the_stop_fail(
    published_version: Path, redis_url: str, tmp_path: Path
):
    """SIGTERM asked for the stop, but a worker that dies mid-drain is still a failure."""
    port_file = tmp_path / "port"
    proc = _serve_retrieval(
        published_version, redis_url, port_file, free_port(), workers=2, stderr=subprocess.PIPE
    )
    try:
        _wait_port_file(proc, port_file)
        workers = _children(proc.pid)
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)
        os.kill(workers[0], signal.SIGKILL)  # lands within the 0.5 s drain delay
        assert proc.wait(timeout=60) == 1
        assert "a worker did not stop cleanly" in proc.stderr.read()
    finally:
        _reap(proc)


def _reap(proc: subprocess.Popen) -> None:
    """Kills ``proc`` if the test left it running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _exit_code(proc: subprocess.Popen, timeout_s: float) -> int:
    """Waits for ``proc``'s exit code; kills it (and fails) if it outlives ``timeout_s``."""
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        _reap(proc)


def test_a_busy_port_with_workers_is_a_clear_error(
    published_version: Path, redis_url: str, tmp_path: Path
):
    """One worker said 'cannot listen on ...' (exit 2); two died with a traceback (exit 1)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _serve_retrieval(
            published_version, redis_url, tmp_path / "port", 0, workers=2,
            stderr=subprocess.PIPE, port=port,
        )  # fmt: skip
        code = _exit_code(proc, 60)
    err = proc.stderr.read()
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}: " in err, err[-2000:]
    assert "Traceback" not in err, err[-2000:]


def test_a_crashed_worker_is_named_and_metrics_off_skips_multiprocess_mode(
    published_version: Path, redis_url: str, tmp_path: Path
):
    """The error said only 'a worker exited'; each worker now tags its records.

    With ``metrics_port`` 0 nothing serves the combined /metrics, so the
    workers keep their own registries instead of paying for multiprocess
    mode's memory-mapped files.
    """
    port_file = tmp_path / "port"
    proc = _serve_retrieval(
        published_version, redis_url, port_file, 0, workers=2, stderr=subprocess.PIPE
    )
    try:
        _wait_port_file(proc, port_file)
        workers = _children(proc.pid)
        assert len(workers) == 2
        in_multiprocess_mode = [pid for pid in workers if MULTIPROC_ENV in _environ(pid)]
        assert in_multiprocess_mode == []
        os.kill(workers[0], signal.SIGKILL)  # e.g. the OOM killer
        assert proc.wait(timeout=60) == 1
    finally:
        _reap(proc)
    docs = [json.loads(line) for line in proc.stderr.read().splitlines()]
    [crash] = [d for d in docs if d["msg"] == "a worker exited; stopping the others"]
    assert crash["exit_codes"] == {str(workers[0]): -signal.SIGKILL}, crash
    listening = {(d["worker"], d["pid"]) for d in docs if d["msg"] == "listening"}
    assert {pid for _, pid in listening} == set(workers), listening
    assert {index for index, _ in listening} == {0, 1}, listening


def test_workers_refusing_their_settings_exit_2_and_are_named(
    published_version: Path, redis_url: str, tmp_path: Path
):
    """As one worker does (operations.md): it was exit 1, and a log naming no worker.

    Each worker exits 2 on the missing certificate unless the supervisor's
    stop reaches it first; those that exited are named with their code.
    """
    missing = tmp_path / "missing.pem"
    proc = _serve_retrieval(
        published_version, redis_url, tmp_path / "port", 0, workers=2, stderr=subprocess.PIPE,
        env_extra={
            "RECSYS_RETRIEVAL__TLS__CERT_FILE": str(missing),
            "RECSYS_RETRIEVAL__TLS__KEY_FILE": str(missing),
        },
    )  # fmt: skip
    code = _exit_code(proc, 120)
    err = proc.stderr.read()
    assert code == 2, err[-2000:]
    assert f"retrieval.tls.cert_file: {missing}: no such file or directory" in err
    docs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    [crash] = [d for d in docs if d["msg"] == "a worker exited; stopping the others"]
    # Workers that died together were not reaped yet: {}.
    assert crash["exit_codes"], crash
    named = {
        exit_code
        for d in docs
        if d["msg"] in (crash["msg"], "a worker did not stop cleanly")
        for exit_code in d["exit_codes"].values()
    }
    assert named == {2}, err[-2000:]


def test_a_stop_while_workers_start_is_clean(
    published_version: Path, redis_url: str, tmp_path: Path
):
    """A worker SIGTERMed before it set up its handlers died of it: the stop exited 1."""
    proc = _serve_retrieval(
        published_version, redis_url, tmp_path / "port", 0, workers=2, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        # The supervisor handles signals before it starts any worker.
        while len(_children(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        assert code == 0, proc.stderr.read()[-2000:]
    finally:
        _reap(proc)


def test_workers_draining_longer_than_the_margin_still_stop_cleanly(
    published_version: Path, redis_url: str, tmp_path: Path
):
    """The supervisor's wait covers drain_delay_s too, not only grace_s (+5 s)."""
    port_file = tmp_path / "port"
    slow_drain = {"RECSYS_RETRIEVAL__DRAIN_DELAY_S": "5.5", "RECSYS_RETRIEVAL__GRACE_S": "0"}
    proc = _serve_retrieval(
        published_version,
        redis_url,
        port_file,
        free_port(),
        workers=2,
        stderr=subprocess.PIPE,
        env_extra=slow_drain,
    )
    try:
        _wait_port_file(proc, port_file)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        assert code == 0, proc.stderr.read()[-2000:]
    finally:
        _reap(proc)


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
@pytest.mark.parametrize(("host", "workers"), [("::1", 1), ("[::1]", 2)])
def test_an_ipv6_host_serves_grpc_and_metrics(
    published_version: Path, redis_url: str, tmp_path: Path, host: str, workers: int
):
    """gRPC was handed ``:::PORT`` for ``::1``; the port reservation and /metrics, ``[::1]``.

    Two workers take the supervisor's path (its port reservation and shared
    /metrics); one worker binds its own /metrics.
    """
    port_file = tmp_path / "port"
    metrics_port = free_port()
    proc = _serve_retrieval(
        published_version,
        redis_url,
        port_file,
        metrics_port,
        workers=workers,
        stderr=subprocess.PIPE,
        host=host,
    )
    try:
        deadline = time.monotonic() + 120
        _wait_port_file(proc, port_file)
        with grpc.insecure_channel(f"[::1]:{int(port_file.read_text())}") as ch:
            _wait_serving(ch, deadline)
            res = retrieval_pb2_grpc.RetrievalServiceStub(ch).Retrieve(
                retrieval_pb2.RetrieveRequest(
                    user=common_pb2.UserContext(user_id="v6-user"), budget=10
                ),
                timeout=5,
            )
        assert len(res.candidates) == 10
        got = _scrape(metrics_port, "[::1]")
        assert got.get("recsys_rpc_total{code=OK,method=Retrieve,service=retrieval}") == 1
    finally:
        proc.terminate()
        proc.wait(30)
