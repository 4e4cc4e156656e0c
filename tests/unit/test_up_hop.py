"""``recsys up`` refuses a config whose ranking could not call its own retrieval.

Both services start from the one config, yet a retrieval token that ranking
did not send (or TLS on one side of the hop only) let ``up`` report SERVING
and exit 0 while every Recommend was the popular fallback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.config import load_settings
from recsys.errors import UserFacingError
from recsys.stack import _check_hop, start_stack

SERVER_TLS = {"cert_file": "server.crt", "key_file": "server.key"}
MUTUAL_TLS = {**SERVER_TLS, "ca_file": "ca.crt", "require_client_cert": True}
HOP_TLS = {"ca_file": "ca.crt"}


@pytest.mark.parametrize(
    ("config", "named"),
    [
        pytest.param(
            {"retrieval": {"auth_token": "r-secret"}},
            ["retrieval.auth_token", "ranking.retrieval_auth_token is not set"],
            id="token not sent",
        ),
        pytest.param(
            {"retrieval": {"auth_token": "r-secret"}, "ranking": {"retrieval_auth_token": "k-x"}},
            ["retrieval.auth_token", "ranking.retrieval_auth_token differs"],
            id="other token sent",
        ),
        pytest.param(
            {"retrieval": {"tls": SERVER_TLS}},
            ["retrieval.tls is on", "ranking.retrieval_tls is not"],
            id="plaintext to TLS",
        ),
        pytest.param(
            {"retrieval": {"tls": MUTUAL_TLS}, "ranking": {"retrieval_tls": HOP_TLS}},
            ["retrieval.tls.require_client_cert", "ranking.retrieval_tls has no cert_file"],
            id="no client certificate",
        ),
        pytest.param(
            {"ranking": {"retrieval_tls": HOP_TLS}},
            ["ranking.retrieval_tls is set", "retrieval.tls is off"],
            id="TLS to plaintext",
        ),
    ],
)
def test_a_hop_its_config_breaks_is_refused_before_anything_starts(config, named, tmp_path: Path):
    settings = load_settings(model_dir=tmp_path / "models", **config)
    with pytest.raises(UserFacingError) as err:
        # Data that cannot load: had `up` gone on, training would fail instead.
        start_stack(
            settings, data="csv:/nonexistent", redis_url="redis://127.0.0.1:1/0", quiet=True
        )
    msg = str(err.value)
    assert msg.startswith("ranking could not call retrieval"), msg
    assert all(name in msg for name in named), msg
    assert "secret" not in msg  # the tokens themselves stay out of the message
    assert not (tmp_path / "models").exists()  # nothing trained, nothing written


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({}, id="plaintext, no tokens"),
        pytest.param(
            {
                "retrieval": {"auth_token": "r", "tls": MUTUAL_TLS},
                "ranking": {
                    "retrieval_auth_token": "r",
                    "retrieval_tls": {**HOP_TLS, **SERVER_TLS},
                },
            },
            id="token and mutual TLS",
        ),
        # Retrieval ignores a token it does not ask for; only the ranking
        # service's own callers are then checked.
        pytest.param({"ranking": {"retrieval_auth_token": "r"}}, id="token not asked for"),
    ],
)
def test_a_hop_that_works_passes(config, tmp_path: Path):
    _check_hop(load_settings(model_dir=tmp_path / "models", **config))
