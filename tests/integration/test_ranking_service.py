"""Ranking service end to end: real trained version, real Redis, real gRPC servers."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from ranking_service.server import build_server
from ranking_service.testing import Reference, ranking_settings, wait_serving
from recsys.artifacts import ModelVersion
from recsys.config import RetrievalSettings
from recsys.embedded_redis import free_port
from recsys.features import (
    UserProfile,
    aggregates_from_genre_ratings,
    default_user_vector,
    user_feature_vector,
)
from recsys.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc

TOL = 1e-4


@pytest.fixture(scope="module")
def reference(trained_version) -> Reference:
    return Reference(trained_version)


@pytest.fixture(scope="module")
async def retrieval(trained_version, redis_server):
    from recsys.channels import wait_serving as wait_for
    from retrieval_service.server import SERVICE_NAME
    from retrieval_service.server import build_server as build_retrieval

    settings = ranking_settings(trained_version.parent, redis_server.url)
    settings = settings.model_copy(
        # A tighter budget cap than ranking's config gives retrieval: a request
        # only retrieval refuses (test_concurrent_recommends_share_retrieve_many_calls).
        update={
            "retrieval": RetrievalSettings(
                host="127.0.0.1", port=0, metrics_port=0, max_budget=1000
            )
        }
    )
    handle, app = build_retrieval(settings)
    await app.start()
    address = f"127.0.0.1:{handle.port}"
    # Ranking serves without retrieval (the popular fallback), so its health
    # says nothing about retrieval's version load (seconds with a cold numba cache).
    await wait_for(address, SERVICE_NAME, timeout_s=60.0)
    yield address
    await app.stop(0)


@pytest.fixture(scope="module")
async def server(trained_version, redis_server, retrieval):
    settings = ranking_settings(
        trained_version.parent,
        redis_server.url,
        retrieval_address=retrieval,
        max_candidates=2000,
        batch_timeout_ms=2.0,
        retrieval_timeout_s=2.0,
    )
    srv = build_server(settings)
    await srv.start()
    await wait_serving(f"127.0.0.1:{srv.port}")
    yield srv
    await srv.stop(0)


@pytest.fixture(scope="module")
async def stub(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ranking_pb2_grpc.RankingServiceStub(ch)


def user_ctx(uid: str = "", **features) -> common_pb2.UserContext:
    return common_pb2.UserContext(user_id=uid, features=common_pb2.UserFeatures(**features))


def rank_request(uid, items, k, **kw) -> ranking_pb2.RankRequest:
    user = kw.pop("user", None) or user_ctx(uid)
    return ranking_pb2.RankRequest(user=user, candidate_item_ids=items, top_k=k, **kw)


def check_against_reference(resp, reference, features, candidates):
    """Scores equal the full model; the order is the model's order."""
    ids = [it.item_id for it in resp.items]
    got = np.array([it.score for it in resp.items])
    np.testing.assert_allclose(got, reference.scores(features, ids), atol=TOL)
    full = np.sort(reference.scores(features, list(candidates)))[::-1]
    np.testing.assert_allclose(got, full[: len(got)], atol=TOL)


async def test_scores_equal_the_full_two_tower_model(stub, published_version, reference):
    mv = reference.mv
    rng = np.random.default_rng(0)
    for uid in mv.users["user_id"][:6]:
        cands = [mv.item_ids[r] for r in rng.choice(len(mv.item_ids), 120, replace=False)]
        resp = await stub.Rank(rank_request(uid, cands, 120, include_watched=True), timeout=10)
        assert resp.model_version == mv.version
        assert len(resp.items) == 120 and resp.unknown_dropped == 0
        check_against_reference(resp, reference, reference.known_user_features(uid), cands)


