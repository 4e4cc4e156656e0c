"""A Redis that stops answering (SIGSTOP), or answers late, against the services' own client.

``recsys.serving.async_redis`` sets no per-read socket timeout (redis-py
would arm a timer per reply read), so every service call bounds its round
trip itself. Each read below would hang for as long as Redis is frozen
without its bound; ``asyncio.wait_for`` turns such a hang into a failure.
A Redis far away (a proxy that delivers its replies late) must still be read
within those bounds, a new connection's handshake included.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from ranking_service import users as ranking_users
from ranking_service.core import Ranker
from ranking_service.model import LoadedModel
from ranking_service.testing import SPEC
from ranking_service.users import fetch_users
from ranking_service.validation import parse_rank
from recsys import redis_keys
from recsys.artifacts import ModelVersion
from recsys.config import RankingSettings, RecsysSettings, load_settings
from recsys.embedded_redis import EmbeddedRedis
from recsys.serving import VersionWatcher, async_redis
from recsys.user_store import UserRead, load_users
from recsys.v1 import common_pb2, ranking_pb2
from retrieval_service import server as retrieval_server
from retrieval_service.sources.base import RedisBatch, RedisUnavailable
from trainer.publish import publish

BOUND_S = 0.2
HANG_S = 3.0  # far beyond the bound: reaching it means the read was not bounded


@pytest.fixture
def own_redis():
    server = EmbeddedRedis().start()
    yield server
    server.cleanup()


@contextlib.asynccontextmanager
async def ranker_on(server: EmbeddedRedis, version: Path, redis_timeout_s: float, **options):
    """A Ranker serving ``version``, reading ``server`` through the services' own client."""
    client = async_redis(RecsysSettings(redis_url=server.url, redis_timeout_s=redis_timeout_s))
    ranker = Ranker(redis=client, redis_timeout_s=redis_timeout_s, **options)
    try:
        ranker.swap(await asyncio.to_thread(LoadedModel.load, version, "cpu"))
        yield ranker
    finally:
        await ranker.close()
        await client.aclose()


def published_into(server: EmbeddedRedis, version: Path) -> ModelVersion:
    """``version`` published into ``server``; returns it opened."""
    client = redis.Redis.from_url(server.url)
    try:
        publish(version, client, quiet=True)
    finally:
        client.close()
    return ModelVersion.open(version)


async def bounded(coro):
    start = time.monotonic()
    try:
        return await asyncio.wait_for(coro, HANG_S), time.monotonic() - start
    except TimeoutError:
        pytest.fail(f"the read waited {HANG_S} s on a frozen Redis: it has no bound")


