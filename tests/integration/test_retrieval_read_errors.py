"""A top-list read that fails mid-request: the source reports ERROR and nothing is left unread.

Real Redis: the version's genre lists are overwritten with plain strings, so
each list's read fails on its own (WRONGTYPE) while the user's state reads
fine. The genre source queues one read per favourite genre and awaits them
in turn; when the first fails, the later ones must still have their errors
consumed, or asyncio logs "Future exception was never retrieved" for each of
them once they are collected (a log line per genre per request in an outage).
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis

from recsys import redis_keys
from recsys.artifacts import ModelVersion
from recsys.config import RetrievalSettings
from retrieval_service.engine import (
    RequestFeatures,
    RetrievalEngine,
    RetrieveQuery,
    SourceStatus,
)
from retrieval_service.registry import build_sources
from trainer.publish import publish

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(published: Path, redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    settings = RetrievalSettings(
        top_list_cache=False,
        sources=[
            {"name": "top_genre", "type": "redis_top_genre", "budget": 60, "timeout_ms": 2000},
            {"name": "popular", "type": "popular", "budget": 60},
        ],
    )
    eng = RetrievalEngine(settings, build_sources(settings.sources), client)
    eng.swap(await asyncio.to_thread(eng.load_version, published))
    yield eng
    await client.aclose()


async def test_failed_genre_reads_are_reported_and_leave_no_unretrieved_errors(
    engine, published: Path, redis_server
):
    mv = ModelVersion.open(published)
    sync = redis.Redis.from_url(redis_server.url)
    try:
        for genre in mv.spec.genres:
            sync.set(redis_keys.top_genre(mv.version, genre), "not a sorted set")
    finally:
        sync.close()
    users = mv.users
    # A user with several favourite genres: several reads queued, all failing.
    row = max(range(len(users["user_id"])), key=lambda r: len(users["history"][r]))
    loop = asyncio.get_running_loop()
    seen: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        for _ in range(3):
            result = await engine.retrieve(RetrieveQuery(str(users["user_id"][row]), budget=60))
            report = {r.source: r for r in result.reports}["top_genre"]
            assert report.status is SourceStatus.ERROR and "WRONGTYPE" in report.message
            assert result.degraded and len(result.selection) == 60  # popular still answers
        await asyncio.sleep(0.05)  # let every read's callbacks run
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    unretrieved = [c for c in seen if "never retrieved" in str(c.get("message", ""))]
    assert not unretrieved, unretrieved[:2]


async def test_a_version_without_top_lists_in_redis_is_served_with_a_warning(
    published: Path, redis_server, caplog
):
    from recsys.config import load_settings
    from retrieval_service.server import build_server

    mv = ModelVersion.open(published)
    sync = redis.Redis.from_url(redis_server.url)
    try:  # as if the version had never been published (or its keys were removed)
        keys = list(sync.scan_iter(match=redis_keys.version_pattern(mv.version)))
        assert keys
        sync.unlink(*keys)
    finally:
        sync.close()
    settings = load_settings(
        model_dir=published.parent,
        redis_url=redis_server.url,
        retrieval={"port": 0, "metrics_port": 0, "reload_interval_s": 3600.0},
    )
    _handle, app = build_server(settings)
    try:
        with caplog.at_level("INFO", logger="recsys.retrieval"):
            await app.load(published)
        assert app.engine.served is not None
        warned = [r for r in caplog.records if "no top lists in Redis" in r.getMessage()]
        assert len(warned) == 1 and warned[0].levelname == "WARNING"
        # Every answer says so too: the list sources fail (degraded), not answer nothing.
        user = str(mv.users["user_id"][0])
        query = RetrieveQuery(
            user_id=user, budget=100, features=RequestFeatures(country=mv.spec.countries[0])
        )
        result = await app.engine.retrieve(query)
        reports = {r.source: r for r in result.reports}
        assert result.degraded and result.candidates
        for source in ("top_genre", "top_country"):
            assert reports[source].status is SourceStatus.ERROR
            assert f"version {mv.version} has no top lists in Redis" in reports[source].message
        assert reports["popular"].status is SourceStatus.OK
        # Published now: the next answers are whole, without a reload.
        sync = redis.Redis.from_url(redis_server.url)
        try:
            publish(published, sync, quiet=True)
        finally:
            sync.close()
        result = await app.engine.retrieve(query)
        reports = {r.source: r for r in result.reports}
        assert not result.degraded
        assert reports["top_genre"].status is SourceStatus.OK and reports["top_genre"].count > 0
    finally:
        await app.close()


async def test_redis_down_is_one_throttled_warning_not_a_traceback_per_batch(
    published: Path, caplog, monkeypatch
):
    from recsys.embedded_redis import free_port

    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing there
    settings = RetrievalSettings(sources=[{"name": "popular", "type": "popular", "budget": 20}])
    eng = RetrievalEngine(settings, build_sources(settings.sources), client)
    eng.swap(await asyncio.to_thread(eng.load_version, published))
    import retrieval_service.engine as engine_module

    monkeypatch.setattr(engine_module._log_redis_down, "_last", float("-inf"))  # a fresh interval
    try:
        with caplog.at_level("INFO"):
            for burst in range(5):
                results = await asyncio.gather(
                    *(eng.retrieve(RetrieveQuery(f"u{burst}-{i}", budget=20)) for i in range(8))
                )
                assert all(r.degraded and len(r.selection) == 20 for r in results)
    finally:
        await client.aclose()
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    warned = [r for r in caplog.records if "user reads failing" in r.getMessage()]
    assert errors == [] and len(warned) == 1, [r.getMessage()[:120] for r in caplog.records][:5]
