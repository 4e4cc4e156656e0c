"""A user's keys are read as one snapshot, even in a large batched read.

Each RecordInteraction is one Lua script, but Redis runs other clients'
commands between two socket reads of a large pipeline (~16 KB and up). A
plain pipeline of HGETALL + LRANGE + SMEMBERS per user could therefore see
an interaction in the watched set and recent list but not in the
aggregates; the reads now go in one MULTI/EXEC, and as a plain pipeline
when a full Redis refuses everything queued in MULTI.
"""

from __future__ import annotations

import asyncio
import threading

import redis
import redis.asyncio as aioredis

from recsys.features import FeatureSpec
from recsys.user_store import UserRead, load_user, load_users, record_interaction

SPEC = FeatureSpec(genres=("Action",), countries=("us",))


def _calls(url: str, command: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats").get(f"cmdstat_{command}", {})
        return int(stats.get("calls", 0))
    finally:
        client.close()


async def test_batched_and_single_reads_are_transactions(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    try:
        before = _calls(redis_url, "exec")
        got = await load_users(client, [UserRead(SPEC, f"u{i}") for i in range(32)])
        assert len(got) == 32
        assert _calls(redis_url, "exec") == before + 1
        await load_user(client, SPEC, "u0", recent_n=5)
        assert _calls(redis_url, "exec") == before + 2
    finally:
        await client.aclose()


async def test_a_large_batch_never_sees_half_an_interaction(redis_url):
    # Every interaction here is a new, unrated item: in any consistent state
    # the count, the watched set and the recent list agree.
    target = "target-user"
    stop = threading.Event()

    def writer() -> None:
        async def go() -> None:
            w = aioredis.Redis.from_url(redis_url)
            i = 0
            while not stop.is_set():
                await record_interaction(
                    w, SPEC, target, f"item{i}", ["Action"], None, history_length=100_000
                )
                i += 1
            await w.aclose()

        asyncio.run(go())

    others = [f"{i:03d}" + "x" * 197 for i in range(31)]  # ~23 KB of pipeline
    client = aioredis.Redis.from_url(redis_url)
    thread = threading.Thread(target=writer)
    thread.start()
    torn = []
    try:
        for k in range(400):
            batch = list(others)
            batch[0] = "p" * (1 + k % 250)  # moves the target across a read boundary
            batch.insert(22, target)
            got = await load_users(client, [UserRead(SPEC, u, recent_n=100_000) for u in batch])
            user = got[22]
            if user.aggregates is None:
                continue  # before the first interaction
            n = int(user.aggregates.watch_count)
            if not n == len(user.watched) == len(user.recent):
                torn.append((n, len(user.watched), len(user.recent)))
    finally:
        stop.set()
        thread.join()
        await client.aclose()
    assert torn == []


async def test_reads_still_work_when_redis_is_full(redis_url):
    # deploy/ runs Redis with noeviction: at maxmemory it refuses every
    # command queued in MULTI, reads too, where a plain pipeline still reads.
    client = aioredis.Redis.from_url(redis_url)
    admin = redis.Redis.from_url(redis_url)
    policy = admin.config_get("maxmemory-policy")["maxmemory-policy"]
    try:
        for user in ("u1", "u2"):
            await record_interaction(client, SPEC, user, "i1", ["Action"], 4.0, history_length=10)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)  # full: writes are refused from here on
        got = await load_users(client, [UserRead(SPEC, u, recent_n=5) for u in ("u1", "u2")])
        assert [(g.known, g.watched, g.recent) for g in got] == [(True, {"i1"}, ["i1"])] * 2
        one = await load_user(client, SPEC, "u1", recent_n=5)
        assert one.aggregates is not None and one.aggregates.watch_count == 1
    finally:
        admin.config_set("maxmemory", 0)
        admin.config_set("maxmemory-policy", policy)
        admin.close()
        await client.aclose()
