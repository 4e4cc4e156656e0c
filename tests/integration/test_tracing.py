"""One Recommend traced across both services (each with its own in-memory exporter)."""

from __future__ import annotations

from collections import Counter

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from ranking_service.testing import ranking_settings
from recsys.artifacts import ModelVersion
from recsys.config import TracingSettings
from recsys.tracing import NOOP, Tracing, _DisabledTracing
from recsys.v1 import common_pb2, ranking_pb2

ON = TracingSettings(enabled=True)


@pytest.fixture(scope="module")
async def traced(trained_version, redis_server, serve_both):
    # Each service gets its own provider and exporter, as two processes would:
    # spans can only share a trace id through the traceparent on the wire.
    exporters = {"ranking": InMemorySpanExporter(), "retrieval": InMemorySpanExporter()}
    tracers = {
        name: Tracing.from_settings(ON, name, exporter=exporter)
        for name, exporter in exporters.items()
    }
    async with serve_both(trained_version.parent, redis_server.url, tracing=tracers) as s:
        yield s.ranking, exporters


def by_name(spans) -> dict[str, object]:
    out = {}
    for s in spans:
        assert s.name not in out, f"span {s.name} twice"
        out[s.name] = s
    return out


async def test_one_recommend_is_one_trace_across_both_services(traced, published_version):
    stub, exporters = traced
    for e in exporters.values():
        e.clear()
    mv = ModelVersion.open(published_version)
    uid = mv.users["user_id"][0]
    resp = await stub.Recommend(
        ranking_pb2.RecommendRequest(user=common_pb2.UserContext(user_id=uid), k=7), timeout=10
    )
    assert len(resp.items) == 7 and not resp.retrieval_fallback
    ranking = by_name(exporters["ranking"].get_finished_spans())
    retrieval = by_name(exporters["retrieval"].get_finished_spans())
    assert set(ranking) == {
        "ranking.Recommend",
        "ranking.retrieve",
        "ranking.hydrate",
        "ranking.user_tower",
        "ranking.score",
        "ranking.top_k",
    }
    sources = {f"retrieval.source.{r.source}" for r in resp.source_reports}
    assert len(sources) == 4
    assert set(retrieval) == {
        "retrieval.Retrieve",
        "retrieval.hydrate",
        "retrieval.merge",  # the filter runs inside the merge's compiled pass
        *sources,
    }
    root = ranking["ranking.Recommend"]
    trace_ids = {s.context.trace_id for s in (*ranking.values(), *retrieval.values())}
    assert trace_ids == {root.context.trace_id}
    assert root.parent is None
    # Parentage: every ranking stage under the root; retrieval's server span
    # under ranking's client span (through the traceparent); its stages under it.
    for name, span in ranking.items():
        if name != "ranking.Recommend":
            assert span.parent.span_id == root.context.span_id, name
    server = retrieval["retrieval.Retrieve"]
    assert server.parent.span_id == ranking["ranking.retrieve"].context.span_id
    assert server.parent.is_remote
    for name, span in retrieval.items():
        if name != "retrieval.Retrieve":
            assert span.parent.span_id == server.context.span_id, name
    # Counts on the spans match the response.
    for r in resp.source_reports:
        attrs = retrieval[f"retrieval.source.{r.source}"].attributes
        assert attrs["recsys.count"] == r.count
    assert ranking["ranking.top_k"].attributes["recsys.returned"] == 7
    assert root.attributes["recsys.variant"] == resp.variant == "default"
    n = ranking["ranking.retrieve"].attributes["recsys.candidates"]
    assert server.attributes["recsys.candidates"] == n > 0
    merged = retrieval["retrieval.merge"].attributes
    assert merged["recsys.returned"] == n
    assert n <= merged["recsys.candidates_kept"] <= merged["recsys.candidates_in"]
    assert merged["recsys.candidates_in"] == sum(r.count for r in resp.source_reports)
    # The batched stages happened inside the request, in order.
    tower, score, top = (ranking[f"ranking.{s}"] for s in ("user_tower", "score", "top_k"))
    assert root.start_time <= tower.start_time <= tower.end_time <= score.end_time
    assert score.end_time <= top.start_time <= top.end_time <= root.end_time


async def test_a_callers_traceparent_is_joined(traced, published_version):
    stub, exporters = traced
    for e in exporters.values():
        e.clear()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    await stub.Recommend(
        ranking_pb2.RecommendRequest(user=common_pb2.UserContext(user_id="nobody"), k=3),
        timeout=10,
        metadata=(("traceparent", f"00-{trace_id}-{parent}-01"),),
    )
    spans = [
        *exporters["ranking"].get_finished_spans(),
        *exporters["retrieval"].get_finished_spans(),
    ]
    assert spans and {format(s.context.trace_id, "032x") for s in spans} == {trace_id}
    root = by_name(exporters["ranking"].get_finished_spans())["ranking.Recommend"]
    assert format(root.parent.span_id, "016x") == parent


def test_tracing_is_off_by_default(trained_version, redis_server):
    settings = ranking_settings(trained_version.parent, redis_server.url)
    assert settings.tracing.enabled is False
    assert Tracing.from_settings(settings.tracing, "ranking") is NOOP
    with NOOP.span("x") as span:
        assert not span.is_recording()
    assert NOOP.inject(None) is None and NOOP.extract([("traceparent", "x")]) is None


class _Counting(_DisabledTracing):
    """A disabled tracer that counts the calls the instrumented code makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def span(self, name, parent=None, kind=SpanKind.INTERNAL, attributes=None):
        self.calls["span"] += 1
        return super().span(name, parent, kind, attributes)

    def inject(self, metadata):
        self.calls["inject"] += 1
        return super().inject(metadata)

    def extract(self, metadata):
        self.calls["extract"] += 1
        return super().extract(metadata)

    def record(self, *args, **kwargs):
        self.calls["record"] += 1
        return super().record(*args, **kwargs)


async def test_the_tracing_bench_makes_the_calls_a_recommend_makes(
    trained_version, redis_server, serve_both, published_version
):
    """bench/tracing.py's target path mirrors ranking's disabled tracing, call for call."""
    from bench.tracing import _ranking_path

    counting = _Counting()
    tracers = {"ranking": counting, "retrieval": NOOP}
    async with serve_both(trained_version.parent, redis_server.url, tracing=tracers) as s:
        user = common_pb2.UserContext(user_id="1")
        await s.ranking.Recommend(ranking_pb2.RecommendRequest(user=user, k=5), timeout=10)
    mirror = _Counting()
    _ranking_path(mirror, 1)
    assert counting.calls and counting.calls == mirror.calls


def test_shutdown_with_the_collector_unreachable_is_bounded():
    """The flush is synchronous; it must not hold a draining worker past its stop budget."""
    import time

    from recsys.embedded_redis import free_port
    from recsys.tracing import FLUSH_TIMEOUT_S

    settings = TracingSettings(enabled=True, endpoint=f"http://127.0.0.1:{free_port()}")
    tracer = Tracing.from_settings(settings, "ranking")
    for i in range(20):
        with tracer.span(f"ranking.stage{i}"):
            pass
    start = time.monotonic()
    tracer.shutdown()
    assert time.monotonic() - start < FLUSH_TIMEOUT_S + 1.5
