"""The candidate-source plugin interface.

A source is a class registered under the entry-point group
``recsys.candidate_sources`` (see ``docs/architecture.md``, "Adding a
candidate source"). It pairs with a pydantic config model and implements one
coroutine::

    class MySource:
        config_model = MyConfig            # subclass of SourceConfig

        def __init__(self, config: MyConfig): ...
        async def retrieve(self, ctx: RetrievalContext, k: int) -> Sequence[Candidate]: ...

        # optional: per-version precomputation, run in a worker thread at load
        def prepare(self, served: ServedVersion) -> object: ...

Sources see only plain dataclasses (never protobuf messages). They read the
user from the hydrated :class:`RetrievalContext` (built once per request) and
read Redis sorted sets through ``ctx.redis.top(...)``, which batches the reads
of every source of one request into one pipelined round trip. Filtering,
deduplication, truncation and timeouts belong to the framework.

A source may return a plain list of :class:`Candidate` or a
:class:`CandidateBlock`: the same answer held as numpy arrays over the served
catalogue's rows, which still reads as a ``Sequence[Candidate]``. The
built-in sources return blocks, so the engine merges, filters and
interleaves their answers without a Python object per candidate.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Literal,
    Protocol,
    TypeVar,
    overload,
    runtime_checkable,
)

import numpy as np
from numba import njit
from pydantic import BaseModel, ConfigDict, Field, field_validator
from redis.exceptions import NoScriptError

from recsys import redis_keys
from recsys.capped import CappedDict
from recsys.features import UserAggregates, UserProfile
from recsys.features import top_genres as _rank_genres
from recsys.rows import RowMarks
from recsys.user_store import StoredUser

if TYPE_CHECKING:
    from recsys.artifacts import ModelVersion
    from retrieval_service.served import ServedVersion

_SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")

# Fallback chain when filtering leaves fewer candidates than the budget:
# leftovers of personalised sources first, then segment lists (genre,
# country), then popularity.
Tier = Literal["personalised", "segment", "popular"]
TIERS: tuple[Tier, ...] = ("personalised", "segment", "popular")


@dataclass(slots=True)
class Candidate:
    """One item a source proposes (treat as immutable once returned).

    Attributes:
        item_id: Catalogue id.
        score: Source-specific score, higher is better; None when the source has none.
        seed_item_id: For similarity sources, the watched item this one is near.
        genre: For per-genre sources, the genre list it came from.
    """

    item_id: str
    score: float | None = None
    seed_item_id: str | None = None
    genre: str | None = None


_NO_NAMES: tuple[str, ...] = ()


class CandidateBlock(Sequence[Candidate]):
    """Candidates as parallel arrays over one served version's catalogue, best first.

    Indexing or iterating yields :class:`Candidate` objects built on access,
    so a block is a valid answer wherever ``Sequence[Candidate]`` is
    expected; the engine reads the arrays instead and never builds them.

    Args:
        item_ids: The served catalogue (``ServedVersion.item_ids``); ``rows`` index it.
        rows: int64 [n] catalogue rows, each at most once, all ``>= 0``.
        scores: float64 [n] scores, NaN where there is none; None: no scores at all.
        seeds: int64 [n] index into ``seed_ids`` (-1: no seed item), or None.
        seed_ids: The seed item ids ``seeds`` refers to.
        genres: int64 [n] index into ``genre_names`` (-1: no genre), or None.
        genre_names: The genres ``genres`` refers to.
    """

    __slots__ = ("genre_names", "genres", "item_ids", "rows", "scores", "seed_ids", "seeds")

    def __init__(
        self,
        item_ids: Sequence[str],
        rows: np.ndarray,
        scores: np.ndarray | None = None,
        *,
        seeds: np.ndarray | None = None,
        seed_ids: Sequence[str] = _NO_NAMES,
        genres: np.ndarray | None = None,
        genre_names: Sequence[str] = _NO_NAMES,
    ):
        self.item_ids = item_ids
        self.rows = rows
        self.scores = scores
        self.seeds = seeds
        self.seed_ids = seed_ids
        self.genres = genres
        self.genre_names = genre_names

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @overload
    def __getitem__(self, i: int) -> Candidate: ...

    @overload
    def __getitem__(self, i: slice) -> CandidateBlock: ...

    def __getitem__(self, i: int | slice) -> Candidate | CandidateBlock:
        if isinstance(i, slice):
            return CandidateBlock(
                self.item_ids,
                self.rows[i],
                None if self.scores is None else self.scores[i],
                seeds=None if self.seeds is None else self.seeds[i],
                seed_ids=self.seed_ids,
                genres=None if self.genres is None else self.genres[i],
                genre_names=self.genre_names,
            )
        row = int(self.rows[i])  # raises IndexError past the end, as a list would
        score = None if self.scores is None else float(self.scores[i])
        seed = -1 if self.seeds is None else int(self.seeds[i])
        genre = -1 if self.genres is None else int(self.genres[i])
        return Candidate(
            self.item_ids[row],
            None if score is None or math.isnan(score) else score,
            self.seed_ids[seed] if seed >= 0 else None,
            self.genre_names[genre] if genre >= 0 else None,
        )

    def __iter__(self) -> Iterator[Candidate]:
        for i in range(len(self)):
            yield self[i]

    @classmethod
    def from_candidates(
        cls, cands: Sequence[Candidate], item_ids: Sequence[str], index: Mapping[str, int]
    ) -> CandidateBlock:
        """The block form of a plain candidate list (a plugin's answer).

        Ids outside the catalogue and repeats of an id (the first proposal
        wins) are left out, as the engine's filter would drop them anyway.

        Raises:
            MalformedAnswer: An entry is not a :class:`Candidate` with a string
                id, a numeric score and text (or None) for its seed item and
                genre.
        """
        rows: list[int] = []
        scores: list[float] = []
        seeds: list[int] = []
        genres: list[int] = []
        seed_ids: dict[str, int] = {}
        genre_names: dict[str, int] = {}
        seen: set[int] = set()
        get = index.get
        for c in cands:
            if not isinstance(c, Candidate):
                raise MalformedAnswer(f"returned {type(c).__name__}, not Candidate")
            item_id = c.item_id
            if not isinstance(item_id, str):
                # No repr: a plugin's object could say anything in it.
                raise MalformedAnswer(f"an item_id is {type(item_id).__name__}, not str")
            row = get(item_id, -1)
            if row < 0 or row in seen:
                continue
            seen.add(row)
            rows.append(row)
            score = c.score
            if score is not None and not isinstance(score, int | float | np.number):
                raise MalformedAnswer(
                    f"score of {item_id!r} is {type(score).__name__}, not a number"
                )
            try:
                scores.append(math.nan if score is None else float(score))
            except OverflowError:  # an int beyond float's range
                raise MalformedAnswer(f"score of {item_id!r} is out of range") from None
            if c.seed_item_id is not None:
                check_text(c.seed_item_id, f"seed_item_id of {item_id!r}")
            if c.genre is not None:
                check_text(c.genre, f"genre of {item_id!r}")
            seeds.append(
                seed_ids.setdefault(c.seed_item_id, len(seed_ids)) if c.seed_item_id else -1
            )
            genres.append(genre_names.setdefault(c.genre, len(genre_names)) if c.genre else -1)
        return cls(
            item_ids,
            np.asarray(rows, np.int64),
            np.asarray(scores, np.float64),
            seeds=np.asarray(seeds, np.int64) if seed_ids else None,
            seed_ids=list(seed_ids),
            genres=np.asarray(genres, np.int64) if genre_names else None,
            genre_names=list(genre_names),
        )


class MalformedAnswer(TypeError):
    """A source's answer the engine cannot use, in the engine's words.

    Its message is safe to send to clients; an exception a plugin's own code
    raises (a property of a ``Candidate`` subclass, say) is not, so the engine
    tells the two apart by this type.
    """


def check_text(value: Any, what: str) -> None:
    """Raises :class:`MalformedAnswer` unless ``value`` is a str the answer's UTF-8 can carry."""
    if not isinstance(value, str):
        raise MalformedAnswer(f"{what} is {type(value).__name__}, not str")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedAnswer(f"{what} is not valid UTF-8 text: {value!r}") from None


@dataclass(frozen=True)
class TopRows:
    """A top list as arrays over the served catalogue: ids outside it are left out."""

    rows: np.ndarray  # int64, best first
    scores: np.ndarray  # float64


_EMPTY_ROWS = TopRows(np.zeros(0, np.int64), np.zeros(0, np.float64))


def top_rows(entries: Sequence[tuple[str, float]], index: Mapping[str, int]) -> TopRows:
    """``[(member, score), ...]`` as catalogue rows and scores, unknown members dropped."""
    if not entries:
        return _EMPTY_ROWS
    n = len(entries)
    members = (m for m, _ in entries)
    rows = np.fromiter(map(index.get, members, repeat(-1)), np.int64, n)
    scores = np.fromiter((s for _, s in entries), np.float64, n)
    known = rows >= 0
    if not known.all():
        rows, scores = rows[known], scores[known]
    return TopRows(rows, scores)


def round_robin(
    rows: np.ndarray, k: int, marks: RowMarks, exclude: Sequence[int] = ()
) -> np.ndarray:
    """Round-robin over the columns of a ``[rank, list]`` matrix of rows, each row once.

    Reads rank 0 of every list (in column order), then rank 1, and so on,
    skipping ``-1`` padding, rows in ``exclude`` and rows already taken.

    Returns:
        At most ``k`` flat indices into ``rows`` (``index % n_columns`` is the list).
    """
    ex_stamp, ex_g = marks.scratch(0)
    if len(exclude):
        ex_stamp[np.asarray(exclude, np.int64)] = ex_g
    stamp, taken = marks.scratch(1)
    return _round_robin(rows.ravel(), max(k, 0), ex_stamp, ex_g, stamp, taken)


@njit(cache=True, boundscheck=True)
def _round_robin(flat, k, ex_stamp, ex_g, stamp, taken):  # pragma: no cover - compiled
    """:func:`round_robin` over the flattened matrix: one pass, no temporaries."""
    out = np.empty(min(k, flat.shape[0]), np.int64)
    n = 0
    for i in range(flat.shape[0]):
        if n >= k:
            break
        r = flat[i]
        if r < 0 or ex_stamp[r] == ex_g or stamp[r] == taken:
            continue
        stamp[r] = taken
        out[n] = i
        n += 1
    return out[:n]


class SourceConfig(BaseModel):
    """Settings every source has; subclasses add their own and narrow ``type``.

    Unknown keys are rejected so a typo in the config fails at startup.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Unique snake_case name: report key, metric label, log field.")
    type: str = Field(description="Entry-point name of the source class.")
    budget: int = Field(
        100,
        ge=1,
        description="Candidates this source contributes in the first pass (its quota). When "
        "filtering leaves the answer short, refill may take up to half as many again from "
        "what the source over-fetched for that purpose.",
    )
    weight: float = Field(1.0, gt=0, description="Share of interleave turns relative to others.")
    timeout_ms: float = Field(50.0, gt=0, description="Own deadline (capped by the request's).")
    tier: Tier = Field(
        "personalised", description="Place in the refill fallback chain (see TIERS)."
    )

    @field_validator("name")
    @classmethod
    def _snake_case(cls, v: str) -> str:
        if not _SNAKE.match(v):
            raise ValueError(f"source name {v!r} must be snake_case ([a-z][a-z0-9_]*)")
        return v


@runtime_checkable
class CandidateSource(Protocol):
    """What the framework needs from a source (see the module docstring)."""

    name: str
    config: SourceConfig

    async def retrieve(self, ctx: RetrievalContext, k: int) -> Sequence[Candidate]:
        """Returns at most ``k`` candidates, best first."""
        ...


class SourceBase:
    """Convenience base for sources: stores the config and exposes ``name``.

    Attributes:
        eager: Lets the engine run ``retrieve`` inline in the request's task
            until it first suspends (and skip the task and timer altogether
            when it never does). Only for sources that neither enter
            ``asyncio.timeout``/``TaskGroup`` nor use ``current_task()``
            before their first ``await``: the rest of the call may run in
            another task. Off by default; the built-ins set it.
        contract_config: Config keys the contract suite
            (``tests/integration/test_retrieval_sources.py``) adds when it
            builds the source: values for keys the config requires.
    """

    config_model: ClassVar[type[SourceConfig]] = SourceConfig
    eager: ClassVar[bool] = False
    contract_config: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, config: SourceConfig):
        self.config = config
        self.name = config.name

    def prepare(self, served: ServedVersion) -> Any:
        """Per-version precomputation; the result is ``ctx.state_for(self)``."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class RedisUnavailable(ConnectionError):
    """Redis could not be reached for this request; Redis-backed sources report ERROR."""


class TopListsMissing(RedisUnavailable):
    """The served version has no top lists in Redis at all (never published, or removed).

    A ``RedisUnavailable``: sources that fall back from Redis to memory do
    so for it too.
    """


class TopListCache:
    """Sorted-set ranges of one served version, kept in process after their first read.

    Only keys under the version's own prefix (``recsys:v:<version>:``) are
    kept. Those are model outputs that ``recsys publish`` writes before it
    moves the version pointer; a republish of the same build writes the same
    lists, each renamed whole over the old one, so a copy cannot go stale (or
    be taken from an emptied list) while its build is served; the cache
    lives on the :class:`~retrieval_service.served.ServedVersion` and is
    dropped with it on the next swap. A version number trained again names
    another build with other lists: Redis says whose lists it holds
    (``recsys:v:<version>:build``), and while that names another build the
    engine hands requests no cache (``trusted`` False) and reads the lists
    through; once it names the served build, a new cache is filled
    (:meth:`~retrieval_service.engine.RetrievalEngine.warm`). Redis stays
    the source: every entry is filled from a real read. An empty reply (a
    list not published yet, a segment with no list) is not kept, so it is
    read again next time. Bounded by key count; past the bound, reads simply
    go to Redis.

    ``absent`` is set when the copy made before the version served found
    none of its lists in Redis. Until a read finds one, an empty reply of
    this version then fails with :class:`TopListsMissing`, so the sources
    report an error (and the answer is degraded) instead of quietly
    answering nothing.

    Args:
        version: The served version; only its keys are cached.
        max_keys: Most keys kept.
        min_width: Entries fetched on a miss, at least, so the slightly
            different ``n`` of later requests are served from the copy.
        build: What ``recsys:v:<version>:build`` said when the copies were
            made (None: not written, by a publish from before it existed).
    """

    def __init__(
        self,
        version: str,
        *,
        max_keys: int = 4096,
        min_width: int = 1000,
        index: Mapping[str, int] | None = None,
        build: str | None = None,
    ):
        self.version = version
        self.prefix = redis_keys.version_prefix(version)
        self.build = build
        # False once Redis holds another build's lists: requests get no cache.
        self.trusted = True
        self.absent = False
        self.max_keys = max_keys
        self.min_width = min_width
        self.index = index
        # key -> (entries best first, how many were asked for)
        self._lists: dict[str, tuple[list[tuple[str, float]], int]] = {}
        # key -> the same entries as catalogue rows (-1: unknown id) and scores,
        # converted once on first use instead of once per request.
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}
        # Answers that sources derive from copied lists only (see :meth:`remember`).
        self._derived: CappedDict[Hashable, Any] = CappedDict(max_keys)

    def recall(self, key: Hashable) -> Any:
        """What :meth:`remember` kept under ``key``, or None."""
        return self._derived.get(key)

    def remember(self, key: Hashable, value: Any) -> None:
        """Keeps a source's answer computed from this cache's copies alone.

        The copies are of lists that never change while the build is
        served, so such an answer stays right for the cache's lifetime, and a
        source asked the same question again (the same favourite genres, the
        same ``k``) can skip the work. At most ``max_keys`` answers, emptied
        when full so the questions asked now fill it again; the value must
        not be mutated by whoever recalls it.
        """
        self._derived.put(key, value)

    def cacheable(self, key: str) -> bool:
        """True for keys of this version's model outputs."""
        return key.startswith(self.prefix)

    def width(self, n: int) -> int:
        """How many entries to read for a request of ``n`` on a miss."""
        return max(n, self.min_width)

    def get(self, key: str, n: int) -> list[tuple[str, float]] | None:
        """The top ``n`` entries of ``key`` if the copy covers them, else None."""
        got = self._lists.get(key)
        if got is None:
            return None
        entries, asked = got
        # Fewer entries than asked for means the copy is the whole list.
        if n <= asked or len(entries) < asked:
            return entries[:n]
        return None

    def get_rows(self, key: str, n: int) -> TopRows | None:
        """The top ``n`` entries of ``key`` as catalogue rows, if the copy covers them.

        Needs the catalogue ``index``; ids outside it are left out.
        """
        if self.index is None or self.get(key, n) is None:
            return None
        arrays = self._arrays.get(key)
        if arrays is None or arrays[0].shape[0] != len(self._lists[key][0]):
            entries = self._lists[key][0]
            m = len(entries)
            rows = np.fromiter(
                map(self.index.get, (e for e, _ in entries), repeat(-1)), np.int64, m
            )
            scores = np.fromiter((sc for _, sc in entries), np.float64, m)
            arrays = (rows, scores, bool((rows >= 0).all()))
            self._arrays[key] = arrays
        rows, scores, all_known = arrays
        rows, scores = rows[:n], scores[:n]
        if not all_known:
            known = rows >= 0
            rows, scores = rows[known], scores[known]
        return TopRows(rows, scores)

    def put(self, key: str, entries: list[tuple[str, float]], asked: int) -> None:
        """Keeps a reply of ``asked`` entries (no-op for other versions' or empty replies)."""
        if not entries or not self.cacheable(key):
            return
        self.absent = False  # the lists are there after all (published since)
        old = self._lists.get(key)
        if old is None and len(self._lists) >= self.max_keys:
            return
        if old is None or asked > old[1]:
            self._lists[key] = (entries, asked)

    def missing(self) -> TopListsMissing:
        """The error of an empty read while the version's lists are ``absent``."""
        return TopListsMissing(
            f"version {self.version} has no top lists in Redis (not published, or removed)"
        )

    def __len__(self) -> int:
        return len(self._lists)


