"""The ranking service's domain logic, free of gRPC types at its interface.

:class:`Ranker` turns a validated query into ranked items: it pins the
model version at the start of the request (a swap mid-request does not
affect it), reads the user in one Redis round trip, maps ids to rows,
drops unknown and watched items, and hands the rest to the micro-batcher.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from opentelemetry.trace import SpanKind

from ranking_service import metrics as M
from ranking_service.model import LoadedModel, ScoreRequest, ScoreResult, score_batch
from ranking_service.retrieval_client import (
    RetrievalAnswer,
    RetrievalClient,
    RetrievalRejected,
    RetrievalUnavailable,
)
from ranking_service.users import UserQuery, feature_rows, fetch_users, resolve_inputs
from ranking_service.validation import RankQuery, RecommendQuery
from recsys.batching import MicroBatcher
from recsys.capped import CappedDict
from recsys.config import CURRENT_VERSION
from recsys.errors import ThrottledWarning
from recsys.experiments import Experiment, Variant
from recsys.explain import TOP_IN_COUNTRY, Reason, explain, source_kinds
from recsys.features import check_genre_names
from recsys.tracing import NOOP, Tracing
from recsys.user_store import READ_SHARE_OF_DEADLINE, StoredUser, state_from_pb

# Shortest wait for a batch's user read, even for a caller out of time (a
# local Redis answers in well under a millisecond).
MIN_READ_S = 0.002

# Most distinct provenances whose reasons are kept per model version.
REASON_CACHE_ENTRIES = 50_000

log = logging.getLogger("ranking_service.core")
_log_fallback = ThrottledWarning(
    log, "recommend falls back to the popular list: %s (%d since last report)"
)


class NoModel(RuntimeError):
    """No version is loaded yet (the RPC answers UNAVAILABLE)."""


@dataclass
class RankedItem:
    """One ranked item: catalogue row, score on the target scale and raw dot."""

    row: int
    item_id: str
    score: float
    raw: float
    candidate: Any = None  # recsys.v1.Candidate from retrieval (Recommend only)
    # Recommend only; shared between answers (see Ranker._explain), never mutated.
    reasons: Sequence[Reason] = ()
    sources: tuple[str, ...] = ()  # the candidate's retrieval sources (Recommend only)
    # (sources, seed, genre, country): what ``reasons`` were built from; None without a candidate.
    why: tuple[tuple[str, ...], str, str, str] | None = None
    # (sources, seed, genre) of ``candidate`` when read ahead from a packed answer.
    provenance: tuple[tuple[str, ...], str, str] | None = None


@dataclass
class RankJob:
    """One request's share of a micro-batch; the batch fills in the outputs."""

    model: LoadedModel
    user: UserQuery
    rows: np.ndarray  # known, deduplicated candidate rows; watched ones removed by the batch
    k: int
    with_watched: bool
    trace: dict[str, Any] | None = None  # stage times (epoch ns) when tracing
    # The user's stored state when the caller already has it (retrieval passed
    # it on): the batch then reads nothing from Redis for this job.
    prefetched: StoredUser | None = None
    deadline: float | None = None  # time.monotonic() when the caller stops waiting
    # Rank without reading Redis (its caller gave up on a slow read: _rank_rows).
    skip_read: bool = False
    started: bool = False  # set when its batch starts
    reading: bool = False  # set by the batch while this job's user read is out
    # Outputs.
    stored: StoredUser | None = None
    redis_failed: bool = False
    watched: int = 0
    source: str = "default"
    result: ScoreResult | None = None


@dataclass
class RankOutcome:
    """The answer to a Rank or Recommend, with the version that produced it."""

    model: LoadedModel
    items: list[RankedItem]
    unknown_dropped: int = 0
    watched_dropped: int = 0
    feature_source: str = "default"
    reports: Sequence[Any] = field(default_factory=list)
    index_version: str = ""
    fallback_reason: str = ""
    variant: str = ""
    country: str = ""  # the user's, for a regional reason


