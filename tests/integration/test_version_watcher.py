"""Which version a service follows: the Redis pointer, not whatever is newest on disk.

The watcher polls a real Redis (a private one this module stops to make it
unreachable). The loader is a recorder over directories that hold only a
manifest: what is under test is the choice of version, not loading one
(the reload and bad-version suites cover that with real models).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis

from recsys import redis_keys
from recsys.artifacts import MANIFEST
from recsys.embedded_redis import EmbeddedRedis
from recsys.serving import REJECTED_RETRY_FIRST_S, REJECTED_RETRY_MAX_S, VersionWatcher


class Recorder:
    """Loader that records each path and fails for the versions in ``failing``."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.failing: set[str] = set()

    async def __call__(self, path: Path) -> None:
        self.loaded.append(path.name)
        if path.name in self.failing:
            raise ValueError(f"version {path.name} is broken")


def add_version(model_dir: Path, name: str, content: str = "{}") -> None:
    (model_dir / name).mkdir(exist_ok=True)
    (model_dir / name / MANIFEST).write_text(content)


@pytest.fixture
def own_redis():
    server = EmbeddedRedis().start()
    yield server
    server.cleanup()


def point_at(url: str, version: str) -> None:
    client = redis.Redis.from_url(url)
    client.set(redis_keys.CURRENT_VERSION, version)
    client.close()


def watcher_for(model_dir: Path, url: str, loader: Recorder, **kw) -> VersionWatcher:
    client = aredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    return VersionWatcher(label="test", model_dir=model_dir, load=loader, redis=client, **kw)


async def polls(watcher: VersionWatcher, n: int = 3) -> None:
    for _ in range(n):
        await watcher.poll_once()


async def test_redis_outage_keeps_the_published_version(tmp_path, own_redis):
    add_version(tmp_path, "1")
    add_version(tmp_path, "2")  # copied in, not published
    point_at(own_redis.url, "1")
    loader = Recorder()
    watcher = watcher_for(tmp_path, own_redis.url, loader)
    try:
        await polls(watcher)
        assert watcher.current == "1" and loader.loaded == ["1"]
        own_redis.stop()
        await polls(watcher)
        # Newest on disk is unpublished: an outage must not put it in service.
        assert watcher.current == "1" and loader.loaded == ["1"]
    finally:
        await watcher.redis.aclose()


async def test_pointer_to_a_version_not_on_disk_yet_keeps_the_current_one(tmp_path, own_redis):
    add_version(tmp_path, "1")
    add_version(tmp_path, "2")
    point_at(own_redis.url, "1")  # e.g. a rollback from 2 to 1
    loader = Recorder()
    watcher = watcher_for(tmp_path, own_redis.url, loader)
    try:
        await polls(watcher)
        point_at(own_redis.url, "3")  # published; this node's copy is still on its way
        await polls(watcher)
        assert watcher.current == "1" and loader.loaded == ["1"]
        add_version(tmp_path, "3")
        await polls(watcher, 1)
        assert watcher.current == "3" and loader.loaded == ["1", "3"]
    finally:
        await watcher.redis.aclose()


async def test_first_load_with_redis_down_takes_the_newest_on_disk(tmp_path, own_redis):
    add_version(tmp_path, "1")
    add_version(tmp_path, "2")
    loader = Recorder()
    watcher = watcher_for(tmp_path, own_redis.url, loader)
    own_redis.stop()
    try:
        await polls(watcher, 1)
        assert watcher.current == "2" and loader.loaded == ["2"]
    finally:
        await watcher.redis.aclose()


def missing_gauge(label: str) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("recsys_version_missing", {"service": label})


async def test_a_pointer_to_a_version_missing_here_is_said_once_and_exported(
    tmp_path, own_redis, caplog
):
    """A copy that never arrives kept the old version serving without a word."""
    add_version(tmp_path, "1")
    point_at(own_redis.url, "1")
    loader = Recorder()
    watcher = watcher_for(tmp_path, own_redis.url, loader)
    try:
        await polls(watcher, 1)
        assert missing_gauge("test") == 0
        with caplog.at_level("WARNING", logger="recsys.serving"):
            for version in ("7", "1", "7"):  # said again once it went missing again
                point_at(own_redis.url, version)
                await polls(watcher)
        said = [r.fields for r in caplog.records if r.getMessage().startswith("wanted version")]
        assert said == [
            {"version": "7", "serving": "1", "model_dir": str(tmp_path)},
            {"version": "7", "serving": "1", "model_dir": str(tmp_path)},
        ]
        assert watcher.current == "1" and missing_gauge("test") == 1
        add_version(tmp_path, "7")
        await polls(watcher, 1)
        assert watcher.current == "7" and missing_gauge("test") == 0
    finally:
        await watcher.redis.aclose()


