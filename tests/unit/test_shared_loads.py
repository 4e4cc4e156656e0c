"""One loaded copy per build for all the model tracks that want it (``SharedLoads``).

A version rebuilt under its number is seen by every track's watcher in the
same poll: matched only among the copies the tracks served, each track loaded
its own copy of the new build, and all of them stayed in memory.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from recsys.artifacts import MANIFEST, manifest_digest
from recsys.serving import SharedLoads


@dataclass
class Copy:
    name: str
    digest: str | None


class Loader:
    """Loads a copy once released (``gate``), failing while ``error`` is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.error: Exception | None = None

    async def __call__(self, path: Path) -> Copy:
        self.calls += 1
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return Copy(path.name, manifest_digest(path))


def version(tmp_path: Path, manifest: str = '{"build": 1}') -> Path:
    path = tmp_path / "1"
    path.mkdir(exist_ok=True)
    (path / MANIFEST).write_text(manifest)
    return path


def loads() -> SharedLoads[Copy]:
    return SharedLoads(lambda c: (c.name, c.digest))


async def test_tracks_loading_one_build_at_once_share_one_copy(tmp_path):
    path, load, shared = version(tmp_path), Loader(), loads()
    both = asyncio.gather(shared.get(path, [], load), shared.get(path, [], load))
    await asyncio.sleep(0)
    load.gate.set()
    first, second = await both
    assert load.calls == 1 and first is second


async def test_a_served_copy_of_the_build_is_taken_and_another_build_is_loaded(tmp_path):
    path, load, shared = version(tmp_path), Loader(), loads()
    load.gate.set()
    served = await shared.get(path, [], load)
    assert await shared.get(path, [served], load) is served and load.calls == 1
    version(tmp_path, '{"build": 2}')  # trained again under its number
    rebuilt = await shared.get(path, [served], load)
    assert rebuilt is not served and load.calls == 2


async def test_a_failed_load_fails_every_waiting_track_and_is_not_kept(tmp_path):
    path, load, shared = version(tmp_path), Loader(), loads()
    load.error = ValueError("checksum mismatch")
    both = asyncio.gather(
        shared.get(path, [], load), shared.get(path, [], load), return_exceptions=True
    )
    await asyncio.sleep(0)
    load.gate.set()
    first, second = await both
    assert first is load.error and second is load.error and load.calls == 1
    load.error = None  # fixed: the next try loads again
    assert (await shared.get(path, [], load)).name == "1" and load.calls == 2


async def test_a_load_cut_short_is_loaded_by_the_track_waiting_on_it(tmp_path):
    path, load, shared = version(tmp_path), Loader(), loads()
    owner = asyncio.ensure_future(shared.get(path, [], load))
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(shared.get(path, [], load))
    await asyncio.sleep(0)
    owner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owner
    load.gate.set()
    assert (await waiter).name == "1" and load.calls == 2


async def test_a_waiting_track_cancelled_leaves_the_load_running(tmp_path):
    path, load, shared = version(tmp_path), Loader(), loads()
    owner = asyncio.ensure_future(shared.get(path, [], load))
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(shared.get(path, [], load))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    load.gate.set()
    assert (await owner).name == "1" and load.calls == 1


@pytest.mark.parametrize("owner_first", [True, False], ids=["owner-first", "waiter-first"])
async def test_a_stop_cancelling_every_track_starts_no_new_load(tmp_path, owner_first: bool):
    """The waiting track, cancelled together with the load's owner, loaded the
    build again, and the service's stop waited for that whole extra load."""
    path, load, shared = version(tmp_path), Loader(), loads()
    owner = asyncio.ensure_future(shared.get(path, [], load))
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(shared.get(path, [], load))
    await asyncio.sleep(0)
    tracks = (owner, waiter) if owner_first else (waiter, owner)
    asyncio.gather(*tracks).cancel()  # what a SIGTERM does to the watchers' gather
    await asyncio.sleep(0.05)
    assert load.calls == 1
    assert owner.cancelled() and waiter.cancelled()
