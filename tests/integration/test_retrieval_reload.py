"""Hot reload: publishing a second trained version swaps it in with no failed call."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.config import load_settings
from recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from retrieval_service.server import SERVICE_NAME, build_server

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _publish(version_dir: Path, url: str) -> None:
    from trainer.publish import publish

    client = redis.Redis.from_url(url)
    try:
        publish(version_dir, client, quiet=True)
    finally:
        client.close()


async def test_hot_reload_under_load(redis_url, trained_version, train_version, tmp_path):
    models = tmp_path / "models"
    v1 = models / trained_version.name
    shutil.copytree(trained_version, v1)
    _publish(v1, redis_url)
    sources = [
        {"name": "similar_to_recent", "type": "annoy_similar", "timeout_ms": 1000},
        {"name": "popular", "type": "popular", "timeout_ms": 1000},
    ]
    settings = load_settings(
        model_dir=models,
        redis_url=redis_url,
        retrieval={"port": 0, "metrics_port": 0, "reload_interval_s": 0.05, "sources": sources},
    )
    handle, app = build_server(settings)
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
    stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    try:
        await _wait_serving(channel)
        assert (await stub.Retrieve(_req(), timeout=5)).index_version == v1.name

        seen: list[str] = []
        errors: list[str] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                try:
                    res = await stub.Retrieve(_req(), timeout=5)
                    sim = await stub.SimilarItems(
                        retrieval_pb2.SimilarItemsRequest(item_id=res.candidates[0].item_id, k=5),
                        timeout=5,
                    )
                    seen.append(res.index_version)
                    assert len(sim.items) == 5
                except Exception as exc:  # every failure is a test failure, collected
                    errors.append(repr(exc))

        workers = [asyncio.create_task(load()) for _ in range(4)]
        # A second real version appears on disk but is only served once published.
        v2 = await asyncio.to_thread(train_version, models, seed=1, epochs=1)
        await asyncio.sleep(0.3)
        assert v2.name not in seen
        await asyncio.to_thread(_publish, v2, redis_url)
        deadline = time.monotonic() + 20
        while seen.count(v2.name) < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*workers)
    finally:
        await channel.close()
        await app.stop(0)
    assert not errors, errors[:3]
    assert seen.count(v2.name) >= 20, "new version never served"
    switch = seen.index(v2.name)
    # Once a worker saw the new version it never sees the old one again (no flapping).
    assert set(seen[:switch]) == {v1.name}
    assert seen[switch:].count(v1.name) <= 4  # at most the calls in flight at the swap


async def _wait_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    deadline = time.monotonic() + 20
    while True:
        # Every call carries a deadline: a lost call must fail the test, not hang it.
        try:
            status = (await health.Check(check, timeout=2)).status
        except grpc.aio.AioRpcError:
            status = None
        if status == health_pb2.HealthCheckResponse.SERVING:
            return
        assert time.monotonic() < deadline, "never became SERVING"
        await asyncio.sleep(0.05)


def _req() -> retrieval_pb2.RetrieveRequest:
    return retrieval_pb2.RetrieveRequest(
        user=common_pb2.UserContext(user_id="reload-user"), budget=20
    )


async def test_not_serving_until_a_version_exists(redis_url, trained_version, tmp_path):
    models = tmp_path / "empty-models"
    models.mkdir()
    settings = load_settings(
        model_dir=models,
        redis_url=redis_url,
        retrieval={"port": 0, "metrics_port": 0, "reload_interval_s": 0.05},
    )
    handle, app = build_server(settings)
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
    health = health_pb2_grpc.HealthStub(channel)
    stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    try:
        await asyncio.sleep(0.2)
        status = (await health.Check(check, timeout=5)).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Retrieve(_req(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no model version loaded" in err.value.details()
        # A version appearing on disk (Redis has no pointer) is picked up.
        shutil.copytree(trained_version, models / trained_version.name)
        await _wait_serving(channel)
        res = await stub.Retrieve(_req(), timeout=5)
        assert res.index_version == trained_version.name and len(res.candidates) == 20
    finally:
        await channel.close()
        await app.stop(0)
