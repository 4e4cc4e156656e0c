"""One contract every registered candidate source must pass (real Redis, real version)."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis

from recsys.artifacts import ModelVersion
from recsys.config import RetrievalSettings
from retrieval_service.engine import RequestFeatures, RetrievalEngine, RetrieveQuery
from retrieval_service.registry import available_sources, build_sources, load_source_class
from retrieval_service.sources.base import Candidate

pytestmark = pytest.mark.asyncio(loop_scope="session")

SOURCE_TYPES = sorted(available_sources())
# What every built-in can promise beyond the contract (a full k for a known
# user); a third-party source with a short curated list need not.
BUILTIN = {k for k, ep in available_sources().items() if ep.value.startswith("retrieval_service.")}
# Bounds each call: a source that hangs fails its case instead of the run's timeout.
CALL_LIMIT_S = 10.0
# Why a type could not be built from its contract config, by type.
BROKEN: dict[str, str] = {}


def _entry(kind: str) -> dict:
    cls = load_source_class(available_sources()[kind])
    extra = dict(getattr(cls, "contract_config", {}))
    return {"name": f"src_{kind}", "type": kind, "budget": 30, **extra}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(published: Path, redis_server):
    # Built one by one: a plugin that cannot be built fails its own cases only.
    sources = []
    for kind in SOURCE_TYPES:
        try:
            sources += build_sources([_entry(kind)])
        except Exception as exc:
            BROKEN[kind] = f"{type(exc).__name__}: {exc}"
    client = aioredis.Redis.from_url(redis_server.url)
    # Off explicitly: tests here count the Redis round trips of the uncached path.
    eng = RetrievalEngine(RetrievalSettings(top_list_cache=False), sources, client)
    eng.swap(await asyncio.to_thread(eng.load_version, published))
    yield eng
    await client.aclose()


def _source(engine: RetrievalEngine, kind: str):
    if kind in BROKEN:
        pytest.fail(f"source type {kind!r} could not be built: {BROKEN[kind]}")
    return engine.by_name[f"src_{kind}"]


async def _call(source, ctx, k: int) -> list:
    async with asyncio.timeout(CALL_LIMIT_S):
        return list(await source.retrieve(ctx, k))


def _users(mv: ModelVersion) -> dict[str, RetrieveQuery]:
    users = mv.users
    row = max(range(len(users["user_id"])), key=lambda r: len(users["history"][r]))
    return {
        "known": RetrieveQuery(str(users["user_id"][row])),
        "unknown": RetrieveQuery("nobody-knows-me"),
        "cold_with_features": RetrieveQuery(
            "cold-features",
            features=RequestFeatures(
                country=mv.spec.countries[0], genre_ratings={mv.spec.genres[0]: 5.0}
            ),
        ),
        "history_override": RetrieveQuery("cold-history", recent=tuple(mv.item_ids[:3])),
    }


async def _context(engine: RetrievalEngine, q: RetrieveQuery):
    return await engine.hydrate(engine.current(), q, time.monotonic() + 5)


@pytest.mark.parametrize("kind", SOURCE_TYPES)
@pytest.mark.parametrize("user", ["known", "unknown", "cold_with_features", "history_override"])
@pytest.mark.parametrize("k", [1, 7, 30])
async def test_source_contract(engine: RetrievalEngine, mv: ModelVersion, kind, user, k):
    source = _source(engine, kind)
    ctx = await _context(engine, _users(mv)[user])
    got = await _call(source, ctx, k)
    assert len(got) <= k
    assert all(isinstance(c, Candidate) for c in got)
    ids = [c.item_id for c in got]
    assert len(ids) == len(set(ids)), "no duplicates within a source"
    assert set(ids) <= set(mv.item_ids), "only catalogue ids"
    assert all(c.score is None or math.isfinite(c.score) for c in got)
    if user == "known" and kind in BUILTIN:
        # A user with a history, a country and favourite genres: every
        # built-in source has more than k items to offer.
        assert len(got) == k, f"{kind} gave {len(got)} of {k} for a known user"
    if kind == "popular":
        assert got, f"{kind} should answer for a {user} user"


@pytest.mark.parametrize("kind", SOURCE_TYPES)
async def test_source_respects_cancellation(engine: RetrievalEngine, mv: ModelVersion, kind):
    source = _source(engine, kind)
    q = _users(mv)["known"]
    for ticks in (0, 1):
        ctx = await _context(engine, q)
        task = asyncio.create_task(source.retrieve(ctx, 30))
        for _ in range(ticks):
            await asyncio.sleep(0)
        finished = task.done()
        task.cancel()
        if finished:  # it answered before the cancel: the answer must still be valid
            assert len(task.result()) <= 30
        else:  # cancelled while running: it must end cancelled, not answer anyway
            with pytest.raises(asyncio.CancelledError):
                async with asyncio.timeout(CALL_LIMIT_S):
                    await task
    # Cancelling left nothing broken: the next call on a fresh context answers.
    again = await _call(source, await _context(engine, q), 30)
    assert len(again) <= 30
    if kind in BUILTIN:
        assert again


async def test_concurrent_sources_share_one_round_trip(engine: RetrievalEngine, mv: ModelVersion):
    ctx = await _context(engine, _users(mv)["known"])
    assert ctx.redis.round_trips == 1  # hydration
    results = await asyncio.gather(*(_call(s, ctx, 30) for s in engine.sources))
    assert all(r for s, r in zip(engine.sources, results, strict=True) if s.name[4:] in BUILTIN)
    assert ctx.redis.round_trips == 2


async def test_top_genre_uses_the_users_favourite_genres(engine, mv: ModelVersion):
    ctx = await _context(engine, _users(mv)["known"])
    favourite = ctx.top_genres(3)
    got = await engine.by_name["src_redis_top_genre"].retrieve(ctx, 30)
    assert {c.genre for c in got} <= set(favourite)
    first_list = mv.top_lists["genre"][favourite[0]]
    assert got[0].item_id == str(first_list[0][0])
    assert got[0].score == pytest.approx(float(first_list[0][1]))


async def test_popular_from_redis_matches_memory_and_falls_back(engine, mv: ModelVersion):
    from retrieval_service.sources.top_lists import PopularConfig, PopularSource

    ctx = await _context(engine, _users(mv)["unknown"])
    memory = await engine.by_name["src_popular"].retrieve(ctx, 25)
    redis_backed = PopularSource(PopularConfig(name="pop_redis", from_redis=True))
    ctx = await _context(engine, _users(mv)["unknown"])
    got = await redis_backed.retrieve(ctx, 25)
    assert ctx.redis.round_trips == 2, "the Redis-backed variant really read Redis"
    # The same list item for item: the export orders ties as ZREVRANGE does.
    assert [c.item_id for c in got] == [c.item_id for c in memory]
    assert [c.score for c in got] == pytest.approx([c.score for c in memory])
    scores = [c.score for c in memory]
    assert len(set(scores)) < len(scores), "the check needs ties among the first 25"
    # Hydration found Redis down: straight to memory, no read attempted.
    ctx.redis._available = False
    fallback = await redis_backed.retrieve(ctx, 25)
    assert [c.item_id for c in fallback] == [c.item_id for c in memory]
    assert ctx.redis.round_trips == 2


async def test_top_list_reads_survive_a_script_flush(engine, mv: ModelVersion, redis_server):
    sync = redis.Redis.from_url(redis_server.url)
    sync.script_flush()
    ctx = await _context(engine, _users(mv)["known"])
    got = await engine.by_name["src_redis_top_genre"].retrieve(ctx, 30)
    assert got
    assert ctx.redis.round_trips == 4  # hydrate, NOSCRIPT, SCRIPT LOAD, retry
    ctx = await _context(engine, _users(mv)["known"])
    again = await engine.by_name["src_redis_top_genre"].retrieve(ctx, 30)
    assert [c.item_id for c in again] == [c.item_id for c in got]
    assert ctx.redis.round_trips == 2


async def test_missing_and_wrong_type_keys(engine, mv: ModelVersion, redis_server):
    sync = redis.Redis.from_url(redis_server.url)
    sync.set("not-a-zset", "x")
    ctx = await _context(engine, _users(mv)["unknown"])
    missing, wrong = ctx.redis.top("no-such-key", 5), ctx.redis.top("not-a-zset", 5)
    assert await missing == []
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        await wrong
    sync.delete("not-a-zset")


async def test_precomputed_hot_neighbours_match_the_index(engine, mv: ModelVersion):
    from retrieval_service.sources.annoy_similar import AnnoySimilarConfig, AnnoySimilarSource

    served = engine.current()
    cached = AnnoySimilarSource(AnnoySimilarConfig(name="cached", hot_items=len(mv.item_ids)))
    direct = AnnoySimilarSource(AnnoySimilarConfig(name="direct", hot_items=0))
    state = cached.prepare(served)
    assert state is not None and len(state.slot) == len(mv.item_ids)
    popular = AnnoySimilarSource(AnnoySimilarConfig(name="top3", hot_items=3)).prepare(served)
    assert popular is not None and list(popular.slot) == served.popular_rows[:3].tolist()
    assert direct.prepare(served) is None
    served.source_state.update(cached=state)
    ctx = await _context(engine, _users(mv)["known"])
    a = await cached.retrieve(ctx, 60)
    b = await direct.retrieve(ctx, 60)
    assert [c.item_id for c in a] == [c.item_id for c in b]
    assert [c.score for c in a] == pytest.approx([c.score for c in b], abs=1e-6)
    assert {c.seed_item_id for c in a} <= set(ctx.recent[:10])


@pytest.mark.parametrize("hot_items", [0, None])
@pytest.mark.parametrize("k", [1, 5, 30])
async def test_seeds_that_are_each_others_neighbours_still_fill_k(
    engine: RetrievalEngine, mv: ModelVersion, hot_items, k
):
    """A binge of one cluster: the seeds' short lists held mostly the seeds and each
    other's neighbours, so the source answered fewer than k (none at k = 1)."""
    from retrieval_service.sources.annoy_similar import AnnoySimilarConfig, AnnoySimilarSource

    served = engine.current()
    cfg = AnnoySimilarConfig(
        name="binge", **({} if hot_items is None else {"hot_items": hot_items})
    )
    source = AnnoySimilarSource(cfg)
    if (state := source.prepare(served)) is not None:
        served.source_state.update(binge=state)
    vec = np.asarray(mv.item_vectors, np.float64)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    # An item and its nearest neighbours by exact cosine, newest first.
    cluster = np.argsort(-(vec @ vec[26]), kind="stable")[: cfg.seeds]
    recent = tuple(mv.item_ids[r] for r in cluster)
    ctx = await _context(engine, RetrieveQuery("binger", recent=recent))
    got = list(await source.retrieve(ctx, k))
    assert len(got) == k
    assert not {c.item_id for c in got} & set(recent)
    assert len({c.item_id for c in got}) == k


