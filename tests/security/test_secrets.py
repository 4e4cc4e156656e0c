"""Shared-token auth, Redis with a password, and no secret in logs or client-visible errors.

Both services run as real ``recsys serve`` processes with DEBUG JSON logs
captured to files; Redis is a real redis-server started with ``--requirepass``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.cli import main as cli_main
from recsys.client import RecommenderClient
from recsys.config import load_settings
from recsys.embedded_redis import EmbeddedRedis, die_with_parent_prefix
from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc

from .conftest import wait_serving

pytestmark = pytest.mark.asyncio(loop_scope="session")

PASSWORD = "redis-Pw-7f3a9c"
TOKEN_R = "retrieval-token-51d0e2"
TOKEN_K = "ranking-token-a88c41"
WRONG_PASSWORD = "wrong-Pw-0b6e11"
SECRETS = (PASSWORD, TOKEN_R, TOKEN_K, WRONG_PASSWORD)


def serve(name: str, env: dict[str, str], log: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    port_file = log.with_suffix(".port")
    cmd = [sys.executable, "-m", "recsys.cli", "serve", name, "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "0", "--port-file", str(port_file), *args]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*die_with_parent_prefix(), *cmd],
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, port_file


async def address_of(proc: subprocess.Popen, port_file: Path, log: Path) -> str:
    deadline = time.monotonic() + 120
    while not port_file.is_file():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no port file"
        await asyncio.sleep(0.05)
    return f"127.0.0.1:{int(port_file.read_text())}"


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def code_of(coro) -> tuple[str, str]:
    try:
        resp = await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", str(resp)


async def test_tokens_redis_password_and_no_secrets_leak(
    trained_version, tmp_path, monkeypatch, capsys
):
    from trainer.publish import publish

    server = EmbeddedRedis(password=PASSWORD).start()
    procs: list[subprocess.Popen] = []
    seen: list[str] = []  # every status message and response text a client got
    try:
        client = redis.Redis.from_url(server.url)
        publish(trained_version, client, quiet=True)
        client.close()
        base = {
            "RECSYS_MODEL_DIR": str(trained_version.parent),
            "RECSYS_LOG_LEVEL": "DEBUG",
            "RECSYS_LOG_FORMAT": "json",
        }
        env = {
            **base,
            "RECSYS_REDIS_URL": server.url,
            "RECSYS_RETRIEVAL__AUTH_TOKEN": TOKEN_R,
            "RECSYS_RANKING__AUTH_TOKEN": TOKEN_K,
            "RECSYS_RANKING__RETRIEVAL_AUTH_TOKEN": TOKEN_R,
            "RECSYS_RANKING__RETRIEVAL_TIMEOUT_S": "3",
        }
        r_proc, r_port = serve("retrieval", env, tmp_path / "retrieval.log")
        procs.append(r_proc)
        r_addr = await address_of(r_proc, r_port, tmp_path / "retrieval.log")
        k_proc, k_port = serve("ranking", env, tmp_path / "ranking.log",
                               "--retrieval-address", r_addr, "--device", "cpu")  # fmt: skip
        procs.append(k_proc)
        # A second retrieval with the wrong Redis password: it must not echo that one either.
        bad_url = server.url.replace(PASSWORD, WRONG_PASSWORD)
        b_proc, b_port = serve(
            "retrieval", {**base, "RECSYS_REDIS_URL": bad_url}, tmp_path / "wrong-pw.log"
        )
        procs.append(b_proc)
        k_addr = await address_of(k_proc, k_port, tmp_path / "ranking.log")
        b_addr = await address_of(b_proc, b_port, tmp_path / "wrong-pw.log")
        # Health needs no token: probes must work without credentials.
        await wait_serving(r_addr, "recsys.v1.RetrievalService")
        await wait_serving(k_addr, "recsys.v1.RankingService", timeout_s=120)
        await wait_serving(b_addr, "recsys.v1.RetrievalService")

        good_r = (("authorization", f"Bearer {TOKEN_R}"),)
        good_k = (("authorization", f"Bearer {TOKEN_K}"),)
        wrong = (("authorization", f"Bearer {TOKEN_K}x"),)
        retrieve = retrieval_pb2.RetrieveRequest(user={"user_id": "1"}, budget=20)
        record = retrieval_pb2.RecordInteractionRequest(user_id="sec-user", item_id="1", rating=4)
        recommend = ranking_pb2.RecommendRequest(user={"user_id": "1"}, k=5)
        async with (
            grpc.aio.insecure_channel(r_addr) as r_ch,
            grpc.aio.insecure_channel(k_addr) as k_ch,
            grpc.aio.insecure_channel(b_addr) as b_ch,
        ):
            r = retrieval_pb2_grpc.RetrievalServiceStub(r_ch)
            k = ranking_pb2_grpc.RankingServiceStub(k_ch)
            b = retrieval_pb2_grpc.RetrievalServiceStub(b_ch)
            for metadata in (None, wrong, (("authorization", TOKEN_R),), good_k):
                code, msg = await code_of(r.Retrieve(retrieve, timeout=5, metadata=metadata))
                assert code == "UNAUTHENTICATED", (metadata, code, msg)
                seen.append(msg)
            for metadata in (None, wrong, good_r):
                code, msg = await code_of(k.Recommend(recommend, timeout=5, metadata=metadata))
                assert code == "UNAUTHENTICATED", (metadata, code, msg)
                seen.append(msg)
            health = health_pb2_grpc.HealthStub(k_ch)
            assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == 1

            ok = await r.Retrieve(retrieve, timeout=5, metadata=good_r)
            assert not ok.degraded and ok.candidates
            # The password works: the write lands in the protected Redis.
            rec = await r.RecordInteraction(record, timeout=5, metadata=good_r)
            assert rec.rating_count == 1
            # The ranking→retrieval hop carries its own token.
            rec_k = await k.Recommend(recommend, timeout=10, metadata=good_k)
            assert not rec_k.retrieval_fallback and len(rec_k.items) == 5
            seen += [str(ok), str(rec_k)]
            # `recsys recommend` sends the token the config gives the ranking service.
            argv = ["recommend", "--user", "1", "--k", "5", "--target", k_addr, "--json"]
            capsys.readouterr()
            assert await asyncio.to_thread(cli_main, argv) == 1  # no token configured here
            assert "UNAUTHENTICATED" in capsys.readouterr().err
            monkeypatch.setenv("RECSYS_RANKING__AUTH_TOKEN", TOKEN_K)
            assert await asyncio.to_thread(cli_main, argv) == 0
            printed = capsys.readouterr()
            assert len(json.loads(printed.out)["items"]) == 5
            seen += [printed.out, printed.err]
            # The Python client sends each service the token the config gives it:
            # the ranking token to retrieval was refused (similar, record failed).
            settings = load_settings(
                ranking={"port": int(k_addr.rsplit(":", 1)[1]), "auth_token": TOKEN_K},
                retrieval={"port": int(r_addr.rsplit(":", 1)[1]), "auth_token": TOKEN_R},
            )

            def use_client() -> tuple[int, int, int]:
                with RecommenderClient.from_settings(settings, timeout_s=10) as rc:
                    recs = rc.recommend("1", k=5)
                    assert not recs.retrieval_fallback
                    return (
                        len(recs.items),
                        len(rc.similar("1", k=3)),
                        rc.record("sec-user", "2").history_length,
                    )

            assert await asyncio.to_thread(use_client) == (5, 3, 2)

            # Wrong password: reads degrade, writes fail, and nobody is told the password.
            deg = await b.Retrieve(retrieve, timeout=5)
            assert deg.degraded
            seen.append(str(deg))
            code, msg = await code_of(b.RecordInteraction(record, timeout=5))
            assert code == "UNAVAILABLE", (code, msg)
            seen.append(msg)

            # Redis gone: the same, through both services.
            server.stop()
            deg = await r.Retrieve(retrieve, timeout=5, metadata=good_r)
            assert deg.degraded
            code, msg = await code_of(r.RecordInteraction(record, timeout=5, metadata=good_r))
            assert code == "UNAVAILABLE", (code, msg)
            rec_k = await k.Recommend(recommend, timeout=10, metadata=good_k)
            seen += [str(deg), msg, str(rec_k)]
    finally:
        codes = [stop(p) for p in procs]
        server.cleanup()
    assert codes == [0, 0, 0]
    logs = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
    assert len(logs) == 3
    assert '"level": "DEBUG"' in logs["retrieval.log"] or "DEBUG" in logs["retrieval.log"]
    # The wrong-password service did log the failure, just not the secret.
    assert "user reads failing" in logs["wrong-pw.log"]
    for secret in SECRETS:
        for name, text in logs.items():
            assert secret not in text, f"{secret} in {name}"
        for text in seen:
            assert secret not in text, f"{secret} sent to a client: {text[:200]}"