async def test_watched_items_are_dropped_unless_asked(stub, published_version, reference):
    mv = reference.mv
    row = int(np.argmax([len(h) for h in mv.users["watched"]]))
    uid, history = mv.users["user_id"][row], mv.users["watched"][row]
    unseen = [i for i in mv.item_ids if i not in set(history)][:30]
    cands = history[:20] + unseen
    resp = await stub.Rank(rank_request(uid, cands, 100), timeout=10)
    assert resp.watched_dropped == len(set(history[:20]))
    assert {it.item_id for it in resp.items} == set(unseen)
    resp = await stub.Rank(rank_request(uid, cands, 100, include_watched=True), timeout=10)
    assert resp.watched_dropped == 0 and len(resp.items) == len(cands)
    # Explicit exclusions apply even with include_watched.
    user = common_pb2.UserContext(user_id=uid, exclude_item_ids=unseen[:5])
    resp = await stub.Rank(
        rank_request(uid, cands, 100, include_watched=True, user=user), timeout=10
    )
    assert not {it.item_id for it in resp.items} & set(unseen[:5])


async def test_unknown_and_duplicate_ids(stub, published_version, reference):
    mv = reference.mv
    cands = [mv.item_ids[0], "no-such-item", mv.item_ids[1], mv.item_ids[0], "nope"]
    resp = await stub.Rank(rank_request("", cands, 10), timeout=10)
    assert resp.unknown_dropped == 2
    assert sorted(it.item_id for it in resp.items) == sorted(mv.item_ids[:2])
    resp = await stub.Rank(rank_request("", ["x1", "x2"], 10), timeout=10)
    assert resp.unknown_dropped == 2 and len(resp.items) == 0


async def test_cold_start_users_get_ranked_results(stub, published_version, reference):
    mv = reference.mv
    spec = mv.spec
    cands = list(mv.item_ids[:200])
    genres = {spec.genres[0]: 5.0, spec.genres[1]: 1.5}
    country = spec.countries[0]
    user = user_ctx("never-seen-before", age=33, country=country, genre_ratings=genres)
    resp = await stub.Rank(rank_request("", cands, 15, user=user), timeout=10)
    assert len(resp.items) == 15
    expected = user_feature_vector(
        spec, UserProfile(age=33, country=country), aggregates_from_genre_ratings(spec, genres)
    )
    check_against_reference(resp, reference, expected, cands)
    # Nothing known at all: the default features, still an answer.
    resp = await stub.Rank(rank_request("brand-new", cands, 15), timeout=10)
    assert len(resp.items) == 15
    check_against_reference(resp, reference, default_user_vector(spec), cands)


async def test_debug_titles_and_genres(stub, published_version, reference):
    mv = reference.mv
    resp = await stub.Rank(rank_request("", list(mv.item_ids[:50]), 5, debug=True), timeout=10)
    for it in resp.items:
        row = reference.row[it.item_id]
        assert it.title == mv.items_meta["title"][row]
        assert list(it.genres) == mv.item_genre_names(row)
        assert it.debug.model_version == mv.version
        assert mv.target.from_model(np.float32(it.debug.raw_score)) == pytest.approx(
            it.score, abs=TOL
        )
    plain = await stub.Rank(rank_request("", list(mv.item_ids[:50]), 5), timeout=10)
    assert not plain.items[0].HasField("debug")


async def test_concurrent_callers_each_get_their_own_answer(
    stub, server, published_version, reference
):
    mv = reference.mv
    rng = np.random.default_rng(3)
    users = mv.users["user_id"][:50]
    reqs = [
        rank_request(
            uid,
            [mv.item_ids[r] for r in rng.choice(len(mv.item_ids), int(n), replace=False)],
            10,
        )
        for uid, n in zip(users, rng.integers(20, 240, len(users)), strict=True)
    ]
    alone = [await stub.Rank(r, timeout=10) for r in reqs]
    batches_before = server.ranker.batcher.batches
    together = await asyncio.gather(*(stub.Rank(r, timeout=10) for r in reqs))
    batches = server.ranker.batcher.batches - batches_before
    for a, b in zip(alone, together, strict=True):
        assert [i.item_id for i in a.items] == [i.item_id for i in b.items]
        np.testing.assert_allclose([i.score for i in a.items], [i.score for i in b.items], 1e-5)
    # Users differ, so answers differ: a mix-up inside a batch would show.
    assert len({tuple(i.item_id for i in r.items) for r in together}) > 40
    assert batches < len(reqs)  # requests were coalesced