async def test_every_read_of_the_services_client_is_bounded(own_redis, trained_version: Path):
    mv = published_into(own_redis, trained_version)
    user = str(mv.users["user_id"][0])
    reads = [UserRead(mv.spec, user, recent_n=5)]
    settings = RecsysSettings(redis_url=own_redis.url, redis_timeout_s=BOUND_S)
    client = async_redis(settings)
    pid = own_redis.proc.pid
    try:
        (before,) = await load_users(client, reads, timeout_s=BOUND_S)
        assert not isinstance(before, Exception) and before.known and before.watched
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(TimeoutError):  # asyncio.wait_for's own would come at HANG_S
                await asyncio.wait_for(load_users(client, reads, timeout_s=BOUND_S), HANG_S)
            assert time.monotonic() - start < HANG_S / 2

            got, took = await bounded(
                fetch_users(client, [(mv.spec, user, True)], timeout_s=BOUND_S)
            )
            assert got == [(None, True)] and took < HANG_S / 2

            watcher = VersionWatcher(
                label="test",
                model_dir=trained_version.parent,
                load=lambda _: asyncio.sleep(0),
                redis=client,
                redis_timeout_s=BOUND_S,
            )
            watcher.current = "kept"
            wanted, took = await bounded(watcher.wanted())
            assert wanted == "kept" and took < HANG_S / 2  # no pointer read: stays put

            batch = RedisBatch(client, timeout_s=BOUND_S)
            key = redis_keys.top_popular(mv.version)
            with pytest.raises(RedisUnavailable):
                await asyncio.wait_for(batch.top(key, 5), HANG_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        # A read cut short closes its connection: the replies that arrive after
        # the thaw are not taken for the next command's.
        (after,) = await load_users(client, reads, timeout_s=5.0)
        assert not isinstance(after, Exception)
        assert (after.profile, after.recent, after.watched) == (
            before.profile,
            before.recent,
            before.watched,
        )
        assert after.aggregates.flat().tolist() == before.aggregates.flat().tolist()
    finally:
        await client.aclose()


async def test_a_bound_landing_anywhere_in_a_read_neither_hangs_nor_desyncs(
    own_redis, trained_version: Path
):
    """Bounds that run out at every point of a live read: the answers that do
    arrive are still each user's own, and no call outlives its bound by much."""
    mv = published_into(own_redis, trained_version)
    users = [str(u) for u in mv.users["user_id"][:8]]
    reads = [UserRead(mv.spec, u, recent_n=5) for u in users]
    client = async_redis(RecsysSettings(redis_url=own_redis.url))
    try:
        truth = await load_users(client, reads, timeout_s=5.0)
        outcomes = {"answered": 0, "timed out": 0}
        # 0 to 1.45 ms: before, during and after the reply; and a roomy bound
        # now and then, so even a slow machine has answers to check.
        bounds = [0.00005 * k for k in range(30)] + [0.05]
        for i in range(155):
            bound = bounds[i % len(bounds)]
            start = time.monotonic()
            try:
                got = await asyncio.wait_for(load_users(client, reads, timeout_s=bound), HANG_S)
            except TimeoutError:
                outcomes["timed out"] += 1
            except redis.RedisError:
                outcomes["timed out"] += 1  # a cut read may surface as the client's own error
            else:
                outcomes["answered"] += 1
                assert [(u.user_id, u.recent, u.watched) for u in got] == [
                    (u.user_id, u.recent, u.watched) for u in truth
                ]
            assert time.monotonic() - start < 0.5, f"bound {bound} s held the call"
        assert outcomes["timed out"] and outcomes["answered"], outcomes
        again = await load_users(client, reads, timeout_s=5.0)
        assert [u.watched for u in again] == [u.watched for u in truth]
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def far_away(server: EmbeddedRedis, one_way_s: float) -> AsyncIterator[str]:
    """A TCP proxy to ``server`` that hands over each reply ``one_way_s`` late; yields its URL.

    A delay line, not a stall: every reply arrives, in order, as from a Redis
    in another zone. Redis going away closes the proxied connection.
    """
    handlers: set[asyncio.Task] = set()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float):
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def send() -> None:
            while (item := await queue.get()) is not None:
                await asyncio.sleep(item[0] - time.monotonic())
                writer.write(item[1])
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + delay, data))
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(OSError):
                await sender
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            redis_r, redis_w = await asyncio.open_connection("127.0.0.1", server.port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            pump(client_r, redis_w, 0.0), pump(redis_r, client_w, one_way_s), return_exceptions=True
        )

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"redis://127.0.0.1:{proxy.sockets[0].getsockname()[1]}/0"
    finally:
        proxy.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


async def test_a_redis_80ms_away_is_read_within_redis_timeout_s_after_a_restart_too(own_redis):
    """redis_timeout_s bounds one round trip (0.25 s); each one here takes 80 ms.

    A call opens the connection it needs inside its own bound, and a bound
    that runs out discards it half-built. redis-py 8's handshake (PING health
    check, HELLO, CLIENT MAINT_NOTIFICATIONS, CLIENT SETINFO) took four round
    trips before the command: no read ever completed, and none did again
    after a Redis restart.
    """
    reads = [UserRead(SPEC, "u1")]
    async with far_away(own_redis, 0.08) as url:
        settings = RecsysSettings(redis_url=url, redis_timeout_s=0.25)
        client = async_redis(settings)

        async def read() -> str:
            try:
                (got,) = await load_users(client, reads, timeout_s=settings.redis_timeout_s)
            except (TimeoutError, redis.RedisError) as exc:
                return type(exc).__name__
            return type(got).__name__

        try:
            assert await read() == "StoredUser"  # on a new connection
            await asyncio.to_thread(own_redis.restart)
            # The connection the restart broke fails the call that finds it;
            # the next call opens a new one in time.
            outcomes = [await read() for _ in range(3)]
            assert outcomes[1:] == ["StoredUser", "StoredUser"], outcomes
        finally:
            await client.aclose()