async def test_a_request_history_with_repeats_seeds_from_distinct_items(engine, mv: ModelVersion):
    """A raw watch log (re-watches) must not crowd distinct seeds out of similar-to-recent."""
    a, b, c = mv.item_ids[:3]
    q = RetrieveQuery("rewatcher", recent=(a, a, b, a, a, c, b))  # newest first
    ctx = await _context(engine, q)
    assert ctx.recent == [a, b, c]


async def test_similar_to_recent_scores_are_the_cosine_to_the_seed_they_name(
    engine: RetrievalEngine, mv: ModelVersion
):
    """Checked against numpy: each candidate's score is its cosine to its credited seed."""
    source = engine.by_name["src_annoy_similar"]
    recent = tuple(mv.item_ids[r] for r in (5, 40, 90))
    ctx = await _context(engine, RetrieveQuery("cold-similar", recent=recent))
    got = list(await source.retrieve(ctx, 30))
    vec = np.asarray(mv.item_vectors, np.float64)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    row = {item: i for i, item in enumerate(mv.item_ids)}
    assert len(got) == 30 and {c.seed_item_id for c in got} == set(recent)
    for c in got:
        cosine = float(vec[row[c.item_id]] @ vec[row[c.seed_item_id]])
        assert c.score == pytest.approx(cosine, abs=1e-4), (c.item_id, c.seed_item_id)


