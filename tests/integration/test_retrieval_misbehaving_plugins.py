"""Third-party sources that misbehave in ways the per-source checks missed.

Each case was found to fail the whole call (no answer at all, or INTERNAL
for every member of a batch) or to hold it past the source's own limit.
Real Redis and a real published version; the engine and the servicer's
answer building, as a call runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from recsys.config import RetrievalSettings, _default_sources
from retrieval_service.engine import RetrievalEngine, RetrieveQuery
from retrieval_service.registry import build_sources
from retrieval_service.servicer import result_to_pb
from retrieval_service.sources.base import Candidate, CandidateBlock, SourceConfig

pytestmark = pytest.mark.asyncio(loop_scope="session")


class _Plugin:
    """A plain plugin source whose ``retrieve`` is the given coroutine function."""

    def __init__(self, name: str, behave, timeout_ms: float = 500.0, eager: bool = False):
        self.name = name
        self.config = SourceConfig(name=name, type="misbehaving", timeout_ms=timeout_ms)
        self._behave = behave
        if eager:
            self.eager = True

    async def retrieve(self, ctx, k):
        return await self._behave(ctx, k)


async def _cancels_itself(ctx, k):
    await asyncio.sleep(0)
    raise asyncio.CancelledError


async def _cancels_at_once(ctx, k):
    raise asyncio.CancelledError


async def _awaits_a_cancelled_shared_fetch(ctx, k):
    # Another request's timeout cancelled the fetch this one shares.
    shared = asyncio.get_running_loop().create_future()
    shared.cancel()
    return await shared


async def _times_out_on_its_own(ctx, k):
    await asyncio.sleep(0.001)
    raise TimeoutError("its HTTP client gave up")


async def _times_out_at_once(ctx, k):
    raise TimeoutError("its cache said so")


@pytest_asyncio.fixture(loop_scope="session")
async def make_engine(published: Path, redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    settings = RetrievalSettings(sources=[{**s, "timeout_ms": 2000.0} for s in _default_sources()])
    loaded = None

    async def make(*plugins) -> RetrievalEngine:
        nonlocal loaded
        engine = RetrievalEngine(settings, [*build_sources(settings.sources), *plugins], client)
        if loaded is None:
            loaded = await asyncio.to_thread(engine.load_version, published)
        engine.swap(loaded)
        return engine

    yield make
    await client.aclose()


@pytest.mark.parametrize(
    "behave", [_cancels_itself, _cancels_at_once, _awaits_a_cancelled_shared_fetch]
)
@pytest.mark.parametrize("eager", [False, True])
async def test_a_source_raising_cancelled_error_is_its_error_not_the_calls(
    make_engine, behave, eager
):
    """It read as the request being cancelled: Retrieve never answered, RetrieveMany timed out."""
    engine = await make_engine(_Plugin("odd", behave, eager=eager))
    res = await asyncio.wait_for(engine.retrieve(RetrieveQuery("u", budget=50), timeout_s=2), 3)
    reports = {r.source: r for r in res.reports}
    assert reports["odd"].status.value == "ERROR" and "CancelledError" in reports["odd"].message
    assert reports["popular"].status.value == "OK" and res.degraded and res.candidates
    many = await asyncio.wait_for(
        engine.retrieve_many([RetrieveQuery(u, budget=20) for u in ("a", "b", "c")], timeout_s=2),
        3,
    )
    assert all(not isinstance(m, BaseException) and m.candidates for m in many)


async def test_a_request_cancelled_while_a_source_runs_is_still_cancelled(make_engine):
    """The other side: a real cancellation of the call must not read as a source error."""

    async def slow(ctx, k):
        await asyncio.sleep(5)
        return []

    engine = await make_engine(_Plugin("slow", slow, timeout_ms=5000))
    call = asyncio.ensure_future(engine.retrieve(RetrieveQuery("u", budget=10), timeout_s=5))
    await asyncio.sleep(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


@pytest.mark.parametrize(
    ("behave", "eager"),
    [(_times_out_on_its_own, False), (_times_out_at_once, False), (_times_out_at_once, True)],
)
async def test_a_sources_own_timeout_error_is_an_error_not_its_limit(make_engine, behave, eager):
    """It was reported as "no answer within 500 ms" after 1 ms."""
    engine = await make_engine(_Plugin("own_timeout", behave, eager=eager))
    res = await engine.retrieve(RetrieveQuery("u", budget=20), timeout_s=2)
    report = {r.source: r for r in res.reports}["own_timeout"]
    assert report.status.value == "ERROR" and "raised TimeoutError" in report.message


async def test_a_source_swallowing_its_cancel_holds_the_call_to_its_own_limit(make_engine):
    """It held every request to the request's deadline (2 s here), not its 100 ms."""

    async def swallows(ctx, k):
        end = time.monotonic() + 3
        while time.monotonic() < end:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)
        return []

    engine = await make_engine(_Plugin("stubborn", swallows, timeout_ms=100))
    start = time.perf_counter()
    res = await engine.retrieve(RetrieveQuery("u", budget=20), timeout_s=2)
    assert time.perf_counter() - start < 1.0
    assert {r.source: r for r in res.reports}["stubborn"].status.value == "TIMEOUT"
    assert res.candidates


