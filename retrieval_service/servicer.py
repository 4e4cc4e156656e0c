"""The gRPC edge: protobuf <-> domain types, domain errors -> status codes. Nothing else."""

from __future__ import annotations

import time

import grpc
import numpy as np
from opentelemetry.trace import SpanKind

from recsys.experiments import observe_request
from recsys.packed import pack
from recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from retrieval_service.engine import (
    RequestFeatures,
    RetrievalEngine,
    RetrieveQuery,
    RetrieveResult,
    SourceStatus,
)
from retrieval_service.errors import RetrievalError
from retrieval_service.merge import Selection

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
    result: RetrieveResult,
    variant: str = "",
    *,
    scores: bool = True,
    packed: bool = False,
    catalogue: str = "",
) -> retrieval_pb2.RetrieveResponse:
    """``RetrieveResponse`` from a domain result.

    Args:
        result: The engine's answer.
        variant: Experiment variant that served it.
        scores: Include the per-source scores (the request's
            ``omit_source_scores`` turns it off).
        packed: Fill ``packed`` (parallel arrays) instead of one ``Candidate``
            per item (the request's ``packed``).
    """
    response = retrieval_pb2.RetrieveResponse(
        index_version=result.version, degraded=result.degraded, variant=variant
    )
    sel = result.selection
    ids = result.item_ids
    if packed:
        by_rows = bool(catalogue) and catalogue == result.catalogue
        pack(
            response.packed,
            item_ids=None if by_rows else [ids[r] for r in sel.rows.tolist()],
            rows=sel.rows if by_rows else None,
            catalogue=result.catalogue if by_rows else "",
            scores=sel.scores,
            source_names=sel.source_names,
            source_mask=sel.source_mask,
            seeds=sel.seeds,
            seed_ids=sel.seed_ids,
            genres=sel.genres,
            genre_names=sel.genre_names,
            source_scores=sel.source_scores if scores else None,
        )
    else:
        _add_candidates(response, sel, [ids[r] for r in sel.rows.tolist()], scores)
    for r in result.reports:
        response.source_reports.add(
            source=r.source,
            status=_STATUS[r.status],
            count=r.count,
            latency_ms=r.latency_ms,
            message=r.message,
        )
    return response


def _add_candidates(
    response: retrieval_pb2.RetrieveResponse, sel: Selection, item_ids: list[str], scores: bool
) -> None:
    """The per-candidate form, for clients that do not ask for ``packed``."""
    names = sel.source_names
    by_mask: dict[int, list[str]] = {}  # few distinct masks per answer: decode each once
    seeds, genres = sel.seeds.tolist(), sel.genres.tolist()
    per_source = sel.source_scores.T.tolist() if scores else None
    # add() + map update is measurably cheaper than constructing each message
    # with a map keyword (500 candidates per call).
    add = response.candidates.add
    for i, (mask, best) in enumerate(
        zip(sel.source_mask.tolist(), np.nan_to_num(sel.scores, nan=0.0).tolist(), strict=True)
    ):
        srcs = by_mask.get(mask)
        if srcs is None:
            srcs = by_mask[mask] = [n for b, n in enumerate(names) if mask >> b & 1]
        c = add(
            item_id=item_ids[i],
            sources=srcs,
            score=best,
            seed_item_id=sel.seed_ids[seeds[i]] if seeds[i] >= 0 else "",
            genre=sel.genre_names[genres[i]] if genres[i] >= 0 else "",
        )
        if per_source is not None:
            row = per_source[i]
            got = {n: row[b] for b, n in enumerate(names) if mask >> b & 1 and row[b] == row[b]}
            if got:
                c.source_scores.update(got)


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
            response = result_to_pb(
                result,
                result.variant,
                scores=not request.omit_source_scores,
                packed=request.packed,
                catalogue=request.catalogue,
            )
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
