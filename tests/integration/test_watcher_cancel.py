"""A version watcher stops when cancelled, even mid Redis read.

redis-py's asyncio client can swallow a cancellation that arrives while a
read is in flight. The watcher polls Redis for the version pointer in a
loop, so a swallowed cancel used to keep it polling forever, and a
server's ``stop()`` (which awaits it) hung. Here the watcher polls a real
Redis with no pause between polls and is cancelled at many points.
"""

from __future__ import annotations

import asyncio

from recsys.serving import VersionWatcher


async def _never_called(path) -> None:
    raise AssertionError(f"nothing to load here, got {path}")


async def test_watcher_stops_when_cancelled_during_redis_reads(tmp_path, redis_server):
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(redis_server.url)
    try:
        watcher = VersionWatcher(
            label="test", model_dir=tmp_path, load=_never_called, redis=client, interval_s=0
        )
        for i in range(60):
            task = asyncio.ensure_future(watcher.run())
            await asyncio.sleep(0.0005 * (i % 7))
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=2)
            assert done, f"watcher still running 2 s after cancel (attempt {i})"
            assert task.cancelled()
    finally:
        await client.aclose()