async def test_a_cold_start_users_disliked_genre_gets_no_genre_list(
    engine: RetrievalEngine, mv: ModelVersion
):
    liked, disliked = mv.spec.genres[0], mv.spec.genres[1]
    q = RetrieveQuery(
        "cold-with-tastes", features=RequestFeatures(genre_ratings={liked: 5.0, disliked: 1.0})
    )
    got = list(await engine.by_name["src_redis_top_genre"].retrieve(await _context(engine, q), 30))
    assert got and {c.genre for c in got} == {liked}


async def test_the_answer_does_not_depend_on_the_order_sources_are_named(
    engine: RetrievalEngine, mv: ModelVersion
):
    """Config order decides ties and the budget's last places, not the request's order."""
    users = [str(u) for u in mv.users["user_id"][:10]]
    for uid in users:
        for budget in (5, 11, 25):
            a = await engine.retrieve(
                RetrieveQuery(uid, budget=budget, sources=("src_annoy_similar", "src_popular"))
            )
            b = await engine.retrieve(
                RetrieveQuery(uid, budget=budget, sources=("src_popular", "src_annoy_similar"))
            )
            assert a.selection.source_names == b.selection.source_names
            assert [(m.item_id, m.sources) for m in a.candidates] == [
                (m.item_id, m.sources) for m in b.candidates
            ], (uid, budget)


async def test_a_request_history_longer_than_the_kept_one_is_all_excluded(
    engine: RetrievalEngine, mv: ModelVersion
):
    keep = engine.settings.history_length
    popular = [i for i, _ in engine.current().popular]
    # Newest first; the most popular items at the old end, past what is kept as seeds.
    recent = tuple(popular[10 : keep + 10]) + tuple(popular[:10])
    got = await engine.retrieve(
        RetrieveQuery("long-history", budget=50, recent=recent, sources=("src_popular",))
    )
    assert got.candidates and not {m.item_id for m in got.candidates} & set(recent)


@pytest.mark.parametrize("field", ["exclude", "recent"])
async def test_excluded_ids_outside_the_catalogue_do_not_widen_a_sources_share(
    engine: RetrievalEngine, mv: ModelVersion, field: str
):
    """Over-fetching for filtering is for ids that filtering drops; junk ids drop nothing."""
    feats = RequestFeatures(genre_ratings={g: 5.0 for g in mv.spec.genres[:3]})
    junk = tuple(f"no-such-item-{i}" for i in range(40))
    got = await engine.retrieve(
        RetrieveQuery(
            "cold-genres",
            budget=100,
            sources=("src_redis_top_genre",),
            features=feats,
            **{field: junk},
        )
    )
    placed = sum("src_redis_top_genre" in m.sources for m in got.candidates)
    assert placed == engine.by_name["src_redis_top_genre"].config.budget
