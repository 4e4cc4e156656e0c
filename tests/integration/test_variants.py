"""A/B variants end to end: two trained versions served side by side, real gRPC and Redis."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
import redis as redis_sync

from recsys import redis_keys
from recsys.artifacts import ModelVersion
from recsys.config import ExperimentSettings
from recsys.experiments import Experiment
from recsys.loadtest import LoadConfig, run_load
from recsys.v1 import common_pb2, ranking_pb2, retrieval_pb2
from trainer.publish import publish

EXPERIMENT = {
    "name": "test-ab",
    "variants": [
        {"name": "control", "share": 0.5},
        {
            "name": "pinned",
            "share": 0.5,
            "model_version": "1",
            "sources": {"top_country": {"enabled": False}, "popular": {"weight": 20.0}},
        },
    ],
}


def _publish(version_dir, url: str) -> None:
    client = redis_sync.Redis.from_url(url)
    try:
        # As `recsys publish` does with this config: the pinned version's top lists stay.
        publish(version_dir, client, quiet=True, protect={"1"})
    finally:
        client.close()


@pytest.fixture(scope="module")
def versions(tmp_path_factory, train_version, redis_server):
    model_dir = tmp_path_factory.mktemp("ab-models")
    v1 = train_version(model_dir, seed=0, epochs=1)
    v2 = train_version(model_dir, seed=1, epochs=1)
    assert (v1.name, v2.name) == ("1", "2")
    # A fresh store: the session's Redis may already serve a newer version
    # from another module, and publish only moves the pointer forward.
    flush = redis_sync.Redis.from_url(redis_server.url)
    flush.flushall()
    flush.close()
    _publish(v1, redis_server.url)
    _publish(v2, redis_server.url)  # current pointer -> 2
    return model_dir


@pytest.fixture(scope="module")
async def stack(versions, redis_server, serve_both):
    async with serve_both(
        versions,
        redis_server.url,
        retrieval={"reload_interval_s": 0.2},
        experiments=ExperimentSettings(**EXPERIMENT),
    ) as s:
        yield s.ranking_server, s.ranking, s.retrieval, s.retrieval_app


def users_by_variant(model_dir) -> dict[str, list[str]]:
    exp = Experiment(ExperimentSettings(**EXPERIMENT))
    mv = ModelVersion.open(model_dir / "2")
    out: dict[str, list[str]] = {"control": [], "pinned": []}
    for uid in mv.users["user_id"]:
        out[exp.assign(uid).name].append(uid)
    return out


async def test_two_variants_serve_two_model_versions_at_once(stack, versions):
    srv, ranking, _, _ = stack
    assert set(srv.ranker.models) == {"current", "1"}
    assert srv.ranker.models["current"].name == "2"
    groups = users_by_variant(versions)
    expected = {"control": "2", "pinned": "1"}
    # Interleaved concurrent calls: both versions answer in the same moment.
    calls, want = [], []
    for variant, users in groups.items():
        assert len(users) >= 5, "both buckets must have users"
        for uid in users[:5]:
            req = ranking_pb2.RecommendRequest(
                user=common_pb2.UserContext(user_id=uid), k=5, debug=True
            )
            calls.append(ranking.Recommend(req, timeout=10))
            want.append((variant, expected[variant]))
    answers = await asyncio.gather(*calls)
    for resp, (variant, version) in zip(answers, want, strict=True):
        assert resp.variant == variant
        assert resp.model_version == version
        # Candidates came from the same version's index and top lists.
        assert resp.index_version == version
        assert not resp.retrieval_fallback
        assert resp.items and all(it.debug.model_version == version for it in resp.items)
        names = {r.source for r in resp.source_reports}
        # Retrieval applied the same variant's sources: "pinned" drops top_country.
        assert ("top_country" in names) == (variant == "control")


async def test_rank_reports_the_variant_and_its_model(stack, versions):
    _, ranking, _, _ = stack
    groups = users_by_variant(versions)
    mv = ModelVersion.open(versions / "1")
    items = list(mv.item_ids[:50])
    for variant, version in (("control", "2"), ("pinned", "1")):
        uid = groups[variant][0]
        resp = await ranking.Rank(
            ranking_pb2.RankRequest(
                user=common_pb2.UserContext(user_id=uid), candidate_item_ids=items, top_k=5
            ),
            timeout=10,
        )
        assert (resp.variant, resp.model_version) == (variant, version)


async def test_forced_variant_wins_over_the_bucket(stack, versions):
    _, ranking, retrieval, _ = stack
    uid = users_by_variant(versions)["control"][0]
    user = common_pb2.UserContext(user_id=uid, variant="pinned")
    resp = await ranking.Recommend(ranking_pb2.RecommendRequest(user=user, k=3), timeout=10)
    assert (resp.variant, resp.model_version) == ("pinned", "1")
    # The pinned variant's popular weight (20) gives that source most interleave turns.
    popular_only = {}
    for variant in ("pinned", "control"):
        user.variant = variant
        got = await retrieval.Retrieve(
            retrieval_pb2.RetrieveRequest(user=user, budget=60), timeout=10
        )
        assert got.variant == variant and len(got.candidates) == 60
        popular_only[variant] = sum(list(c.sources) == ["popular"] for c in got.candidates)
    assert popular_only["pinned"] > 2 * popular_only["control"]


async def test_retrieve_alone_buckets_like_ranking(stack, versions):
    _, _, retrieval, _ = stack
    expected = {"control": "2", "pinned": "1"}
    for variant, users in users_by_variant(versions).items():
        for uid in users[:3]:
            req = retrieval_pb2.RetrieveRequest(user=common_pb2.UserContext(user_id=uid))
            resp = await retrieval.Retrieve(req, timeout=10)
            assert (resp.variant, resp.index_version) == (variant, expected[variant])
            assert not resp.degraded


async def test_retrieval_serves_each_variant_from_its_own_version(stack, versions):
    _, _, retrieval, app = stack
    assert set(app.engine.tracks) == {"current", "1"}
    assert (app.engine.tracks["current"].version, app.engine.tracks["1"].version) == ("2", "1")
    assert set(app.watchers) == {"current", "1"}
    # One RetrieveMany holding both variants' users: each member uses its own version.
    groups = users_by_variant(versions)
    members = [
        retrieval_pb2.RetrieveRequest(user=common_pb2.UserContext(user_id=uid), budget=30)
        for uid in groups["control"][:3] + groups["pinned"][:3]
    ]
    got = await retrieval.RetrieveMany(
        retrieval_pb2.RetrieveManyRequest(requests=members), timeout=10
    )
    versions_seen = [o.response.index_version for o in got.outcomes]
    assert versions_seen == ["2"] * 3 + ["1"] * 3
    # "Similar to recent" reads the pinned version's own Annoy index: its
    # neighbours of an item differ from the current version's.
    v1 = app.engine.tracks["1"].similar("1", 10)
    v2 = app.engine.tracks["current"].similar("1", 10)
    assert [n.item_id for n in v1] != [n.item_id for n in v2]


@pytest.mark.parametrize("rpc", ["Recommend", "Rank", "Retrieve"])
async def test_unknown_variant_is_invalid_argument(stack, rpc):
    _, ranking, retrieval, _ = stack
    user = common_pb2.UserContext(user_id="u1", variant="nope")
    if rpc == "Recommend":
        call = ranking.Recommend(ranking_pb2.RecommendRequest(user=user, k=3), timeout=10)
    elif rpc == "Rank":
        call = ranking.Rank(
            ranking_pb2.RankRequest(user=user, candidate_item_ids=["x"], top_k=1), timeout=10
        )
    else:
        call = retrieval.Retrieve(retrieval_pb2.RetrieveRequest(user=user), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user.variant" in err.value.details() and "nope" in err.value.details()


async def test_tracks_swap_independently(stack, versions, train_version, redis_server):
    srv, ranking, _, app = stack
    pinned_before = srv.ranker.models["1"]
    pinned_index_before = app.engine.tracks["1"]
    v3 = train_version(versions, seed=2, epochs=1)
    _publish(v3, redis_server.url)  # the current pointer moves to 3
    for _ in range(300):
        if (srv.ranker.models["current"].name, app.engine.tracks["current"].version) == ("3", "3"):
            break
        await asyncio.sleep(0.1)
    assert srv.ranker.models["current"].name == "3"
    assert app.engine.tracks["current"].version == "3"
    # The pinned tracks did not move, in either service.
    assert srv.ranker.models["1"] is pinned_before
    assert app.engine.tracks["1"] is pinned_index_before
    groups = users_by_variant(versions)
    for variant, version in (("control", "3"), ("pinned", "1")):
        req = ranking_pb2.RecommendRequest(user=common_pb2.UserContext(user_id=groups[variant][0]))
        resp = await ranking.Recommend(req, timeout=10)
        assert (resp.variant, resp.model_version, resp.index_version) == (variant, version, version)
        assert not resp.retrieval_fallback
        genre = next(r for r in resp.source_reports if r.source == "top_genre")
        assert genre.status == common_pb2.SOURCE_STATUS_OK and genre.count > 0
    # Publishing 3 with keep=2 would drop version 1's top lists, but it is pinned:
    # a retrieval process started now still finds them.
    client = redis_sync.Redis.from_url(redis_server.url)
    try:
        assert client.exists(redis_keys.top_popular("1"))
    finally:
        client.close()


async def test_loadtest_can_drive_one_arm(stack, versions):
    srv, _, _, _ = stack
    control_users = users_by_variant(versions)["control"][:20]

    def variant_of(resp: bytes) -> str:
        return ranking_pb2.RecommendResponse.FromString(resp).variant

    cfg = LoadConfig(
        rpc="Recommend",
        target=f"127.0.0.1:{srv.port}",
        user_ids=control_users,
        concurrency=2,
        requests=10,
        duration_s=None,
        variant="pinned",
        inspect=variant_of,
    )
    forced = await run_load(cfg)
    assert (forced.ok, forced.flagged) == (10, {"pinned": 10})
    bucketed = await run_load(dataclasses.replace(cfg, variant=""))
    assert (bucketed.ok, bucketed.flagged) == (10, {"control": 10})
    # SimilarItems carries the forced arm too.
    _, _, _, app = stack
    similar = dataclasses.replace(
        cfg,
        rpc="SimilarItems",
        target=f"127.0.0.1:{app.handle.port}",
        item_ids=["1", "2", "3"],
        inspect=lambda resp: retrieval_pb2.SimilarItemsResponse.FromString(resp).variant,
    )
    forced_similar = await run_load(similar)
    assert (forced_similar.ok, forced_similar.flagged) == (10, {"pinned": 10})


async def test_similar_items_follow_the_users_variant(stack, versions):
    _, _, retrieval, app = stack
    item = "1"
    current = app.engine.tracks["current"]  # 2, or 3 once test_tracks_swap_independently ran
    expected = {
        "control": (current.version, [n.item_id for n in current.similar(item, 10)]),
        "pinned": ("1", [n.item_id for n in app.engine.tracks["1"].similar(item, 10)]),
    }
    assert expected["control"][1] != expected["pinned"][1]
    for variant, users in users_by_variant(versions).items():
        version, neighbours = expected[variant]
        for uid in users[:3]:
            resp = await retrieval.SimilarItems(
                retrieval_pb2.SimilarItemsRequest(item_id=item, k=10, user_id=uid), timeout=10
            )
            assert (resp.variant, resp.index_version) == (variant, version)
            assert [i.item_id for i in resp.items] == neighbours
    # A forced variant wins over the bucket; no user at all is the default variant.
    control_user = users_by_variant(versions)["control"][0]
    forced = await retrieval.SimilarItems(
        retrieval_pb2.SimilarItemsRequest(
            item_id=item, k=10, user_id=control_user, variant="pinned"
        ),
        timeout=10,
    )
    assert (forced.variant, forced.index_version) == ("pinned", "1")
    anonymous = await retrieval.SimilarItems(
        retrieval_pb2.SimilarItemsRequest(item_id=item, k=10), timeout=10
    )
    assert (anonymous.variant, anonymous.index_version) == ("control", current.version)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await retrieval.SimilarItems(
            retrieval_pb2.SimilarItemsRequest(item_id=item, k=10, variant="nope"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("variant") and "nope" in err.value.details()


async def test_naming_only_sources_an_arm_disables_is_an_empty_answer_not_an_error(stack, versions):
    """Whether a request is valid must not depend on an arm the caller cannot see."""
    _, ranking, _, _ = stack
    by = users_by_variant(versions)
    answers = {}
    for arm in ("control", "pinned"):
        resp = await ranking.Recommend(
            ranking_pb2.RecommendRequest(
                user=common_pb2.UserContext(user_id=by[arm][0]), k=5, sources=["top_country"]
            ),
            timeout=10,
        )
        answers[arm] = (resp.variant, len(resp.items), resp.retrieval_fallback)
    assert answers["control"][0] == "control" and answers["control"][1] > 0
    assert answers["pinned"] == ("pinned", 0, False)


async def test_an_arm_retrieval_does_not_know_yet_falls_back_instead_of_failing(
    versions, redis_server
):
    """A config rollout: ranking has the new arm, retrieval still runs the old config."""
    from ranking_service.server import build_server as build_ranking
    from ranking_service.testing import ranking_settings, wait_serving
    from recsys.channels import wait_serving as wait_for
    from recsys.config import RetrievalSettings
    from recsys.v1 import ranking_pb2_grpc
    from retrieval_service.server import SERVICE_NAME
    from retrieval_service.server import build_server as build_retrieval

    old = ExperimentSettings(name="test-ab", variants=[{"name": "control", "share": 1.0}])
    base = ranking_settings(versions, redis_server.url, retrieval_timeout_s=2.0)
    rs = RetrievalSettings(host="127.0.0.1", port=0, metrics_port=0)
    handle, app = build_retrieval(base.model_copy(update={"retrieval": rs, "experiments": old}))
    await app.start()
    try:
        ranking = base.ranking.model_copy(update={"retrieval_address": f"127.0.0.1:{handle.port}"})
        new = ExperimentSettings(**EXPERIMENT)
        srv = build_ranking(base.model_copy(update={"ranking": ranking, "experiments": new}))
        await srv.start()
        try:
            await wait_serving(f"127.0.0.1:{srv.port}")
            await wait_for(f"127.0.0.1:{handle.port}", SERVICE_NAME, timeout_s=60.0)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = ranking_pb2_grpc.RankingServiceStub(ch)
                uid = users_by_variant(versions)["pinned"][0]
                resp = await stub.Recommend(
                    ranking_pb2.RecommendRequest(user=common_pb2.UserContext(user_id=uid), k=3),
                    timeout=10,
                )
                # Forced by the caller, the unknown arm is still the caller's error.
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Recommend(
                        ranking_pb2.RecommendRequest(
                            user=common_pb2.UserContext(user_id=uid, variant="pinned"), k=3
                        ),
                        timeout=10,
                    )
        finally:
            await srv.stop(0)
    finally:
        await app.stop(0)
    assert resp.variant == "pinned" and len(resp.items) == 3 and resp.retrieval_fallback
    assert "variant" in resp.fallback_reason
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