async def test_warnings_of_a_stalled_redis_name_the_cause(
    own_redis, trained_version: Path, caplog, monkeypatch
):
    """``str(TimeoutError())`` is empty: ranking warned "features:  (1 since last report)"
    and retrieval's copy at load "TimeoutError: "."""
    monkeypatch.setattr(ranking_users._log_degraded, "_last", float("-inf"))  # a fresh interval
    monkeypatch.setattr(ranking_users._log_degraded, "_count", 0)  # not earlier tests' failures
    monkeypatch.setattr(retrieval_server, "WARM_TIMEOUT_S", BOUND_S)
    client = async_redis(RecsysSettings(redis_url=own_redis.url, redis_timeout_s=BOUND_S))
    settings = load_settings(
        model_dir=trained_version.parent,
        redis_url=own_redis.url,
        retrieval={"port": 0, "metrics_port": 0},
    )
    _handle, app = retrieval_server.build_server(settings, redis=client)
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        with caplog.at_level("WARNING"):
            got = await fetch_users(client, [(SPEC, "u1", True)], timeout_s=0.05)
            await app.load(trained_version)
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        await app.close()
    assert got == [(None, True)]
    (ranking,) = [r.getMessage() for r in caplog.records if "user reads failing" in r.getMessage()]
    assert "features: TimeoutError: no reply within 50 ms (1 since last report)" in ranking
    (copy,) = [r for r in caplog.records if r.getMessage() == "top lists not copied before serving"]
    assert copy.fields["error"] == f"TimeoutError: no reply within {BOUND_S:g} s"


async def test_the_top_list_copy_at_load_is_bounded(own_redis, trained_version: Path, monkeypatch):
    """warm() bounds its own read: a caller giving up must not leave it holding a connection."""
    from recsys.config import RetrievalSettings
    from retrieval_service import engine as engine_module
    from retrieval_service.registry import build_sources

    monkeypatch.setattr(engine_module, "WARM_TIMEOUT_S", BOUND_S)
    settings = RecsysSettings(redis_url=own_redis.url, redis_timeout_s=BOUND_S)
    client = async_redis(settings)
    rs = RetrievalSettings()
    eng = engine_module.RetrievalEngine(rs, build_sources(rs.sources), client)
    served = await asyncio.to_thread(eng.load_version, trained_version)
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(RedisUnavailable):
            await asyncio.wait_for(eng.warm(served), HANG_S)
        await asyncio.sleep(0)
        left = [t for t in asyncio.all_tasks() if "RedisBatch" in repr(t.get_coro())]
        assert not left, left
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        await client.aclose()


async def test_short_deadlines_get_degraded_answers_from_a_frozen_redis(
    own_redis, trained_version: Path, serve_both
):
    """Ranking's user read waits a share of the caller's time, not all of redis_timeout_s."""
    import grpc

    mv = published_into(own_redis, trained_version)
    user = common_pb2.UserContext(user_id=str(mv.users["user_id"][0]))
    rank = ranking_pb2.RankRequest(user=user, candidate_item_ids=list(mv.item_ids[:50]), top_k=5)
    async with serve_both(trained_version.parent, own_redis.url, redis_timeout_s=0.25) as stack:
        for _ in range(3):  # connections and caches warm
            await stack.ranking.Rank(rank, timeout=5)
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            outcomes = []
            for call in (
                stack.ranking.Rank(rank, timeout=0.2),
                stack.ranking.Recommend(ranking_pb2.RecommendRequest(user=user, k=5), timeout=0.3),
            ):
                try:
                    outcomes.append(len((await call).items))
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(exc.code().name)
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
    assert outcomes == [5, 5]


def _stall(pid: int, seconds: float) -> None:
    """Redis stops answering for ``seconds`` (a fork, a slow command, a failover blip)."""
    os.kill(pid, signal.SIGSTOP)
    threading.Timer(seconds, os.kill, (pid, signal.SIGCONT)).start()


