"""Reasons on Recommend items, end to end (no experiment configured: variant "default")."""

from __future__ import annotations

import asyncio

import pytest
import redis

from recsys import redis_keys
from recsys.artifacts import ModelVersion
from recsys.client import RecommenderClient, format_table
from recsys.v1 import common_pb2, ranking_pb2, retrieval_pb2


@pytest.fixture(scope="module")
async def stack(trained_version, redis_server, serve_both):
    async with serve_both(trained_version.parent, redis_server.url) as s:
        yield s.ranking, s.retrieval, s.ranking_port, s.retrieval_port


@pytest.fixture(scope="module")
def mv(trained_version) -> ModelVersion:
    return ModelVersion.open(trained_version)


def title(mv: ModelVersion, item: str) -> str:
    return mv.items_meta["title"][mv.item_ids.index(item)]


async def recommend(stub, user: common_pb2.UserContext, *sources: str, k: int = 8):
    req = ranking_pb2.RecommendRequest(user=user, k=k, sources=list(sources))
    resp = await stub.Recommend(req, timeout=10)
    assert resp.variant == "default" and not resp.retrieval_fallback
    assert len(resp.items) == k
    return resp


async def test_reason_names_the_seed_from_request_history(stack, mv, published_version):
    ranking, _, _, _ = stack
    seed = mv.item_ids[17]
    user = common_pb2.UserContext(user_id="fresh-1", recent_item_ids=[seed])
    resp = await recommend(ranking, user, "similar_to_recent")
    for it in resp.items:
        (r,) = it.reasons
        assert (r.kind, r.ref) == ("similar_to", seed)
        assert r.text == f"Because you watched {title(mv, seed)}"


async def test_each_reason_names_the_seed_the_item_is_near(stack, mv, published_version):
    ranking, retrieval, _, _ = stack
    seeds = [mv.item_ids[3], mv.item_ids[90]]
    user = common_pb2.UserContext(user_id="fresh-2", recent_item_ids=seeds)
    resp = await recommend(ranking, user, "similar_to_recent", k=12)
    refs = set()
    for it in resp.items:
        r = it.reasons[0]
        refs.add(r.ref)
        near = await retrieval.SimilarItems(
            retrieval_pb2.SimilarItemsRequest(item_id=r.ref, k=60), timeout=10
        )
        assert it.item_id in {n.item_id for n in near.items}, (it.item_id, r.ref)
        assert r.text == f"Because you watched {title(mv, r.ref)}"
    assert refs <= set(seeds)


async def test_stored_recent_history_is_the_seed(stack, mv, published_version):
    ranking, retrieval, _, _ = stack
    seed = mv.item_ids[42]
    await retrieval.RecordInteraction(
        retrieval_pb2.RecordInteractionRequest(user_id="fresh-3", item_id=seed, rating=5.0),
        timeout=10,
    )
    user = common_pb2.UserContext(user_id="fresh-3")
    resp = await recommend(ranking, user, "similar_to_recent", k=5)
    assert {it.reasons[0].text for it in resp.items} == {f"Because you watched {title(mv, seed)}"}


async def test_segment_and_popular_reasons(stack, mv, published_version):
    ranking, _, _, _ = stack
    uid = mv.users["user_id"][0]
    resp = await recommend(ranking, common_pb2.UserContext(user_id=uid), "top_genre")
    for it in resp.items:
        r = it.reasons[0]
        assert r.kind == "top_in_genre" and r.text == f"Top in {r.ref}"
        assert r.ref in it.genres  # the genre list it came from is one of its genres
    country = mv.spec.countries[0]
    user = common_pb2.UserContext(
        user_id="fresh-4", features=common_pb2.UserFeatures(country=country)
    )
    resp = await recommend(ranking, user, "top_country")
    assert {(r.kind, r.ref, r.text) for it in resp.items for r in it.reasons} == {
        ("top_in_country", country, "Popular in your region")
    }
    resp = await recommend(ranking, common_pb2.UserContext(user_id="fresh-5"), "popular")
    assert {r.text for it in resp.items for r in it.reasons} == {"Popular now"}


async def test_client_and_table_show_reasons(stack, mv, published_version):
    _, _, ranking_port, retrieval_port = stack
    seed = mv.item_ids[17]

    def call():
        with RecommenderClient(
            f"127.0.0.1:{ranking_port}", f"127.0.0.1:{retrieval_port}", timeout_s=10
        ) as rc:
            return rc.recommend("fresh-6", k=4, recent=[seed], sources=["similar_to_recent"])

    recs = await asyncio.to_thread(call)
    assert recs.variant == "default"
    assert all(it.reasons[0].ref == seed for it in recs.items)
    table = format_table(recs)
    assert table.count(f"Because you watched {title(mv, seed)}"[:43]) == 4


async def test_distinct_countries_do_not_grow_the_reason_memo_of_other_sources(
    serve_both, trained_version, redis_server, published_version, mv
):
    """Only a regional reason depends on the country, so only its memo key carries it."""
    uid = mv.users["user_id"][0]
    async with serve_both(trained_version.parent, redis_server.url) as s:
        ranker = s.ranking_server.ranker

        async def answer(country: str, *sources: str):
            user = common_pb2.UserContext(
                user_id=uid, features=common_pb2.UserFeatures(country=country)
            )
            return await recommend(s.ranking, user, *sources)

        first = await answer("country-0", "top_genre")
        memo = ranker._reasons[ranker.model]
        size = len(memo)
        assert size > 0
        for n in range(1, 30):
            again = await answer(f"country-{n}", "top_genre")
            assert [i.reasons for i in again.items] == [i.reasons for i in first.items]
        assert len(memo) == size, "a key per country"
        # The regional reason still names the caller's own country.
        for country in mv.spec.countries[:2]:
            regional = await answer(country, "top_country")
            assert {r.ref for i in regional.items for r in i.reasons} == {country}


async def test_regional_reason_names_the_stored_country(stack, mv, published_version, redis_server):
    """A known user who sends no country gets the stored one as the regional reason's ref."""
    ranking, _, _, _ = stack
    r = redis.Redis.from_url(redis_server.url)
    uid, country = None, None
    for u in mv.users["user_id"]:
        c = r.hget(redis_keys.user_state(str(u)), "country")
        if c:
            uid, country = str(u), c.decode()
            break
    assert uid is not None
    resp = await recommend(ranking, common_pb2.UserContext(user_id=uid), "top_country")
    assert {(x.kind, x.ref) for it in resp.items for x in it.reasons} == {
        ("top_in_country", country)
    }


async def test_regional_reason_is_not_shared_across_countries(stack, mv, published_version):
    """The reason memo never gives one user another's country."""
    ranking, _, _, _ = stack
    a, b = mv.spec.countries[0], mv.spec.countries[1]
    for n, country in enumerate((a, b, a)):
        user = common_pb2.UserContext(
            user_id=f"fresh-country-{n}", features=common_pb2.UserFeatures(country=country)
        )
        resp = await recommend(ranking, user, "top_country")
        assert {x.ref for it in resp.items for x in it.reasons} == {country}
