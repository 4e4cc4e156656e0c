"""Edge cases of the request contract against real servers: fallback, limits, keys, retries."""

from __future__ import annotations

import grpc
import pytest

from ranking_service.server import build_server
from ranking_service.testing import ranking_settings, wait_serving
from recsys.artifacts import ModelVersion
from recsys.embedded_redis import free_port
from recsys.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc


async def test_popular_fallback_returns_items_the_request_says_were_watched(
    trained_version, redis_server, published_version
):
    """Retrieval drops user.recent_item_ids (the caller says they were watched): so must
    the popular fallback, or the answer's filtering depends on retrieval being up."""
    popular = [p[0] for p in ModelVersion.open(trained_version).top_lists["popular"]]
    watched = popular[:10]
    closed = f"127.0.0.1:{free_port()}"  # retrieval down -> popular fallback
    srv = build_server(
        ranking_settings(trained_version.parent, redis_server.url, retrieval_address=closed)
    )
    await srv.start()
    try:
        await wait_serving(f"127.0.0.1:{srv.port}")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = ranking_pb2_grpc.RankingServiceStub(ch)
            via_recent = await stub.Recommend(
                ranking_pb2.RecommendRequest(
                    user=common_pb2.UserContext(user_id="cold-x", recent_item_ids=watched),
                    k=10,
                ),
                timeout=10,
            )
            via_exclude = await stub.Recommend(
                ranking_pb2.RecommendRequest(
                    user=common_pb2.UserContext(user_id="cold-x", exclude_item_ids=watched),
                    k=10,
                ),
                timeout=10,
            )
    finally:
        await srv.stop(0)
    assert via_recent.retrieval_fallback and via_exclude.retrieval_fallback
    assert not {i.item_id for i in via_exclude.items} & set(watched)  # passes
    assert not {i.item_id for i in via_recent.items} & set(watched), [
        i.item_id for i in via_recent.items
    ]


@pytest.mark.parametrize(
    ("ranking_opts", "retrieval_opts", "user"),
    [
        # More exclude ids than retrieval's max_request_ids, within ranking's max_candidates.
        (
            {"max_candidates": 20_000},
            {},
            common_pb2.UserContext(user_id="u1", exclude_item_ids=[f"x{i}" for i in range(12_000)]),
        ),
        # A user id within ranking's max_id_bytes but over retrieval's.
        ({}, {"max_id_bytes": 64}, common_pb2.UserContext(user_id="u" * 100)),
    ],
)
async def test_recommend_validity_does_not_depend_on_retrieval_being_up(
    trained_version, redis_server, published_version, ranking_opts, retrieval_opts, user
):
    """Ranking checks retrieval's id counts and id lengths too (RetrievalLimits)."""
    from recsys.channels import wait_serving as wait_for
    from recsys.config import RetrievalSettings
    from retrieval_service.server import SERVICE_NAME
    from retrieval_service.server import build_server as build_retrieval

    rs = RetrievalSettings(host="127.0.0.1", port=0, metrics_port=0, **retrieval_opts)
    base = ranking_settings(trained_version.parent, redis_server.url, **ranking_opts)
    base = base.model_copy(update={"retrieval": rs})
    handle, app = build_retrieval(base)
    await app.start()
    codes = {}
    try:
        await wait_for(f"127.0.0.1:{handle.port}", SERVICE_NAME, timeout_s=60.0)
        for name, address in (
            ("up", f"127.0.0.1:{handle.port}"),
            ("down", f"127.0.0.1:{free_port()}"),
        ):
            cfg = base.model_copy(
                update={"ranking": base.ranking.model_copy(update={"retrieval_address": address})}
            )
            srv = build_server(cfg)
            await srv.start()
            try:
                await wait_serving(f"127.0.0.1:{srv.port}")
                async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                    stub = ranking_pb2_grpc.RankingServiceStub(ch)
                    try:
                        r = await stub.Recommend(
                            ranking_pb2.RecommendRequest(user=user, k=5), timeout=10
                        )
                        codes[name] = ("OK", r.retrieval_fallback)
                    except grpc.aio.AioRpcError as exc:
                        codes[name] = (exc.code().name, exc.details()[:80])
            finally:
                await srv.stop(0)
    finally:
        await app.stop(0)
    assert codes["up"][0] == codes["down"][0], codes


async def test_a_brace_in_ids_aliases_another_users_redis_keys(
    trained_version, redis_url, published_version, serve_both
):
    """Unescaped, user_event("bob", "evt}") was user_state("bob}:event:evt")."""
    from recsys.v1 import retrieval_pb2

    RI = retrieval_pb2.RecordInteractionRequest
    async with serve_both(trained_version.parent, redis_url) as st:
        # Another user's first interaction creates a hash at bob's event marker...
        await st.retrieval.RecordInteraction(RI(user_id="bob}:event:evt", item_id="3"), timeout=5)
        # ...so bob's own, first, event is dropped as a duplicate: nothing recorded.
        got = await st.retrieval.RecordInteraction(
            RI(user_id="bob", item_id="4", rating=5.0, event_id="evt}"), timeout=5
        )
    assert not got.duplicate and got.history_length == 1, got


async def test_client_record_without_event_id_reports_duplicate_after_its_own_retry(
    trained_version, redis_url, published_version, serve_both
):
    """record() makes a fresh event id; when the channel retries an UNAVAILABLE whose
    write landed (Redis stalled past 4 x redis_timeout_s), the server says duplicate,
    but for the caller this first interaction was recorded, once."""
    import asyncio
    import threading

    import redis

    from recsys.client import RecommenderClient

    async with serve_both(trained_version.parent, redis_url) as st:

        def run():
            c = RecommenderClient(
                f"127.0.0.1:{st.ranking_port}", f"127.0.0.1:{st.retrieval_port}", timeout_s=5
            )
            c.record("warm", "1")
            stall = threading.Thread(
                target=lambda: redis.Redis.from_url(redis_url).execute_command(
                    "DEBUG", "SLEEP", "1.3"
                )
            )
            stall.start()
            import time

            time.sleep(0.05)
            try:
                return c.record("dupcheck", "1", rating=4.0)
            finally:
                stall.join()
                c.close()

        got = await asyncio.to_thread(run)
    stored = redis.Redis.from_url(redis_url).lrange("recsys:user:{dupcheck}:recent", 0, -1)
    assert stored == [b"1"]  # recorded exactly once (idempotency works)
    assert not got.duplicate, got
