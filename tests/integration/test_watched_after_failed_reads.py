"""Watched items stay out of answers when one service's user read fails or the hash is corrupt."""

from __future__ import annotations

import redis

from recsys import redis_keys
from recsys.artifacts import ModelVersion
from recsys.v1 import common_pb2, ranking_pb2


async def test_watched_items_stay_out_when_retrievals_read_fails(
    trained_version, redis_server, published_version, serve_both, monkeypatch
):
    mv = ModelVersion.open(trained_version)
    c = redis.Redis.from_url(redis_server.url, decode_responses=True)
    # The heaviest watcher: most of the catalogue watched.
    row = max(range(len(mv.users["user_id"])), key=lambda r: len(mv.users["watched"][r]))
    uid = mv.users["user_id"][row]
    watched = c.smembers(redis_keys.user_watched(uid))
    c.close()
    assert len(watched) > 50
    async with serve_both(trained_version.parent, redis_server.url) as stack:
        req = ranking_pb2.RecommendRequest(user=common_pb2.UserContext(user_id=uid), k=50)
        ok = await stack.ranking.Recommend(req, timeout=10)
        assert not {i.item_id for i in ok.items} & watched  # healthy: none watched

        import retrieval_service.engine as eng

        async def failing(*a, **k):
            raise redis.exceptions.TimeoutError("simulated: retrieval's user read timed out")

        monkeypatch.setattr(eng, "load_users", failing)
        bad = await stack.ranking.Recommend(req, timeout=10)
    got = [i.item_id for i in bad.items]
    leaked = [i for i in got if i in watched]
    assert not bad.retrieval_fallback
    assert not leaked, f"{len(leaked)}/{len(got)} recommended items were already watched"


async def test_watched_items_stay_out_for_a_user_whose_hash_does_not_decode(
    trained_version, redis_server, published_version, serve_both
):
    """Same path without a fault injection: one non-numeric aggregate field."""
    mv = ModelVersion.open(trained_version)
    c = redis.Redis.from_url(redis_server.url, decode_responses=True)
    row = max(range(len(mv.users["user_id"])), key=lambda r: len(mv.users["watched"][r]))
    uid = mv.users["user_id"][row]
    watched = c.smembers(redis_keys.user_watched(uid))
    c.hset(redis_keys.user_state(uid), "sum", "n/a")
    c.close()
    async with serve_both(trained_version.parent, redis_server.url) as stack:
        req = ranking_pb2.RecommendRequest(user=common_pb2.UserContext(user_id=uid), k=50)
        bad = await stack.ranking.Recommend(req, timeout=10)
        rank_req = ranking_pb2.RankRequest(
            user=common_pb2.UserContext(user_id=uid),
            candidate_item_ids=sorted(watched)[:20],
            top_k=20,
        )
        rank = await stack.ranking.Rank(rank_req, timeout=10)
    leaked = [i.item_id for i in bad.items if i.item_id in watched]
    assert not leaked, f"{len(leaked)}/{len(bad.items)} recommended items were already watched"
    assert not rank.items, "Rank returned watched candidates"
    assert rank.watched_dropped == 20


async def test_a_corrupt_hash_keeps_the_recent_list_for_similar_to_recent(
    trained_version, redis_server, published_version, serve_both
):
    """The history read fine beside a hash that does not decode: similar_to_recent uses it."""
    from recsys.v1 import common_pb2, retrieval_pb2

    mv = ModelVersion.open(trained_version)
    uid = str(mv.users["user_id"][0])
    c = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert c.llen(redis_keys.user_recent(uid)) > 0
    c.hset(redis_keys.user_state(uid), "sum", "n/a")
    c.close()
    async with serve_both(trained_version.parent, redis_server.url) as stack:
        resp = await stack.retrieval.Retrieve(
            retrieval_pb2.RetrieveRequest(user=common_pb2.UserContext(user_id=uid), budget=50),
            timeout=10,
        )
    reports = {r.source: (r.status, r.message, r.count) for r in resp.source_reports}
    status, _, count = reports["similar_to_recent"]
    assert status == common_pb2.SOURCE_STATUS_OK and count > 0, reports
    assert resp.degraded, "served as unknown: the answer says so"
