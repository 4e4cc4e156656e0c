"""``recsys up`` with a config file: every child gets it, TLS services count as up.

Before, only the ports and model dir from the file reached the stack: the
children were started without it, so a ranking auth token (and TLS, sources,
trainer settings) silently did not apply, and with TLS on, ``up`` waited out
its health timeout on a plaintext health check.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from recsys.client import RecommenderClient
from recsys.config import load_settings
from recsys.errors import UserFacingError
from recsys.stack import run_demo, start_stack

pytestmark = pytest.mark.slow


def test_up_hands_its_config_file_to_every_child(
    pki, trained_version: Path, tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.delenv("RECSYS_REDIS_URL", raising=False)
    monkeypatch.delenv("RECSYS_CONFIG", raising=False)
    model_dir = tmp_path / "models"
    shutil.copytree(trained_version, model_dir / trained_version.name)
    cfg = tmp_path / "recsys.toml"
    cfg.write_text(
        f"""
[retrieval]
port = 0
tls = {{ cert_file = "{pki.server_cert}", key_file = "{pki.server_key}" }}

[ranking]
port = 0
auth_token = "up-token"
retrieval_tls = {{ ca_file = "{pki.ca}" }}
"""
    )
    # As `recsys up --log-level DEBUG` gives it: a flag, not the file.
    settings = load_settings(cfg, model_dir=model_dir, log_level="DEBUG")
    stack = start_stack(
        settings, quiet=True, log_dir=tmp_path / "logs", health_timeout_s=120, config_file=cfg
    )
    try:
        with RecommenderClient(stack.ranking_address, None, timeout_s=10) as anonymous:
            with pytest.raises(grpc.RpcError) as err:
                anonymous.recommend("1", k=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with RecommenderClient(stack.ranking_address, None, timeout_s=10, token="up-token") as rc:
            recs = rc.recommend("1", k=5)
            # Ranking reached retrieval over TLS with the file's CA: real candidates.
            assert len(recs.items) == 5 and not recs.retrieval_fallback
        with pytest.raises(UserFacingError, match="UNAUTHENTICATED"):
            run_demo(stack, n_users=1, k=3)
        run_demo(stack, n_users=1, k=3, token="up-token")
        assert "cold start" in capsys.readouterr().out
    finally:
        stack.stop()
    # The flag's log level reached the services too (up passed only the format).
    for service in ("retrieval", "ranking"):
        assert "DEBUG" in (tmp_path / "logs" / f"{service}.log").read_text(), service
