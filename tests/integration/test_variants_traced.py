"""With tracing on, a request naming only sources its A/B arm disables is an empty answer.

The traced path waits on one task per source: with none, asyncio.wait refused the
empty set and the call was INTERNAL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from recsys.config import ExperimentSettings, RecsysSettings, RetrievalSettings, TracingSettings
from recsys.experiments import Experiment
from recsys.tracing import Tracing

EXPERIMENT = {
    "name": "t",
    "variants": [
        {"name": "control", "share": 0.5},
        {"name": "arm", "share": 0.5, "sources": {"top_country": {"enabled": False}}},
    ],
}


async def test_traced_request_for_only_disabled_sources_is_an_empty_answer(
    published_version: Path, redis_url: str
):
    from retrieval_service.engine import RetrievalEngine, RetrieveQuery
    from retrieval_service.registry import build_sources
    from retrieval_service.server import variant_sources

    rs = RetrievalSettings()
    exp = Experiment(ExperimentSettings(**EXPERIMENT))
    settings = RecsysSettings(redis_url=redis_url, retrieval=rs, experiments=EXPERIMENT)
    client = aioredis.Redis.from_url(redis_url)
    try:
        results = {}
        for traced in (False, True):
            tracing = (
                Tracing.from_settings(
                    TracingSettings(enabled=True), "retrieval", exporter=InMemorySpanExporter()
                )
                if traced
                else Tracing.from_settings(TracingSettings(), "retrieval")
            )
            eng = RetrievalEngine(
                rs,
                build_sources(rs.sources),
                client,
                experiment=exp,
                variant_sources=variant_sources(settings, exp),
                tracing=tracing,
            )
            eng.swap(await asyncio.to_thread(eng.load_version, published_version))
            q = RetrieveQuery("u1", sources=("top_country",), variant="arm")
            try:
                res = await eng.retrieve(q, timeout_s=2.0)
                results[traced] = ("ok", len(res.candidates))
            except Exception as exc:
                results[traced] = (type(exc).__name__, str(exc))
    finally:
        await client.aclose()
    assert results[False] == ("ok", 0), results
    assert results[True] == ("ok", 0), results
