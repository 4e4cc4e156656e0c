"""OpenTelemetry tracing for both services, off by default.

Each service holds one :class:`Tracing`. When ``tracing.enabled`` is false
it is :data:`NOOP`: :meth:`Tracing.span` hands back one shared, do-nothing
context manager, no span object is created, nothing is exported and no
context is attached, so the instrumented code costs an attribute read and a
call per stage (``bench/tracing.py`` measures it).

When enabled, every ``Tracing`` owns its own ``TracerProvider`` rather than
installing a global one, so two services (or tests) in one process keep
their exporters apart. Trace context crosses the ranking → retrieval hop as
a W3C ``traceparent`` in gRPC metadata, through the OpenTelemetry
propagation API (:func:`opentelemetry.propagate.inject` / ``extract``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind

from recsys.config import TracingSettings

log = logging.getLogger("recsys.tracing")

INSTRUMENTATION = "recsys"
# Longest an export, or the flush at shutdown, may take (collector unreachable).
FLUSH_TIMEOUT_S = 2.0


class _NullSpan:
    """The context manager a disabled tracer hands out: enters to ``INVALID_SPAN``.

    Its ``__enter__``/``__exit__`` are C callables, not Python methods, so a
    ``with`` on it runs no Python frame and creates no object that outlives it.
    """

    __slots__ = ()

    # repeat(x).__next__ returns x on every call.
    __enter__ = staticmethod(itertools.repeat(INVALID_SPAN).__next__)
    # str.format ignores surplus arguments and "" is falsy, so an exception
    # raised in the block propagates (a truthy __exit__ would swallow it).
    __exit__ = staticmethod("".format)


_NULL = _NullSpan()


class Tracing:
    """A service's tracer; the disabled one (:data:`NOOP`) does nothing.

    Args:
        provider: An SDK ``TracerProvider`` with its span processors, or None
            for the disabled tracer.
        service: ``service.name`` of the spans (``ranking``/``retrieval``).
    """

    def __new__(cls, provider: Any = None, service: str = "") -> Tracing:
        # Without a provider it is the disabled kind, whose methods skip every check.
        if provider is None and cls is Tracing:
            cls = _DisabledTracing
        return super().__new__(cls)

    def __init__(self, provider: Any = None, service: str = ""):
        self.provider = provider
        self.service = service
        self.enabled = provider is not None
        self._tracer = provider.get_tracer(INSTRUMENTATION) if provider is not None else None

    @classmethod
    def from_settings(
        cls, settings: TracingSettings, service: str, *, exporter: Any = None
    ) -> Tracing:
        """Builds the tracer config asks for.

        Args:
            settings: The ``[tracing]`` section.
            service: ``service.name`` resource attribute.
            exporter: A span exporter to use instead of the configured one
                (tests pass an ``InMemorySpanExporter``; it is flushed per span).

        Returns:
            :data:`NOOP` when tracing is disabled (and no exporter is given).
        """
        if not settings.enabled and exporter is None:
            return NOOP
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(
            resource=Resource.create({"service.name": f"recsys-{service}"}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif settings.exporter == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            # Bounded: an unreachable collector must not hold up a drain.
            kwargs: dict[str, Any] = {"insecure": settings.insecure, "timeout": FLUSH_TIMEOUT_S}
            if settings.endpoint:
                kwargs["endpoint"] = settings.endpoint
            # Batched off the request path: export never adds latency to a call.
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(**kwargs)))
        log.info(
            "tracing on",
            extra={"fields": {"service": service, "exporter": settings.exporter}},
        )
        return cls(provider, service)

    # --- spans -------------------------------------------------------------------------

    def span(
        self,
        name: str,
        *,
        parent: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
    ) -> contextlib.AbstractContextManager[Span]:
        """A span made current for the ``with`` block (a shared no-op when disabled).

        Args:
            name: Span name, ``<service>.<stage>``.
            parent: Explicit parent context (an extracted ``traceparent``);
                default: the current span.
            kind: SERVER for an RPC's root span, CLIENT for an outgoing call.
            attributes: Initial attributes (counts, names).
        """
        if self._tracer is None:
            return _NULL
        return self._tracer.start_as_current_span(
            name, context=parent, kind=kind, attributes=attributes
        )

    def record(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        *,
        parent: Context | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Records a finished stage with known times (work done on another thread).

        The micro-batcher runs the towers for many requests at once on a
        worker thread; the stage times are taken there and turned into a
        span in each request's own trace afterwards.
        """
        if self._tracer is None:
            return
        span = self._tracer.start_span(
            name, context=parent, start_time=start_ns, attributes=attributes
        )
        span.end(end_time=end_ns)

    def current_context(self) -> Context | None:
        """The active context to hand to :meth:`record` later (None when disabled)."""
        if self._tracer is None:
            return None
        from opentelemetry.context import get_current

        return get_current()

    # --- propagation -----------------------------------------------------------------

    def extract(self, metadata: Iterable[tuple[str, Any]] | None) -> Context | None:
        """The caller's trace context from gRPC invocation metadata (None when disabled).

        Without a ``traceparent`` it is an empty context, so the RPC starts
        a new trace instead of joining whatever happens to be current.
        """
        if self._tracer is None:
            return None
        carrier = {str(k).lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
        return propagate.extract(carrier, context=Context())

    def inject(
        self, metadata: tuple[tuple[str, str], ...] | None
    ) -> tuple[tuple[str, str], ...] | None:
        """``metadata`` plus the current span's ``traceparent``.

        Unchanged when disabled, and when the current span is not sampled: a
        call carrying a trace context goes to retrieval alone instead of in a
        shared ``RetrieveMany``, so propagating unsampled contexts cost every
        request its batching at any ``sample_ratio`` below 1. Retrieval then
        decides those calls' sampling by its own ratio.
        """
        if self._tracer is None:
            return metadata
        if not trace.get_current_span().get_span_context().trace_flags.sampled:
            return metadata
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if not carrier:
            return metadata
        return (*(metadata or ()), *carrier.items())

    def shutdown(self) -> None:
        """Flushes and stops the exporter, waiting at most :data:`FLUSH_TIMEOUT_S`.

        The flush is synchronous; with the collector unreachable it took
        about 8 s, which pushed a worker past its supervisor's stop budget.
        Spans not sent by then are dropped.
        """
        if self.provider is not None:
            done = threading.Thread(target=self.provider.shutdown, daemon=True)
            done.start()
            done.join(FLUSH_TIMEOUT_S)
            if done.is_alive():
                log.warning("tracing: spans not flushed within %.0f s dropped", FLUSH_TIMEOUT_S)


class _DisabledTracing(Tracing):
    """What ``Tracing()`` without a provider is: :meth:`span` is a constant.

    The instrumented code enters about fourteen spans per Recommend, so the
    disabled kind does no work there: no check, no keyword handling, no
    allocation. ``parent``/``kind``/``attributes`` are plain parameters with
    defaults because CPython fills keyword-only defaults from a dict on
    every call; any call valid on the enabled tracer is valid here. The
    other methods are off the hot path and return early in the base class.
    """

    def span(  # type: ignore[override]
        self,
        name: str,
        parent: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
    ) -> contextlib.AbstractContextManager[Span]:
        return _NULL


NOOP = Tracing()


def now_ns() -> int:
    """Wall-clock time in ns, the clock OpenTelemetry timestamps use."""
    return time.time_ns()