async def test_a_patient_callers_rank_does_not_depend_on_a_hurried_neighbour(
    own_redis, trained_version: Path
):
    mv = published_into(own_redis, trained_version)
    uid = str(mv.users["user_id"][0])
    watched = [str(i) for i in mv.users["watched"][0]]
    others = [str(i) for i in mv.item_ids if str(i) not in set(watched)][:40]
    limits = RankingSettings()
    req = ranking_pb2.RankRequest(
        user=common_pb2.UserContext(user_id=uid), candidate_item_ids=watched + others, top_k=20
    )
    other_user = str(mv.users["user_id"][1])
    req2 = ranking_pb2.RankRequest(
        user=common_pb2.UserContext(user_id=other_user), candidate_item_ids=others, top_k=5
    )
    async with ranker_on(own_redis, trained_version, 0.5) as ranker:
        pid = own_redis.proc.pid
        try:
            for _ in range(3):
                warm = await ranker.rank(parse_rank(req, limits), 5.0)
            assert warm.watched_dropped == len(watched) and warm.feature_source != "default"

            # Control: alone, a 50 ms Redis hiccup only delays the patient caller.
            _stall(pid, 0.05)
            alone = await ranker.rank(parse_rank(req, limits), 5.0)
            assert alone.watched_dropped == len(watched), "control"
            await asyncio.sleep(0.1)

            # Same hiccup, same caller (5 s left), batched with a caller 8 ms from its deadline.
            _stall(pid, 0.05)
            patient, _hurried = await asyncio.gather(
                ranker.rank(parse_rank(req, limits), 5.0),
                ranker.rank(parse_rank(req2, limits), 0.008),
            )
            await asyncio.sleep(0.1)
            # Cut short by its neighbour, it came back ranked for a default user,
            # with its already-watched items.
            assert patient.watched_dropped == len(watched), (
                patient.watched_dropped,
                patient.feature_source,
                len(patient.items),
            )
        finally:
            os.kill(pid, signal.SIGCONT)


HURRIED_S = 0.3  # under 2 x redis_timeout_s: the escape path


def _rank_req(mv, i):
    return ranking_pb2.RankRequest(
        user=common_pb2.UserContext(user_id=str(mv.users["user_id"][i])),
        candidate_item_ids=list(mv.item_ids[:50]),
        top_k=5,
    )


