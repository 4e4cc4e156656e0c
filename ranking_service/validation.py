"""Request checks and pb2 → domain conversion (INVALID_ARGUMENT names the field)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ranking_service.catalogue import IdIndex
from ranking_service.users import UserQuery
from recsys.checks import FieldError, check_features, check_id, check_source_names
from recsys.config import RankingSettings, RetrievalSettings
from recsys.v1 import ranking_pb2

# RankRequest.candidate_item_ids on the wire, read from the generated descriptor.
_CANDIDATES_FIELD = ranking_pb2.RankRequest.DESCRIPTOR.fields_by_name["candidate_item_ids"].number


# The shared field error: the servicer maps it to INVALID_ARGUMENT.
InvalidArgument = FieldError


@dataclass(frozen=True)
class RetrievalLimits:
    """What retrieval accepts of a Recommend's fields, read from the shared config.

    Ranking checks them too, so whether a request is valid does not depend
    on retrieval being up: without these checks a request retrieval would
    refuse got popular items whenever retrieval was down.
    """

    sources: tuple[str, ...]  # configured source names, in config order
    max_budget: int
    max_request_ids: int = 10_000
    max_id_bytes: int = 256

    @classmethod
    def from_settings(cls, settings: RetrievalSettings) -> RetrievalLimits:
        """The limits of the retrieval config both services load."""
        names = tuple(str(e["name"]) for e in settings.sources if e.get("name"))
        return cls(names, settings.max_budget, settings.max_request_ids, settings.max_id_bytes)


@dataclass
class RankQuery:
    """A validated Rank request.

    The candidate ids stay in the request's own ``repeated string`` field
    until :meth:`rows` maps them: materialising 1,000 strings into a list or
    a numpy array first would cost more than the lookup itself.
    """

    user: UserQuery
    candidates: Sequence[str]  # item ids, request order (the protobuf field)
    k: int
    include_watched: bool
    debug: bool
    max_id_bytes: int = 128
    # The RankRequest the query came from: its wire form is the cheapest
    # place to read 1,000 ids from (IdIndex.lookup_field).
    request: object | None = None

    def rows(self, index: IdIndex) -> np.ndarray:
        """Catalogue rows of the candidates (-1 = unknown), after checking the unknown ones.

        A known id is well-formed by construction (the catalogue was checked
        at export), so only misses need the per-id checks: usually none.

        Raises:
            InvalidArgument: An unknown id is empty, too long or contains NUL.
        """
        rows = None
        if self.request is not None:
            wire = self.request.SerializeToString()  # type: ignore[attr-defined]
            rows = index.lookup_field(wire, _CANDIDATES_FIELD, len(self.candidates))
        if rows is None:
            rows = index.lookup(self.candidates)
        check_ids_at(self.candidates, np.flatnonzero(rows < 0), "candidate_item_ids",
                     self.max_id_bytes)  # fmt: skip
        return rows


@dataclass
class RecommendQuery:
    """A validated Recommend request (``raw_user`` passes through to retrieval)."""

    user: UserQuery
    raw_user: object
    k: int
    budget: int
    sources: list[str]
    debug: bool


def check_ids_at(ids: Sequence[str], positions: np.ndarray, field: str, max_bytes: int) -> None:
    """Checks ``ids[i]`` for each ``i`` in ``positions`` (a Python loop over those only)."""
    for i in positions.tolist():
        check_id(ids[i], f"{field}[{i}]", max_bytes)


def check_id_list(ids: list[str], field: str, max_bytes: int) -> None:
    """Checks a list of ids: each non-empty, within ``max_bytes`` UTF-8 bytes, no NUL.

    The per-id Python check only runs for the few ids whose length alone
    cannot settle it (long ones, possibly over the byte limit) or when the
    list holds a NUL. No numpy string array: its fixed width is the longest
    id's, so one long id among thousands asked for gigabytes before its
    length was even looked at.
    """
    lengths = list(map(len, ids))
    if not lengths:
        return
    if min(lengths) == 0:
        raise InvalidArgument(f"{field}[{lengths.index(0)}]", "must not be empty")
    # A code point is 1..4 UTF-8 bytes: ids of at most max_bytes/4 characters
    # are always short enough, and more than max_bytes characters never are.
    if max(lengths) * 4 > max_bytes:
        for i, n in enumerate(lengths):
            if n * 4 > max_bytes:
                check_id(ids[i], f"{field}[{i}]", max_bytes)
    if "\x00" in "".join(ids):
        for i, v in enumerate(ids):
            check_id(v, f"{field}[{i}]", max_bytes)


def _k(value: int, field: str, limits: RankingSettings) -> int:
    if value < 0:
        raise InvalidArgument(field, f"{value} is outside 0..{limits.max_k} (0: the default)")
    if value == 0:
        return limits.default_k
    if value > limits.max_k:
        raise InvalidArgument(field, f"{value} is more than the maximum {limits.max_k}")
    return value


def parse_user(
    ctx,
    limits: RankingSettings,
    field: str = "user",
    *,
    max_ids: int | None = None,
    max_id_bytes: int | None = None,
) -> UserQuery:
    """``recsys.v1.UserContext`` → :class:`UserQuery`.

    ``max_ids`` and ``max_id_bytes`` replace ranking's own ``max_candidates``
    and ``max_id_bytes`` (a Recommend passes the smaller of its and retrieval's).
    """
    most_ids = limits.max_candidates if max_ids is None else max_ids
    id_bytes = limits.max_id_bytes if max_id_bytes is None else max_id_bytes
    if ctx.user_id:
        check_id(ctx.user_id, f"{field}.user_id", id_bytes)
    f = ctx.features
    age = float(f.age) if f.HasField("age") and f.age != 0 else None
    check_features(
        f"{field}.features",
        age=age,
        gender=f.gender,
        occupation=f.occupation,
        country=f.country,
        # The message's map: counted before anything copies it (a 900k-entry
        # map took over a second to copy, holding up the event loop).
        genre_ratings=f.genre_ratings,
        max_bytes=id_bytes,
    )
    ratings = dict(f.genre_ratings)
    if len(ctx.exclude_item_ids) > most_ids:
        raise InvalidArgument(
            f"{field}.exclude_item_ids",
            f"{len(ctx.exclude_item_ids)} ids, at most {most_ids} allowed",
        )
    exclude = list(ctx.exclude_item_ids)
    if exclude:
        check_id_list(exclude, f"{field}.exclude_item_ids", id_bytes)
    # Counted before the per-id loop, so a huge list costs nothing to refuse.
    if len(ctx.recent_item_ids) > most_ids:
        raise InvalidArgument(
            f"{field}.recent_item_ids",
            f"{len(ctx.recent_item_ids)} ids, at most {most_ids} allowed",
        )
    for i, v in enumerate(ctx.recent_item_ids):
        check_id(v, f"{field}.recent_item_ids[{i}]", id_bytes)
    return UserQuery(
        user_id=ctx.user_id,
        age=age,
        gender=f.gender or None,
        occupation=f.occupation or None,
        country=f.country or None,
        genre_ratings=ratings,
        exclude_item_ids=exclude,
        recent_item_ids=list(ctx.recent_item_ids),
        variant=ctx.variant,
    )


def parse_rank(request, limits: RankingSettings) -> RankQuery:
    """``recsys.v1.RankRequest`` → :class:`RankQuery`.

    Raises:
        InvalidArgument: Empty or oversized candidate list, a bad id, or a
            ``top_k`` outside 0..max_k (0 means the configured default).
    """
    ids = request.candidate_item_ids
    if len(ids) == 0:
        raise InvalidArgument("candidate_item_ids", "must not be empty")
    if len(ids) > limits.max_candidates:
        raise InvalidArgument(
            "candidate_item_ids",
            f"{len(ids)} candidates, at most {limits.max_candidates} allowed",
        )
    k = _k(request.top_k, "top_k", limits)
    user = parse_user(request.user, limits)
    return RankQuery(
        user=user,
        candidates=ids,
        k=k,
        include_watched=request.include_watched,
        debug=request.debug,
        max_id_bytes=limits.max_id_bytes,
        request=request,
    )


def parse_recommend(
    request, limits: RankingSettings, retrieval: RetrievalLimits | None = None
) -> RecommendQuery:
    """``recsys.v1.RecommendRequest`` → :class:`RecommendQuery`.

    Args:
        request: The request.
        limits: Ranking's own limits.
        retrieval: Retrieval's limits (None: only ranking's own are checked).
    """
    k = _k(request.k, "k", limits)
    budget = request.retrieval_budget
    most = (
        limits.max_candidates
        if retrieval is None
        else min(limits.max_candidates, retrieval.max_budget)
    )
    if budget < 0 or budget > most:
        raise InvalidArgument("retrieval_budget", f"{budget} is outside 0..{most}")
    # What both services accept: whether a request is valid must not depend on
    # retrieval being up (the popular fallback would answer what it refuses).
    id_bytes = limits.max_id_bytes
    most_ids = limits.max_candidates
    if retrieval is not None:
        id_bytes = min(id_bytes, retrieval.max_id_bytes)
        most_ids = min(most_ids, retrieval.max_request_ids)
    # Retrieval needs a user to read history from; Rank may go without one.
    check_id(request.user.user_id, "user.user_id", id_bytes)
    # Only retrieval reads sources: its limit alone (ranking's without one).
    most_sources = limits.max_candidates if retrieval is None else retrieval.max_request_ids
    if len(request.sources) > most_sources:  # counted before the per-entry checks
        raise InvalidArgument("sources", f"{len(request.sources)} entries, at most {most_sources}")
    check_source_names(request.sources, retrieval.sources if retrieval else None, id_bytes)
    return RecommendQuery(
        user=parse_user(request.user, limits, max_ids=most_ids, max_id_bytes=id_bytes),
        raw_user=request.user,
        k=k,
        budget=budget,
        sources=list(request.sources),
        debug=request.debug,
    )
