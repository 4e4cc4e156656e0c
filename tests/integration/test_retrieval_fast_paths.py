"""The hot-path options of Retrieve (real Redis, a real published version, real gRPC).

``retrieval.top_list_cache`` answers a version's top lists from a copy after
the first Redis read; ``RetrieveRequest.omit_source_scores`` leaves the
per-candidate score maps out. Both must give the same answer as the plain path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis

from recsys import redis_keys
from recsys.artifacts import ModelVersion
from recsys.config import RetrievalSettings, load_settings
from recsys.v1 import common_pb2, retrieval_pb2
from retrieval_service.engine import RetrievalEngine, RetrieveQuery
from retrieval_service.registry import build_sources

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def users(published: Path) -> list[str]:
    return [str(u) for u in ModelVersion.open(published).users["user_id"][:12]]


def _sources() -> list[dict]:
    from recsys.config import _default_sources

    # Generous timeouts: a busy shared test machine must not turn a read into TIMEOUT.
    return [{**s, "timeout_ms": 2000.0} for s in _default_sources()]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engines(published: Path, redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    built = {}
    for cached in (False, True):
        settings = RetrievalSettings(sources=_sources(), top_list_cache=cached)
        eng = RetrievalEngine(settings, build_sources(settings.sources), client)
        eng.swap(await asyncio.to_thread(eng.load_version, published))
        built[cached] = eng
    yield built
    await client.aclose()


def _answer(result) -> list[tuple]:
    return [
        (m.item_id, tuple(m.sources), m.score, m.seed_item_id, m.genre) for m in result.candidates
    ]


async def test_cache_gives_the_same_answers_with_one_round_trip(engines, users):
    plain, cached = engines[False], engines[True]
    want = [await plain.retrieve(RetrieveQuery(u, budget=200)) for u in users]
    assert [r.redis_round_trips for r in want[1:]] == [2] * (len(users) - 1)
    first = [await cached.retrieve(RetrieveQuery(u, budget=200)) for u in users]
    # The first request of the version filled the copy from Redis.
    assert first[0].redis_round_trips == 2
    assert len(cached.current().top_cache) > 0
    for u, got, exp in zip(users, first, want, strict=True):
        assert _answer(got) == _answer(exp), u
        assert not got.degraded
    again = [await cached.retrieve(RetrieveQuery(u, budget=200)) for u in users]
    assert [r.redis_round_trips for r in again] == [1] * len(users), "hydration only"
    assert [_answer(r) for r in again] == [_answer(r) for r in first]


async def test_cache_belongs_to_one_version_and_redis_down_still_errors(
    engines, users, published: Path
):
    cached = engines[True]
    await cached.retrieve(RetrieveQuery(users[0], budget=50))
    old = cached.current()
    assert len(old.top_cache) > 0
    fresh = await asyncio.to_thread(cached.load_version, published)
    assert len(fresh.top_cache) == 0, "a loaded version starts with no copies"
    # Hydration finding Redis down wins over the copy: Redis-backed sources say ERROR.
    ctx = await cached.hydrate(old, RetrieveQuery(users[0]), time.monotonic() + 5)
    ctx.redis._available = False
    with pytest.raises(ConnectionError):
        await cached.by_name["top_genre"].retrieve(ctx, 30)


async def test_cache_only_keeps_the_served_versions_keys(engines, redis_server, users):
    cached = engines[True]
    sync = redis.Redis.from_url(redis_server.url)
    other = redis_keys.top_genre("elsewhere", "x")
    sync.zadd(other, {"a": 2.0, "b": 1.0})
    try:
        ctx = await cached.hydrate(cached.current(), RetrieveQuery(users[0]), time.monotonic() + 5)
        assert await ctx.redis.top(other, 5) == [("a", 2.0), ("b", 1.0)]
        sync.zadd(other, {"c": 3.0})
        # Not this version's key: read from Redis every time, so the change shows.
        assert (await ctx.redis.top(other, 1)) == [("c", 3.0)]
        assert ctx.redis.round_trips == 3
    finally:
        sync.delete(other)


@contextlib.asynccontextmanager
async def _retrieval_stub(published: Path, redis_url: str):
    """A real retrieval server on port 0 with the version loaded, and a stub to it."""
    import grpc

    from recsys.v1 import retrieval_pb2_grpc
    from retrieval_service.server import build_server

    settings = load_settings(
        model_dir=published.parent,
        redis_url=redis_url,
        retrieval={
            "port": 0,
            "metrics_port": 0,
            "reload_interval_s": 3600.0,
            "sources": _sources(),
        },
    )
    handle, app = build_server(settings)
    await app.start()
    try:
        while app.engine.served is None:
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
            yield retrieval_pb2_grpc.RetrievalServiceStub(ch)
    finally:
        await app.stop(0)


async def test_omit_source_scores_drops_only_the_maps(published: Path, redis_server, users):
    async with _retrieval_stub(published, redis_server.url) as stub:
        for u in users[:4]:
            ctx = common_pb2.UserContext(user_id=u)
            full = await stub.Retrieve(retrieval_pb2.RetrieveRequest(user=ctx, budget=100))
            lean = await stub.Retrieve(
                retrieval_pb2.RetrieveRequest(user=ctx, budget=100, omit_source_scores=True)
            )
            assert any(c.source_scores for c in full.candidates)
            assert not any(c.source_scores for c in lean.candidates)
            assert lean.ByteSize() < full.ByteSize()
            for c in full.candidates:
                c.ClearField("source_scores")
            assert list(lean.candidates) == list(full.candidates)


async def test_packed_answer_carries_the_same_candidates(published: Path, redis_server, users):
    from recsys.packed import candidates_of

    async with _retrieval_stub(published, redis_server.url) as stub:
        for u in users[:4]:
            for omit in (False, True):
                ctx = common_pb2.UserContext(user_id=u)
                plain = await stub.Retrieve(
                    retrieval_pb2.RetrieveRequest(user=ctx, budget=150, omit_source_scores=omit)
                )
                packed = await stub.Retrieve(
                    retrieval_pb2.RetrieveRequest(
                        user=ctx, budget=150, omit_source_scores=omit, packed=True
                    )
                )
                assert not packed.candidates and packed.HasField("packed")
                assert not plain.HasField("packed")
                cands, ids, rows = candidates_of(packed)
                assert rows is None and ids == [c.item_id for c in plain.candidates]
                assert [c.to_pb() for c in cands] == list(plain.candidates)
                assert any(c.seed_item_id for c in plain.candidates)
                assert any(c.genre for c in plain.candidates)

                def outcome(res):
                    return [(r.source, r.status, r.count) for r in res.source_reports]

                assert outcome(packed) == outcome(plain)
                # The point of packing: fewer bytes for the same answer.
                assert packed.ByteSize() < plain.ByteSize()


async def test_a_caller_sharing_the_catalogue_gets_rows_not_ids(
    published: Path, redis_server, users
):
    from recsys.packed import candidates_of

    mv = ModelVersion.open(published)
    other = ModelVersion.open(published)
    other.__dict__["catalogue_id"] = "f" * 64  # a caller whose catalogue differs
    # The lightest watchers: a full 150 candidates each, so the rows' saving
    # (this catalogue's ids are only 1-3 characters) outweighs the
    # fingerprint the answer carries.
    watched = mv.users["watched"]
    light = sorted(range(len(watched)), key=lambda r: len(watched[r]))[:3]
    async with _retrieval_stub(published, redis_server.url) as stub:
        for u in (str(mv.users["user_id"][r]) for r in light):
            ctx = common_pb2.UserContext(user_id=u)

            def req(catalogue: str, ctx=ctx) -> retrieval_pb2.RetrieveRequest:
                return retrieval_pb2.RetrieveRequest(
                    user=ctx, budget=150, packed=True, catalogue=catalogue
                )

            by_ids = await stub.Retrieve(req(""))
            assert len(by_ids.packed.item_ids) == 150
            by_rows = await stub.Retrieve(req(mv.catalogue_id))
            assert not by_rows.packed.item_ids and by_rows.packed.catalogue == mv.catalogue_id
            assert len(by_rows.packed.rows) == 4 * len(by_ids.packed.item_ids) > 0
            cands, ids, rows = candidates_of(by_rows, mv)
            assert ids is None and rows is not None
            assert [mv.item_ids[r] for r in rows] == list(by_ids.packed.item_ids)
            same, _, _ = candidates_of(by_ids)
            assert [c.to_pb() for c in cands] == [c.to_pb() for c in same]
            # Smaller on the wire too.
            assert by_rows.ByteSize() < by_ids.ByteSize()
            # A different catalogue gets ids back, never rows it cannot read.
            mismatch = await stub.Retrieve(req(other.catalogue_id))
            assert list(mismatch.packed.item_ids) == list(by_ids.packed.item_ids)
            assert not mismatch.packed.rows and not mismatch.packed.catalogue
            # And a client without the catalogue refuses a rows answer.
            with pytest.raises(ValueError, match="catalogue"):
                candidates_of(by_rows, other)
            with pytest.raises(ValueError, match="catalogue"):
                candidates_of(by_rows)


class _Sleepy:
    """An eager source that suspends (like a Redis read) before answering or failing."""

    eager = True

    def __init__(self, name: str, delay_s: float, fail: bool = False):
        from retrieval_service.sources.base import SourceConfig

        self.name = name
        self.config = SourceConfig(name=name, type="sleepy", timeout_ms=40.0, tier="segment")
        self.delay_s, self.fail = delay_s, fail

    async def retrieve(self, ctx, k):
        from retrieval_service.sources.base import Candidate

        first = ctx.served.item_ids[-1]  # work before the first suspension runs inline
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("lost the connection")
        return [Candidate(first, 9.5)]


async def test_eager_sources_that_suspend_keep_deadlines_and_errors(published: Path, redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    settings = RetrievalSettings(sources=_sources())
    sources = [
        *build_sources(settings.sources),
        _Sleepy("quick", 0.001),
        _Sleepy("stuck", 5.0),
        _Sleepy("broken", 0.001, fail=True),
    ]
    engine = RetrievalEngine(settings, sources, client)
    engine.swap(await asyncio.to_thread(engine.load_version, published))
    try:
        start = time.perf_counter()
        res = await engine.retrieve(RetrieveQuery("cold-user", budget=50), timeout_s=2.0)
        assert time.perf_counter() - start < 1.0, "the stuck source was cut at its 40 ms"
        status = {r.source: r.status.value for r in res.reports}
        assert status["stuck"] == "TIMEOUT" and status["broken"] == "ERROR"
        assert status["quick"] == "OK" and status["popular"] == "OK"
        assert res.degraded
        last = engine.current().item_ids[-1]
        quick = [m for m in res.candidates if "quick" in m.sources]
        assert [m.item_id for m in quick] == [last] and quick[0].source_scores["quick"] == 9.5
        # A cancelled request takes its suspended sources down with it.
        task = asyncio.create_task(engine.retrieve(RetrieveQuery("cold-user"), timeout_s=2.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await client.aclose()


class _Odd:
    """A plain (not eager) plugin source answering with a generator, or with None."""

    def __init__(self, name: str, answer_none: bool):
        from retrieval_service.sources.base import SourceConfig

        self.name = name
        self.config = SourceConfig(name=name, type="odd", timeout_ms=500.0)
        self.answer_none = answer_none

    async def retrieve(self, ctx, k):
        from retrieval_service.sources.base import Candidate

        if self.answer_none:
            return None
        return (Candidate(i, float(n)) for n, i in enumerate(ctx.served.item_ids[:3]))


async def test_plugin_answers_any_iterable_and_none_is_an_error(published: Path, redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    settings = RetrievalSettings(sources=_sources())
    sources = [*build_sources(settings.sources), _Odd("gen", False), _Odd("nothing", True)]
    engine = RetrievalEngine(settings, sources, client)
    engine.swap(await asyncio.to_thread(engine.load_version, published))
    try:
        res = await engine.retrieve(RetrieveQuery("cold-user", budget=50), timeout_s=2.0)
        reports = {r.source: r for r in res.reports}
        assert reports["gen"].status.value == "OK" and reports["gen"].count == 3
        assert reports["nothing"].status.value == "ERROR"
        assert reports["nothing"].message == "TypeError: returned NoneType, not candidates"
        got = {m.item_id for m in res.candidates if "gen" in m.sources}
        assert got == set(engine.current().item_ids[:3])
    finally:
        await client.aclose()


async def test_concurrent_calls_share_one_user_read(engines, users):
    cached = engines[True]
    served = cached.current()
    deadline = time.monotonic() + 5
    alone = [await cached.hydrate(served, RetrieveQuery(u), deadline) for u in users[:6]]
    before = (cached._user_reads.batches, cached._user_reads.requests)
    together = await asyncio.gather(
        *(cached.hydrate(served, RetrieveQuery(u), deadline) for u in users[:6])
    )
    # Six calls hydrating in one loop turn: one pipelined read for all of them.
    assert cached._user_reads.batches - before[0] == 1
    assert cached._user_reads.requests - before[1] == 6
    for a, b in zip(alone, together, strict=True):
        assert (a.user_id, a.recent, a.watched) == (b.user_id, b.recent, b.watched)
        assert a.hydrate_error is None and b.hydrate_error is None


async def test_retrieve_many_answers_as_retrieve_with_one_user_read(engines, users, monkeypatch):
    import retrieval_service.engine as engine_module
    from retrieval_service.errors import InvalidArgument

    reads: list[int] = []
    real = engine_module.load_users

    async def counted(redis, batch, **kw):  # the real read, counted
        reads.append(len(batch))
        return await real(redis, batch, **kw)

    monkeypatch.setattr(engine_module, "load_users", counted)
    queries = [RetrieveQuery(u, budget=120) for u in users[:8]]
    queries.insert(3, RetrieveQuery(users[0], budget=-1))
    queries.append(RetrieveQuery(users[1], budget=50, sources=("no_such_source",)))
    queries.append(RetrieveQuery("never-seen-user", budget=50))
    # Uncached, every member waits on its own top-list reads (tasks); cached, none does.
    for cached in (False, True):
        engine = engines[cached]
        reads.clear()
        got = await engine.retrieve_many(queries, timeout_s=5.0)
        assert reads == [len(queries) - 2], "one pipelined read for every valid member"
        assert isinstance(got[3], InvalidArgument) and str(got[3]).startswith("budget:")
        assert isinstance(got[-2], InvalidArgument) and str(got[-2]).startswith("sources[0]:")
        singles = [engine.retrieve(q, timeout_s=5.0) for i, q in enumerate(queries)]
        for i, (q, member) in enumerate(zip(queries, got, strict=True)):
            if i in (3, len(queries) - 2):
                singles[i].close()
                continue
            want = await singles[i]
            assert _answer(member) == _answer(want), q.user_id
            assert not member.degraded and member.user is not None
            assert [r.status for r in member.reports] == [r.status for r in want.reports]
    assert await engines[True].retrieve_many([]) == []


async def test_retrieve_many_with_redis_down_answers_every_member_degraded(published: Path):
    from recsys.embedded_redis import free_port

    dead = aioredis.Redis(port=free_port(), socket_connect_timeout=0.2)  # nothing listens
    settings = RetrievalSettings(sources=_sources())
    engine = RetrievalEngine(settings, build_sources(settings.sources), dead)
    engine.swap(await asyncio.to_thread(engine.load_version, published))
    try:
        got = await engine.retrieve_many(
            [RetrieveQuery("u1", budget=30), RetrieveQuery("u2", budget=30)], timeout_s=2.0
        )
        for member in got:
            assert not isinstance(member, Exception), member
            assert member.degraded and member.user is None
            status = {r.source: r.status.value for r in member.reports}
            assert status["popular"] == "OK" and status["top_genre"] == "ERROR"
            assert len(member.selection) == 30
    finally:
        await dead.aclose()


async def test_retrieve_many_without_a_version_or_cancelled(published: Path, redis_server):
    from retrieval_service.errors import InvalidArgument, Unavailable

    client = aioredis.Redis.from_url(redis_server.url)
    settings = RetrievalSettings(sources=_sources())
    engine = RetrievalEngine(
        settings, [*build_sources(settings.sources), _Sleepy("stuck", 5.0)], client
    )
    try:
        before = await engine.retrieve_many(
            [RetrieveQuery("u", budget=5), RetrieveQuery("u", budget=-1)]
        )
        assert isinstance(before[0], Unavailable)
        assert isinstance(before[1], InvalidArgument), "field errors come first"
        engine.swap(await asyncio.to_thread(engine.load_version, published))
        # Members waiting on a source are cancelled with the batch, not left running.
        others = asyncio.all_tasks()
        task = asyncio.create_task(
            engine.retrieve_many(
                [RetrieveQuery("cold-user"), RetrieveQuery("cold-2")], timeout_s=2.0
            )
        )
        await asyncio.sleep(0.01)
        members = asyncio.all_tasks() - others - {task}
        assert len(members) >= 2, "each waiting member runs in a task"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        assert all(t.done() for t in members)
    finally:
        await client.aclose()


async def test_genre_answers_from_copies_are_reused_and_read_only(engines, users):
    plain, cached = engines[False], engines[True]
    served = cached.current()
    source = cached.by_name["top_genre"]
    deadline = time.monotonic() + 5
    ctx = await cached.hydrate(served, RetrieveQuery(users[0]), deadline)
    first = await source.retrieve(ctx, 40)  # may read Redis: the copies fill
    ctx = await cached.hydrate(served, RetrieveQuery(users[0]), deadline)
    second = await source.retrieve(ctx, 40)
    ctx = await cached.hydrate(served, RetrieveQuery(users[0]), deadline)
    third = await source.retrieve(ctx, 40)
    assert third is second, "answered from the copies: kept and reused"
    assert not third.rows.flags.writeable and not third.genres.flags.writeable
    ctx = await plain.hydrate(plain.current(), RetrieveQuery(users[0]), deadline)
    want = await plain.by_name["top_genre"].retrieve(ctx, 40)
    for got in (first, third):
        assert got.rows.tolist() == want.rows.tolist() and len(want) > 0
        assert got.scores.tolist() == want.scores.tolist()
        assert [got.genre_names[g] for g in got.genres] == [
            want.genre_names[g] for g in want.genres
        ]
    ctx = await plain.hydrate(plain.current(), RetrieveQuery(users[0]), deadline)
    assert await plain.by_name["top_genre"].retrieve(ctx, 40) is not want, "no cache, no reuse"
    # Another k is another question.
    ctx = await cached.hydrate(served, RetrieveQuery(users[0]), deadline)
    assert len(await source.retrieve(ctx, 10)) == 10
