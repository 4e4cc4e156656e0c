"""SIGTERM: in-flight calls finish, new ones are refused, and a rolling restart loses nothing.

Real ``recsys serve`` processes. The rolling restart runs two retrieval
replicas behind one client-side round-robin channel
(``recsys.channels.create_channel`` with an ``ipv4:`` multi-address target)
and restarts each in turn while a load loop runs: zero calls may fail.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from bench.echo import EchoProcess
from recsys.channels import create_channel
from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc

from .conftest import RANKING, RETRIEVAL, ServiceProcess, wait_serving

pytestmark = pytest.mark.asyncio(loop_scope="session")


def env_for(redis_url: str, model_dir) -> dict[str, str]:
    return {
        "RECSYS_REDIS_URL": redis_url,
        "RECSYS_MODEL_DIR": str(model_dir),
        "RECSYS_LOG_FORMAT": "json",
        "RECSYS_RETRIEVAL__GRACE_S": "5",
        "RECSYS_RANKING__GRACE_S": "5",
    }


async def test_rolling_restart_of_one_of_two_replicas_fails_no_call(
    rel_redis, rel_published, tmp_path
):
    env = env_for(rel_redis.url, rel_published.parent)
    replicas = [
        ServiceProcess("retrieval", env, tmp_path / f"r{i}.log", "--port", "0") for i in range(2)
    ]
    ports = []
    for r in replicas:
        address = await r.address()
        await wait_serving(address, RETRIEVAL)
        ports.append(address.rsplit(":", 1)[1])
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    ok = 0
    failures: list[str] = []
    per_phase: dict[str, int] = {}
    phase = "both up"
    stop = asyncio.Event()
    channel = create_channel(target, aio=True)
    stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)

    async def worker(n: int) -> None:
        nonlocal ok
        i = n
        while not stop.is_set():
            req = retrieval_pb2.RetrieveRequest(user={"user_id": str(1 + i % 200)}, budget=30)
            try:
                resp = await stub.Retrieve(req, timeout=5)
                assert resp.candidates
                ok += 1
                per_phase[phase] = per_phase.get(phase, 0) + 1
            except Exception as exc:  # every failure is a test failure, collected
                failures.append(f"{phase}: {exc!r}"[:300])
            i += 4
            await asyncio.sleep(0.002)

    tasks = [asyncio.ensure_future(worker(n)) for n in range(4)]
    try:
        await asyncio.sleep(0.7)
        for i in range(2):
            phase = f"replica {i} draining"
            replicas[i].terminate()
            code = await asyncio.to_thread(replicas[i].proc.wait, 30)
            assert code == 0, replicas[i].log_text()[-2000:]
            assert "draining" in replicas[i].log_text()
            phase = f"replica {i} down"
            await asyncio.sleep(0.5)
            replicas[i].stop()
            phase = f"replica {i} restarting"
            replicas[i] = ServiceProcess(
                "retrieval", env, tmp_path / f"r{i}b.log", "--port", ports[i]
            )
            await wait_serving(await replicas[i].address(), RETRIEVAL)
            phase = f"replica {i} back"
            # The client reconnects within its 1 s maximum backoff; give it that
            # before the other replica goes, as a rollout waits for readiness.
            await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        await channel.close()
        for r in replicas:
            r.stop()
    assert failures == [], failures[:5]
    assert ok > 100
    # Load kept flowing through every phase, including while one replica was gone.
    for i in range(2):
        assert per_phase.get(f"replica {i} down", 0) > 0, per_phase
        assert per_phase.get(f"replica {i} back", 0) > 0, per_phase


async def test_sigterm_lets_in_flight_calls_finish_and_refuses_new_ones(
    rel_redis, rel_published, tmp_path
):
    env = {
        **env_for(rel_redis.url, rel_published.parent),
        "RECSYS_RANKING__RETRIEVAL_TIMEOUT_S": "10",
        # This client does not watch health, so skip the pause that lets
        # health-watching clients move away; refusal is then immediate.
        "RECSYS_RANKING__DRAIN_DELAY_S": "0",
    }
    # A slow retrieval that answers with real catalogue ids, so the calls in
    # flight rank what it returns (a fallback would hide an aborted hop).
    answer = retrieval_pb2.RetrieveResponse(
        candidates=[{"item_id": str(i), "sources": ["popular"]} for i in range(1, 31)],
        index_version=rel_published.name,
    ).SerializeToString()
    with EchoProcess(delay_ms=1500, fixed={"Retrieve": answer}) as slow_retrieval:
        proc = ServiceProcess(
            "ranking", env, tmp_path / "ranking.log",
            "--port", "0", "--device", "cpu", "--retrieval-address", slow_retrieval.address,
        )  # fmt: skip
        try:
            address = await proc.address()
            await wait_serving(address, RANKING, timeout_s=120)
            async with grpc.aio.insecure_channel(address) as ch:
                stub = ranking_pb2_grpc.RankingServiceStub(ch)
                req = ranking_pb2.RecommendRequest(user={"user_id": "1"}, k=5)
                in_flight = [
                    asyncio.ensure_future(stub.Recommend(req, timeout=15)) for _ in range(5)
                ]
                await asyncio.sleep(0.5)  # all five are waiting on the slow retrieval
                t_term = time.monotonic()
                proc.terminate()
                await asyncio.sleep(0.3)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Recommend(req, timeout=5)
                answers = await asyncio.gather(*in_flight)
                finished_after = time.monotonic() - t_term
            code = await asyncio.to_thread(proc.proc.wait, 30)
        finally:
            proc.stop()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # The in-flight calls got retrieval's (slow) answer, not a fallback or an error.
    assert all(len(a.items) == 5 and not a.retrieval_fallback for a in answers)
    assert 0.5 < finished_after < 5.0, finished_after
    assert code == 0
    log = proc.log_text()
    assert "draining" in log and "stopped" in log