async def test_a_version_trained_again_under_its_number_is_loaded(tmp_path, own_redis):
    """A deleted version's number is reused: the running service loads the new build,
    as a replica started now does, and a re-copy of the same build is no new build."""
    add_version(tmp_path, "1", json.dumps({"created_at": "2026-01-01T00:00:00+00:00"}))
    point_at(own_redis.url, "1")
    loader = Recorder()
    watcher = watcher_for(tmp_path, own_redis.url, loader)
    try:
        await polls(watcher, 1)
        manifest = tmp_path / "1" / MANIFEST
        time.sleep(0.02)  # a later mtime
        manifest.write_text(manifest.read_text())  # the same build copied again
        await polls(watcher)
        assert loader.loaded == ["1"]
        shutil.rmtree(tmp_path / "1")
        add_version(tmp_path, "1", json.dumps({"created_at": "2026-02-01T00:00:00+00:00"}))
        await polls(watcher)
        assert watcher.current == "1" and loader.loaded == ["1", "1"]
    finally:
        await watcher.redis.aclose()


async def test_a_rejected_new_build_is_retried_at_once_when_its_files_change(tmp_path, own_redis):
    add_version(tmp_path, "1", json.dumps({"build": "first"}))
    point_at(own_redis.url, "1")
    loader = Recorder()
    watcher = watcher_for(tmp_path, own_redis.url, loader)
    try:
        await polls(watcher, 1)
        loader.failing.add("1")
        add_version(tmp_path, "1", json.dumps({"build": "second, broken"}))
        await polls(watcher)
        assert loader.loaded == ["1", "1"] and "broken" in watcher.rejected["1"]
        assert watcher.current == "1"  # the first build still serves
        loader.failing.clear()
        (tmp_path / "1" / "item_vectors.npy").write_bytes(b"the rest of the copy")
        await polls(watcher)
        assert loader.loaded == ["1", "1", "1"] and watcher.rejected == {}
    finally:
        await watcher.redis.aclose()


async def test_pinned_version_is_loaded_once_it_arrives(tmp_path, own_redis):
    add_version(tmp_path, "1")
    loader = Recorder()
    watcher = watcher_for(tmp_path, own_redis.url, loader, pinned="4")
    try:
        await polls(watcher)
        assert watcher.current is None and loader.loaded == [] and watcher.rejected == {}
        assert missing_gauge("test") == 1
        add_version(tmp_path, "4")
        await polls(watcher, 1)
        assert watcher.current == "4" and loader.loaded == ["4"]
        assert missing_gauge("test") == 0
    finally:
        await watcher.redis.aclose()


@contextlib.asynccontextmanager
async def second_version_rejected(model_dir: Path, url: str):
    """Version 1 served, then version 2 published and rejected by the loader."""
    add_version(model_dir, "1")
    point_at(url, "1")
    loader = Recorder()
    watcher = watcher_for(model_dir, url, loader)
    try:
        await polls(watcher, 1)
        loader.failing.add("2")
        add_version(model_dir, "2")
        point_at(url, "2")
        await polls(watcher)
        assert loader.loaded == ["1", "2"]  # tried once, not on every poll
        assert "broken" in watcher.rejected["2"] and watcher.current == "1"
        loader.failing.clear()
        yield watcher, loader
    finally:
        await watcher.redis.aclose()


async def test_rejected_version_is_retried_at_once_when_its_manifest_changes(tmp_path, own_redis):
    async with second_version_rejected(tmp_path, own_redis.url) as (watcher, loader):
        await polls(watcher)
        assert loader.loaded == ["1", "2"]  # fixed loader, same files: not before its backoff
        add_version(tmp_path, "2", json.dumps({"copied": "again"}))  # a fixed re-copy
        await polls(watcher, 1)
        assert watcher.current == "2" and loader.loaded == ["1", "2", "2"]
        assert "2" not in watcher.rejected


