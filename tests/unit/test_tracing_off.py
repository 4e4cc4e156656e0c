"""The disabled tracer: one shared null context manager, no Python work, no spans."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import INVALID_SPAN, SpanKind

from recsys.config import TracingSettings
from recsys.tracing import NOOP, Tracing


def python_calls(fn: Callable[[], object]) -> list[str]:
    """``file:function`` of every Python frame entered while ``fn`` runs (none of this file's)."""
    seen: list[str] = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename != __file__:
            seen.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def test_every_disabled_tracer_hands_out_one_shared_null_context_manager():
    kinds = (SpanKind.SERVER, SpanKind.CLIENT, SpanKind.INTERNAL)
    managers = [NOOP.span(f"stage{i}") for i in range(50)]
    managers += [
        NOOP.span("root", parent=Context(), kind=k, attributes={"recsys.k": 1}) for k in kinds
    ]
    managers.append(Tracing().span("other"))  # a fresh disabled tracer, not only NOOP
    assert len({id(m) for m in managers}) == 1


def test_disabled_span_enters_to_the_invalid_span_and_attaches_no_context():
    before = trace.get_current_span()
    with NOOP.span("outer") as outer, NOOP.span("inner", kind=SpanKind.CLIENT) as inner:
        assert outer is INVALID_SPAN and inner is INVALID_SPAN
        assert not inner.is_recording()
        # Nothing was made current: the active span is whatever it was before.
        assert trace.get_current_span() is before
    inner.set_attribute("recsys.count", 1)  # a no-op, as on any non-recording span


def test_disabled_span_lets_exceptions_through():
    with pytest.raises(ValueError, match="boom"), NOOP.span("stage"):
        raise ValueError("boom")
    # A truthy __exit__ would swallow the exception: check the value directly too.
    assert not NOOP.span("stage").__exit__(ValueError, ValueError("x"), None)


def test_a_disabled_stage_runs_no_python_beyond_span_itself():
    def stage():
        with NOOP.span("stage", kind=SpanKind.INTERNAL) as span:
            if NOOP.enabled:
                span.set_attribute("recsys.count", 1)

    # Only the one call into span(): no Python __enter__/__exit__, no span
    # object built (every OpenTelemetry span type runs a Python __init__).
    assert python_calls(stage) == ["tracing.py:span"]


def test_disabled_record_and_propagation_do_nothing():
    calls = python_calls(lambda: NOOP.record("ranking.score", 1, 2, attributes={"a": 1}))
    assert calls == ["tracing.py:record"]
    assert NOOP.record("ranking.score", 1, 2, parent=Context()) is None
    assert NOOP.current_context() is None
    assert NOOP.extract([("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")]) is None
    meta = (("x-request-id", "r1"),)
    assert NOOP.inject(meta) is meta and NOOP.inject(None) is None
    assert NOOP.enabled is False and NOOP.provider is None
    assert Tracing.from_settings(TracingSettings(enabled=False), "ranking") is NOOP


def test_a_tracer_with_a_provider_still_records():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tr = Tracing(provider, "ranking")
    assert tr.enabled and isinstance(tr, Tracing)
    with tr.span("ranking.Recommend", kind=SpanKind.SERVER, attributes={"k": 3}) as root:
        assert root.is_recording()
        parent = tr.current_context()
        assert tr.inject(None)[0][0] == "traceparent"
    tr.record("ranking.score", 1_000, 2_000, parent=parent, attributes={"n": 5})
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"ranking.Recommend", "ranking.score"}
    score = spans["ranking.score"]
    assert (score.start_time, score.end_time) == (1_000, 2_000)
    assert score.parent.span_id == spans["ranking.Recommend"].context.span_id
    assert spans["ranking.Recommend"].kind is SpanKind.SERVER
    provider.shutdown()


def test_an_unsampled_span_propagates_nothing():
    """A traced call skips RetrieveMany: an unsampled context must not cost its batching."""

    exporter = InMemorySpanExporter()
    never = Tracing.from_settings(
        TracingSettings(enabled=True, sample_ratio=0.0), "ranking", exporter=exporter
    )
    always = Tracing.from_settings(
        TracingSettings(enabled=True, sample_ratio=1.0), "ranking", exporter=exporter
    )
    with never.span("ranking.Recommend", kind=SpanKind.SERVER):
        assert never.inject(None) is None
        assert never.inject((("authorization", "x"),)) == (("authorization", "x"),)
    with always.span("ranking.Recommend", kind=SpanKind.SERVER):
        assert [k for k, _ in always.inject(None)] == ["traceparent"]
