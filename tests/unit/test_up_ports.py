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
