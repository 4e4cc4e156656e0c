"""``recsys up`` serves on the ports the config names, or says why it cannot.

It used to move a service whose configured port was busy to a free one, and
``recsys recommend``, which dials the configured port, then failed or reached
an old stack.
"""

from __future__ import annotations

import shlex
import socket
from pathlib import Path

import pytest

from recsys.cli import build_parser
from recsys.config import load_settings
from recsys.errors import UserFacingError
from recsys.stack import _port_free, recommend_hint, start_stack


@pytest.mark.parametrize("service", ["retrieval", "ranking"])
def test_a_busy_configured_port_is_refused_before_anything_starts(service, tmp_path: Path):
    settings = load_settings(model_dir=tmp_path / "models")
    settings.retrieval.port = settings.ranking.port = 0
    with socket.socket() as other:  # an old stack, another program
        other.bind(("127.0.0.1", 0))
        other.listen()
        busy = other.getsockname()[1]
        getattr(settings, service).port = busy
        with pytest.raises(UserFacingError) as err:
            # Data that cannot load: had `up` gone on, training would fail instead.
            start_stack(
                settings, data="csv:/nonexistent", redis_url="redis://127.0.0.1:1/0", quiet=True
            )
    msg = str(err.value)
    assert msg.startswith(f"{service} port {busy} on 127.0.0.1 is in use"), msg
    assert f"[{service}] port = 0" in msg and "\n" not in msg
    assert not (tmp_path / "models").exists()  # nothing trained, nothing written


def test_the_hint_for_a_free_port_is_a_command_recommend_parses():
    config = Path("/srv/my stack/recsys.toml")
    hint = recommend_hint("127.0.0.1:40123", config, tls=False)
    args = build_parser().parse_args(shlex.split(hint)[1:])
    assert (args.command, args.target, args.config) == ("recommend", "127.0.0.1:40123", config)
    tls = build_parser().parse_args(shlex.split(recommend_hint("[::1]:1", None, tls=True))[1:])
    assert (tls.target, tls.config, tls.tls_ca) == ("[::1]:1", None, Path("CA_FILE"))


@pytest.mark.parametrize("host", ["192.0.2.1", "no-such-host.invalid"])
def test_a_host_that_is_not_this_machines_is_said_so_not_called_busy(host, tmp_path: Path):
    """Every bind failure read as "in use", and the advice (port 0) failed after training."""
    settings = load_settings(model_dir=tmp_path / "models")
    settings.retrieval.port = 0
    settings.ranking.host, settings.ranking.port = host, 50999
    with pytest.raises(UserFacingError) as err:
        start_stack(
            settings, data="csv:/nonexistent", redis_url="redis://127.0.0.1:1/0", quiet=True
        )
    msg = str(err.value)
    assert repr(host) in msg and "in use" not in msg, msg
    assert not (tmp_path / "models").exists()


def test_a_port_held_on_one_of_a_names_addresses_is_busy():
    """``localhost`` names 127.0.0.1 (and ::1 where there is one): a holder of either counts."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        assert not _port_free("localhost", other.getsockname()[1])
        assert not _port_free("0.0.0.0", other.getsockname()[1])


def test_one_port_configured_for_both_services_is_refused_before_anything_starts(
    tmp_path: Path,
):
    """The check passed it (the port was free), and the second service failed to bind
    only after training and publishing."""
    settings = load_settings(model_dir=tmp_path / "models")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings.retrieval.port = settings.ranking.port = port
    with pytest.raises(UserFacingError, match=f"both configured on port {port}"):
        start_stack(
            settings, data="csv:/nonexistent", redis_url="redis://127.0.0.1:1/0", quiet=True
        )
    assert not (tmp_path / "models").exists()


def test_stop_waits_as_long_as_the_services_drain():
    """A fixed 10 s killed a supervisor whose workers drain for 15.5 s, orphaning a worker."""
    from recsys.stack import drain_time_s

    settings = load_settings()
    base = drain_time_s(settings)
    r = settings.retrieval
    assert base >= r.drain_delay_s + r.grace_s
    settings.retrieval.workers = 2
    settings.retrieval.grace_s = 30.0
    assert drain_time_s(settings) >= r.drain_delay_s + 30.0 + 5.0


def test_a_service_still_not_serving_at_its_deadline_shows_its_log(tmp_path: Path):
    """ "was not SERVING after 120s" left the reason (a pinned version not on disk)
    in a log file the message did not name."""
    import subprocess
    import sys

    from recsys.embedded_redis import free_port
    from recsys.stack import wait_serving

    log = tmp_path / "retrieval.log"
    log.write_text('{"message": "wanted version is not on disk yet", "version": "7"}\n')
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(UserFacingError) as err:
            wait_serving(f"127.0.0.1:{free_port()}", "recsys.v1.RetrievalService", 0.5, proc, log)
    finally:
        proc.kill()
        proc.wait()
    msg = str(err.value)
    assert "was not SERVING after" in msg and str(log) in msg
    assert "wanted version is not on disk yet" in msg


def test_up_beside_a_running_stack_keeps_its_redis_data_apart(tmp_path: Path, capsys):
    """Both stacks' Redis appended to <model dir's parent>/redis/appendonly.aof."""
    import subprocess

    from recsys.embedded_redis import EmbeddedRedis

    settings = load_settings(model_dir=tmp_path / "models")
    settings.retrieval.port = settings.ranking.port = 0
    running = EmbeddedRedis(data_dir=tmp_path / "redis").start()  # the other stack's
    try:
        # Data that cannot load: the stack stops at training, after its Redis started.
        with pytest.raises(subprocess.CalledProcessError):
            start_stack(settings, data="csv:/nonexistent")
        out = capsys.readouterr().out
        assert "is another running stack's Redis data" in out
        assert running.ping()
    finally:
        running.stop()


@pytest.mark.parametrize(("r", "k"), [(0, 0), (0, 50052), (50051, 0), (50051, 50052)])
def test_free_ports_are_picked_late_and_never_collide(r, k, monkeypatch):
    """Picked before training, a free port could be anyone's by the time a service bound
    it; and two picks in a row could return one port for both services."""
    import recsys.stack as stack

    picks = iter([50052, 50052, 50051, 40000, 40000, 40001])
    monkeypatch.setattr(stack, "free_port", lambda: next(picks))
    got_r, got_k = stack._free_ports(r, k)
    assert got_r and got_k and got_r != got_k
    assert (r == 0 or got_r == r) and (k == 0 or got_k == k)
    settings = load_settings()
    settings.retrieval.port = settings.ranking.port = 0
    assert stack._ports(settings, any_free=False) == (0, 0)  # nothing picked before training