class Ranker:
    """Scores candidates for users with the current model version.

    Args:
        batcher: Micro-batcher whose function is :func:`score_batch`.
        redis: ``redis.asyncio`` client for user state, or None.
        redis_timeout_s: Longest wait for a batch's user read.
        retrieval: Client for Recommend, or None (Recommend then always
            answers from the popular list).
        experiment: A/B variants (default: none; everything is variant ``default``).
        kinds: Retrieval source name -> reason kind (:func:`recsys.explain.source_kinds`).
        tracing: Spans per stage (default: off).
    """

    def __init__(
        self,
        *,
        max_batch_size: int = 64,
        batch_timeout_ms: float = 5.0,
        score_in_thread: bool = False,
        redis=None,
        redis_timeout_s: float = 0.25,
        retrieval: RetrievalClient | None = None,
        experiment: Experiment | None = None,
        kinds: dict[str, str] | None = None,
        tracing: Tracing = NOOP,
    ):
        # One micro-batch = one Redis read for its users, one feature matrix,
        # one tower call per model version and one gather/dot (_run_jobs).
        self.batcher: MicroBatcher[RankJob, RankJob] = MicroBatcher(
            self._run_jobs,
            max_batch_size=max_batch_size,
            max_wait_s=batch_timeout_ms / 1000.0,
            on_batch=M.BATCH_SIZE.observe,
            inline=True,
            adaptive=True,
        )
        # On a GPU the scoring waits on the device: a worker thread keeps the
        # loop serving meanwhile. On a CPU it would only add hand-offs.
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="ranking-score")
            if score_in_thread
            else None
        )
        self.redis = redis
        self.redis_timeout_s = redis_timeout_s
        self.retrieval = retrieval
        self.experiment = experiment or Experiment()
        self.kinds = kinds if kinds is not None else source_kinds(())
        # The sources whose reason names the user's country: only their items'
        # reasons depend on it, so only their cache keys carry it (a caller
        # sending distinct countries would otherwise make every key new).
        self._country_sources = frozenset(s for s, k in self.kinds.items() if k == TOP_IN_COUNTRY)
        self.tracing = tracing
        # Per model version: (sources, seed, genre, country) -> reasons. Few
        # distinct provenances recur across answers, and explaining one (with
        # its seed's title) cost about as much as scoring.
        self._reasons: weakref.WeakKeyDictionary[
            LoadedModel, CappedDict[tuple[tuple[str, ...], str, str, str], tuple[Reason, ...]]
        ] = weakref.WeakKeyDictionary()
        # One loaded model per model track ("current" or a pinned version);
        # ``model`` is the default variant's, the one callers without a variant get.
        self.models: dict[str, LoadedModel] = {}
        self.default_track = self.experiment.default.model_version
        self.model: LoadedModel | None = None

    def swap(self, model: LoadedModel, track: str = CURRENT_VERSION) -> None:
        """Makes ``model`` the one of ``track`` with one reference assignment."""
        self.models[track] = model
        if track == self.default_track:
            self.model = model
            M.CATALOGUE_ITEMS.set(len(model.index))
            M.MODEL_LOAD_SECONDS.set(model.load_seconds)

    def ready(self) -> bool:
        """True when every variant's model track has a model loaded."""
        return all(t in self.models for t in self.experiment.model_tracks())

    def variant_for(self, user: UserQuery) -> Variant:
        """The request's variant: forced by the request, else the user's bucket.

        Raises:
            UnknownVariant: The request forces a variant that is not configured.
        """
        return self.experiment.resolve(user.user_id, user.variant)

    def _check_genres(self, user: UserQuery) -> None:
        """Refuses cold-start genres no served model knows (every track: see check_genre_names)."""
        if user.genre_ratings:
            models = [self.model, *self.models.values()]
            specs = [m.version.spec for m in models if m is not None]
            check_genre_names(specs, user.genre_ratings, "user.features")

    def require_model(self, variant: Variant | None = None) -> LoadedModel:
        """The variant's current model, pinned by the caller for the whole request."""
        model = self.model if variant is None else self.models.get(variant.model_version)
        if model is None:
            which = f" for variant {variant.name!r}" if variant is not None else ""
            raise NoModel(f"no model version loaded yet{which}")
        return model

    async def rank(self, query: RankQuery, time_remaining: float | None = None) -> RankOutcome:
        """Answers a Rank request (``time_remaining``: seconds left on its deadline)."""
        variant = self.variant_for(query.user)
        model = self.require_model(variant)
        self._check_genres(query.user)
        rows = query.rows(model.index)
        out = await self._rank_rows(
            model,
            query.user,
            rows,
            query.k,
            query.include_watched,
            variant=variant.name,
            deadline=_deadline(time_remaining),
        )
        out.variant = variant.name
        return out

    async def recommend(self, query: RecommendQuery, time_remaining: float | None) -> RankOutcome:
        """Answers a Recommend request; retrieval failing falls back to the popular list.

        Raises:
            RetrievalRejected: Retrieval found the request invalid.
            NoModel: Nothing to rank with.
            UnknownVariant: The request forces a variant that is not configured.
        """
        deadline = _deadline(time_remaining)
        variant = self.variant_for(query.user)
        model = self.require_model(variant)
        self._check_genres(query.user)
        answer: RetrievalAnswer | None = None
        rows: np.ndarray | None = None
        reason = ""
        tr = self.tracing
        if self.retrieval is None:
            reason = "no retrieval service configured"
        else:
            user = query.raw_user
            if self.experiment.active and user.variant != variant.name:  # type: ignore[attr-defined]
                # Retrieval applies the same variant's sources and budgets.
                user = type(user)()
                user.CopyFrom(query.raw_user)  # type: ignore[attr-defined]
                user.variant = variant.name
            try:
                with tr.span("ranking.retrieve", kind=SpanKind.CLIENT) as span:
                    answer = await self.retrieval.retrieve(
                        user,
                        query.budget,
                        query.sources,
                        time_remaining,
                        source_scores=query.debug,
                        # The retrieval span joins this trace through a traceparent.
                        trace_metadata=tr.inject(None) or (),
                        catalogue=model.version,
                        user_state=True,
                    )
                    if tr.enabled:
                        span.set_attribute("recsys.candidates", len(answer.candidates))
            except RetrievalUnavailable as exc:
                reason = exc.reason
                M.RETRIEVAL_FALLBACK.labels(exc.code, variant.name).inc()
            except RetrievalRejected as exc:
                # An arm ranking chose itself that retrieval does not know: a
                # config rollout half done. Not the caller's error (it named
                # no variant), so an answer from the popular list.
                forced = query.raw_user.variant  # type: ignore[attr-defined]
                if forced or not str(exc).startswith("user.variant:"):
                    raise
                reason = f"retrieval does not serve variant {variant.name!r} yet"
                M.RETRIEVAL_FALLBACK.labels("UNKNOWN_VARIANT", variant.name).inc()
            else:
                # A caller that named its sources gets what they found, even
                # nothing; popular items would be from sources it did not ask for.
                if len(answer.candidates) == 0 and not query.sources:
                    reason = "retrieval returned no candidates"
                    M.RETRIEVAL_FALLBACK.labels("EMPTY", variant.name).inc()
                elif not query.sources:
                    rows = self._candidate_rows(model, answer)
                    if rows.shape[0] and not (rows >= 0).any():
                        # The two services' versions out of step: an empty
                        # answer, unflagged, where the popular list would do.
                        reason = (
                            "none of retrieval's candidates is in the ranking model's catalogue"
                        )
                        M.RETRIEVAL_FALLBACK.labels("UNKNOWN_CANDIDATES", variant.name).inc()
        if reason:
            # Every request repeats it while retrieval is down: one line per interval.
            _log_fallback(reason)
            limit = query.budget or len(model.popular_rows)
            rows = model.popular_rows[:limit]
            out = await self._rank_rows(
                model, query.user, rows, query.k, False, variant=variant.name, deadline=deadline
            )
            scores = model.popular_score_of
            for item in out.items:
                item.candidate = _popular_candidate(item.item_id, scores.get(item.row, 0.0))
            out.fallback_reason = reason
            out.variant = variant.name
            if answer is not None:  # retrieval did answer (with nothing): say what it found
                out.reports = answer.reports
                out.index_version = answer.index_version
            self._explain(out)
            return out
        assert answer is not None
        cands = answer.candidates
        # Rows come straight off the wire when retrieval shares the model's
        # catalogue, else the packed id list maps to rows; provenance is only
        # built for the winners below.
        if rows is None:
            rows = self._candidate_rows(model, answer)
        # Retrieval already read the user's state (passed on unless its read
        # failed) and dropped the stored watched set, so only the request's
        # own exclusions are applied here: no Redis read for this request.
        stored = None
        if answer.user_state is not None:
            stored = state_from_pb(model.version.spec, query.user.user_id, answer.user_state)
        (M.STATE_FROM_RETRIEVAL if stored is not None else M.STATE_READ_HERE).inc()
        out = await self._rank_rows(
            model,
            query.user,
            rows,
            query.k,
            False,
            # No state passed on: retrieval's read failed (or an old retrieval),
            # so it filtered nothing it could not read; this read drops it.
            read_watched=answer.user_state is None,
            variant=variant.name,
            stored=stored,
            deadline=deadline,
        )
        # Provenance of the winners: position of each top row among the candidates,
        # through the model's catalogue-sized scratch (no sort; winners are known,
        # distinct rows).
        if out.items:
            top = np.array([it.row for it in out.items], np.int64)
            # Reversed, so a candidate a misbehaving retrieval repeated takes
            # the first copy's provenance, the copy it was scored as.
            known = np.flatnonzero(rows >= 0)[::-1]
            where = model.marks.position_scratch()
            where[rows[known]] = known
            pos = where[top].tolist()
            read_many = getattr(cands, "provenance_many", None)  # packed: one read for all
            provenance = read_many(pos) if read_many is not None else [None] * len(pos)
            for it, p, prov in zip(out.items, pos, provenance, strict=True):
                it.candidate = cands[p]
                it.provenance = prov
        out.reports = answer.reports
        out.index_version = answer.index_version
        out.variant = variant.name
        self._explain(out)
        return out

    @staticmethod
    def _candidate_rows(model, answer: RetrievalAnswer) -> np.ndarray:
        """The candidates' rows in the model's catalogue (-1: unknown to it)."""
        if answer.rows is not None:
            return answer.rows.astype(np.int64)
        return model.index.lookup(answer.item_ids)

    def _explain(self, out: RankOutcome) -> None:
        """Attaches sources and reasons to the winners, from their retrieval provenance."""
        model = out.model
        cache = self._reasons.get(model)
        if cache is None:
            cache = self._reasons[model] = CappedDict(REASON_CACHE_ENTRIES)
        country = out.country or ""
        by_country = self._country_sources
        for it in out.items:
            c = it.candidate
            if c is None:
                continue
            if it.provenance is not None:  # read from a packed answer with the others
                sources, seed, genre = it.provenance
            else:
                sources, seed, genre = tuple(c.sources), c.seed_item_id or "", c.genre or ""
            it.sources = sources
            regional = country if not by_country.isdisjoint(sources) else ""
            it.why = key = (sources, seed, genre, regional)
            reasons = cache.get(key)
            if reasons is None:
                reasons = tuple(
                    explain(c, kinds=self.kinds, title_of=model.title_of, country=regional)
                )
                cache.put(key, reasons)
            it.reasons = reasons

    async def _rank_rows(
        self,
        model: LoadedModel,
        user: UserQuery,
        rows: np.ndarray,
        k: int,
        include_watched: bool,
        *,
        read_watched: bool = True,
        variant: str = "default",
        stored: StoredUser | None = None,
        deadline: float | None = None,
    ) -> RankOutcome:
        known = rows >= 0
        unknown = int(rows.shape[0] - np.count_nonzero(known))
        if unknown:
            M.UNKNOWN_IDS.inc(unknown)
        rows = rows[known]
        # Duplicates would be scored twice and could fill top-k with one item.
        rows = rows[model.marks.first(rows)]
        with_watched = read_watched and not include_watched
        if with_watched:
            stored = None  # a passed-on state has no watched set
        tr = self.tracing
        job = RankJob(
            model,
            user,
            rows,
            k,
            with_watched,
            {} if tr.enabled else None,
            prefetched=stored,
            deadline=deadline,
        )
        if deadline is None or stored is not None or self._share(deadline) >= self.redis_timeout_s:
            # No read, or time for the longest read a batch makes: nothing to
            # escape from, and no timer and shield per call.
            await self.batcher.submit(job)
        else:
            job = await self._submit_within_share(job)
        if job.redis_failed:
            M.REDIS_ERRORS.inc()
        if job.watched:
            M.WATCHED_DROPPED.inc(job.watched)
        M.user_features(job.source, variant).inc()
        out = RankOutcome(model, [], unknown, job.watched, job.source)
        stored = job.stored
        out.country = user.country or (
            (stored.profile.country or "") if stored is not None and stored.known else ""
        )
        trace = job.trace
        if trace:
            # The batch ran outside this request's span; its stage times become spans here.
            tr.record(
                "ranking.hydrate",
                *trace["hydrate"],
                attributes={
                    "recsys.feature_source": job.source,
                    "recsys.unknown_dropped": unknown,
                    "recsys.watched_dropped": job.watched,
                    "recsys.candidates": int(job.rows.size),
                    "recsys.redis_failed": job.redis_failed,
                    "recsys.batch_size": trace["batch_size"],
                },
            )
            if "user_tower" in trace:
                for stage, attrs in (
                    ("user_tower", {"recsys.batch_size": trace["batch_size"]}),
                    ("score", {"recsys.candidates": trace["candidates"],
                               "recsys.batch_candidates": trace["batch_candidates"]}),
                    ("top_k", {"recsys.k": k, "recsys.returned": int(job.result.rows.size)
                               if job.result is not None else 0}),
                ):  # fmt: skip
                    start, end = trace[stage]
                    tr.record(f"ranking.{stage}", start, end, attributes=attrs)
        res = job.result
        if res is None:
            return out
        scores = model.version.target.from_model(res.dots)
        out.items = [
            RankedItem(row=r, item_id=model.item_id(r), score=s, raw=d)
            for r, s, d in zip(res.rows.tolist(), scores.tolist(), res.dots.tolist(), strict=True)
        ]
        return out

    async def _run_jobs(self, jobs: list[RankJob]) -> list[RankJob]:
        """One micro-batch: hydrate every user in one round trip, featurise, score."""
        traced = any(j.trace is not None for j in jobs)
        t0 = time.time_ns() if traced else 0
        for j in jobs:
            j.started = True
            j.reading = j.prefetched is None and not j.skip_read
        got = await fetch_users(
            self.redis,
            [
                (j.model.version.spec, j.user.user_id, j.with_watched) if j.reading else None
                for j in jobs
            ],
            timeout_s=self._read_limit(jobs),
        )
        inputs = []
        for j, (stored, failed) in zip(jobs, got, strict=True):
            j.reading = False
            if j.prefetched is not None:
                stored, failed = j.prefetched, False
            elif j.skip_read:
                stored, failed = None, True  # its caller gave up on the read
            j.stored, j.redis_failed = stored, failed
            drop: list[str] = list(j.user.exclude_item_ids)
            if j.with_watched:
                # The request's own history is watched too, Redis or not (the
                # popular fallback returned it; retrieval drops it).
                drop.extend(j.user.recent_item_ids)
                if stored is not None:
                    drop.extend(stored.watched)
            if drop and j.rows.size:
                dropped = j.model.index.lookup(drop)
                marks = j.model.marks
                g = marks.mark(0, dropped[dropped >= 0])
                mask = marks.has(0, g, j.rows)
                j.watched = int(np.count_nonzero(mask))
                if j.watched:
                    j.rows = j.rows[~mask]
            inputs.append(resolve_inputs(j.model.version.spec, stored, j.user))
        # One feature matrix per model version in the batch.
        by_model: dict[int, list[int]] = {}
        for i, j in enumerate(jobs):
            by_model.setdefault(id(j.model), []).append(i)
        requests: list[ScoreRequest] = []
        owners: list[RankJob] = []
        for idx in by_model.values():
            model = jobs[idx[0]].model
            feats = feature_rows(
                model.version.spec, [inputs[i] for i in idx], model.default_features
            )
            for row, i in enumerate(idx):
                j = jobs[i]
                j.source = inputs[i][2] if inputs[i] is not None else "default"
                if j.rows.size:
                    requests.append(ScoreRequest(model, feats[row], j.rows, j.k, j.trace))
                    owners.append(j)
        t1 = time.time_ns() if traced else 0
        for j in jobs:
            if j.trace is not None:
                j.trace.update(hydrate=(t0, t1), batch_size=len(jobs))
        if requests:
            M.BATCH_CANDIDATES.observe(sum(r.rows.shape[0] for r in requests))
            if self._executor is not None:
                loop = asyncio.get_running_loop()
                results = await loop.run_in_executor(self._executor, score_batch, requests)
            else:
                results = score_batch(requests)
            for j, r in zip(owners, results, strict=True):
                j.result = r
        return jobs

    async def _submit_within_share(self, job: RankJob) -> RankJob:
        """Submits a job that reads Redis; its caller stops waiting for a slow read.

        The batch's read may wait for its most patient caller (_read_limit).
        This caller waits its own share of its time. If its job is then still
        queued or its read still out, it is ranked alone without the read
        (request and default features), outside the batcher, so no other
        caller's read can hold it, and it still answers before its deadline.
        A job already past its read (scoring) is waited for. The first job,
        if its batch started, stays there for its other callers.
        """
        assert job.deadline is not None
        own = self._share(job.deadline)
        fut = self.batcher.enqueue(job)
        try:
            async with asyncio.timeout(own + self.batcher.max_wait_s):
                await asyncio.shield(fut)
            return job
        except TimeoutError:
            if job.started and not job.reading:
                await fut  # read done, scoring: its answer is moments away
                return job
        except asyncio.CancelledError:
            fut.cancel()  # the caller is gone: withdrawn if its batch has not started
            raise
        if not job.started:
            fut.cancel()  # still queued: withdrawn, it never costs a read
        else:
            fut.add_done_callback(_consume)  # its batch may still fail: nobody reads it
        alone = dataclasses.replace(job, skip_read=True, reading=False, started=False)
        await self._run_jobs([alone])
        return alone

    def _share(self, deadline: float) -> float:
        """The longest a user read may wait for a caller with ``deadline``."""
        left = READ_SHARE_OF_DEADLINE * (deadline - time.monotonic())
        return max(min(self.redis_timeout_s, left), MIN_READ_S)

    def _read_limit(self, jobs: Sequence[RankJob]) -> float:
        """How long the batch's user read may wait: a share of its most patient caller's time.

        Past it the users are ranked from request and default features, so a
        hung Redis gives degraded answers rather than DEADLINE_EXCEEDED. The
        most patient caller sets it, not the most hurried: one caller about
        to give up must not cut the read short, and so degrade, for the
        whole batch; a hurried caller stops waiting on its own
        (:meth:`_submit_within_share`).
        """
        deadlines = [j.deadline for j in jobs if j.prefetched is None and not j.skip_read]
        if not deadlines or None in deadlines:
            return self.redis_timeout_s
        return self._share(max(deadlines))  # type: ignore[type-var]

    async def close(self) -> None:
        """Stops the batcher and closes clients."""
        await self.batcher.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self.retrieval is not None:
            await self.retrieval.close()


def _consume(fut: asyncio.Future) -> None:
    """Retrieves an abandoned result so a failure is not logged as never retrieved."""
    if not fut.cancelled():
        fut.exception()


def _deadline(time_remaining: float | None) -> float | None:
    return None if time_remaining is None else time.monotonic() + time_remaining


def _popular_candidate(item_id: str, score: float):
    from recsys.v1 import common_pb2

    return common_pb2.Candidate(
        item_id=item_id, sources=["popular"], score=score, source_scores={"popular": score}
    )