async def test_a_swap_leaves_one_version_series_per_service(tmp_path, own_redis):
    """After 1 → 2 the pod exports only version 2: an alert counting versions must not fire."""
    from prometheus_client import REGISTRY

    add_version(tmp_path, "1")
    add_version(tmp_path, "2")
    point_at(own_redis.url, "1")
    watcher = VersionWatcher(
        label="swap-series",
        model_dir=tmp_path,
        load=Recorder(),
        redis=aredis.Redis.from_url(own_redis.url, socket_timeout=0.5),
    )

    def series() -> dict[str, float]:
        return {
            s.labels["version"]: s.value
            for m in REGISTRY.collect()
            if m.name == "recsys_model_version_info"
            for s in m.samples
            if s.labels.get("service") == "swap-series"
        }

    try:
        await polls(watcher, 1)
        assert series() == {"1": 1.0}
        point_at(own_redis.url, "2")
        await polls(watcher, 1)
        assert watcher.current == "2"
        assert series() == {"2": 1.0}
    finally:
        await watcher.redis.aclose()


async def test_a_swap_in_a_worker_writes_no_warning(tmp_path, monkeypatch):
    """prometheus-client warns on remove() in multiprocess mode: a non-JSON line per swap."""
    from recsys.serving import MULTIPROC_ENV

    add_version(tmp_path, "1")
    watcher = VersionWatcher(label="swap-worker", model_dir=tmp_path, load=Recorder())
    await polls(watcher, 1)
    add_version(tmp_path, "2")
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))  # as a worker's supervisor sets it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await polls(watcher, 1)
    assert watcher.current == "2"


async def test_a_pointer_that_vanishes_keeps_the_serving_version(tmp_path, own_redis):
    """A Redis restarted empty must not put a rolled-back or unpublished version in service."""
    add_version(tmp_path, "1")
    add_version(tmp_path, "2")  # e.g. rolled back from, or never published
    point_at(own_redis.url, "1")
    loader = Recorder()
    watcher = watcher_for(tmp_path, own_redis.url, loader)
    try:
        await polls(watcher)
        redis.Redis.from_url(own_redis.url).flushall()
        await polls(watcher)
        assert watcher.current == "1" and loader.loaded == ["1"]
    finally:
        await watcher.redis.aclose()


async def test_a_vanished_pointer_clears_the_missing_version_alert(tmp_path, own_redis, caplog):
    """The pointer named a version never copied here, then Redis lost the pointer
    (restarted empty): nothing wanted was missing, yet recsys_version_missing stayed 1."""
    add_version(tmp_path, "1")
    point_at(own_redis.url, "1")
    watcher = watcher_for(tmp_path, own_redis.url, Recorder())
    try:
        await polls(watcher, 1)
        point_at(own_redis.url, "9")
        await polls(watcher)
        assert missing_gauge("test") == 1
        redis.Redis.from_url(own_redis.url).flushall()
        await polls(watcher)
        assert watcher.current == "1" and missing_gauge("test") == 0
        caplog.clear()
        with caplog.at_level("WARNING", logger="recsys.serving"):
            point_at(own_redis.url, "9")  # missing again: said again
            await polls(watcher)
        said = [r.fields for r in caplog.records if r.getMessage().startswith("wanted version")]
        assert said == [{"version": "9", "serving": "1", "model_dir": str(tmp_path)}]
        assert missing_gauge("test") == 1
    finally:
        await watcher.redis.aclose()


async def test_a_rejected_version_is_retried_when_the_rest_of_its_copy_lands(tmp_path, own_redis):
    """The manifest can arrive first; the files it lists come later, itself unchanged."""
    async with second_version_rejected(tmp_path, own_redis.url) as (watcher, loader):
        (tmp_path / "2" / "item_vectors.npy").write_bytes(b"the rest of the copy")
        await polls(watcher, 1)
        assert watcher.current == "2" and loader.loaded == ["1", "2", "2"]


