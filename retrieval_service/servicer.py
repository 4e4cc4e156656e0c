"""The gRPC edge: protobuf <-> domain types, domain errors -> status codes. Nothing else."""

from __future__ import annotations

import time

import grpc
from opentelemetry.trace import SpanKind

from recsys.experiments import observe_request
from recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from retrieval_service.engine import (
    RequestFeatures,
    RetrievalEngine,
    RetrieveQuery,
    RetrieveResult,
    SourceStatus,
)
from retrieval_service.errors import RetrievalError

_STATUS = {
    SourceStatus.OK: common_pb2.SOURCE_STATUS_OK,
    SourceStatus.TIMEOUT: common_pb2.SOURCE_STATUS_TIMEOUT,
    SourceStatus.ERROR: common_pb2.SOURCE_STATUS_ERROR,
}


def query_from_pb(request: retrieval_pb2.RetrieveRequest) -> RetrieveQuery:
    """Domain query from a ``RetrieveRequest`` (the proto's history is oldest first)."""
    user = request.user
    f = user.features
    features = RequestFeatures(
        age=float(f.age) if f.HasField("age") and f.age > 0 else None,
        gender=f.gender or None,
        occupation=f.occupation or None,
        country=f.country or None,
        genre_ratings=dict(f.genre_ratings),
    )
    return RetrieveQuery(
        user_id=user.user_id,
        budget=request.budget,
        sources=tuple(request.sources),
        recent=tuple(reversed(user.recent_item_ids)),
        exclude=tuple(user.exclude_item_ids),
        features=features,
        variant=user.variant,
    )


def result_to_pb(
    result: RetrieveResult, variant: str = "", *, scores: bool = True
) -> retrieval_pb2.RetrieveResponse:
    """``RetrieveResponse`` from a domain result.

    Args:
        result: The engine's answer.
        variant: Experiment variant that served it.
        scores: Fill each candidate's ``source_scores`` map (the request's
            ``omit_source_scores`` turns it off).
    """
    response = retrieval_pb2.RetrieveResponse(
        index_version=result.version, degraded=result.degraded, variant=variant
    )
    # add() + map update is measurably cheaper than constructing each message
    # with a map keyword (500 candidates per call).
    add = response.candidates.add
    for m in result.candidates:
        c = add(
            item_id=m.item_id,
            sources=m.sources,
            score=m.score or 0.0,
            seed_item_id=m.seed_item_id or "",
            genre=m.genre or "",
        )
        if scores and m.source_scores:
            c.source_scores.update(m.source_scores)
    for r in result.reports:
        response.source_reports.add(
            source=r.source,
            status=_STATUS[r.status],
            count=r.count,
            latency_ms=r.latency_ms,
            message=r.message,
        )
    return response


async def _abort(context: grpc.aio.ServicerContext, exc: RetrievalError) -> None:
    await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    """``recsys.v1.RetrievalService`` over a :class:`RetrievalEngine`."""

    def __init__(self, engine: RetrievalEngine):
        self.engine = engine

    async def Retrieve(self, request, context):
        start = time.perf_counter()
        tr = self.engine.tracing
        # Joins the caller's trace (ranking's traceparent) or starts a new one.
        parent = tr.extract(context.invocation_metadata()) if tr.enabled else None
        with tr.span("retrieval.Retrieve", parent=parent, kind=SpanKind.SERVER) as span:
            try:
                result = await self.engine.retrieve(
                    query_from_pb(request), timeout_s=context.time_remaining()
                )
            except RetrievalError as exc:
                await _abort(context, exc)
            if tr.enabled:
                span.set_attributes(
                    {
                        "recsys.variant": result.variant,
                        "recsys.index_version": result.version,
                        "recsys.candidates": len(result.candidates),
                        "recsys.degraded": result.degraded,
                    }
                )
            response = result_to_pb(result, result.variant, scores=not request.omit_source_scores)
        observe_request("retrieval", "Retrieve", result.variant, time.perf_counter() - start)
        return response

    async def SimilarItems(self, request, context):
        try:
            items, version = self.engine.similar(request.item_id, request.k)
        except RetrievalError as exc:
            await _abort(context, exc)
        return retrieval_pb2.SimilarItemsResponse(
            items=[retrieval_pb2.SimilarItem(item_id=n.item_id, score=n.score) for n in items],
            index_version=version,
        )

    async def RecordInteraction(self, request, context):
        rating = request.rating if request.HasField("rating") else None
        try:
            length, rated = await self.engine.record(
                request.user_id, request.item_id, rating, request.timestamp
            )
        except RetrievalError as exc:
            await _abort(context, exc)
        return retrieval_pb2.RecordInteractionResponse(history_length=length, rating_count=rated)
