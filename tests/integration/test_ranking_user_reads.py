"""A micro-batch's users are read from a real Redis in one pipeline; failures stay per user."""

import numpy as np
import redis
import redis.asyncio as aredis

from ranking_service.users import fetch_users
from recsys import redis_keys
from recsys.embedded_redis import free_port
from recsys.features import FeatureSpec
from recsys.user_store import load_user, record_interaction

SPEC = FeatureSpec(genres=("Action", "Comedy", "Drama"), countries=("us", "eu"))


async def test_batch_read_matches_single_reads_and_isolates_a_corrupt_user(redis_url):
    sync = redis.Redis.from_url(redis_url)
    sync.set(redis_keys.user_state("broken"), "not a hash")  # WRONGTYPE for HGETALL
    sync.close()
    client = aredis.Redis.from_url(redis_url)
    try:
        for i, (user, genres) in enumerate(
            [("a", ["Action"]), ("a", ["Drama"]), ("b", ["Comedy"])]
        ):
            await record_interaction(client, SPEC, user, f"item{i}", genres, 4.0, history_length=10)
        got = await fetch_users(
            client,
            [(SPEC, "a", True), None, (SPEC, "broken", True), (SPEC, "b", False), (SPEC, "", True)],
        )
        assert got[1] == (None, False) and got[4] == (None, False)  # no user id: nothing read
        assert got[2] == (None, True)  # its own failure only
        for i, (user, with_watched) in ((0, ("a", True)), (3, ("b", False))):
            stored, failed = got[i]
            alone = await load_user(client, SPEC, user, recent_n=0, with_watched=with_watched)
            assert not failed and stored is not None and stored.known
            assert stored.recent == [] == alone.recent  # ranking reads no history list
            assert stored.watched == alone.watched
            assert stored.watched == ({"item0", "item1"} if user == "a" else set())
            np.testing.assert_array_equal(
                stored.aggregates.genre_watch, alone.aggregates.genre_watch
            )
    finally:
        await client.aclose()


async def test_redis_down_degrades_every_user_of_the_batch():
    client = aredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    try:
        got = await fetch_users(client, [(SPEC, "a", True), None, (SPEC, "b", False)])
    finally:
        await client.aclose()
    assert got == [(None, True), (None, False), (None, True)]


async def test_a_user_read_returns_the_newest_recent_n_items(redis_url):
    """Exactly ``recent_n``, newest first, alone and in a batch (the range end is inclusive)."""
    from recsys.user_store import UserRead, load_users

    client = aredis.Redis.from_url(redis_url)
    try:
        for i in range(8):
            await record_interaction(
                client, SPEC, "c", f"item{i}", ["Drama"], None, history_length=20
            )
        alone = await load_user(client, SPEC, "c", recent_n=3)
        assert alone.recent == ["item7", "item6", "item5"]
        (batch,) = await load_users(client, [UserRead(SPEC, "c", recent_n=3)])
        assert batch.recent == alone.recent
    finally:
        await client.aclose()
