"""One ``Retrieve`` / ``SimilarItems`` / ``RecordInteraction`` call, in domain types.

The framework owns the stage order of ``Retrieve``::

    validate -> hydrate (1 pipelined Redis round trip)
             -> sources concurrently, each under min(own timeout, request deadline),
                their sorted-set reads batched into 1 more round trip
             -> merge/dedup (attribution) -> filter (watched, excluded, unknown ids)
             -> fair interleave up to the budget -> refill from the fallback chain

A source that times out or raises is reported (``TIMEOUT``/``ERROR``) and the
others still answer; the call fails only when every source failed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from redis.exceptions import RedisError

from recsys import redis_keys
from recsys.batching import MicroBatcher
from recsys.checks import FieldError, check_features, check_id, check_source_names
from recsys.config import CURRENT_VERSION, RetrievalSettings
from recsys.errors import ThrottledWarning, describe_error, shown
from recsys.experiments import Experiment, UnknownVariant, Variant
from recsys.features import (
    FeatureSpec,
    UserProfile,
    aggregates_from_genre_ratings,
    check_genre_names,
)
from recsys.tracing import NOOP, Tracing
from recsys.user_store import (
    EVENT_TTL_S,
    READ_SHARE_OF_DEADLINE,
    CorruptUserState,
    Recorded,
    StoredUser,
    UserRead,
    load_users,
    record_interaction,
)
from retrieval_service import metrics
from retrieval_service.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from retrieval_service.merge import (
    Lane,
    MergedCandidate,
    Selection,
    assemble,
    compile_kernels,
)
from retrieval_service.served import Neighbour, ServedVersion, load_served_version
from retrieval_service.sources.base import (
    CandidateBlock,
    CandidateSource,
    MalformedAnswer,
    RedisBatch,
    RedisUnavailable,
    RetrievalContext,
    await_each,
    check_text,
)
from retrieval_service.sources.top_lists import PopularSource

log = logging.getLogger("recsys.retrieval")

# A client that sets no deadline still gets an answer in bounded time.
DEFAULT_DEADLINE_S = 1.0
# Time kept back from the sources for merging and answering: 10% of what is
# left on the deadline, within these bounds.
MIN_RESERVE_S = 0.002
MAX_RESERVE_S = 0.02
# Longest a version's top-list copy may delay its swap (Redis slow or down).
WARM_TIMEOUT_S = 10.0
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
# A user read a healthy Redis answers well within, even on a busy host: a
# read the caller's deadline cut to less than this is the caller's fault,
# any other timeout a Redis fault (counted and logged). Ranking's default
# 200 ms retrieval deadline gives the read 100 ms, below redis_timeout_s, so
# comparing with that would have called every stall the caller's fault.
HEALTHY_READ_S = 0.05

_log_redis_down = ThrottledWarning(
    log, "user reads failing, retrieving with request features only: %s (%d since last report)"
)


class SourceStatus(StrEnum):
    """Outcome of one source in one call (mirrors ``recsys.v1.SourceStatus``)."""

    OK = "OK"
    TIMEOUT = "TIMEOUT"
    ERROR = "ERROR"


@dataclass(frozen=True)
class RequestFeatures:
    """Inline user features from the request; empty fields mean "not given"."""

    age: float | None = None
    gender: str | None = None
    occupation: str | None = None
    country: str | None = None
    genre_ratings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RetrieveQuery:
    """A validated-on-use ``Retrieve`` request.

    ``recent`` is newest first (the servicer reverses the proto's oldest-first list).
    """

    user_id: str
    budget: int = 0
    sources: Sequence[str] = ()
    recent: Sequence[str] = ()
    exclude: Sequence[str] = ()
    features: RequestFeatures = field(default_factory=RequestFeatures)
    variant: str = ""  # forced experiment variant; empty: bucket by user id


@dataclass
class SourceReport:
    """How one source fared."""

    source: str
    status: SourceStatus
    count: int
    latency_ms: float
    message: str = ""


@dataclass
class RetrieveResult:
    """Answer of ``Retrieve``.

    ``selection`` holds the candidates as arrays (what the servicer packs);
    ``candidates`` gives the same answer as :class:`MergedCandidate` objects,
    built on first access.
    """

    selection: Selection
    item_ids: Sequence[str]  # the served catalogue the selection's rows index
    reports: list[SourceReport]
    version: str
    degraded: bool
    redis_round_trips: int
    variant: str = ""
    catalogue: str = ""  # fingerprint of the catalogue the rows index
    user: StoredUser | None = None  # as read from Redis; None when the read failed
    spec: FeatureSpec | None = None  # the served version's (indexes user's aggregates)
    _merged: list[MergedCandidate] | None = field(default=None, repr=False, compare=False)

    @property
    def candidates(self) -> list[MergedCandidate]:
        """The candidates in answer order, with attribution (built once, on demand)."""
        if self._merged is None:
            self._merged = self.selection.merged(self.item_ids)
        return self._merged


class _Resumed:
    """Awaitable that continues a coroutine already run up to its first suspension.

    ``yielded`` is what the coroutine handed to the event loop (the future it
    waits on); the task awaiting this object receives it and resumes the
    coroutine when it is done, as if the task had run it from the start.
    """

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any):
        self._coro = coro
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self._coro, self._yielded
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation (timeout) goes into the source
                try:
                    yielded = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as done:
                    return done.value


async def _within(work: Awaitable[Any], limit: float | None) -> Any:
    async with asyncio.timeout(limit) as scope:
        got = await work
    if scope.expired():
        # The source caught the cancel and answered anyway, after its limit.
        raise TimeoutError
    return got


class SourceRaised(Exception):
    """A source's own exception that would otherwise read as the engine's.

    Its own ``CancelledError`` (not a cancellation of the request: one from a
    shared fetch another request cancelled, say) read as the request being
    cancelled, and the call was never answered; its own ``TimeoutError``
    read as its time limit running out.
    """


def _own_timeout(limit: float) -> SourceRaised:
    """A TimeoutError the source raised itself, not its limit running out."""
    return SourceRaised(f"raised TimeoutError before its {limit * 1e3:.0f} ms limit")


def _own_cancel() -> SourceRaised:
    """A CancelledError the source raised itself, nothing having cancelled it."""
    return SourceRaised("raised CancelledError without being cancelled")


async def _source_within(work: Awaitable[Any], limit: float) -> Any:
    """:func:`_within` for a source: its own cancellation or timeout is its error."""
    try:
        async with asyncio.timeout(limit) as scope:
            got = await work
    except TimeoutError as exc:
        if scope.expired():
            raise
        raise _own_timeout(limit) from exc
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the request (or its batch) is being cancelled
        raise _own_cancel() from None
    if scope.expired():
        # The source caught the cancel and answered anyway, after its limit.
        raise TimeoutError
    return got


# A source task still running this long after the sources' stop time is left
# behind: it swallowed its cancellation, and must not hold the request.
LATE_GRACE_S = 0.002
# How long past the longest source limit the sources' wait lasts, when that
# comes before the request's stop time: a source's own timer starts when its
# task first runs, after the request's inline (eager) sources and any loop
# lag, so a cut right at the limit took sources answering within theirs.
SOURCES_GRACE_S = 0.05


def _consume(task: asyncio.Task) -> None:
    """Retrieves a left-behind task's outcome (asyncio logs one never retrieved)."""
    if not task.cancelled():
        task.exception()


async def _wait_until(tasks: Sequence[asyncio.Task], stop_at: float) -> list[Any]:
    """Each task's result or exception; one still running at ``stop_at`` is cancelled and left.

    ``gather`` would wait for every task, so one source that swallows its
    cancellation would hold the whole request past its deadline. A task left
    behind reads as ``TimeoutError``.
    """
    if not tasks:  # asyncio.wait refuses an empty set
        return []
    try:
        _, pending = await asyncio.wait(
            tasks, timeout=max(stop_at - time.monotonic(), 0.0) + LATE_GRACE_S
        )
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        raise
    out: list[Any] = []
    for t in tasks:
        if t in pending:
            t.cancel()
            t.add_done_callback(_consume)
            out.append(TimeoutError())
        elif t.cancelled():
            out.append(asyncio.CancelledError())
        else:
            out.append(t.exception() or t.result())
    return out


class _Plan(NamedTuple):
    """What one ``Retrieve`` runs, fixed before any I/O."""

    budget: int
    chosen: list[CandidateSource]
    variant: Variant
    served: ServedVersion


_UMAX = np.maximum.reduce  # the ufunc method itself: ndarray.max() adds a Python wrapper


def _outside(rows: np.ndarray, n: int) -> bool:
    """True when some row is not in ``0..n-1`` (checked for every source's block)."""
    if not rows.shape[0]:
        return False
    if rows.dtype == np.int64:
        # Seen unsigned, a negative row is huge: one reduction checks both ends.
        return int(_UMAX(rows.view(np.uint64))) >= n
    return bool(rows.min() < 0 or rows.max() >= n)


def _check_block(block: CandidateBlock) -> None:
    """Raises MalformedAnswer unless the block's arrays line up (the merge indexes them blindly).

    Also what would fail later, outside the source's isolation: rows that
    are not distinct integers, scores that are not numbers, seed and genre
    names that are not text.
    """
    rows = block.rows
    if not isinstance(rows, np.ndarray) or rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise MalformedAnswer("returned a CandidateBlock whose rows are not a 1-d integer array")
    n = rows.shape[0]
    if n > 1 and np.unique(rows).shape[0] != n:
        raise MalformedAnswer("returned a CandidateBlock with a row more than once")
    if block.scores is not None and (
        not isinstance(block.scores, np.ndarray) or block.scores.dtype.kind not in "iuf"
    ):
        raise MalformedAnswer("returned a CandidateBlock whose scores are not a numeric array")
    for what, arr, names in (
        ("scores", block.scores, None),
        ("seeds", block.seeds, block.seed_ids),
        ("genres", block.genres, block.genre_names),
    ):
        if arr is None:
            continue
        # Each of these would otherwise fail with a bare AttributeError or
        # TypeError, taken for the plugin's own (log only), or in the merge.
        if not isinstance(arr, np.ndarray):
            raise MalformedAnswer(f"returned a CandidateBlock whose {what} are not an array")
        if arr.shape != (n,):
            raise MalformedAnswer(
                f"returned a CandidateBlock with {n} rows but {what} of shape {arr.shape}"
            )
        if what == "scores":
            continue
        if not isinstance(names, list | tuple):
            raise MalformedAnswer(
                f"returned a CandidateBlock with {what} but no list of their names"
            )
        if not n:
            continue
        if arr.dtype.kind not in "iu":
            raise MalformedAnswer(f"returned a CandidateBlock whose {what} are not integers")
        try:
            for name in names:
                check_text(name, f"a name in {what}")
        except MalformedAnswer as exc:
            raise MalformedAnswer(f"returned a CandidateBlock whose {exc}") from None
        if arr.dtype == np.int64:
            # -1 (none) up to the last name: one unsigned reduction checks both ends.
            bad = int(_UMAX((arr + 1).view(np.uint64))) > len(names)
        else:
            bad = bool(arr.min() < -1 or arr.max() >= len(names))
        if bad:
            raise MalformedAnswer(
                f"returned a CandidateBlock whose {what} point outside its {len(names)} names"
            )


def _builtin(src: CandidateSource) -> bool:
    """True for this package's own sources, whose blocks their tests check."""
    return type(src).__module__.startswith("retrieval_service.sources.")


def _as_block(
    got: Sequence[Any], k: int, served: ServedVersion, *, trusted: bool = False
) -> CandidateBlock:
    """A source's answer, cut to ``k``, as a block over ``served``'s catalogue.

    ``trusted`` (a built-in source) skips the arrays' alignment check: about
    2 µs per block, 1% of a Retrieve, spent only where it can find something.
    """
    if isinstance(got, CandidateBlock) and got.item_ids is served.item_ids:
        if not trusted:
            _check_block(got)
        block = got if got.rows.shape[0] <= k else got[:k]  # usually already within k
        if _outside(block.rows, len(served.item_ids)):
            raise MalformedAnswer("returned a CandidateBlock with rows outside the catalogue")
        return block
    # A plain list (plugins), or a block over another catalogue: one object per candidate.
    return CandidateBlock.from_candidates(list(got)[:k], served.item_ids, served.item_index)


def _check_id(field_name: str, value: str, limit: int) -> None:
    """The shared id check, as this service's :class:`InvalidArgument`."""
    try:
        check_id(value, field_name, limit)
    except FieldError as exc:
        raise InvalidArgument(exc.field, exc.problem) from None


class RetrievalEngine:
    """Runs retrieval against the loaded versions, one per model track.

    With A/B variants, a variant that pins a model version retrieves from
    that version's catalogue, Annoy index and top lists, as ranking scores
    with that version's model; every other variant uses the ``current``
    track. Without variants there is one track.

    Args:
        settings: The retrieval section of the config.
        sources: Built sources, in config order (see :mod:`retrieval_service.registry`).
        redis: ``redis.asyncio`` client (user state and top lists).
        redis_timeout_s: Longest wait for one Redis round trip (a user read, a
            top-list read; ``RecordInteraction``'s write gets four times it).
        experiment: A/B variants (default: none, every call is variant ``default``).
        variant_sources: Per variant, its sources with the variant's overrides
            applied; a variant missing here uses ``sources`` as they are.
        tracing: Span per stage and per source (default: off).
    """

    def __init__(
        self,
        settings: RetrievalSettings,
        sources: Sequence[CandidateSource],
        redis: Any,
        *,
        redis_timeout_s: float = 0.25,
        experiment: Experiment | None = None,
        variant_sources: Mapping[str, Sequence[CandidateSource]] | None = None,
        tracing: Tracing = NOOP,
    ):
        self.settings = settings
        self.sources = list(sources)
        self.by_name = {s.name: s for s in self.sources}
        self.redis = redis
        self.redis_timeout_s = redis_timeout_s
        self.experiment = experiment or Experiment()
        # Model track ("current" or a pinned version) -> its loaded version.
        # Replaced, never mutated, so a batch that took it sees one set.
        self.tracks: dict[str, ServedVersion] = {}
        self.default_track = self.experiment.default.model_version
        self.plans = {v: {s.name: s for s in srcs} for v, srcs in (variant_sources or {}).items()}
        self._source_warnings: dict[str, ThrottledWarning] = {}
        every = [*self.sources, *(s for p in self.plans.values() for s in p.values())]
        # Usual: every source eager, so no request needs to order its sources (_run_sources).
        self._all_eager = all(getattr(s, "eager", False) for s in every)
        self.tracing = tracing
        # Concurrent calls' user reads share one pipeline. The adaptive batch
        # waits (at most 1 ms) only while the server is busy, so a lone call
        # pays nothing; under load redis-py's fixed cost per pipeline is paid
        # once per batch instead of once per call.
        self._user_reads: MicroBatcher[UserRead, StoredUser | Exception] = MicroBatcher(
            self._read_users,
            max_batch_size=64,
            max_wait_s=0.001,
            inline=True,
            adaptive=True,
        )

    async def _read_users(self, reads: list[UserRead]) -> list[StoredUser | Exception]:
        try:
            return await load_users(self.redis, reads, timeout_s=self.redis_timeout_s)
        except _REDIS_ERRORS as exc:
            # Every member's own failure, for hydrate to report (throttled);
            # raised, the batcher logged a traceback per batch.
            return [exc] * len(reads)

    # --- versions -------------------------------------------------------------------

    def load_version(self, path: str | Path) -> ServedVersion:
        """Opens a version and runs every source's ``prepare`` (blocking; use a thread)."""
        compile_kernels()  # the first load builds them (seconds); later ones find them built
        served = load_served_version(path)
        for src in self.sources:
            prepare = getattr(src, "prepare", None)
            if prepare is not None:
                served.source_state[src.name] = prepare(served)
        return served

    async def warm(self, served: ServedVersion) -> int | None:
        """Copies a version's top lists into a new cache before the version serves.

        Without it the first requests on a new version (after a start or a
        swap) all miss the empty copies, and Redis may not hold the read
        script yet: in-process, the first batch of 32 after a load took 66 ms
        and 30 of its answers were degraded (genre and country lists past
        their 50 ms deadlines). One pipelined read of every genre, country
        and popular list of the version, each as wide as a miss would read,
        then each copy's rows converted once. Off with ``retrieval.top_list_cache``.

        Nothing is copied while Redis holds the lists of another build of the
        version (:meth:`lists_build`): a version trained again under its
        number lands, and is loaded, before ``recsys publish`` writes its
        lists; the copy made then kept the old build's lists for good.
        :meth:`lists_changed` says when to call this again.

        Returns:
            How many lists were copied; None when Redis holds another build's
            (the cache is not ``trusted``: requests read the lists from Redis).
            None copied marks the cache ``absent``
            (:class:`~retrieval_service.sources.base.TopListsMissing`).

        Raises:
            RedisUnavailable: The reads failed, or a Redis error of one list's
                read (e.g. a key of the wrong type). The caller swaps anyway:
                the lists are then read on first use, as before.
        """
        if not self.settings.top_list_cache:
            return 0
        # Bounded itself, as the reads below: a caller's timeout cancels only
        # its wait, and the read would otherwise hold a pooled connection.
        build = await self.lists_build(served, timeout_s=WARM_TIMEOUT_S)
        if build is not None and build != served.model.digest:
            served.top_cache.trusted = False
            return None
        cache = served.new_top_cache(build)
        spec, version = served.model.spec, served.version
        keys = [redis_keys.top_genre(version, g) for g in spec.genres]
        keys += [redis_keys.top_country(version, c) for c in spec.countries]
        keys.append(redis_keys.top_popular(version))
        batch = RedisBatch(self.redis, cache=cache, timeout_s=WARM_TIMEOUT_S)
        width = cache.width(1)
        try:
            # Plain entries: each copy's rows are converted once, below.
            await await_each([batch.top(k, width) for k in keys])
        finally:
            # Even part way: every copy is of this build's lists, and a new
            # object leaves requests under way with the one they had.
            served.top_cache = cache
        copied = sum(cache.get_rows(k, width) is not None for k in keys)
        cache.absent = copied == 0
        return copied

    async def lists_build(self, served: ServedVersion, timeout_s: float) -> str | None:
        """The build whose top lists Redis holds under ``served``'s version number.

        ``recsys:v:<version>:build``, the manifest digest ``recsys publish``
        wrote with the lists. None: not written (published before the key
        existed): the build is unknown, and the lists are taken as the served
        build's, as they always were.

        Raises:
            RedisUnavailable: Redis failed, or did not answer within ``timeout_s``.
        """
        try:
            async with asyncio.timeout(timeout_s):
                raw = await self.redis.get(redis_keys.version_build(served.version))
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(f"redis read failed: {type(exc).__name__}") from exc
        return raw.decode() if isinstance(raw, bytes) else raw

    async def lists_changed(self, served: ServedVersion) -> bool:
        """True when Redis's top lists of ``served`` changed build since its cache was made.

        One ``GET`` (:meth:`lists_build`), polled at the version watchers'
        interval; on True, :meth:`warm` makes the cache again. Either Redis now holds
        another build's lists (a version trained again and published, this
        replica not reloaded yet: the cache stops being used), or it holds
        the served build's and the cache was not made from them (not trusted,
        or made while the build was unknown).

        Raises:
            RedisUnavailable: Redis failed, or did not answer within ``redis_timeout_s``.
        """
        if not self.settings.top_list_cache:
            return False
        build = await self.lists_build(served, timeout_s=self.redis_timeout_s)
        cache = served.top_cache
        if build is not None and build != served.model.digest:
            return cache.trusted
        return not cache.trusted or (build is not None and build != cache.build)

    def swap(self, served: ServedVersion, track: str = CURRENT_VERSION) -> None:
        """Makes ``served`` the version of ``track``; calls in flight keep the one they had."""
        self.tracks = {**self.tracks, track: served}

    @property
    def served(self) -> ServedVersion | None:
        """The default variant's version (SimilarItems without a user, RecordInteraction)."""
        return self.tracks.get(self.default_track)

    def ready(self) -> bool:
        """True when every variant's model track has a version loaded."""
        return all(t in self.tracks for t in self.experiment.model_tracks())

    def current(self) -> ServedVersion:
        """The loaded version, or UNAVAILABLE before the first load."""
        served = self.served
        if served is None:
            raise Unavailable("no model version loaded yet")
        return served

    # --- Retrieve ---------------------------------------------------------------------

    def _validate(self, q: RetrieveQuery) -> tuple[int, list[CandidateSource]]:
        s = self.settings
        _check_id("user.user_id", q.user_id, s.max_id_bytes)
        if q.budget < 0 or q.budget > s.max_budget:
            raise InvalidArgument("budget", f"{q.budget} is outside 0..{s.max_budget}")
        lists = (
            ("user.recent_item_ids", q.recent),
            ("user.exclude_item_ids", q.exclude),
            ("sources", q.sources),
        )
        for name, values in lists:
            # Checked before any per-id work so a huge list costs nothing to refuse.
            if len(values) > s.max_request_ids:
                raise InvalidArgument(
                    name, f"{len(values)} entries, at most {s.max_request_ids} allowed"
                )
        # recent is newest first here; the request's list is oldest first,
        # and the message must point at the position the caller sent.
        last = len(q.recent) - 1
        for i, item in enumerate(q.recent):
            _check_id(f"user.recent_item_ids[{last - i}]", item, s.max_id_bytes)
        for i, item in enumerate(q.exclude):
            _check_id(f"user.exclude_item_ids[{i}]", item, s.max_id_bytes)
        f = q.features
        try:
            check_features(
                "user.features",
                age=f.age,
                gender=f.gender,
                occupation=f.occupation,
                country=f.country,
                genre_ratings=f.genre_ratings,
                max_bytes=s.max_id_bytes,
            )
        except FieldError as exc:
            raise InvalidArgument(exc.field, exc.problem) from None
        if q.sources:
            try:
                check_source_names(q.sources, self.by_name, s.max_id_bytes)
            except FieldError as exc:
                raise InvalidArgument(exc.field, exc.problem) from None
            # In config order, whatever the request's: the order decides who
            # wins interleave ties and the budget's last places.
            wanted = set(q.sources)
            chosen = [src for src in self.sources if src.name in wanted]
        else:
            chosen = self.sources
        return q.budget or s.default_budget, chosen

    def _user_read(self, served: ServedVersion, q: RetrieveQuery) -> UserRead:
        return UserRead(served.model.spec, q.user_id, recent_n=self.settings.history_length)

    def _hydrate_limit(self, deadline: float) -> float:
        """The longest wait for the user read."""
        # At most a share of the time left, so the in-memory sources (popular,
        # Annoy) still answer when Redis hangs.
        return min(self.redis_timeout_s, READ_SHARE_OF_DEADLINE * (deadline - time.monotonic()))

    async def hydrate(
        self,
        served: ServedVersion,
        q: RetrieveQuery,
        deadline: float,
        *,
        preread: StoredUser | BaseException | None = None,
        read_s: float = 0.0,
        read_limit: float | None = None,
    ) -> RetrievalContext:
        """Builds the request's context: one pipelined Redis read, then request overrides.

        Redis trouble never fails the call: the context then describes an
        unknown user (plus whatever the request carries) with
        ``hydrate_error`` set, and Redis-backed sources report ERROR.

        Args:
            served: The version the call runs on.
            q: The request.
            deadline: ``time.monotonic()`` by which the call must answer.
            preread: The user as a batch read already got it (or that read's
                error), as :meth:`retrieve_many` passes it; None: read it here.
            read_s: How long the batch read took (``preread`` only).
            read_limit: The longest wait the batch read was given (``preread`` only).
        """
        stored: StoredUser | None = None
        error: str | None = None
        start = time.perf_counter() - read_s
        limit = self._hydrate_limit(deadline) if read_limit is None else read_limit
        try:
            if preread is None:
                async with asyncio.timeout(limit):
                    got = await self._user_reads.submit(self._user_read(served, q))
            else:
                got = preread
            if isinstance(got, BaseException):  # this user's own read failed
                raise got
            stored = got
            if stored.corrupt:
                # The hash does not decode (corrupt or foreign data): served as
                # unknown, but its watched set and recent list, read fine, apply.
                error = "user state unavailable: ValueError"
                metrics.HYDRATE_FAILURES.inc()
                log.warning(
                    "hydrate failed",
                    extra={"fields": {"user": q.user_id, "error": f"{error}: {stored.corrupt}"}},
                )
        except TimeoutError as exc:  # asyncio's: the wait ran out (Redis' own are RedisError)
            # The caller's fault only when its deadline, not redis_timeout_s,
            # set a wait shorter than a healthy read needs.
            if limit < self.redis_timeout_s and limit < HEALTHY_READ_S:
                # The caller's deadline was too short to wait for Redis: not a Redis fault.
                error = "user state not read within the request's deadline"
                metrics.HYDRATE_CUT_SHORT.inc()
            else:
                error = "user state unavailable: TimeoutError"
                metrics.HYDRATE_FAILURES.inc()
                _log_redis_down(describe_error(exc, waited=f"{limit * 1e3:.0f} ms"))
        except _REDIS_ERRORS as exc:
            error = f"user state unavailable: {type(exc).__name__}"
            metrics.HYDRATE_FAILURES.inc()
            _log_redis_down(exc)  # every request hits it while Redis is down
        except ValueError as exc:
            # This user's hash does not decode (corrupt or foreign data); that
            # user is served as unknown, like when Redis is down.
            error = f"user state unavailable: {type(exc).__name__}"
            metrics.HYDRATE_FAILURES.inc()
            log.warning(
                "hydrate failed",
                extra={"fields": {"user": q.user_id, "error": f"{error}: {exc}"[:300]}},
            )
        metrics.HYDRATE_LATENCY.observe(time.perf_counter() - start)
        read = stored
        if stored is None:
            stored = StoredUser(q.user_id, known=False)
        f = q.features
        p = stored.profile
        profile = UserProfile(
            age=f.age if f.age else p.age,
            gender=f.gender or p.gender,
            occupation=f.occupation or p.occupation,
            country=f.country or p.country,
        )
        agg = stored.aggregates
        stated = (agg is None or agg.watch_count == 0) and bool(f.genre_ratings)
        if stated:
            agg = aggregates_from_genre_ratings(served.model.spec, f.genre_ratings)
        cache = served.top_cache
        if not (self.settings.top_list_cache and cache.trusted):
            cache = None  # off, or Redis holds another build's lists: read them, keep none
        # A corrupt hash came from a Redis that answered: its top lists still can.
        reachable = error is None or (read is not None and bool(read.corrupt))
        batch = RedisBatch(
            self.redis, available=reachable, cache=cache, timeout_s=self.redis_timeout_s
        )
        batch.round_trips = 1  # the hydration pipeline
        # A request's history may be a raw watch log: repeats would crowd
        # distinct seeds out of similar-to-recent (stored history is distinct).
        recent = (
            list(dict.fromkeys(q.recent))[: self.settings.history_length]
            if q.recent
            else stored.recent
        )
        return RetrievalContext(
            user_id=q.user_id,
            known=stored.known,
            profile=profile,
            aggregates=agg,
            recent=recent,
            watched=stored.watched,
            excluded=set(q.exclude),
            country=profile.country,
            served=served,
            deadline=deadline,
            redis=batch,
            hydrate_error=error,
            recent_from_request=bool(q.recent),
            stored=read,
            stated_genres=stated,
        )

    def _report(
        self,
        src: CandidateSource,
        ctx: RetrievalContext,
        k: int,
        start: float,
        limit: float,
        variant: str,
        got: Sequence[Any] | None = None,
        exc: BaseException | None = None,
    ) -> tuple[SourceReport, CandidateBlock | None]:
        """Report, metrics and block of one finished source run (``got`` or ``exc``)."""
        block: CandidateBlock | None = None
        count = 0
        status, message = SourceStatus.OK, ""
        # The engine's own words (a malformed answer, a source's cancellation)
        # are safe to send; a plugin's exception text is for the log only.
        ours = isinstance(exc, SourceRaised) or _builtin(src)
        if exc is None and not isinstance(got, CandidateBlock):
            if not hasattr(got, "__iter__"):  # None, say: the engine's words, safe to send
                exc, ours = TypeError(f"returned {type(got).__name__}, not candidates"), True
            else:
                try:
                    # Runs the plugin's own code when it answered with a generator.
                    got = list(got)  # type: ignore[arg-type]  # any iterable
                except Exception as bad:
                    exc = bad
        if exc is None:
            try:
                block = _as_block(got, k, ctx.served, trusted=_builtin(src))
                count = min(len(got), k)
            except MalformedAnswer as bad:  # the engine's check of the answer: its words
                exc, ours = bad, True
            except Exception as bad:  # the plugin's code (a Candidate's property): the log's
                exc = bad
        if isinstance(exc, TimeoutError):
            status, block = SourceStatus.TIMEOUT, None
            message = f"no answer within {max(limit, 0) * 1e3:.0f} ms"
        elif exc is not None:
            status, block = SourceStatus.ERROR, None
            message = describe_error(exc)[:200]
            logged = message
            if not ours:
                message = f"{type(exc).__name__} (details in the retrieval service's log)"
            # An outage fails it on every request: one line per source and interval.
            warn = self._source_warnings.get(src.name)
            if warn is None:
                warn = self._source_warnings[src.name] = ThrottledWarning(
                    log, "source failed: %s (%d since last report)"
                )
            warn(logged, {"source": src.name, "user": ctx.user_id, "error": logged})
        elapsed = time.perf_counter() - start
        latency, counts = metrics.source_children(src.name, variant)
        latency.observe(elapsed)
        metrics.source_status(src.name, status.value, variant).inc()
        counts.observe(count)
        return SourceReport(src.name, status, count, elapsed * 1e3, message), block

    async def _run_source(
        self,
        src: CandidateSource,
        ctx: RetrievalContext,
        k: int,
        stop_at: float,
        variant: str = "default",
        left_behind: Callable[[], bool] = lambda: False,
    ) -> tuple[SourceReport, CandidateBlock | None] | None:
        """One source under its limit; None when the request already reported it as left behind."""
        start = time.perf_counter()
        limit = min(src.config.timeout_ms / 1000.0, stop_at - time.monotonic())
        got: Any = None
        exc: Exception | None = None
        try:
            if limit <= 0:
                raise TimeoutError
            got = await _source_within(src.retrieve(ctx, k), limit)
        except Exception as e:  # one broken source must not fail the call
            exc = e
        if left_behind():  # counted once, by the request that stopped waiting for it
            return None
        return self._report(src, ctx, k, start, limit, variant, got=got, exc=exc)

    async def _run_sources(
        self,
        chosen: Sequence[CandidateSource],
        ctx: RetrievalContext,
        asks: Mapping[str, int],
        stop_at: float,
        variant: str,
    ) -> list[tuple[SourceReport, CandidateBlock | None]]:
        """Runs the sources concurrently, each under its own deadline.

        A source whose class sets ``eager`` runs inline, in the request's
        task, up to its first suspension: the built-ins usually never suspend
        (in-memory lists, Annoy, top lists already copied), so they cost no
        task and no timer. Only a source that does suspend (a Redis read)
        continues in a task of its own under its deadline, which it joins
        having already queued its reads, so every source's reads still share
        one pipeline.
        """
        out: list[tuple[SourceReport, CandidateBlock | None] | None] = [None] * len(chosen)
        waiting: list[tuple[int, CandidateSource, float, float, asyncio.Task]] = []
        longest = 0.0
        # Tasks first: an eager source's first read schedules the batch's flush,
        # and a task created after it would queue its reads in a second round trip.
        order: Sequence[int] = range(len(chosen))
        if not self._all_eager:
            order = sorted(order, key=lambda j: getattr(chosen[j], "eager", False))
        for i in order:
            src = chosen[i]
            k = asks[src.name]
            start = time.perf_counter()
            limit = min(src.config.timeout_ms / 1000.0, stop_at - time.monotonic())
            if limit <= 0:
                out[i] = self._report(src, ctx, k, start, limit, variant, exc=TimeoutError())
                continue
            work: Awaitable[Any]
            if getattr(src, "eager", False):
                coro = src.retrieve(ctx, k)
                try:
                    yielded = coro.send(None)
                except StopIteration as done:
                    out[i] = self._report(src, ctx, k, start, limit, variant, got=done.value)
                    continue
                except Exception as exc:
                    if isinstance(exc, TimeoutError):  # raised before any wait: not its limit
                        exc = _own_timeout(limit)
                    out[i] = self._report(src, ctx, k, start, limit, variant, exc=exc)
                    continue
                except asyncio.CancelledError:
                    # Raised before its first suspension: nothing cancelled it.
                    out[i] = self._report(src, ctx, k, start, limit, variant, exc=_own_cancel())
                    continue
                work = _Resumed(coro, yielded)
                left = limit - (time.perf_counter() - start)
            else:
                work, left = src.retrieve(ctx, k), limit
            task = asyncio.get_running_loop().create_task(_source_within(work, left))
            waiting.append((i, src, start, limit, task))
            longest = max(longest, left)
        if waiting:
            # Not far past the longest source limit: one that swallows its
            # cancellation must not hold the request to the request's deadline.
            sources_stop = time.monotonic() + longest + SOURCES_GRACE_S
            done = await _wait_until([w[-1] for w in waiting], min(stop_at, sources_stop))
            for (i, src, start, limit, _), got in zip(waiting, done, strict=True):
                k = asks[src.name]
                if isinstance(got, asyncio.CancelledError):
                    raise got  # the request itself was cancelled
                if isinstance(got, BaseException):
                    out[i] = self._report(src, ctx, k, start, limit, variant, exc=got)
                else:
                    out[i] = self._report(src, ctx, k, start, limit, variant, got=got)
        return out  # type: ignore[return-value]

    async def retrieve(self, q: RetrieveQuery, *, timeout_s: float | None = None) -> RetrieveResult:
        """Runs one ``Retrieve``.

        Args:
            q: The request.
            timeout_s: Time left on the caller's deadline (None: no deadline set).

        Raises:
            InvalidArgument: A field is malformed (the message names it).
            Unavailable: No version loaded, or every source failed.
            DeadlineExceeded: The deadline left no time for the sources, or
                passed before any of them answered.
        """
        plan = self._plan(q, self.tracks)
        deadline = time.monotonic() + (DEFAULT_DEADLINE_S if timeout_s is None else timeout_s)
        return await self._retrieve(q, plan, deadline)

    def _plan(self, q: RetrieveQuery, tracks: Mapping[str, ServedVersion]) -> _Plan:
        """The checks done before any I/O: fields, sources, variant, its loaded version."""
        budget, chosen = self._validate(q)
        variant = self._variant(q.user_id, q.variant)
        chosen = self._for_variant(chosen, variant)
        served = self._served_for(variant, tracks)
        try:
            if q.features.genre_ratings:  # every track's genres: see check_genre_names
                specs = [t.model.spec for t in tracks.values()]
                check_genre_names(specs, q.features.genre_ratings, "user.features")
        except FieldError as exc:
            raise InvalidArgument(exc.field, exc.problem) from None
        return _Plan(budget, chosen, variant, served)

    @staticmethod
    def _served_for(variant: Variant, tracks: Mapping[str, ServedVersion]) -> ServedVersion:
        """The loaded version of ``variant``'s model track."""
        served = tracks.get(variant.model_version)
        if served is None:
            if not tracks:
                raise Unavailable("no model version loaded yet")
            raise Unavailable(
                f"variant {variant.name!r}: model version {variant.model_version} is not loaded yet"
            )
        return served

    async def retrieve_many(
        self, queries: Sequence[RetrieveQuery], *, timeout_s: float | None = None
    ) -> list[RetrieveResult | Exception]:
        """Runs several ``Retrieve``s as one batch (what ``RetrieveMany`` carries).

        The same stages as :meth:`retrieve`, with two batch-level savings:
        every member's user is read in one pipelined round trip before any
        member starts, and a member whose sources answer without waiting (the
        usual case: in-memory lists, Annoy, top lists already copied) runs to
        the end inline, with no task of its own. A member that does wait (a
        Redis read of a top list) continues in a task, so members still
        overlap their I/O.

        Returns:
            One entry per query, in order: its result, or the exception it
            raised (a domain error such as :class:`InvalidArgument`, or a bug),
            so one bad member does not fail the others.
        """
        out: list[RetrieveResult | Exception | None] = [None] * len(queries)
        tracks = self.tracks  # one set of versions for the whole batch
        deadline = time.monotonic() + (DEFAULT_DEADLINE_S if timeout_s is None else timeout_s)
        plans: list[tuple[int, _Plan]] = []
        for i, q in enumerate(queries):
            try:
                plans.append((i, self._plan(q, tracks)))
            except Exception as exc:  # refused before any I/O: costs the others nothing
                out[i] = exc
        if not plans:
            return out  # type: ignore[return-value]
        start = time.perf_counter()
        limit = self._hydrate_limit(deadline)
        users: list[StoredUser | Exception]
        try:
            async with asyncio.timeout(limit):
                users = await load_users(
                    self.redis, [self._user_read(plan.served, queries[i]) for i, plan in plans]
                )
        except (*_REDIS_ERRORS, ValueError) as exc:
            users = [exc] * len(plans)
        read_s = time.perf_counter() - start
        waiting: list[tuple[int, asyncio.Task]] = []
        loop = asyncio.get_running_loop()
        for (i, plan), user in zip(plans, users, strict=True):
            coro = self._retrieve(
                queries[i], plan, deadline, preread=user, read_s=read_s, read_limit=limit
            )
            try:
                yielded = coro.send(None)
            except StopIteration as done:
                out[i] = done.value
                continue
            except Exception as exc:
                out[i] = exc
                continue
            waiting.append((i, loop.create_task(_within(_Resumed(coro, yielded), None))))
        if waiting:
            done = await asyncio.gather(*(t for _, t in waiting), return_exceptions=True)
            for (i, _), got in zip(waiting, done, strict=True):
                if isinstance(got, asyncio.CancelledError):
                    raise got  # the whole batch was cancelled
                if isinstance(got, BaseException) and not isinstance(got, Exception):
                    raise got
                out[i] = got
        return out  # type: ignore[return-value]

    async def _retrieve(
        self,
        q: RetrieveQuery,
        plan: _Plan,
        deadline: float,
        *,
        preread: StoredUser | BaseException | None = None,
        read_s: float = 0.0,
        read_limit: float | None = None,
    ) -> RetrieveResult:
        budget, chosen, variant, served = plan
        tr = self.tracing
        with tr.span("retrieval.hydrate") as span:
            ctx = await self.hydrate(
                served, q, deadline, preread=preread, read_s=read_s, read_limit=read_limit
            )
            if tr.enabled:
                span.set_attributes(
                    {
                        "recsys.user.known": ctx.known,
                        "recsys.recent": len(ctx.recent),
                        "recsys.watched": len(ctx.watched),
                        "recsys.degraded": ctx.hydrate_error is not None,
                    }
                )
        # The whole request history, not only the part kept as seeds: an item
        # the caller says was watched must not come back.
        excluded = ctx.watched | ctx.excluded | set(ctx.recent) | set(q.recent)
        n_excluded = len(excluded)
        # Only ids in the catalogue: the others drop nothing.
        excluded_rows = served.rows_of(excluded, n_excluded)
        # Ask for a little more than the quota when filtering will drop some,
        # so refill rarely needs the last-resort pad (but not so much more that
        # reading and parsing the extra doubles the cost of a heavy watcher).
        n_dropping = len(excluded_rows)
        asks = {}
        for src in chosen:
            k = min(src.config.budget, budget)
            asks[src.name] = k + min(n_dropping, k // 2)
        # Sources stop a little before the caller's deadline so the merge and
        # the response still arrive in time.
        total = deadline - time.monotonic()
        stop_at = deadline - min(MAX_RESERVE_S, max(MIN_RESERVE_S, 0.1 * total))
        if stop_at <= time.monotonic():
            raise DeadlineExceeded("the deadline passed before the candidate sources could run")
        if tr.enabled:  # a span per source: each in a task of its own
            runs = await self._run_traced(chosen, ctx, asks, stop_at, variant.name)
        else:
            runs = await self._run_sources(chosen, ctx, asks, stop_at, variant.name)
        reports = [r for r, _ in runs]
        ok = [(src, b) for src, (r, b) in zip(chosen, runs, strict=True) if b is not None]
        if not ok and chosen:
            detail = ", ".join(f"{r.source}: {r.status.value} ({r.message})" for r in reports)
            if time.monotonic() >= stop_at and all(
                r.status is SourceStatus.TIMEOUT for r in reports
            ):
                # Not an outage: the caller's deadline was too short (and not worth a retry).
                raise DeadlineExceeded(f"the deadline passed before any source answered: {detail}")
            raise Unavailable(f"every candidate source failed: {detail}", retry=False)
        blocks = [b for _, b in ok]
        lanes = [
            Lane(s.name, s.config.weight, min(s.config.budget, budget), s.config.tier)
            for s, _ in ok
        ]
        # Credited to a popular-tier source that answered: one that timed out
        # or failed must not be named as the provenance of the pad.
        # The built-in popular source first: the pad is its list, and another
        # popular-tier source (a plugin's "trending") never proposed those items.
        tier = [s for s, _ in ok if s.config.tier == "popular"]
        pad_source = next((s.name for s in tier if isinstance(s, PopularSource)), None)
        if pad_source is None and tier:
            pad_source = tier[0].name
        pad = None
        if pad_source is not None:
            pad = (pad_source, served.popular_rows, served.popular_row_scores)
        # Filter (watched, excluded, recent), interleave, refill, pad and
        # attribution run as one pass: one span.
        with tr.span("retrieval.merge") as span, served.marks() as marks:
            selection, kept = assemble(
                blocks,
                lanes,
                [s.name for s in chosen],
                budget,
                marks,
                excluded_rows,
                pad,
            )
            if tr.enabled:
                span.set_attributes(
                    {
                        "recsys.candidates_in": sum(len(b) for b in blocks),
                        "recsys.candidates_kept": kept,
                        "recsys.excluded": n_excluded,
                        "recsys.budget": budget,
                        "recsys.returned": len(selection),
                    }
                )
        degraded = len(ok) < len(chosen) or ctx.hydrate_error is not None
        metrics.REDIS_ROUND_TRIPS.observe(ctx.redis.round_trips)
        metrics.RETURNED.observe(len(selection))
        return RetrieveResult(
            selection,
            served.item_ids,
            reports,
            served.version,
            degraded,
            ctx.redis.round_trips,
            variant.name,
            served.model.catalogue_id,
            ctx.stored,
            served.model.spec,
        )

    def _variant(self, user_id: str, forced: str, field_name: str = "user.variant") -> Variant:
        try:
            return self.experiment.resolve(user_id, forced, field_name)
        except UnknownVariant as exc:
            raise InvalidArgument(exc.field, str(exc).split(": ", 1)[1]) from exc

    def _for_variant(
        self, chosen: list[CandidateSource], variant: Variant
    ) -> list[CandidateSource]:
        """The chosen sources as the variant configures them (overrides, some disabled)."""
        plan = self.plans.get(variant.name)
        if plan is None:
            return chosen
        # May be empty: the request named only sources this arm disables. The
        # caller cannot see its arm, so that is an empty answer, not an error.
        return [plan[s.name] for s in chosen if s.name in plan]

    async def _run_traced(
        self,
        chosen: Sequence[CandidateSource],
        ctx: RetrievalContext,
        asks: Mapping[str, int],
        stop_at: float,
        variant: str,
    ) -> list[tuple[SourceReport, CandidateBlock | None]]:
        """:meth:`_run_sources` with a span per source, each in a task of its own."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        left: set[int] = set()
        longest = max(s.config.timeout_ms for s in chosen) / 1000.0 if chosen else 0.0
        sources_stop = min(stop_at, time.monotonic() + longest + SOURCES_GRACE_S)
        tasks = [
            loop.create_task(
                self._traced_source(s, ctx, asks[s.name], stop_at, variant, lambda i=i: i in left)
            )
            for i, s in enumerate(chosen)
        ]
        done = await _wait_until(tasks, sources_stop)
        left.update(i for i, got in enumerate(done) if isinstance(got, TimeoutError))
        runs = []
        for src, got in zip(chosen, done, strict=True):
            if isinstance(got, TimeoutError):  # left behind: it swallowed its cancellation
                limit = src.config.timeout_ms / 1000.0
                got = self._report(src, ctx, asks[src.name], start, limit, variant, exc=got)
            elif isinstance(got, BaseException):
                raise got  # the request itself was cancelled
            runs.append(got)
        return runs

    async def _traced_source(
        self,
        src: CandidateSource,
        ctx: RetrievalContext,
        k: int,
        stop_at: float,
        variant: str,
        left_behind: Callable[[], bool],
    ) -> tuple[SourceReport, CandidateBlock | None] | None:
        with self.tracing.span(f"retrieval.source.{src.name}") as span:
            run = await self._run_source(src, ctx, k, stop_at, variant, left_behind)
            if run is None:
                return None
            report, cands = run
            span.set_attributes(
                {
                    "recsys.source": src.name,
                    "recsys.asked": k,
                    "recsys.count": report.count,
                    "recsys.status": report.status.value,
                }
            )
            return report, cands

    # --- SimilarItems -------------------------------------------------------------------

    def similar(
        self, item_id: str, k: int, *, user_id: str = "", variant: str = ""
    ) -> tuple[list[Neighbour], str, str]:
        """The ``k`` nearest items to ``item_id`` (itself excluded), the version and variant used.

        Args:
            item_id: The query item.
            k: Neighbours wanted.
            user_id: Who they are for (optional): the user's experiment
                variant picks the model version, as for ``Retrieve``.
                Without it (and without ``variant``), the default variant's.
            variant: Forces a variant by name.

        Raises:
            InvalidArgument: Empty/oversized id, ``k`` outside 1..max_similar_k,
                an oversized ``user_id``, or a ``variant`` that is not configured.
            NotFound: ``item_id`` is not in that version's catalogue.
            Unavailable: That version is not loaded yet.
        """
        limit = self.settings.max_id_bytes
        _check_id("item_id", item_id, limit)
        if k <= 0 or k > self.settings.max_similar_k:
            raise InvalidArgument("k", f"{k} is outside 1..{self.settings.max_similar_k}")
        if user_id:
            _check_id("user_id", user_id, limit)
        # Without a user or a forced variant this is the default variant's track.
        chosen = self._variant(user_id, variant, "variant")
        served = self._served_for(chosen, self.tracks)
        if item_id not in served.item_index:
            raise NotFound(f"item_id {item_id!r} is not in catalogue version {served.version}")
        return served.similar(item_id, k), served.version, chosen.name

    # --- RecordInteraction -----------------------------------------------------------

    async def record(
        self,
        user_id: str,
        item_id: str,
        rating: float | None,
        timestamp: int = 0,
        event_id: str = "",
        dedupe_window_s: int = 0,
    ) -> Recorded:
        """Records one interaction, all of it or none of it.

        Args:
            user_id: Who interacted.
            item_id: With what; must be in the served catalogue.
            rating: Explicit rating, or None for an implicit watch.
            timestamp: Event time (validated; the history is kept in arrival order).
            event_id: Idempotency key: a retry with the same key is not counted again.
            dedupe_window_s: How long the key is remembered (0: a day, the most).

        Raises:
            InvalidArgument: Bad id, rating outside the version's scale, negative timestamp.
            NotFound: ``item_id`` is not in the served catalogue.
            FailedPrecondition: The user's stored keys are corrupt; nothing was written.
            Unavailable: Redis could not be written (the write may have landed:
                retry with the same ``event_id``).
        """
        limit = self.settings.max_id_bytes
        _check_id("user_id", user_id, limit)
        _check_id("item_id", item_id, limit)
        if event_id:
            _check_id("event_id", event_id, limit)
        if timestamp < 0:
            raise InvalidArgument("timestamp", f"{timestamp} is negative")
        if dedupe_window_s > EVENT_TTL_S:
            raise InvalidArgument(
                "dedupe_window_s", f"{dedupe_window_s} is more than {EVENT_TTL_S} (24 h)"
            )
        served = self.current()
        spec = served.model.spec
        if rating is not None and not (
            math.isfinite(rating) and spec.rating_min <= rating <= spec.rating_max
        ):
            raise InvalidArgument(
                "rating", f"{rating} is outside {spec.rating_min:g}..{spec.rating_max:g}"
            )
        row = served.item_index.get(item_id)
        if row is None:
            raise NotFound(f"item_id {item_id!r} is not in catalogue version {served.version}")
        try:
            async with asyncio.timeout(self.redis_timeout_s * 4):
                return await record_interaction(
                    self.redis,
                    spec,
                    user_id,
                    item_id,
                    served.model.item_genre_names(row),
                    rating,
                    history_length=self.settings.history_length,
                    event_id=event_id,
                    event_ttl_s=dedupe_window_s,
                    log_length=self.settings.interaction_log_length,
                    timestamp=timestamp,
                )
        except CorruptUserState as exc:
            log.error("corrupt user state", extra={"fields": {"user": user_id, "error": str(exc)}})
            raise FailedPrecondition(
                f"user {shown(user_id)}'s stored state cannot be updated: {exc}"
            ) from exc
        except _REDIS_ERRORS as exc:
            raise Unavailable(f"cannot record the interaction: {type(exc).__name__}") from exc
