"""A small typed Python client for backend services, and ``recsys recommend``.

Three lines for a backend team::

    from recsys.client import RecommenderClient
    with RecommenderClient("ranking:50052", "retrieval:50051") as rc:
        for item in rc.recommend("42", k=10).items: ...

Deadlines on every call, retries with backoff for ``UNAVAILABLE`` and
``CANCELLED`` (what a stopping server answers) only, and
round-robin over every address a ``dns:///`` target resolves to come from
:mod:`recsys.channels`; TLS and bearer tokens (one per service) are optional.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from recsys.channels import create_channel
from recsys.config import RecsysSettings, TLSSettings
from recsys.v1 import (
    common_pb2,
    ranking_pb2,
    ranking_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)


@dataclass
class Reason:
    """Why an item is recommended."""

    kind: str
    ref: str
    text: str


@dataclass
class Recommendation:
    """One ranked item."""

    item_id: str
    score: float
    title: str = ""
    genres: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)
    debug: dict[str, Any] | None = None


@dataclass
class SourceReport:
    """How one retrieval source fared."""

    source: str
    status: str
    count: int
    latency_ms: float
    message: str = ""


@dataclass
class Recommendations:
    """The answer of ``recommend``/``rank``."""

    items: list[Recommendation]
    model_version: str
    index_version: str = ""
    source_reports: list[SourceReport] = field(default_factory=list)
    retrieval_fallback: bool = False
    fallback_reason: str = ""
    variant: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


# How long the server remembers an event id made for one record() call: its
# channel's retries come within seconds (each id costs Redis ~150 bytes).
OWN_RETRY_WINDOW_S = 300


@dataclass
class Recorded:
    """The answer of ``record``."""

    history_length: int
    rating_count: int
    # Your event_id was seen before: nothing was written now (never set for an
    # id record() made itself: a retry of its own landed write is not one).
    duplicate: bool


@dataclass
class SimilarItem:
    """A neighbour of an item."""

    item_id: str
    score: float


def user_context(
    user_id: str,
    *,
    features: Mapping[str, Any] | None = None,
    recent: Sequence[str] = (),
    exclude: Sequence[str] = (),
    variant: str = "",
) -> common_pb2.UserContext:
    """Builds a ``UserContext`` (features: age, gender, occupation, country, genre_ratings)."""
    ctx = common_pb2.UserContext(
        user_id=user_id,
        recent_item_ids=list(recent),
        exclude_item_ids=list(exclude),
        variant=variant,
    )
    if features:
        f = dict(features)
        genre_ratings = f.pop("genre_ratings", {}) or {}
        ctx.features.CopyFrom(common_pb2.UserFeatures(**f))
        ctx.features.genre_ratings.update({k: float(v) for k, v in genre_ratings.items()})
    return ctx


def _items(msgs) -> list[Recommendation]:
    out = []
    for m in msgs:
        debug = None
        if m.HasField("debug"):
            debug = {
                "sources": list(m.debug.sources),
                "source_scores": dict(m.debug.source_scores),
                "raw_score": m.debug.raw_score,
                "model_version": m.debug.model_version,
            }
        out.append(
            Recommendation(
                item_id=m.item_id,
                score=round(float(m.score), 6),
                title=m.title,
                genres=list(m.genres),
                sources=list(m.sources),
                reasons=[Reason(r.kind, r.ref, r.text) for r in m.reasons],
                debug=debug,
            )
        )
    return out


def _bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """The ``authorization`` metadata for ``token`` (none for None or ``""``)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class RecommenderClient:
    """Blocking client for the ranking and retrieval services.

    Args:
        ranking_target: Ranking service address (``host:port`` or ``dns:///name:port``).
        retrieval_target: Retrieval service address, for ``similar`` and
            ``record``; None if the caller only ranks.
        timeout_s: Deadline of each call.
        tls: Optional TLS/mTLS settings (CA, client cert and key) towards ranking.
        token: Optional bearer token sent to ranking as ``authorization`` metadata.
        retrieval_tls: TLS settings towards retrieval; None: the same as ``tls``.
        retrieval_token: Bearer token sent to retrieval; None: the same as
            ``token`` (one token for both services), ``""``: none. Services
            with tokens of their own need it: retrieval refuses the ranking
            token, and should never see it.
        max_attempts: Attempts per call on ``UNAVAILABLE`` (1 = no retries).
    """

    def __init__(
        self,
        ranking_target: str = "127.0.0.1:50052",
        retrieval_target: str | None = "127.0.0.1:50051",
        *,
        timeout_s: float = 2.0,
        tls: TLSSettings | None = None,
        token: str | None = None,
        retrieval_tls: TLSSettings | None = None,
        retrieval_token: str | None = None,
        max_attempts: int = 4,
    ):
        self.timeout_s = timeout_s
        self._ranking_metadata = _bearer(token)
        self._retrieval_metadata = _bearer(token if retrieval_token is None else retrieval_token)
        self._ranking_channel = create_channel(ranking_target, tls=tls, max_attempts=max_attempts)
        self._ranking = ranking_pb2_grpc.RankingServiceStub(self._ranking_channel)
        self._retrieval_channel = None
        self._retrieval = None
        if retrieval_target:
            self._retrieval_channel = create_channel(
                retrieval_target,
                tls=tls if retrieval_tls is None else retrieval_tls,
                max_attempts=max_attempts,
            )
            self._retrieval = retrieval_pb2_grpc.RetrievalServiceStub(self._retrieval_channel)

    @classmethod
    def from_settings(cls, settings: RecsysSettings, **kwargs: Any) -> RecommenderClient:
        """Client for the addresses the local config serves on.

        Each service gets the token the config gives it (``ranking.auth_token``,
        ``retrieval.auth_token``; none where it has none) unless ``kwargs``
        name one. A ``token`` passed without ``retrieval_token`` goes to
        retrieval too where the config gives retrieval none, as it does
        with the constructor.
        """
        ranking, retrieval = settings.ranking.auth_token, settings.retrieval.auth_token
        if retrieval is not None:
            kwargs.setdefault("retrieval_token", retrieval.get_secret_value())
        elif "token" not in kwargs:
            # The config's ranking token, taken below, is not retrieval's.
            kwargs.setdefault("retrieval_token", "")
        kwargs.setdefault("token", ranking.get_secret_value() if ranking is not None else "")
        return cls(settings.ranking.local_address, settings.retrieval.local_address, **kwargs)

    def _call(self, method, request, metadata: tuple[tuple[str, str], ...]):
        return method(request, timeout=self.timeout_s, metadata=metadata)

    def recommend(
        self,
        user_id: str,
        k: int = 0,
        *,
        features: Mapping[str, Any] | None = None,
        recent: Sequence[str] = (),
        debug: bool = False,
        sources: Sequence[str] = (),
        variant: str = "",
    ) -> Recommendations:
        """Top-k recommendations for a user (retrieval + ranking in one call).

        ``k`` 0 asks for the server's ``default_k``.
        """
        req = ranking_pb2.RecommendRequest(
            user=user_context(user_id, features=features, recent=recent, variant=variant),
            k=k,
            debug=debug,
            sources=list(sources),
        )
        resp = self._call(self._ranking.Recommend, req, self._ranking_metadata)
        return Recommendations(
            items=_items(resp.items),
            model_version=resp.model_version,
            index_version=resp.index_version,
            source_reports=[
                SourceReport(
                    r.source,
                    _status_name(r.status),
                    r.count,
                    round(r.latency_ms, 3),
                    r.message,
                )
                for r in resp.source_reports
            ],
            retrieval_fallback=resp.retrieval_fallback,
            fallback_reason=resp.fallback_reason,
            variant=resp.variant,
        )

    def rank(
        self,
        user_id: str,
        item_ids: Sequence[str],
        top_k: int = 0,
        *,
        include_watched: bool = False,
        features: Mapping[str, Any] | None = None,
        debug: bool = False,
    ) -> Recommendations:
        """Scores the given items for a user and returns the best ``top_k``.

        ``top_k`` 0 asks for the server's ``default_k``.
        """
        req = ranking_pb2.RankRequest(
            user=user_context(user_id, features=features),
            candidate_item_ids=list(item_ids),
            top_k=top_k,
            include_watched=include_watched,
            debug=debug,
        )
        resp = self._call(self._ranking.Rank, req, self._ranking_metadata)
        return Recommendations(
            items=_items(resp.items), model_version=resp.model_version, variant=resp.variant
        )

    def similar(self, item_id: str, k: int = 10, *, user_id: str = "") -> list[SimilarItem]:
        """The ``k`` items most similar to ``item_id``.

        With ``user_id``, the user's experiment variant picks the model version.
        """
        resp = self._call(
            self._require_retrieval().SimilarItems,
            retrieval_pb2.SimilarItemsRequest(item_id=item_id, k=k, user_id=user_id),
            self._retrieval_metadata,
        )
        return [SimilarItem(i.item_id, float(i.score)) for i in resp.items]

    def record(
        self,
        user_id: str,
        item_id: str,
        rating: float | None = None,
        *,
        event_id: str | None = None,
    ) -> Recorded:
        """Records a watch (and optional rating).

        The server counts each ``event_id`` once per user (for a day), which
        makes retries safe. Without one, a fresh id is made for this call and
        remembered for :data:`OWN_RETRY_WINDOW_S` only, so the channel's own
        retries on ``UNAVAILABLE`` or ``CANCELLED`` (sent when the write may already have
        landed) cannot count it twice; pass your own to make retries of your
        own safe too.
        """
        req = retrieval_pb2.RecordInteractionRequest(user_id=user_id, item_id=item_id)
        if event_id:
            req.event_id = event_id
        else:
            req.event_id, req.dedupe_window_s = uuid.uuid4().hex, OWN_RETRY_WINDOW_S
        if rating is not None:
            req.rating = rating
        resp = self._call(
            self._require_retrieval().RecordInteraction, req, self._retrieval_metadata
        )
        # An id made for this call can only have been seen by this call's own
        # earlier attempt (a retry of a write that landed): not a duplicate to
        # the caller, whose interaction was recorded once.
        return Recorded(resp.history_length, resp.rating_count, resp.duplicate and bool(event_id))

    def _require_retrieval(self):
        if self._retrieval is None:
            raise ValueError("this client was built without a retrieval_target")
        return self._retrieval

    def close(self) -> None:
        """Closes the channels."""
        self._ranking_channel.close()
        if self._retrieval_channel is not None:
            self._retrieval_channel.close()

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _status_name(status: int) -> str:
    """A source status's short name; a number a newer server added stays a number."""
    try:
        return common_pb2.SourceStatus.Name(status).removeprefix("SOURCE_STATUS_")
    except ValueError:
        return str(status)


