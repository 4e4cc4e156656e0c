"""Tracing cost: the disabled path against the work of one request, and the enabled SDK.

Measured in one process:

* ``path`` (the target): the tracing calls one ``Recommend`` makes in the
  ranking service with tracing off, in the order the code makes them (root
  and retrieve spans, ``inject``, the ``enabled`` checks, the stage-clock
  dict): :func:`_ranking_path`. Until session 16 the target used ``off``
  times 6 stages, but since session 13 four of those stages are recorded
  from the batch's clocks only when tracing is on, so that model counted
  four spans the disabled path never enters; it is still reported;
* ``off``: one stage wrapped by the disabled tracer (``NOOP.span`` enter/exit
  plus the ``enabled`` check that guards attribute building), times the
  number of stages a Recommend crosses in the ranking service (6) and in
  both services (14);
* ``baseline``: ``score_batch`` for one request of 500 candidates on a
  synthetic version, the ranking work a request does anyway (tower + dot + top-k);
* ``on``: the same stages as recording SDK spans into an in-memory exporter;
* ``plain``: the same stages through :class:`_PlainNullTracer`, a disabled
  tracer written the plain-Python way (what ``recsys.tracing`` had before
  its null span moved to C-level callables), for a before/after in one run.

The target compares like with like: the ranking service's 6 disabled stages
against the ranking work of one request. Both services' 14 stages against
that same ranking work is reported too; it used to be the target, until
the frozen tower ran in the calling thread (session 13) and ``score_batch``
for one request fell from ~207 to ~71 µs, so the ratio grew from 0.7% to
1.9% with the instrumentation's cost unchanged (~95 ns a stage). Retrieval's
8 stages are ~0.8 µs against its ~0.9 ms server-side ``Retrieve``
(``bench/retrieval.py``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from opentelemetry.trace import INVALID_SPAN, SpanKind

from bench import common

# Stages one Recommend crosses: ranking (root, retrieve, hydrate, tower, score,
# top-k) and retrieval (root, hydrate, 4 sources, filter, merge).
STAGES_RANKING = 6
STAGES_PER_RECOMMEND = 14


class _PlainNullSpan:
    """A null context manager with Python ``__enter__``/``__exit__`` (the reference)."""

    __slots__ = ()

    def __enter__(self) -> Any:
        return INVALID_SPAN

    def __exit__(self, *exc: object) -> None:
        return None


class _PlainNullTracer:
    """A disabled tracer as first written: a checked, keyword-only ``span()``."""

    def __init__(self) -> None:
        self._tracer = None
        self.enabled = False
        self._null = _PlainNullSpan()

    def span(self, name: str, *, parent: Any = None, kind: Any = None, attributes: Any = None):
        if self._tracer is None:
            return self._null
        raise AssertionError("reference tracer is never enabled")


def _per_call_ns(fn, n: int) -> float:
    best = float("inf")
    for _ in range(5):  # best of 5 rounds: the least disturbed by other load
        start = time.perf_counter_ns()
        fn(n)
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def _stages(tr, n: int) -> None:
    for _ in range(n):
        with tr.span("stage") as span:
            if tr.enabled:
                span.set_attribute("recsys.count", 1)


def _ranking_path(tr, n: int) -> None:
    """The tracing calls one Recommend makes in the ranking service, as the code makes them.

    ``RankingServicer._root_span`` and the ``Recommend`` handler (root span,
    ``enabled`` checks), ``Ranker.recommend`` (the retrieve span and its
    ``inject``) and ``Ranker._score`` (the stage-clock dict, and the four
    batch stages recorded from it only when tracing is on). Kept in step
    with those by ``tests/integration/test_tracing.py``, which counts the
    calls a real Recommend makes.
    """
    for _ in range(n):
        parent = tr.extract(()) if tr.enabled else None
        with tr.span("ranking.Recommend", parent=parent, kind=SpanKind.SERVER) as root:
            with tr.span("ranking.retrieve", kind=SpanKind.CLIENT) as span:
                _ = tr.inject(None) or ()
                if tr.enabled:
                    span.set_attribute("recsys.candidates", 500)
            trace = {} if tr.enabled else None
            if trace:
                tr.record("ranking.hydrate", 0, 1)
            if tr.enabled:
                root.set_attributes({"recsys.returned": 20})


def _empty(n: int) -> None:
    for _ in range(n):
        pass


def run(quick: bool = False) -> dict[str, Any]:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ranking_service.model import LoadedModel, ScoreRequest, score_batch
    from ranking_service.testing import write_synthetic_version
    from recsys.config import TracingSettings
    from recsys.tracing import NOOP, Tracing

    print(common.header("Tracing overhead", "tracing", quick))
    n = 20_000 if quick else 200_000
    # The bare loop is subtracted: only what the instrumentation adds is counted.
    loop_ns = _per_call_ns(_empty, n)
    off_ns = max(_per_call_ns(lambda k: _stages(NOOP, k), n) - loop_ns, 0.0)
    # What the ranking service's disabled tracer really costs per Recommend:
    # two spans and a handful of checks (its four batch stages are recorded
    # from clocks only when tracing is on).
    path_ns = max(_per_call_ns(lambda k: _ranking_path(NOOP, k), n) - loop_ns, 0.0)
    plain = _PlainNullTracer()
    plain_ns = max(_per_call_ns(lambda k: _stages(plain, k), n) - loop_ns, 0.0)
    exporter = InMemorySpanExporter()
    on = Tracing.from_settings(TracingSettings(enabled=True), "bench", exporter=exporter)

    def traced(k: int) -> None:
        _stages(on, k)
        exporter.clear()

    on_ns = _per_call_ns(traced, max(n // 20, 1000)) - loop_ns

    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_version(Path(tmp), n_items=5000, dim=32)
        model = LoadedModel.load(path, "cpu")
        rng = np.random.default_rng(0)
        rows = rng.choice(5000, 500, replace=False).astype(np.int64)
        feats = model.default_features

        def plain(k: int) -> None:
            for _ in range(k):
                score_batch([ScoreRequest(model, feats, rows, 20)])

        def clocked(k: int) -> None:
            for _ in range(k):
                score_batch([ScoreRequest(model, feats, rows, 20, {})])

        reps = 50 if quick else 300
        base_ns = _per_call_ns(plain, reps)
        clocked_ns = _per_call_ns(clocked, reps)

    off_request_ns = off_ns * STAGES_PER_RECOMMEND
    off_ranking_ns = off_ns * STAGES_RANKING  # the model used until session 16
    out = {
        "machine": common.machine_info(),
        "command": common.reproduce_command("tracing", quick),
        "off_ns_per_stage": round(off_ns, 1),
        "on_ns_per_stage": round(on_ns, 1),
        "plain_python_null_ns_per_stage": round(plain_ns, 1),
        "off_us_per_recommend": round(off_request_ns / 1e3, 3),
        "off_us_per_recommend_in_ranking": round(off_ranking_ns / 1e3, 3),
        "off_us_ranking_path_per_recommend": round(path_ns / 1e3, 3),
        "score_batch_us_per_request": round(base_ns / 1e3, 1),
        "score_batch_traced_us_per_request": round(clocked_ns / 1e3, 1),
        "ratios": {
            "tracing_off_share_of_ranking_work": common.ratio(
                path_ns,
                base_ns,
                unit="ns",
                what="ranking's disabled tracing calls per Recommend / score_batch(500)",
            ),
            "tracing_off_6_stage_model_vs_ranking_work": common.ratio(
                off_ranking_ns, base_ns, unit="ns", what="6 disabled stages / score_batch(500)"
            ),
            "tracing_off_both_services_vs_ranking_work": common.ratio(
                off_request_ns, base_ns, unit="ns", what="14 disabled stages / score_batch(500)"
            ),
            "tracing_on_vs_off_per_stage": common.ratio(on_ns, off_ns, unit="ns"),
            "tracing_off_vs_plain_python_null_per_stage": common.ratio(
                off_ns, plain_ns, unit="ns", what="recsys NOOP / plain-Python null tracer"
            ),
        },
        "targets": [
            common.target(
                "tracing off costs < 1% of a request's ranking work",
                path_ns / base_ns,
                "<",
                0.01,
            ),
        ],
    }
    print(
        f"ranking's disabled tracing per Recommend: {path_ns:.0f} ns = "
        f"{path_ns / base_ns:.2%} of score_batch for 500 candidates"
    )
    print(
        f"disabled stage: {off_ns:.0f} ns; {STAGES_RANKING} ranking stages per Recommend: "
        f"{off_ranking_ns / 1e3:.2f} us = {off_ranking_ns / base_ns:.2%} of score_batch "
        f"for 500 candidates ({base_ns / 1e3:.0f} us; with stage clocks "
        f"{clocked_ns / 1e3:.0f} us); "
        f"all {STAGES_PER_RECOMMEND} stages of both services: {off_request_ns / 1e3:.2f} us "
        f"= {off_request_ns / base_ns:.2%} of it"
    )
    print(
        f"plain-Python null tracer (reference): {plain_ns:.0f} ns per stage; "
        f"NOOP is {off_ns / plain_ns:.2f}x of it"
    )
    print(f"recording SDK span: {on_ns:.0f} ns per stage ({on_ns / off_ns:.0f}x the disabled path)")
    return out


if __name__ == "__main__":
    run()