async def test_a_re_copy_that_keeps_mtimes_is_retried(tmp_path, own_redis):
    """``cp -a`` / ``rsync -a`` keep each file's mtime and size; only its ctime moves."""
    manifest = tmp_path / "2" / MANIFEST
    async with second_version_rejected(tmp_path, own_redis.url) as (watcher, _loader):
        before = manifest.stat()
        time.sleep(0.02)  # a later ctime than the first copy's
        manifest.write_text("{}")  # the same bytes, then the old mtime put back
        os.utime(manifest, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = manifest.stat()
        assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
        await polls(watcher, 1)
        assert watcher.current == "2"


async def test_a_replica_serving_nothing_falls_back_to_an_older_version(tmp_path, own_redis):
    """Started after a bad publish: the version before it, not NOT_SERVING for good."""
    for v in ("1", "2", "3"):
        add_version(tmp_path, v)
    point_at(own_redis.url, "3")
    loader = Recorder()
    loader.failing.update({"3", "2"})
    watcher = watcher_for(tmp_path, own_redis.url, loader)
    try:
        await polls(watcher)
        assert watcher.current == "1" and loader.loaded == ["3", "2", "1"]
        assert set(watcher.rejected) == {"3", "2"}
        loader.failing.clear()
        (tmp_path / "3" / "fixed").write_text("re-copied")
        await polls(watcher, 1)
        assert watcher.current == "3"
    finally:
        await watcher.redis.aclose()


async def test_a_pinned_track_does_not_fall_back(tmp_path, own_redis):
    add_version(tmp_path, "1")
    add_version(tmp_path, "2")
    loader = Recorder()
    loader.failing.add("2")
    watcher = watcher_for(tmp_path, own_redis.url, loader, pinned="2")
    try:
        await polls(watcher)
        assert watcher.current is None and loader.loaded == ["2"]
    finally:
        await watcher.redis.aclose()


class FakeClock:
    """The watcher's clock, moved by hand: a backoff of minutes without waiting for it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rejections(caplog) -> list[tuple[str, int, float]]:
    """(version, attempt, retry_in_s) of each "version rejected" line."""
    return [
        (r.fields["version"], r.fields["attempt"], r.fields["retry_in_s"])
        for r in caplog.records
        if r.getMessage() == "version rejected"
    ]


def rejected_count(label: str) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("recsys_version_rejected_total", {"service": label})


@pytest.mark.parametrize("serving", [None, "1"], ids=["serving-nothing", "serving-older"])
async def test_a_version_that_failed_once_is_retried_after_the_backoff(tmp_path, caplog, serving):
    """A failure not in the files (a transient OSError, a Redis hiccup in warm-up) kept
    a replica NOT_SERVING, or on the older version, until its files were touched."""
    if serving:
        add_version(tmp_path, serving)
    clock, loader = FakeClock(), Recorder()
    label = f"retry-once-{serving}"
    watcher = VersionWatcher(label=label, model_dir=tmp_path, load=loader, clock=clock)
    await polls(watcher, 1)
    add_version(tmp_path, "2")
    loader.failing.add("2")
    with caplog.at_level("INFO", logger="recsys.serving"):
        await polls(watcher, 1)
        assert watcher.current == serving and "2" in watcher.rejected
        loader.failing.clear()  # what failed has gone away; the files are the same
        clock.now = REJECTED_RETRY_FIRST_S - 0.1
        await polls(watcher)
        assert watcher.current == serving and loader.loaded.count("2") == 1
        clock.now = REJECTED_RETRY_FIRST_S
        await polls(watcher)
    assert watcher.current == "2" and loader.loaded.count("2") == 2 and watcher.rejected == {}
    assert rejections(caplog) == [("2", 1, REJECTED_RETRY_FIRST_S)]
    assert rejected_count(label) == 1
    retried = [r.fields for r in caplog.records if r.getMessage().endswith("loaded on retry")]
    assert retried == [{"version": "2", "attempt": 2}]


async def test_a_version_that_stays_broken_is_retried_at_a_doubling_then_capped_rate(
    tmp_path, caplog
):
    """No tight loop: two hours of polls load it a handful of times, and 1 keeps serving."""
    add_version(tmp_path, "1")
    clock, loader = FakeClock(), Recorder()
    watcher = VersionWatcher(label="retry-capped", model_dir=tmp_path, load=loader, clock=clock)
    await polls(watcher, 1)
    add_version(tmp_path, "2")
    loader.failing.add("2")
    tried_at: list[float] = []
    with caplog.at_level("ERROR", logger="recsys.serving"):
        for t in range(0, 2 * 3600, 10):  # a poll every 10 s
            clock.now = float(t)
            before = len(loader.loaded)
            await watcher.poll_once()
            if len(loader.loaded) > before:
                tried_at.append(clock.now)
    assert watcher.current == "1"
    gaps = [b - a for a, b in itertools.pairwise(tried_at)]
    assert gaps[0] == REJECTED_RETRY_FIRST_S
    assert all(b == min(2 * a, REJECTED_RETRY_MAX_S) for a, b in itertools.pairwise(gaps))
    assert gaps.count(REJECTED_RETRY_MAX_S) >= 5  # capped: it keeps trying, ~6 an hour
    said = rejections(caplog)
    assert [attempt for _v, attempt, _in in said] == list(range(1, len(tried_at) + 1))
    assert [wait for _v, _a, wait in said] == [*gaps, REJECTED_RETRY_MAX_S]
    assert rejected_count("retry-capped") == len(tried_at)


async def test_a_files_change_retries_at_once_and_starts_the_backoff_over(tmp_path, caplog):
    clock, loader = FakeClock(), Recorder()
    add_version(tmp_path, "1")
    loader.failing.add("1")
    watcher = VersionWatcher(label="retry-files", model_dir=tmp_path, load=loader, clock=clock)
    with caplog.at_level("ERROR", logger="recsys.serving"):
        await polls(watcher, 1)
        clock.now = REJECTED_RETRY_FIRST_S  # retried and rejected again: the wait doubles
        await polls(watcher)
        clock.now += 1
        (tmp_path / "1" / "item_vectors.npy").write_bytes(b"the rest of the copy")
        await polls(watcher)  # new files, still broken: tried once, at once
    assert loader.loaded == ["1", "1", "1"]
    assert [attempt_wait for _v, *attempt_wait in rejections(caplog)] == [
        [1, REJECTED_RETRY_FIRST_S],
        [2, 2 * REJECTED_RETRY_FIRST_S],
        [1, REJECTED_RETRY_FIRST_S],
    ]


async def test_a_fall_back_retries_an_older_version_after_its_backoff(tmp_path):
    """The wanted version stays broken and the older one failed once: the replica
    served nothing for good, as the fall-back skipped every rejected version."""
    add_version(tmp_path, "1")
    add_version(tmp_path, "2")
    clock, loader = FakeClock(), Recorder()
    loader.failing.update({"1", "2"})
    watcher = VersionWatcher(label="retry-older", model_dir=tmp_path, load=loader, clock=clock)
    await polls(watcher)
    assert watcher.current is None and loader.loaded == ["2", "1"]
    loader.failing.discard("1")
    clock.now = REJECTED_RETRY_FIRST_S
    await polls(watcher)
    assert watcher.current == "1" and loader.loaded == ["2", "1", "2", "1"]


async def test_the_rejection_counter_exists_at_zero_before_any_rejection(tmp_path):
    """increase() never counts a series' first sample: created at 1, no alert fired."""
    from prometheus_client import REGISTRY

    VersionWatcher(label="zero-series", model_dir=tmp_path, load=Recorder())
    assert (
        REGISTRY.get_sample_value("recsys_version_rejected_total", {"service": "zero-series"}) == 0
    )


async def test_nothing_to_serve_is_said_once(tmp_path, caplog):
    """A wrong model_dir or an unmounted volume: NOT_SERVING, and the log says why."""
    watcher = VersionWatcher(label="test", model_dir=tmp_path / "typo", load=Recorder())
    with caplog.at_level("WARNING", logger="recsys.serving"):
        await polls(watcher)
    said = [r for r in caplog.records if "no version to serve" in r.getMessage()]
    assert len(said) == 1 and watcher.current is None


async def test_a_second_lone_server_cannot_bind_a_port_in_use():
    """gRPC's default SO_REUSEPORT let it bind and silently take part of the traffic."""
    from recsys.config import ServerSettings
    from recsys.serving import create_server

    def build(port: int):
        return create_server(
            ServerSettings(host="127.0.0.1", port=port, metrics_port=0),
            label="bind-test",
            service_names=[],
            register=lambda _server: None,
        )

    from recsys.errors import UserFacingError

    first = build(0)
    await first.server.start()
    try:
        with pytest.raises(UserFacingError, match=r"cannot listen on 127\.0\.0\.1:\d+"):
            build(first.port)
    finally:
        await first.server.stop(0)