def _clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the last one an ellipsis when cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(recs: Recommendations, *, title: str = "") -> str:
    """A readable table: rank, title, genres, predicted score, sources, reason.

    Items carrying debug fields (a request with ``debug``) add the model's raw
    score and each source's own score.
    """
    debug = any(it.debug for it in recs.items)
    head = ("#", "item", "title", "genres", "score", "sources", "why")
    rows = [head + (("raw", "source scores") if debug else ())]
    for n, it in enumerate(recs.items, 1):
        why = it.reasons[0].text if it.reasons else ""
        row: tuple[str, ...] = (
            str(n),
            it.item_id,
            _clip(it.title or "", 40),
            _clip(", ".join(it.genres), 28),
            f"{it.score:.2f}",
            ",".join(it.sources),
            _clip(why, 44),
        )
        if debug:
            d = it.debug or {}
            scores = d.get("source_scores", {})
            row += (
                f"{d['raw_score']:.4f}" if "raw_score" in d else "",
                " ".join(f"{k}={v:.3g}" for k, v in scores.items()),
            )
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [title] if title else []
    for i, r in enumerate(rows):
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    foot = f"model {recs.model_version}"
    if recs.index_version:
        foot += f", index {recs.index_version}"
    if recs.variant:
        foot += f", variant {recs.variant}"
    if recs.retrieval_fallback:
        foot += f"; retrieval unavailable, popular fallback ({recs.fallback_reason})"
    degraded = [s for s in recs.source_reports if s.status != "OK"]
    if degraded:
        foot += "; degraded sources: " + ", ".join(f"{s.source}={s.status}" for s in degraded)
    lines.append(foot)
    return "\n".join(lines)


def cli_recommend(args, settings: RecsysSettings) -> int:
    """``recsys recommend --user ID [--k N] [--json]``."""
    from recsys.cli import client_tls

    target = args.target or None
    # The token the local config gives the ranking service (as `recsys loadtest` sends it).
    secret = settings.ranking.auth_token
    opts: dict[str, Any] = {
        "tls": client_tls(args),
        "token": secret.get_secret_value() if secret is not None else None,
    }
    client = (
        RecommenderClient(target, None, **opts)
        if target
        else RecommenderClient.from_settings(settings, **opts)
    )
    with client:
        try:
            recs = client.recommend(
                args.user, k=args.k, debug=args.debug, variant=getattr(args, "variant", "")
            )
        except grpc.RpcError as exc:
            print(f"recsys recommend: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(recs.to_dict(), indent=2))
    else:
        print(format_table(recs, title=f"Recommendations for user {args.user}"))
    return 0
