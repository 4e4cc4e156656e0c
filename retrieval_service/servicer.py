"""The gRPC edge: protobuf <-> domain types, domain errors -> status codes. Nothing else."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import numpy as np
from opentelemetry.trace import SpanKind

from recsys.checks import MAX_GENRE_RATINGS
from recsys.config import MAX_RETRIEVE_MANY
from recsys.experiments import observe_request
from recsys.packed import pack
from recsys.serving import RPC_TOTAL, counts_as_calls
from recsys.user_store import state_to_pb
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

log = logging.getLogger("recsys.retrieval")

_STATUS = {
    SourceStatus.OK: common_pb2.SOURCE_STATUS_OK,
    SourceStatus.TIMEOUT: common_pb2.SOURCE_STATUS_TIMEOUT,
    SourceStatus.ERROR: common_pb2.SOURCE_STATUS_ERROR,
}


def query_from_pb(request: retrieval_pb2.RetrieveRequest, *, max_ids: int) -> RetrieveQuery:
    """Domain query from a ``RetrieveRequest`` (the proto's history is oldest first).

    Args:
        request: The request.
        max_ids: The engine's ``max_request_ids``: a longer id list is passed
            uncopied (and unreversed) for the engine's count check to refuse.
    """
    user = request.user
    f = user.features
    features = RequestFeatures(
        age=float(f.age) if f.HasField("age") and f.age != 0 else None,  # checked by the engine
        gender=f.gender or None,
        occupation=f.occupation or None,
        country=f.country or None,
        # Too many entries: passed uncopied for the engine's check to refuse
        # (copying a 900k-entry map held up the event loop for over a second).
        genre_ratings=(
            dict(f.genre_ratings) if len(f.genre_ratings) <= MAX_GENRE_RATINGS else f.genre_ratings
        ),
    )
    # Copying a 4-million-entry list cost ~300 MB and most of a second on the
    # event loop before the engine refused it; len() of the protobuf list is free.
    sources, recent, exclude = request.sources, user.recent_item_ids, user.exclude_item_ids
    return RetrieveQuery(
        user_id=user.user_id,
        budget=request.budget,
        sources=tuple(sources) if len(sources) <= max_ids else sources,
        recent=tuple(reversed(recent)) if len(recent) <= max_ids else recent,
        exclude=tuple(exclude) if len(exclude) <= max_ids else exclude,
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
    user_state: bool = False,
    out: retrieval_pb2.RetrieveResponse | None = None,
) -> retrieval_pb2.RetrieveResponse:
    """``RetrieveResponse`` from a domain result.

    Args:
        result: The engine's answer.
        variant: Experiment variant that served it.
        scores: Include the per-source scores (the request's
            ``omit_source_scores`` turns it off).
        packed: Fill ``packed`` (parallel arrays) instead of one ``Candidate``
            per item (the request's ``packed``).
        catalogue: The caller's catalogue fingerprint; a packed answer names
            candidates by row when it is the result's catalogue.
        user_state: Include the user's state as read from Redis (the
            request's ``with_user_state``); left unset when the read failed.
        out: An empty message to fill (e.g. inside a RetrieveMany answer)
            instead of a new one.
    """
    response = out if out is not None else retrieval_pb2.RetrieveResponse()
    response.index_version = result.version
    response.degraded = result.degraded
    response.variant = variant
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
    if user_state and result.user is not None and result.spec is not None:
        state_to_pb(result.spec, result.user, response.user_state)
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


INTERNAL_MESSAGE = "internal error while retrieving (logged by the retrieval service)"


def _answer(
    result: RetrieveResult,
    request: retrieval_pb2.RetrieveRequest,
    out: retrieval_pb2.RetrieveResponse | None,
) -> retrieval_pb2.RetrieveResponse:
    """The response to ``request`` in the form it asked for (packed, scores, user state)."""
    return result_to_pb(
        result,
        result.variant,
        scores=not request.omit_source_scores,
        packed=request.packed,
        catalogue=request.catalogue,
        user_state=request.with_user_state,
        out=out,
    )


# A RetrieveMany member's outcome, by code: the call itself is OK whatever its
# members' codes, so without this the alerts on recsys_rpc_total never saw a
# failing member (RetrieveMany is ranking's usual path under load).
MEMBER = "RetrieveMany.member"
_MEMBER_OK = RPC_TOTAL.labels("retrieval", MEMBER, "OK")


def _failed(outcome: retrieval_pb2.RetrieveOutcome, exc: Exception) -> None:
    """Turns one ``RetrieveMany`` member into an error; the rest of the batch is still answered."""
    outcome.Clear()
    if isinstance(exc, RetrievalError):
        outcome.code = getattr(grpc.StatusCode, exc.code).value[0]
        outcome.message = str(exc)
        RPC_TOTAL.labels("retrieval", MEMBER, exc.code).inc()
        return
    # A bug, not the caller's fault: logged here, and no internals in the status.
    log.error("retrieve failed", exc_info=exc)
    outcome.code = grpc.StatusCode.INTERNAL.value[0]
    outcome.message = INTERNAL_MESSAGE
    RPC_TOTAL.labels("retrieval", MEMBER, "INTERNAL").inc()


# gRPC's retry pushback (gRFC A6): a value that is not a non-negative integer
# tells a client's retry policy not to retry this status.
_NO_RETRY = (("grpc-retry-pushback-ms", "-1"),)


async def _abort(context: grpc.aio.ServicerContext, exc: RetrievalError) -> None:
    trailing = _NO_RETRY if getattr(exc, "retry", True) is False else ()
    await context.abort(getattr(grpc.StatusCode, exc.code), str(exc), trailing)


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    """``recsys.v1.RetrievalService`` over a :class:`RetrievalEngine`."""

    def __init__(self, engine: RetrievalEngine):
        self.engine = engine

    async def _retrieve(
        self,
        request: retrieval_pb2.RetrieveRequest,
        timeout_s: float | None,
        parent=None,
        out: retrieval_pb2.RetrieveResponse | None = None,
    ) -> retrieval_pb2.RetrieveResponse:
        """Answers one Retrieve request (alone or inside a RetrieveMany).

        Raises:
            RetrievalError: The request is invalid or cannot be answered.
        """
        start = time.perf_counter()
        tr = self.engine.tracing
        with tr.span("retrieval.Retrieve", parent=parent, kind=SpanKind.SERVER) as span:
            query = query_from_pb(request, max_ids=self.engine.settings.max_request_ids)
            result = await self.engine.retrieve(query, timeout_s=timeout_s)
            if tr.enabled:
                span.set_attributes(
                    {
                        "recsys.variant": result.variant,
                        "recsys.index_version": result.version,
                        "recsys.candidates": len(result.candidates),
                        "recsys.degraded": result.degraded,
                    }
                )
            response = _answer(result, request, out)
        observe_request("retrieval", "Retrieve", result.variant, time.perf_counter() - start)
        return response

    async def Retrieve(self, request, context):
        tr = self.engine.tracing
        # Joins the caller's trace (ranking's traceparent) or starts a new one.
        parent = tr.extract(context.invocation_metadata()) if tr.enabled else None
        try:
            return await self._retrieve(request, context.time_remaining(), parent)
        except RetrievalError as exc:
            await _abort(context, exc)
        except Exception:
            # A bug, not the caller's fault: logged here, and no internals in the status.
            log.exception("retrieve failed")
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

    # Each request in it counts against max_concurrent_rpcs as a Retrieve
    # would: one 256-request call held the event loop for ~700 ms in one slot.
    @counts_as_calls(lambda request: len(request.requests))
    async def RetrieveMany(self, request, context):
        n = len(request.requests)
        if n > MAX_RETRIEVE_MANY:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"requests: {n} requests, at most {MAX_RETRIEVE_MANY} per call",
            )
        timeout = context.time_remaining()
        answer = retrieval_pb2.RetrieveManyResponse()
        outcomes = [answer.outcomes.add() for _ in range(n)]
        if not self.engine.tracing.enabled:
            await self._retrieve_many(request, outcomes, timeout)
            return answer
        # Traced: each member in a task of its own, under a span of its own.

        async def one(req: retrieval_pb2.RetrieveRequest, outcome) -> None:
            try:
                await self._retrieve(req, timeout, out=outcome.response)
            except Exception as exc:
                _failed(outcome, exc)
            else:
                _MEMBER_OK.inc()

        # Concurrently, so the engine batches their user reads into one round trip.
        await asyncio.gather(*(one(r, o) for r, o in zip(request.requests, outcomes, strict=True)))
        return answer

    async def _retrieve_many(self, request, outcomes, timeout: float | None) -> None:
        """Untraced ``RetrieveMany``: the engine runs the members as one batch."""
        start = time.perf_counter()
        requests = request.requests
        max_ids = self.engine.settings.max_request_ids
        results = await self.engine.retrieve_many(
            [query_from_pb(r, max_ids=max_ids) for r in requests], timeout_s=timeout
        )
        # Every member is answered when the batch is: that is its latency.
        elapsed = time.perf_counter() - start
        ok = 0
        for req, outcome, result in zip(requests, outcomes, results, strict=True):
            if isinstance(result, Exception):
                _failed(outcome, result)
                continue
            try:
                _answer(result, req, outcome.response)
            except Exception as exc:
                _failed(outcome, exc)
                continue
            ok += 1
            observe_request("retrieval", "Retrieve", result.variant, elapsed)
        _MEMBER_OK.inc(ok)

    async def SimilarItems(self, request, context):
        try:
            items, version, variant = self.engine.similar(
                request.item_id, request.k, user_id=request.user_id, variant=request.variant
            )
        except RetrievalError as exc:
            await _abort(context, exc)
        return retrieval_pb2.SimilarItemsResponse(
            items=[retrieval_pb2.SimilarItem(item_id=n.item_id, score=n.score) for n in items],
            index_version=version,
            variant=variant,
        )

    async def RecordInteraction(self, request, context):
        rating = request.rating if request.HasField("rating") else None
        try:
            done = await self.engine.record(
                request.user_id,
                request.item_id,
                rating,
                request.timestamp,
                request.event_id,
                request.dedupe_window_s,
            )
        except RetrievalError as exc:
            await _abort(context, exc)
        return retrieval_pb2.RecordInteractionResponse(
            history_length=done.history_length,
            rating_count=done.rating_count,
            duplicate=done.duplicate,
        )