async def test_a_source_answering_within_its_limit_is_not_cut_by_the_sources_wait(make_engine):
    """The wait's cut ran from before the task started: 30 ms of inline work cost it its answer."""

    async def busy_inline(ctx, k):
        time.sleep(0.03)  # an eager source's inline work, before the tasks run
        return []

    async def late_but_in_time(ctx, k):
        await asyncio.sleep(0.085)
        return [Candidate(ctx.served.item_ids[0], 1.0)]

    engine = await make_engine(
        _Plugin("busy", busy_inline, eager=True),
        _Plugin("in_time", late_but_in_time, timeout_ms=100),
    )
    res = await engine.retrieve(RetrieveQuery("u", budget=20), timeout_s=2)
    assert {r.source: r for r in res.reports}["in_time"].status.value == "OK"


def _block_of(make):
    async def behave(ctx, k):
        return make(ctx.served)

    return behave


def _cands(**fields):
    return lambda served: [Candidate(served.item_ids[0], 1.0, **fields)]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_cands(seed_item_id=5), "seed_item_id of .* is int, not str"),
        (_cands(genre=7), "genre of .* is int, not str"),
        (_cands(seed_item_id="\ud800"), "not valid UTF-8"),
        (
            lambda s: CandidateBlock(s.item_ids, np.arange(2), np.asarray(["a", "b"])),
            "scores are not a numeric array",
        ),
        (
            lambda s: CandidateBlock(s.item_ids, np.asarray([5, 6, 5]), np.ones(3)),
            "a row more than once",
        ),
        (
            lambda s: CandidateBlock(s.item_ids, np.asarray([1.0, 2.0]), np.ones(2)),
            "rows are not a 1-d integer array",
        ),
        (
            lambda s: CandidateBlock(
                s.item_ids, np.arange(2), np.ones(2), seeds=np.zeros(2, np.int64), seed_ids=[9]
            ),
            "a name in seeds is int",
        ),
        (
            lambda s: CandidateBlock(
                s.item_ids, np.arange(2), np.ones(2), seeds=[0, 0], seed_ids=["a"]
            ),
            "seeds are not an array",
        ),
        (
            lambda s: CandidateBlock(
                s.item_ids, np.arange(2), np.ones(2), genres=np.zeros(2, np.int64), genre_names=5
            ),
            "genres but no list of their names",
        ),
        (
            # Skipped every check, then failed the merge: the whole call.
            lambda s: CandidateBlock(
                s.item_ids, np.arange(2), np.ones(2), seeds=np.zeros(2, np.int64), seed_ids=None
            ),
            "seeds but no list of their names",
        ),
        (lambda s: [Candidate(s.item_ids[0], 10**400)], "out of range"),
    ],
)
async def test_a_malformed_answer_is_the_sources_error_and_the_call_answers(
    make_engine, make, message
):
    """Passed as OK, each failed the answer's building: INTERNAL for the call (or batch)."""
    engine = await make_engine(_Plugin("bad", _block_of(make)))
    res = await engine.retrieve(RetrieveQuery("u", budget=30), timeout_s=2)
    report = {r.source: r for r in res.reports}["bad"]
    assert report.status.value == "ERROR", report
    assert report.message and re.search(message, report.message), report.message
    for packed in (False, True):
        assert result_to_pb(res, packed=packed).ByteSize() > 0


async def _raises_secret(ctx, k):
    raise RuntimeError("boom secret=hunter2")


async def _generator_raising_secret(ctx, k):
    def gen():
        yield Candidate(ctx.served.item_ids[0], 1.0)
        raise RuntimeError("boom secret=hunter2")

    return gen()


class _SecretScore(Candidate):
    """A plugin's Candidate subclass whose property fails while the engine reads it."""

    @property
    def score(self):  # type: ignore[override]
        raise RuntimeError("boom secret=hunter2")

    @score.setter
    def score(self, value):  # the dataclass's __init__ sets it
        pass


async def _candidate_property_raising_secret(ctx, k):
    return [_SecretScore(ctx.served.item_ids[0])]


@pytest.mark.parametrize(
    "behave", [_raises_secret, _generator_raising_secret, _candidate_property_raising_secret]
)
async def test_a_plugins_exception_text_stays_in_the_log(make_engine, caplog, behave):
    """Sent verbatim in SourceReport.message, which the contract calls client-safe."""
    engine = await make_engine(_Plugin("leaky", behave))
    res = await engine.retrieve(RetrieveQuery("u", budget=20), timeout_s=2)
    report = {r.source: r for r in res.reports}["leaky"]
    assert report.status.value == "ERROR" and "RuntimeError" in report.message
    assert "hunter2" not in report.message
    assert any("hunter2" in r.getMessage() for r in caplog.records)
