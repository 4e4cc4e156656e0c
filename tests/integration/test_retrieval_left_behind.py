"""A source left behind (it swallows its cancellations) is counted once, traced or not.

The request reports it TIMEOUT; its own task, ending later, counted it again."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import redis.asyncio as aioredis
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from recsys.config import RetrievalSettings, TracingSettings
from recsys.tracing import Tracing
from retrieval_service.sources.base import SourceBase, SourceConfig


class Deaf(SourceBase):
    async def retrieve(self, ctx, k):
        for _ in range(5):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.1)
        return []


async def test_a_left_behind_source_is_counted_once(published_version: Path, redis_url: str):
    from retrieval_service import metrics
    from retrieval_service.engine import RetrievalEngine, RetrieveQuery
    from retrieval_service.registry import build_sources

    tracing = Tracing.from_settings(
        TracingSettings(enabled=True), "retrieval", exporter=InMemorySpanExporter()
    )
    client = aioredis.Redis.from_url(redis_url)
    try:
        srcs = [
            *build_sources([{"name": "popular", "type": "popular"}]),
            Deaf(SourceConfig(name="deaf", type="x", timeout_ms=30)),
        ]
        eng = RetrievalEngine(RetrievalSettings(), srcs, client, tracing=tracing)
        eng.swap(await asyncio.to_thread(eng.load_version, published_version))
        timeouts = metrics.source_status("deaf", "TIMEOUT", "default")
        before = timeouts._value.get()
        res = await eng.retrieve(RetrieveQuery("u"), timeout_s=0.2)
        assert {r.source: r.status.value for r in res.reports}["deaf"] == "TIMEOUT"
        await asyncio.sleep(0.8)  # the left-behind task ends
    finally:
        await client.aclose()
    assert timeouts._value.get() - before == 1