BAD_RANK = [
    ("empty candidates", {"candidate_item_ids": []}, "candidate_item_ids"),
    ("too many", {"candidate_item_ids": [f"i{k}" for k in range(2001)]}, "candidate_item_ids"),
    ("empty id", {"candidate_item_ids": ["1", ""]}, "candidate_item_ids[1]"),
    ("long id", {"candidate_item_ids": ["x" * 300]}, "candidate_item_ids[0]"),
    ("negative top_k", {"top_k": -1}, "top_k"),
    ("huge top_k", {"top_k": 5000}, "top_k"),
    ("long user", {"user": common_pb2.UserContext(user_id="u" * 300)}, "user.user_id"),
    ("bad age", {"user": user_ctx("", age=-4)}, "user.features.age"),
    (
        "unknown genre",
        {"user": user_ctx("", genre_ratings={"comedy": 5.0})},
        "user.features.genre_ratings",
    ),
]


@pytest.mark.parametrize(("name", "kw", "field"), BAD_RANK, ids=[b[0] for b in BAD_RANK])
async def test_bad_rank_input_is_invalid_argument(stub, name, kw, field):
    kw = {"candidate_item_ids": ["1", "2"], **kw}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Rank(ranking_pb2.RankRequest(**kw), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")


BAD_RECOMMEND = [
    ({"k": -1}, "k"),
    ({"k": 1001}, "k"),
    ({"retrieval_budget": -5}, "retrieval_budget"),
    ({"retrieval_budget": 2001}, "retrieval_budget"),
    ({"sources": [""]}, "sources[0]"),
    ({"sources": ["popular", "no_such_source"]}, "sources[1]"),
    ({"user": user_ctx("")}, "user.user_id"),
    (
        {"user": user_ctx("u1", genre_ratings={"Comedy": 5.0, "Noir": 4.0})},
        "user.features.genre_ratings",
    ),
]


def recommend_request(kw) -> ranking_pb2.RecommendRequest:
    return ranking_pb2.RecommendRequest(**{"user": user_ctx("u1"), **kw})


@pytest.mark.parametrize(("kw", "field"), BAD_RECOMMEND)
async def test_bad_recommend_input_is_invalid_argument(stub, kw, field):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Recommend(recommend_request(kw), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")


async def test_an_unknown_genre_names_the_model_genre_it_resembles(stub):
    """A cold start's "comedy" was skipped: the answer was for no stated taste at all."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Recommend(
            recommend_request({"user": user_ctx("cold", genre_ratings={"comedy": 5.0})}),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert "unknown genre 'comedy' (did you mean 'Comedy'?)" in details, details
    assert "Action" in details
    ok = await stub.Recommend(
        recommend_request({"user": user_ctx("cold", genre_ratings={"Comedy": 5.0})}), timeout=10
    )
    assert ok.items


async def test_recommend_ranks_what_retrieval_returns(stub, published_version, reference):
    mv = reference.mv
    uid = mv.users["user_id"][7]
    resp = await stub.Recommend(
        ranking_pb2.RecommendRequest(user=user_ctx(uid), k=10, debug=True), timeout=10
    )
    assert not resp.retrieval_fallback and resp.fallback_reason == ""
    assert resp.index_version == mv.version and resp.model_version == mv.version
    assert resp.source_reports and all(r.source for r in resp.source_reports)
    assert len(resp.items) == 10
    for it in resp.items:
        assert it.sources and list(it.debug.sources) == list(it.sources)
        assert set(it.debug.source_scores) <= set(it.sources)
    ids = [it.item_id for it in resp.items]
    np.testing.assert_allclose(
        [it.score for it in resp.items],
        reference.scores(reference.known_user_features(uid), ids),
        atol=TOL,
    )
    assert np.all(np.diff([it.score for it in resp.items]) <= TOL)
    watched = set(mv.users["history"][7])
    assert not watched & set(ids)


def _hgetall_calls(url: str) -> int:
    """How many HGETALL commands the Redis server has run (user-state reads)."""
    import redis

    with redis.Redis.from_url(url) as r:
        return int(r.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))


async def test_recommend_reads_the_user_state_once(
    stub, redis_server, published_version, reference
):
    """Retrieval passes the state it read on to ranking: one HGETALL per Recommend, not two."""
    from ranking_service import metrics as M

    mv = reference.mv
    passed = M.USER_STATE_READS.labels("retrieval")
    for i in (3, 4):
        uid = mv.users["user_id"][i]
        before, count = _hgetall_calls(redis_server.url), passed._value.get()
        resp = await stub.Recommend(
            ranking_pb2.RecommendRequest(user=user_ctx(uid), k=10), timeout=10
        )
        assert not resp.retrieval_fallback and len(resp.items) == 10
        assert _hgetall_calls(redis_server.url) - before == 1
        assert passed._value.get() - count == 1
        ids = [it.item_id for it in resp.items]
        np.testing.assert_allclose(
            [it.score for it in resp.items],
            reference.scores(reference.known_user_features(uid), ids),
            atol=TOL,
        )
    # Rank has no retrieval answer to take the state from: it reads the user itself.
    before = _hgetall_calls(redis_server.url)
    await stub.Rank(rank_request(mv.users["user_id"][3], mv.item_ids[:50], 5), timeout=10)
    assert _hgetall_calls(redis_server.url) - before == 1


async def test_concurrent_recommends_share_retrieve_many_calls(
    stub, server, published_version, reference
):
    """Retrieval of concurrent Recommends goes out batched; each caller gets its own answer."""
    batcher = server.ranker.retrieval._batcher
    assert batcher is not None, "retrieval batching is on by default"
    users = [str(u) for u in reference.mv.users["user_id"][:24]]

    def req(uid: str, **kw) -> ranking_pb2.RecommendRequest:
        return ranking_pb2.RecommendRequest(user=user_ctx(uid), k=10, debug=True, **kw)

    alone = [await stub.Recommend(req(u), timeout=10) for u in users]  # one Retrieve each
    before = (batcher.batches, batcher.requests)
    observed = (_sample("recsys_ranking_retrieval_batch_size_count"),
                _sample("recsys_ranking_retrieval_batch_size_sum"))  # fmt: skip
    # Retrieval refuses this one (its cap is lower than the one ranking was told).
    bad = req(users[0], retrieval_budget=1500)
    *together, refused = await asyncio.gather(
        *(stub.Recommend(req(u), timeout=10) for u in users),
        stub.Recommend(bad, timeout=10),
        return_exceptions=True,
    )
    assert isinstance(refused, grpc.aio.AioRpcError), refused
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details().startswith("retrieval_budget: 1500"), refused.details()
    for one, batched in zip(alone, together, strict=True):
        assert not isinstance(batched, BaseException), batched
        assert not batched.retrieval_fallback
        assert [i.item_id for i in batched.items] == [i.item_id for i in one.items]
        assert [list(i.sources) for i in batched.items] == [list(i.sources) for i in one.items]
        assert [dict(i.debug.source_scores) for i in batched.items] == [
            dict(i.debug.source_scores) for i in one.items
        ]
    batches, requests = batcher.batches - before[0], batcher.requests - before[1]
    assert requests == len(users) + 1
    assert batches < requests, "concurrent calls were sent one by one"
    # The metric sees the same calls: one observation per call, of its size.
    assert _sample("recsys_ranking_retrieval_batch_size_count") - observed[0] == batches
    assert _sample("recsys_ranking_retrieval_batch_size_sum") - observed[1] == requests


def _sample(name: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name) or 0.0


async def test_recommend_falls_back_to_popular_when_retrieval_is_down(
    trained_version, redis_server, published_version, reference
):
    closed = f"127.0.0.1:{free_port()}"
    srv = build_server(
        ranking_settings(
            trained_version.parent, redis_server.url, retrieval_address=closed, max_candidates=2000
        )
    )
    await srv.start()
    try:
        await wait_serving(f"127.0.0.1:{srv.port}")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            s = ranking_pb2_grpc.RankingServiceStub(ch)
            resp = await s.Recommend(
                ranking_pb2.RecommendRequest(user=user_ctx("cold"), k=8, debug=True), timeout=10
            )
            # The fallback ranks only the first retrieval_budget popular items.
            small = await s.Recommend(
                ranking_pb2.RecommendRequest(user=user_ctx("cold"), k=3, retrieval_budget=4),
                timeout=10,
            )
            # What retrieval would refuse is refused with it down too, not
            # answered from the popular list.
            refused = []
            for bad in BAD_RECOMMEND:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await s.Recommend(recommend_request(bad[0]), timeout=10)
                refused.append((err.value.code(), err.value.details().split(":")[0]))
    finally:
        await srv.stop(0)
    assert refused == [(grpc.StatusCode.INVALID_ARGUMENT, field) for _, field in BAD_RECOMMEND]
    assert resp.retrieval_fallback and "retrieval" in resp.fallback_reason
    assert resp.index_version == "" and len(resp.source_reports) == 0
    top4 = {p[0] for p in reference.mv.top_lists["popular"][:4]}
    assert len(small.items) == 3 and {it.item_id for it in small.items} <= top4
    popular = {p[0] for p in reference.mv.top_lists["popular"]}
    assert len(resp.items) == 8 and {it.item_id for it in resp.items} <= popular
    assert all(list(it.sources) == ["popular"] for it in resp.items)
    ids = [it.item_id for it in resp.items]
    np.testing.assert_allclose(
        [it.score for it in resp.items],
        reference.scores(default_user_vector(reference.mv.spec), ids),
        atol=TOL,
    )


async def test_recommend_propagates_the_deadline_and_still_answers(
    trained_version, redis_server, published_version
):
    from bench.echo import EchoProcess

    with EchoProcess(delay_ms=3000) as echo:
        srv = build_server(
            ranking_settings(
                trained_version.parent,
                redis_server.url,
                retrieval_address=echo.address,
                retrieval_timeout_s=30.0,
            )
        )
        await srv.start()
        try:
            await wait_serving(f"127.0.0.1:{srv.port}")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                s = ranking_pb2_grpc.RankingServiceStub(ch)
                t0 = time.monotonic()
                resp = await s.Recommend(
                    ranking_pb2.RecommendRequest(user=user_ctx("u"), k=5), timeout=1.0
                )
                elapsed = time.monotonic() - t0
        finally:
            await srv.stop(0)
    # Retrieval got (most of) the client's 1 s, not its own 30 s, and the
    # popular list was ranked in the time kept back.
    assert resp.retrieval_fallback and "did not answer within" in resp.fallback_reason
    assert len(resp.items) == 5
    assert elapsed < 1.0


async def test_redis_down_degrades_to_request_features(trained_version, reference):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    srv = build_server(ranking_settings(trained_version.parent, dead))
    await srv.start()
    try:
        await wait_serving(f"127.0.0.1:{srv.port}")
        mv = reference.mv
        uid = mv.users["user_id"][0]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            s = ranking_pb2_grpc.RankingServiceStub(ch)
            resp = await s.Rank(rank_request(uid, list(mv.item_ids[:100]), 10), timeout=10)
    finally:
        await srv.stop(0)
    assert len(resp.items) == 10
    check_against_reference(resp, reference, default_user_vector(mv.spec), list(mv.item_ids[:100]))


async def test_recommend_restricted_to_sources_that_found_nothing_is_empty(stub, published_version):
    """Not popular items (from a source the caller left out), and not a fallback."""
    resp = await stub.Recommend(
        ranking_pb2.RecommendRequest(
            user=user_ctx("cold-and-restricted"), k=5, sources=["similar_to_recent"]
        ),
        timeout=10,
    )
    assert list(resp.items) == []
    assert not resp.retrieval_fallback and resp.fallback_reason == ""
    assert [(r.source, r.count) for r in resp.source_reports] == [("similar_to_recent", 0)]
    # Without the restriction the same cold user still gets the popular list.
    everything = await stub.Recommend(
        ranking_pb2.RecommendRequest(user=user_ctx("cold-and-restricted"), k=5), timeout=10
    )
    assert len(everything.items) == 5


async def _rank_order(stub, cands, user_id: str = "", **features) -> list[str]:
    user = common_pb2.UserContext(user_id=user_id, features=common_pb2.UserFeatures(**features))
    req = ranking_pb2.RankRequest(
        user=user, candidate_item_ids=cands, top_k=len(cands), include_watched=True
    )
    return [it.item_id for it in (await stub.Rank(req, timeout=10)).items]


async def test_a_cold_start_user_without_an_age_is_still_personalised(stub, published_version):
    """Every training user had an age: a request without one must not collapse to one ranking."""
    mv = ModelVersion.open(published_version)
    g, c = mv.spec.genres, mv.spec.countries
    cands = list(mv.item_ids[:200])
    a = await _rank_order(stub, cands, genre_ratings={g[0]: 5.0, g[1]: 1.0})
    b = await _rank_order(stub, cands, genre_ratings={g[1]: 5.0, g[0]: 1.0}, country=c[-1])
    nothing = await _rank_order(stub, cands)
    assert a != b and a != nothing and b != nothing
    # Unknown, the age is the training users' median: ranked as if sent.
    assert mv.spec.default_age > 0
    typical = await _rank_order(
        stub, cands, genre_ratings={g[0]: 5.0, g[1]: 1.0}, age=int(mv.spec.default_age)
    )
    assert typical == a


async def test_users_known_only_from_their_interactions_are_personalised(
    stub, published_version, redis_server
):
    """No stored profile (so no age): opposite histories must give different rankings."""
    import redis.asyncio as aioredis

    from recsys.user_store import record_interaction

    mv = ModelVersion.open(published_version)
    genres = np.asarray(mv.item_genres, bool)
    g0, g1 = mv.spec.genres[:2]
    only = {
        g0: [r for r in range(len(mv.item_ids)) if genres[r, 0] and not genres[r, 1]][:15],
        g1: [r for r in range(len(mv.item_ids)) if genres[r, 1] and not genres[r, 0]][:15],
    }
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        for uid, (liked, disliked) in {"online-a": (g0, g1), "online-b": (g1, g0)}.items():
            for genre, rating in ((liked, 5.0), (disliked, 1.0)):
                for r in only[genre]:
                    await record_interaction(
                        client,
                        mv.spec,
                        uid,
                        mv.item_ids[r],
                        mv.item_genre_names(r),
                        rating,
                        history_length=50,
                    )
    finally:
        await client.aclose()
    cands = list(mv.item_ids[:200])
    assert await _rank_order(stub, cands, "online-a") != await _rank_order(stub, cands, "online-b")


async def test_recommend_falls_back_when_retrieval_finds_nothing(
    serve_both, published_version, redis_url
):
    """Retrieval answers, with nothing (its one source needs a country the user lacks)."""
    only_country = [{"name": "top_country", "type": "redis_top_country", "budget": 50}]
    async with serve_both(
        published_version.parent, redis_url, retrieval={"sources": only_country}
    ) as stack:
        resp = await stack.ranking.Recommend(
            ranking_pb2.RecommendRequest(user=user_ctx("no-country"), k=5), timeout=10
        )
    assert resp.retrieval_fallback and resp.fallback_reason == "retrieval returned no candidates"
    assert len(resp.items) == 5 and all(list(it.sources) == ["popular"] for it in resp.items)
    assert [(r.source, r.count) for r in resp.source_reports] == [("top_country", 0)]
