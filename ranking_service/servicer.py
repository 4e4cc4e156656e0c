"""gRPC edge of the ranking service: pb2 ↔ domain, errors → status codes."""

from __future__ import annotations

import logging
import struct
import time
import weakref
from typing import Any

import grpc
from opentelemetry.trace import SpanKind

from ranking_service.core import NoModel, RankedItem, Ranker, RankOutcome
from ranking_service.model import LoadedModel
from ranking_service.retrieval_client import RetrievalRejected
from ranking_service.validation import (
    InvalidArgument,
    RetrievalLimits,
    parse_rank,
    parse_recommend,
)
from recsys.batching import BatcherClosed
from recsys.capped import CappedDict
from recsys.config import RankingSettings
from recsys.experiments import UnknownVariant, observe_request
from recsys.v1 import ranking_pb2, ranking_pb2_grpc

log = logging.getLogger("ranking_service.servicer")


# Most catalogue items whose response template is kept per model version.
TEMPLATE_CACHE_ITEMS = 100_000
# Most distinct provenances whose encoded fields are kept per model version.
PROVENANCE_CACHE_ENTRIES = 50_000
_FLOAT32 = struct.Struct("<f")
# ScoredItem.score's key on the wire, taken from protobuf's own encoding.
_SCORE_KEY = ranking_pb2.ScoredItem(score=1.0).SerializeToString()[: -_FLOAT32.size]


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Implements ``recsys.v1.RankingService`` on top of :class:`Ranker`."""

    def __init__(
        self, ranker: Ranker, settings: RankingSettings, retrieval: RetrievalLimits | None = None
    ):
        self.ranker = ranker
        self.settings = settings
        self.retrieval_limits = retrieval
        # Per model version: row -> the item's static fields (id, title,
        # genres) as an encoded ScoredItem, built once instead of per answer.
        self._templates: weakref.WeakKeyDictionary[LoadedModel, CappedDict[int, bytes]] = (
            weakref.WeakKeyDictionary()
        )
        # Per model version: RankedItem.why -> its sources and reasons, encoded.
        self._provenance: weakref.WeakKeyDictionary[LoadedModel, CappedDict[Any, bytes]] = (
            weakref.WeakKeyDictionary()
        )

    def _items(self, out: RankOutcome, debug: bool, container) -> None:
        """Appends the outcome's items to a response's repeated ``items`` field.

        Outside debug an item is parsed from three cached byte strings (its
        static fields, its score, its provenance): one C parse instead of a
        copy, a field set and a message per reason.
        """
        model = out.model
        cache = self._templates.get(model)
        if cache is None:
            cache = self._templates[model] = CappedDict(TEMPLATE_CACHE_ITEMS)
        provenance = self._provenance.get(model)
        if provenance is None:
            provenance = self._provenance[model] = CappedDict(PROVENANCE_CACHE_ENTRIES)
        add = container.add
        for it in out.items:
            template = cache.get(it.row)
            if template is None:
                template = ranking_pb2.ScoredItem(
                    item_id=it.item_id, title=model.title(it.row), genres=model.genres(it.row)
                ).SerializeToString()
                cache.put(it.row, template)
            item = add()
            if debug:
                item.MergeFromString(template)
                item.score = it.score
                _provenance(item, it, model, debug=True)
                continue
            # Reasons are a function of ``it.why`` within one model version (titles).
            why = provenance.get(it.why) if it.why is not None else b""
            if why is None:
                msg = ranking_pb2.ScoredItem()
                _provenance(msg, it, model, debug=False)
                why = msg.SerializeToString()
                provenance.put(it.why, why)
            try:
                item.MergeFromString(template + _SCORE_KEY + _FLOAT32.pack(it.score) + why)
            except OverflowError:  # beyond float32: let protobuf round it as it would
                item.MergeFromString(template + why)
                item.score = it.score

    def _root_span(self, method: str, context: grpc.aio.ServicerContext):
        tr = self.ranker.tracing
        # Joins a caller's traceparent when one was sent, else starts a trace.
        parent = tr.extract(context.invocation_metadata()) if tr.enabled else None
        return tr.span(f"ranking.{method}", parent=parent, kind=SpanKind.SERVER)

    async def Rank(self, request, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        with self._root_span("Rank", context) as span:
            try:
                query = parse_rank(request, self.settings)
                out = await self.ranker.rank(query, context.time_remaining())
                response = ranking_pb2.RankResponse(
                    model_version=out.model.name,
                    unknown_dropped=out.unknown_dropped,
                    watched_dropped=out.watched_dropped,
                    variant=out.variant,
                )
                self._items(out, query.debug, response.items)
            except Exception as exc:
                await _abort(context, exc)
                raise  # unreachable: abort raises
            if self.ranker.tracing.enabled:
                span.set_attributes(_span_attributes(out))
        observe_request("ranking", "Rank", out.variant, time.perf_counter() - start)
        return response

    async def Recommend(self, request, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        with self._root_span("Recommend", context) as span:
            try:
                query = parse_recommend(request, self.settings, self.retrieval_limits)
                out = await self.ranker.recommend(query, context.time_remaining())
                response = ranking_pb2.RecommendResponse(
                    model_version=out.model.name,
                    index_version=out.index_version,
                    source_reports=list(out.reports),
                    retrieval_fallback=bool(out.fallback_reason),
                    fallback_reason=out.fallback_reason,
                    variant=out.variant,
                )
                self._items(out, query.debug, response.items)
            except Exception as exc:
                await _abort(context, exc)
                raise
            if self.ranker.tracing.enabled:
                span.set_attributes(_span_attributes(out))
        observe_request("ranking", "Recommend", out.variant, time.perf_counter() - start)
        return response


def _span_attributes(out: RankOutcome) -> dict[str, str | int | bool]:
    return {
        "recsys.variant": out.variant,
        "recsys.model_version": out.model.name,
        "recsys.returned": len(out.items),
        "recsys.retrieval_fallback": bool(out.fallback_reason),
    }


def _provenance(item: ranking_pb2.ScoredItem, it: RankedItem, model: LoadedModel, debug: bool):
    """Fills the per-request fields of a ScoredItem: sources, reasons, debug."""
    sources = list(it.sources)
    if sources:
        item.sources.extend(sources)
    if it.reasons:
        add = item.reasons.add  # in place: no temporary message to copy
        for r in it.reasons:
            add(kind=r.kind, ref=r.ref, text=r.text)
    if debug:
        item.debug.raw_score = it.raw
        item.debug.model_version = model.name
        if it.candidate is not None:
            item.debug.sources.extend(sources)
            item.debug.source_scores.update(dict(it.candidate.source_scores))


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, InvalidArgument | RetrievalRejected | UnknownVariant):
        # Retrieval's message already names the field as the caller sent it.
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, NoModel | BatcherClosed):
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, grpc.aio.AbortError | grpc.RpcError):
        raise exc
    log.exception("ranking failed")
    await context.abort(grpc.StatusCode.INTERNAL, "internal error while ranking")