@pytest.mark.parametrize("patient", [None, 5.0], ids=["patient-without-deadline", "patient-5s"])
async def test_a_hurried_caller_beside_a_patient_one_answers_in_time(
    own_redis, trained_version: Path, patient
):
    """The batch's read waits for the patient caller; the hurried one stops on its own."""
    mv = published_into(own_redis, trained_version)
    limits = RankingSettings()
    hurried_req, patient_req = _rank_req(mv, 0), _rank_req(mv, 1)
    async with ranker_on(own_redis, trained_version, 0.25) as ranker:
        pid = own_redis.proc.pid
        for _ in range(3):
            await ranker.rank(parse_rank(patient_req, limits), 5.0)
        os.kill(pid, signal.SIGSTOP)
        try:
            # The hurried caller's gRPC deadline is 0.2 s: it stops waiting then.
            hurried, patient_out = await asyncio.gather(
                asyncio.wait_for(ranker.rank(parse_rank(hurried_req, limits), 0.2), 0.2),
                ranker.rank(parse_rank(patient_req, limits), patient),
                return_exceptions=True,
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        assert not isinstance(hurried, BaseException), repr(hurried)
        assert hurried.feature_source == "default" and len(hurried.items) == 5
        assert not isinstance(patient_out, BaseException) and len(patient_out.items) == 5


async def test_an_escaped_caller_does_not_wait_for_a_later_patient_callers_read(
    own_redis, trained_version: Path
):
    """Patient callers keep arriving while Redis is frozen: the hurried caller's
    read-less retry must not land in a batch with a patient caller's read."""
    mv = published_into(own_redis, trained_version)
    limits = RankingSettings()
    async with ranker_on(own_redis, trained_version, 0.25) as ranker:
        pid = own_redis.proc.pid
        for _ in range(3):
            await ranker.rank(parse_rank(_rank_req(mv, 1), limits), 5.0)
        os.kill(pid, signal.SIGSTOP)
        try:

            async def stream():
                tasks = []
                for n in range(100):  # one patient caller every 3 ms for 0.3 s
                    tasks.append(
                        asyncio.ensure_future(
                            ranker.rank(parse_rank(_rank_req(mv, 2 + n % 50), limits), 5.0)
                        )
                    )
                    await asyncio.sleep(0.003)
                return await asyncio.gather(*tasks, return_exceptions=True)

            s = asyncio.ensure_future(stream())
            await asyncio.sleep(0.01)
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(ranker.rank(parse_rank(_rank_req(mv, 0), limits), 0.2), 0.2)
                err = None
            except TimeoutError as exc:
                err = exc
            took = time.monotonic() - t0
            await s
        finally:
            os.kill(pid, signal.SIGCONT)
        assert err is None, f"hurried caller missed its 0.2 s deadline ({took:.3f} s)"


async def test_a_cancelled_hurried_caller_is_withdrawn_from_the_queue(
    own_redis, trained_version: Path
):
    """A caller cancelled before its batch starts (gRPC deadline, client gone) costs
    no batch slot, the escape path included."""
    mv = published_into(own_redis, trained_version)
    limits = RankingSettings()
    async with ranker_on(own_redis, trained_version, 0.25, batch_timeout_ms=50) as ranker:
        await ranker.rank(parse_rank(_rank_req(mv, 1), limits), 5.0)
        before = ranker.batcher.requests
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # the patient's batch stays in flight
        try:
            patient = asyncio.ensure_future(ranker.rank(parse_rank(_rank_req(mv, 2), limits), 5.0))
            await asyncio.sleep(0.005)
            hurried = asyncio.ensure_future(
                ranker.rank(parse_rank(_rank_req(mv, 0), limits), HURRIED_S)
            )
            await asyncio.sleep(0.005)
            hurried.cancel()  # before its batch (due 50 ms after it queued) starts
            await asyncio.gather(patient, hurried, return_exceptions=True)
            await asyncio.sleep(0.3)
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        ran = ranker.batcher.requests - before
        assert ran == 1, f"{ran} requests ran; the cancelled caller's job still ran"


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize(
    ("timeout_s", "redis_timeout_s", "redis_fault"),
    [(RankingSettings().retrieval_timeout_s, 0.25, True), (0.04, 0.25, False), (1.0, 0.03, True)],
)
async def test_a_frozen_redis_counts_as_a_failed_user_read_at_rankings_deadline(
    own_redis,
    trained_version: Path,
    batched: bool,
    timeout_s: float,
    redis_timeout_s: float,
    redis_fault: bool,
):
    """Ranking gives retrieval 200 ms by default: a stall there is Redis', not the caller's.

    A 40 ms deadline leaves the read 20 ms: that one is cut short by the caller.
    A redis_timeout_s of 30 ms set the wait itself: Redis', however short.
    """
    from recsys.config import RetrievalSettings
    from retrieval_service import metrics
    from retrieval_service.engine import RetrievalEngine, RetrieveQuery
    from retrieval_service.registry import build_sources

    mv = published_into(own_redis, trained_version)
    settings = RecsysSettings(redis_url=own_redis.url, redis_timeout_s=redis_timeout_s)
    client = async_redis(settings)
    rs = RetrievalSettings()
    eng = RetrievalEngine(
        rs, build_sources(rs.sources), client, redis_timeout_s=settings.redis_timeout_s
    )
    eng.swap(await asyncio.to_thread(eng.load_version, trained_version))
    q = RetrieveQuery(str(mv.users["user_id"][0]))
    await eng.retrieve(q, timeout_s=1.0)
    failures, cut = metrics.HYDRATE_FAILURES._value.get(), metrics.HYDRATE_CUT_SHORT._value.get()
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        if batched:
            (got,) = await eng.retrieve_many([q], timeout_s=timeout_s)
        else:
            got = await eng.retrieve(q, timeout_s=timeout_s)
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        await client.aclose()
    assert not isinstance(got, Exception) and got.candidates, "degraded, still answered"
    assert metrics.HYDRATE_FAILURES._value.get() == failures + redis_fault
    assert metrics.HYDRATE_CUT_SHORT._value.get() == cut + (not redis_fault)