class RedisBatch:
    """Coalesces the sorted-set reads of one request into one pipelined round trip.

    DataLoader style: the first ``top()`` call in an event-loop tick schedules
    a flush with ``call_soon``; every source task that starts in the same tick
    queues its reads before the flush runs, so N concurrent sources cost one
    round trip. Identical keys are read once. Each range comes back as one
    JSON string from a tiny server-side script (see ``_read``). With a
    :class:`TopListCache`, ranges already copied from Redis for the served
    version are answered without a round trip. ``timeout_s`` bounds each
    round trip (the services' client has no per-read socket timeout).
    """

    def __init__(
        self,
        redis: Any,
        *,
        available: bool = True,
        cache: TopListCache | None = None,
        timeout_s: float | None = None,
    ):
        self._redis = redis
        self._timeout_s = timeout_s
        self._available = available and redis is not None
        self._cache = cache
        self._pending: list[tuple[str, int, asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()
        self.round_trips = 0

    @property
    def available(self) -> bool:
        """False when hydration already found Redis unreachable."""
        return self._available

    @property
    def cache(self) -> TopListCache | None:
        """The served version's copies of its top lists (None: caching is off)."""
        return self._cache

    def top(self, key: str, n: int) -> asyncio.Future[list[tuple[str, float]]]:
        """Queues a read of the ``n`` highest-scored members of sorted set ``key``.

        The read is queued when this is *called* (not when awaited), so a
        source can issue several reads and then await them, one round trip.

        Returns:
            A future of ``[(member, score), ...]``, best first; it raises
            :class:`RedisUnavailable` when Redis is down (or was found down
            during hydration).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        if not self._available:
            fut.set_exception(RedisUnavailable("redis unavailable"))
        elif n <= 0:
            fut.set_result([])
        elif self._cache is not None and (hit := self._cache.get(key, n)) is not None:
            fut.set_result(hit)
        else:
            self._pending.append((key, n, fut))
            if len(self._pending) == 1:
                loop.call_soon(self._flush)
        return fut

    def top_rows(self, key: str, n: int, index: Mapping[str, int]) -> asyncio.Future[TopRows]:
        """:meth:`top` as catalogue rows and scores (ids outside ``index`` left out).

        Queued the same way as :meth:`top` (shares its round trip). A range
        already copied for the served version is answered from arrays
        converted once per version, so a cached read costs no per-entry work.
        """
        loop = asyncio.get_running_loop()
        cache = self._cache
        if (
            self._available
            and n > 0
            and cache is not None
            and cache.index is index
            and (hit := cache.get_rows(key, n)) is not None
        ):
            fut: asyncio.Future[TopRows] = loop.create_future()
            fut.set_result(hit)
            return fut
        inner = self.top(key, n)
        out: asyncio.Future[TopRows] = loop.create_future()

        def convert(done: asyncio.Future) -> None:
            if done.cancelled():
                out.cancel()
                return
            exc = done.exception()  # read even when unused: no "never retrieved" warning
            if out.done():  # the reading source was cancelled
                return
            if exc is not None:
                out.set_exception(exc)
            else:
                out.set_result(top_rows(done.result(), index))

        inner.add_done_callback(convert)
        return out

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[str, int, asyncio.Future]]) -> None:
        cache = self._cache
        widest: dict[str, int] = {}
        for key, n, _ in batch:
            if cache is not None and cache.cacheable(key):
                n = cache.width(n)
            widest[key] = max(widest.get(key, 0), n)
        keys = list(widest)
        try:
            # The sources waiting on these reads have deadlines of their own;
            # this bound frees the read (and its connection) if Redis stalls.
            async with asyncio.timeout(self._timeout_s):
                results = await self._read(keys, [widest[k] for k in keys])
        except Exception as exc:
            err = RedisUnavailable(f"redis read failed: {type(exc).__name__}")
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        by_key = dict(zip(keys, results, strict=True))
        if cache is not None:
            for key, res in by_key.items():
                if not isinstance(res, Exception):
                    cache.put(key, res, widest[key])
        absent = cache if cache is not None and cache.absent else None
        for key, n, fut in batch:
            if fut.done():  # the waiting source was cancelled (timeout)
                continue
            res = by_key[key]
            if isinstance(res, Exception):
                fut.set_exception(res)
            elif absent is not None and not res and absent.cacheable(key):
                fut.set_exception(absent.missing())
            else:
                fut.set_result(res[:n])

    async def _read(self, keys: list[str], ns: list[int]) -> list[Any]:
        # One EVALSHA per key (single-key scripts stay Redis Cluster safe), all
        # in one pipeline. The script returns each range as one JSON string,
        # which costs one bulk reply to parse instead of three per entry in
        # redis-py's pure-Python RESP parser: most of a request's CPU otherwise.
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for key, n in zip(keys, ns, strict=True):
                pipe.evalsha(_TOP_SHA, 1, key, n)
            self.round_trips += 1
            replies = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                # Only after a Redis restart or SCRIPT FLUSH: load it, go again.
                self.round_trips += 1
                await self._redis.script_load(_TOP_SCRIPT)
                continue
            return [r if isinstance(r, Exception) else _decode_top(r) for r in replies]
        raise RedisUnavailable("top-list script could not be loaded")


# Returns ZREVRANGE key 0 n-1 WITHSCORES as one JSON array [member, score, ...].
_TOP_SCRIPT = (
    "local r = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES') "
    "if #r == 0 then return '[]' end "
    "return cjson.encode(r)"
)
_TOP_SHA = hashlib.sha1(_TOP_SCRIPT.encode()).hexdigest()


T = TypeVar("T")


async def await_each(futures: Sequence[asyncio.Future[T]]) -> list[T]:
    """Results of ``futures`` in order, awaited one by one.

    For reads a source queued together (one pipeline): awaiting done
    futures does not suspend, so a source answered from copies stays
    inline, where ``asyncio.gather`` would always suspend once. When one
    raises (or the source is cancelled), the others' outcomes are still
    consumed as they land, so asyncio does not log "Future exception was
    never retrieved" for each of them.
    """
    out: list[T] = []
    try:
        for fut in futures:
            out.append(await fut)
    except BaseException:
        for fut in futures:
            fut.add_done_callback(_consume)
        raise
    return out


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # marks it retrieved


def _decode_top(reply: bytes | str) -> list[tuple[str, float]]:
    flat = json.loads(reply)
    return [(m, float(sc)) for m, sc in zip(flat[::2], flat[1::2], strict=True)]


@dataclass
class RetrievalContext:
    """Everything a request knows about its user, built once and shared by all sources.

    Attributes:
        user_id: The requesting user.
        known: Whether Redis holds any state for the user.
        profile: Demographics (request overrides applied).
        aggregates: Running feature aggregates, or None for a user with none.
        recent: Recent item ids, newest first (the request's override when given).
        watched: Every item the user interacted with (stored set).
        excluded: Extra ids the request asked to exclude.
        country: Country bucket (request first, then profile), or None.
        served: The loaded version this request runs against.
        deadline: ``time.monotonic()`` by which the whole request must answer.
        redis: Batched sorted-set reader (see :class:`RedisBatch`).
        hydrate_error: Why hydration fell back to an empty user, if it did.
        recent_from_request: True when ``recent`` is the request's override
            (so it is valid even when hydration failed).
        stored: The user exactly as read from Redis (no request overrides);
            None when the read failed.
        stated_genres: ``aggregates`` come from the request's own
            ``genre_ratings`` (a cold start), not from a history.
    """

    user_id: str
    known: bool
    profile: UserProfile
    aggregates: UserAggregates | None
    recent: list[str]
    watched: set[str]
    excluded: set[str]
    country: str | None
    served: ServedVersion
    deadline: float
    redis: RedisBatch
    hydrate_error: str | None = None
    recent_from_request: bool = False
    stored: StoredUser | None = None
    stated_genres: bool = False
    _genres: list[str] | None = field(default=None, repr=False)

    @property
    def version(self) -> ModelVersion:
        """The serving model version (feature spec, catalogue, artifacts)."""
        return self.served.model

    @property
    def version_id(self) -> str:
        """Version string, for version-scoped Redis keys."""
        return self.served.version

    def top_genres(self, n: int) -> list[str]:
        """The user's ``n`` favourite genres (most watched, ties by mean rating)."""
        if self._genres is None:
            agg = self.aggregates
            spec = self.version.spec
            self._genres = (
                []
                if agg is None
                else _rank_genres(spec, agg, len(spec.genres), stated=self.stated_genres)
            )
        return self._genres[:n]

    def remaining_s(self) -> float:
        """Seconds left before the request deadline (may be negative)."""
        return self.deadline - time.monotonic()

    def state_for(self, source: CandidateSource) -> Any:
        """What ``source.prepare`` computed for the served version (None if nothing)."""
        return self.served.source_state.get(source.name)

    def top_rows(self, key: str, n: int) -> asyncio.Future[TopRows]:
        """``ctx.redis.top`` as rows of the served catalogue (see :meth:`RedisBatch.top_rows`)."""
        return self.redis.top_rows(key, n, self.served.item_index)
