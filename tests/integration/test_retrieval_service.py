"""Retrieval service end to end: real Redis, a real published trained version, real gRPC."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys import redis_keys
from recsys.artifacts import ModelVersion
from recsys.config import load_settings
from recsys.embedded_redis import free_port
from recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from retrieval_service.engine import RetrieveQuery
from retrieval_service.errors import DeadlineExceeded
from retrieval_service.server import SERVICE_NAME, build_server

pytestmark = pytest.mark.asyncio(loop_scope="session")

OK = common_pb2.SOURCE_STATUS_OK
TIMEOUT = common_pb2.SOURCE_STATUS_TIMEOUT
ERROR = common_pb2.SOURCE_STATUS_ERROR


class CountingConnection(aioredis.Connection):
    """A real connection that counts socket writes: one per command or pipeline."""

    writes = 0

    async def send_packed_command(self, command, check_health=True):
        type(self).writes += 1
        return await super().send_packed_command(command, check_health)


def counting_client(url: str) -> aioredis.Redis:
    pool = aioredis.ConnectionPool.from_url(url, connection_class=CountingConnection)
    return aioredis.Redis(connection_pool=pool)


def default_sources(timeout_ms: float = 1000.0) -> list[dict]:
    """The default source set with generous timeouts: a loaded CI box must not flake."""
    from recsys.config import _default_sources

    return [{**s, "timeout_ms": timeout_ms} for s in _default_sources()]


def settings_for(model_dir: Path, redis_url: str, **retrieval):
    rs = {
        "port": 0,
        "metrics_port": 0,
        "reload_interval_s": 3600.0,
        "sources": default_sources(),
        **retrieval,
    }
    return load_settings(model_dir=model_dir, redis_url=redis_url, retrieval=rs)


async def wait_serving(channel: grpc.aio.Channel, timeout: float = 20.0) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            res = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2)
        except grpc.aio.AioRpcError:
            continue  # a lost call is retried until the deadline, never awaited forever
        if res.status == health_pb2.HealthCheckResponse.SERVING:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("retrieval server never became SERVING")


class Running:
    """A started server plus a client stub."""

    def __init__(self, settings, client=None):
        self.settings = settings
        self.client = client

    async def __aenter__(self) -> Running:
        self.handle, self.app = build_server(self.settings, redis=self.client)
        await self.app.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.handle.port}")
        self.stub = retrieval_pb2_grpc.RetrievalServiceStub(self.channel)
        await wait_serving(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.app.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(published: Path, redis_server):
    settings = settings_for(published.parent, redis_server.url)
    async with Running(settings, counting_client(redis_server.url)) as running:
        yield running


def heavy_user(mv: ModelVersion) -> tuple[str, list[str]]:
    """The user who watched the most, with what publish stored as watched."""
    users = mv.users
    row = max(range(len(users["user_id"])), key=lambda r: len(users["watched"][r]))
    return str(users["user_id"][row]), [str(i) for i in users["watched"][row]]


def typical_user(mv: ModelVersion) -> tuple[str, list[str]]:
    """A user with a median number of watched items (and those items)."""
    users = mv.users
    rows = sorted(range(len(users["user_id"])), key=lambda r: len(users["watched"][r]))
    row = rows[len(rows) // 2]
    return str(users["user_id"][row]), [str(i) for i in users["watched"][row]]


def request(user_id: str, budget: int = 0, **user) -> retrieval_pb2.RetrieveRequest:
    return retrieval_pb2.RetrieveRequest(
        user=common_pb2.UserContext(user_id=user_id, **user), budget=budget
    )


async def test_health_and_version(server: Running, mv: ModelVersion):
    res = await server.stub.Retrieve(request(heavy_user(mv)[0], 10), timeout=5)
    assert res.index_version == mv.version
    assert len(res.candidates) == 10


async def test_known_user_dedup_attribution_and_watched_filter(server: Running, mv: ModelVersion):
    user, history = typical_user(mv)
    r = redis.Redis.from_url(server.settings.redis_url.get_secret_value())
    watched = {m.decode() for m in r.smembers(redis_keys.user_watched(user))}
    assert set(history) <= watched
    res = await server.stub.Retrieve(request(user, 120), timeout=5)
    ids = [c.item_id for c in res.candidates]
    assert len(ids) == 120 and len(set(ids)) == 120
    assert not set(ids) & watched, "watched items must be filtered"
    assert set(ids) <= set(mv.item_ids)
    assert {r.source: r.status for r in res.source_reports} == {
        "similar_to_recent": OK, "top_genre": OK, "top_country": OK, "popular": OK,
    }  # fmt: skip
    assert not res.degraded
    multi = [c for c in res.candidates if len(c.sources) > 1]
    assert multi, "a 250-item catalogue must give overlapping sources"
    for c in res.candidates:
        assert len(set(c.sources)) == len(c.sources)
        assert set(c.source_scores) <= set(c.sources)
        if c.source_scores:
            assert c.score == pytest.approx(max(c.source_scores.values()))
    # Attribution is true: every item credited to a source is in that source's own
    # answer (asked with a larger budget, so its list is a superset of the first one).
    for name in ("similar_to_recent", "top_genre", "top_country", "popular"):
        own = await server.stub.Retrieve(
            retrieval_pb2.RetrieveRequest(
                user=common_pb2.UserContext(user_id=user), budget=5000, sources=[name]
            ),
            timeout=5,
        )
        credited = {c.item_id for c in res.candidates if name in c.sources}
        assert credited <= {c.item_id for c in own.candidates}, name
        assert all(c.sources == [name] for c in own.candidates)
    similar = [c for c in res.candidates if "similar_to_recent" in c.sources]
    assert similar and all(c.seed_item_id in watched for c in similar)
    genre = [c for c in res.candidates if "top_genre" in c.sources]
    assert genre and all(c.genre in mv.spec.genres for c in genre)


async def test_heavy_watcher_still_gets_a_full_list(server: Running, mv: ModelVersion):
    user, history = heavy_user(mv)
    unwatched = len(mv.item_ids) - len(set(history))
    res = await server.stub.Retrieve(request(user, 500), timeout=5)
    # Budget 500 over a 250-item catalogue: every unwatched item, via the fallback chain.
    assert len(res.candidates) == unwatched


async def test_record_interaction_is_seen_by_next_retrieve(server: Running, mv: ModelVersion):
    user = "new-user-record"
    first = await server.stub.Retrieve(request(user, 50), timeout=5)
    assert first.candidates
    item = first.candidates[0].item_id
    res = await server.stub.RecordInteraction(
        retrieval_pb2.RecordInteractionRequest(
            user_id=user, item_id=item, rating=5.0, timestamp=1_700_000_123
        ),
        timeout=5,
    )
    assert (res.history_length, res.rating_count) == (1, 1)
    second = await server.stub.Retrieve(request(user, 50), timeout=5)
    ids = [c.item_id for c in second.candidates]
    assert item not in ids
    # The new history seeds the similarity source and the genre source.
    assert any(c.seed_item_id == item for c in second.candidates)
    assert any("top_genre" in c.sources for c in second.candidates)
    r = redis.Redis.from_url(server.settings.redis_url.get_secret_value())
    assert r.lrange(redis_keys.user_recent(user), 0, -1) == [item.encode()]
    assert r.hget(redis_keys.user_state(user), "nr") == b"1"
    # Logged for the next publish to replay (retrieval.interaction_log_length, 200).
    [(_, logged)] = r.xrange(redis_keys.user_log(user))
    assert (logged[b"item"], logged[b"ts"], logged[b"r"]) == (item.encode(), b"1700000123", b"5.0")


async def test_record_interaction_retried_with_its_event_id_counts_once(
    server: Running, mv: ModelVersion
):
    user, item = "retrying-user", mv.item_ids[3]
    req = retrieval_pb2.RecordInteractionRequest(
        user_id=user, item_id=item, rating=4.0, event_id="evt-1"
    )
    first = await server.stub.RecordInteraction(req, timeout=5)
    again = await server.stub.RecordInteraction(req, timeout=5)
    assert (first.history_length, first.rating_count, first.duplicate) == (1, 1, False)
    assert (again.history_length, again.rating_count, again.duplicate) == (1, 1, True)
    r = redis.Redis.from_url(server.settings.redis_url.get_secret_value())
    assert r.hget(redis_keys.user_state(user), "n") == b"1", "counted once"
    assert 0 < r.ttl(redis_keys.user_event(user, "evt-1")) <= 24 * 3600
    # Another event id for the same item is a new interaction.
    other = await server.stub.RecordInteraction(
        retrieval_pb2.RecordInteractionRequest(user_id=user, item_id=item, event_id="evt-2"),
        timeout=5,
    )
    assert not other.duplicate and r.hget(redis_keys.user_state(user), "n") == b"2"


@pytest.mark.parametrize(
    "corrupt",
    ["watched_is_a_string", "counter_is_text", "counter_is_hex", "sum_is_hex", "sum_is_padded"],
)
async def test_record_interaction_on_corrupt_state_writes_nothing(
    server: Running, mv: ModelVersion, corrupt
):
    """A refused write changes nothing, and its status says a retry will not help."""
    user = f"corrupt-{corrupt}"
    r = redis.Redis.from_url(server.settings.redis_url.get_secret_value())
    r.hset(redis_keys.user_state(user), mapping={"n": "2", "nr": "1", "sum": "4"})
    if corrupt == "watched_is_a_string":
        r.set(redis_keys.user_watched(user), "oops")
    else:
        # Lua's tonumber reads the hex and padded forms; Redis and Python do not.
        field, value = {
            "counter_is_text": ("sum", "four"),
            "counter_is_hex": ("n", "0x2"),
            "sum_is_hex": ("sum", "0x4"),
            "sum_is_padded": ("sum", " 4"),
        }[corrupt]
        r.hset(redis_keys.user_state(user), field, value)
    before = r.hgetall(redis_keys.user_state(user))
    for _ in range(3):  # a client retrying on the old UNAVAILABLE counted it each time
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await server.stub.RecordInteraction(
                retrieval_pb2.RecordInteractionRequest(
                    user_id=user, item_id=mv.item_ids[0], rating=5.0
                ),
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert user in err.value.details()
    assert r.hgetall(redis_keys.user_state(user)) == before
    assert r.llen(redis_keys.user_recent(user)) == 0


async def test_request_overrides_history_and_excludes(server: Running, mv: ModelVersion):
    seeds = mv.item_ids[:3]
    exclude = [mv.item_ids[10], mv.item_ids[11]]
    res = await server.stub.Retrieve(
        request("cold-override", 100, recent_item_ids=seeds, exclude_item_ids=exclude),
        timeout=5,
    )
    ids = {c.item_id for c in res.candidates}
    assert not ids & (set(seeds) | set(exclude))
    seeds_used = {c.seed_item_id for c in res.candidates if c.seed_item_id}
    assert seeds_used and seeds_used <= set(seeds)


async def test_cold_start_user(server: Running, mv: ModelVersion):
    country = mv.spec.countries[0]
    res = await server.stub.Retrieve(
        retrieval_pb2.RetrieveRequest(
            user=common_pb2.UserContext(
                user_id="never-seen", features=common_pb2.UserFeatures(country=country)
            ),
            budget=40,
        ),
        timeout=5,
    )
    counts = {r.source: (r.status, r.count) for r in res.source_reports}
    assert counts["similar_to_recent"] == (OK, 0)
    assert counts["top_genre"] == (OK, 0)
    assert counts["top_country"][0] == OK and counts["top_country"][1] > 0
    assert len(res.candidates) == 40 and not res.degraded
    popular_top = [i for i, _ in mv.top_lists["popular"][:5]]
    assert popular_top[0] in {c.item_id for c in res.candidates}


async def test_similar_items_match_brute_force(server: Running, mv: ModelVersion):
    vec = np.asarray(mv.item_vectors, np.float64)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    recalls = []
    for row in range(0, len(mv.item_ids), 25):
        item = mv.item_ids[row]
        res = await server.stub.SimilarItems(
            retrieval_pb2.SimilarItemsRequest(item_id=item, k=10), timeout=5
        )
        got = [n.item_id for n in res.items]
        assert len(got) == 10 and item not in got
        cos = vec @ vec[row]
        cos[row] = -np.inf
        exact = {mv.item_ids[i] for i in np.argsort(-cos)[:10]}
        recalls.append(len(exact & set(got)) / 10)
        for n in res.items:
            assert n.score == pytest.approx(cos[mv.item_index[n.item_id]], abs=1e-3)
        assert [n.score for n in res.items] == sorted((n.score for n in res.items), reverse=True)
    assert np.mean(recalls) >= 0.95


@pytest.mark.parametrize(
    ("rpc", "req", "field"),
    [
        ("Retrieve", retrieval_pb2.RetrieveRequest(), "user.user_id"),
        ("Retrieve", request("x" * 257), "user.user_id"),
        ("Retrieve", request("u", -1), "budget"),
        ("Retrieve", request("u", 5001), "budget"),
        (
            "Retrieve",
            retrieval_pb2.RetrieveRequest(
                user=common_pb2.UserContext(user_id="u"), sources=["popular", "nope"]
            ),
            "sources[1]",
        ),
        ("Retrieve", request("u", exclude_item_ids=["1", ""]), "user.exclude_item_ids[1]"),
        ("Retrieve", request("u", recent_item_ids=["y" * 300]), "user.recent_item_ids[0]"),
        ("SimilarItems", retrieval_pb2.SimilarItemsRequest(item_id="", k=5), "item_id"),
        ("SimilarItems", retrieval_pb2.SimilarItemsRequest(item_id="z" * 257, k=5), "item_id"),
        ("SimilarItems", retrieval_pb2.SimilarItemsRequest(item_id="1", k=0), "k"),
        ("SimilarItems", retrieval_pb2.SimilarItemsRequest(item_id="1", k=1001), "k"),
        ("RecordInteraction", retrieval_pb2.RecordInteractionRequest(item_id="1"), "user_id"),
        (
            "RecordInteraction",
            retrieval_pb2.RecordInteractionRequest(user_id="u", item_id="1", rating=9.0),
            "rating",
        ),
        (
            "RecordInteraction",
            retrieval_pb2.RecordInteractionRequest(user_id="u", item_id="1", rating=float("nan")),
            "rating",
        ),
        (
            "RecordInteraction",
            retrieval_pb2.RecordInteractionRequest(user_id="u", item_id="1", event_id="e" * 300),
            "event_id",
        ),
    ],
)
async def test_bad_input_is_invalid_argument(server: Running, rpc, req, field):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(server.stub, rpc)(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()


async def test_an_unknown_cold_start_genre_is_invalid_argument(server: Running):
    req = retrieval_pb2.RetrieveRequest(
        user=common_pb2.UserContext(
            user_id="cold", features=common_pb2.UserFeatures(genre_ratings={"sci-fi": 5.0})
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await server.stub.Retrieve(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("user.features.genre_ratings: unknown genre 'sci-fi'")


async def test_retrieve_many_answers_each_request_as_retrieve_would(
    server: Running, mv: ModelVersion
):
    from recsys.serving import RPC_TOTAL

    users = [typical_user(mv)[0], heavy_user(mv)[0], "never-seen-user"]
    singles = [await server.stub.Retrieve(request(u, 40), timeout=5) for u in users]
    bad = request("u", -1)
    member = {
        c: RPC_TOTAL.labels("retrieval", "RetrieveMany.member", c)
        for c in ("OK", "INVALID_ARGUMENT")
    }
    before = {c: m._value.get() for c, m in member.items()}
    many = await server.stub.RetrieveMany(
        retrieval_pb2.RetrieveManyRequest(
            requests=[request(users[0], 40), bad, request(users[1], 40), request(users[2], 40)]
        ),
        timeout=5,
    )
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [o.code for o in many.outcomes] == [0, invalid, 0, 0]
    # Each member is counted by its own code: the alerts see a failing member.
    assert {c: m._value.get() - before[c] for c, m in member.items()} == {
        "OK": 3,
        "INVALID_ARGUMENT": 1,
    }
    refused = many.outcomes[1]
    assert refused.message.startswith("budget:") and not refused.HasField("response")
    assert all(o.message == "" for i, o in enumerate(many.outcomes) if i != 1)
    for single, got in zip(singles, [many.outcomes[i].response for i in (0, 2, 3)], strict=True):
        assert [c.item_id for c in got.candidates] == [c.item_id for c in single.candidates]
        assert [c.sources for c in got.candidates] == [c.sources for c in single.candidates]
        assert got.index_version == single.index_version == mv.version
        assert [r.source for r in got.source_reports] == [r.source for r in single.source_reports]
    assert len(many.outcomes[0].response.candidates) == 40
    empty = await server.stub.RetrieveMany(retrieval_pb2.RetrieveManyRequest(), timeout=5)
    assert len(empty.outcomes) == 0


async def test_retrieve_many_refuses_an_oversized_batch(server: Running):
    from retrieval_service.servicer import MAX_RETRIEVE_MANY

    batch = [request("u", 5)] * (MAX_RETRIEVE_MANY + 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await server.stub.RetrieveMany(retrieval_pb2.RetrieveManyRequest(requests=batch), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("requests:"), err.value.details()


@pytest.mark.parametrize("rpc", ["SimilarItems", "RecordInteraction"])
async def test_unknown_item_is_not_found(server: Running, rpc):
    req = (
        retrieval_pb2.SimilarItemsRequest(item_id="no-such-item", k=5)
        if rpc == "SimilarItems"
        else retrieval_pb2.RecordInteractionRequest(user_id="u", item_id="no-such-item")
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(server.stub, rpc)(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-item" in err.value.details()


async def test_at_most_two_redis_round_trips_per_retrieve(
    published: Path, redis_server, mv: ModelVersion
):
    # The uncached path: every Retrieve reads the top lists from Redis again.
    settings = settings_for(published.parent, redis_server.url, top_list_cache=False)
    async with Running(settings, counting_client(redis_server.url)) as server:
        user, _ = heavy_user(mv)
        sync = redis.Redis.from_url(server.settings.redis_url.get_secret_value())
        await server.stub.Retrieve(request(user, 500), timeout=5)  # warm the pool
        sync.config_resetstat()
        before = CountingConnection.writes
        n = 20
        for _ in range(n):
            res = await server.stub.Retrieve(request(user, 500), timeout=5)
            assert all(r.status == OK for r in res.source_reports), res.source_reports
        per_call = (CountingConnection.writes - before) / n
        assert per_call <= 2, per_call
        stats = sync.info("commandstats")
        # Cross-check from the server's side: the sorted-set reads really happened, batched.
        assert stats["cmdstat_hgetall"]["calls"] == n
        assert stats["cmdstat_zrevrange"]["calls"] >= 3 * n


# --- third-party sources through a real entry point ------------------------------

PLUGIN = textwrap.dedent(
    """
    import asyncio
    from typing import Literal
    from retrieval_service.sources.base import Candidate, CandidateBlock, SourceBase, SourceConfig

    class SlowConfig(SourceConfig):
        type: Literal["test_slow"] = "test_slow"
        sleep_s: float = 5.0

    class SlowSource(SourceBase):
        config_model = SlowConfig
        async def retrieve(self, ctx, k):
            await asyncio.sleep(self.config.sleep_s)
            return [Candidate(ctx.served.item_ids[0])]

    class BrokenConfig(SourceConfig):
        type: Literal["test_broken"] = "test_broken"

    class BrokenSource(SourceBase):
        config_model = BrokenConfig
        async def retrieve(self, ctx, k):
            raise RuntimeError("plugin exploded")

    class TrendingConfig(SourceConfig):
        type: Literal["test_trending"] = "test_trending"

    class TrendingSource(SourceBase):
        config_model = TrendingConfig
        async def retrieve(self, ctx, k):
            return [Candidate(ctx.served.item_ids[-1], 1.0)]

    class StubbornConfig(SourceConfig):
        type: Literal["test_stubborn"] = "test_stubborn"

    class StubbornSource(SourceBase):
        # Catches its cancellation and answers anyway, much later.
        config_model = StubbornConfig
        async def retrieve(self, ctx, k):
            try:
                await asyncio.sleep(2.0)
            except asyncio.CancelledError:
                await asyncio.sleep(2.0)
            return [Candidate(ctx.served.item_ids[0])]

    class ReaderConfig(SourceConfig):
        type: Literal["test_reader"] = "test_reader"
        key: str = "test:reader"

    class ReaderSource(SourceBase):
        # Reads one sorted set through the request's shared Redis batch.
        config_model = ReaderConfig
        async def retrieve(self, ctx, k):
            got = await ctx.redis.top(self.config.key, k)
            return [Candidate(i, s) for i, s in got]

    class MisalignedConfig(SourceConfig):
        type: Literal["test_misaligned"] = "test_misaligned"
        extra_scores: int = 1

    class MisalignedSource(SourceBase):
        # A block whose arrays do not line up with its rows.
        config_model = MisalignedConfig
        async def retrieve(self, ctx, k):
            import numpy as np
            rows = np.arange(3, dtype=np.int64)
            scores = np.ones(3 + self.config.extra_scores)
            return CandidateBlock(ctx.served.item_ids, rows, scores)
    """
)


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """Installs a test-only distribution (dist-info + entry points) on sys.path."""
    root = tmp_path_factory.mktemp("site")
    (root / "recsys_test_plugin.py").write_text(PLUGIN)
    info = root / "recsys_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: recsys-test-plugin\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[recsys.candidate_sources]\n"
        "test_slow = recsys_test_plugin:SlowSource\n"
        "test_broken = recsys_test_plugin:BrokenSource\n"
        "test_trending = recsys_test_plugin:TrendingSource\n"
        "test_stubborn = recsys_test_plugin:StubbornSource\n"
        "test_misaligned = recsys_test_plugin:MisalignedSource\n"
        "test_reader = recsys_test_plugin:ReaderSource\n"
    )
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("recsys_test_plugin", None)


async def test_slow_and_broken_plugins_degrade_not_fail(
    plugin_path, published: Path, redis_server, mv: ModelVersion
):
    sources = [
        *default_sources(),
        {"name": "slow", "type": "test_slow", "timeout_ms": 40, "budget": 10},
        {"name": "slow_long", "type": "test_slow", "timeout_ms": 5000},
        {"name": "broken", "type": "test_broken"},
    ]
    settings = settings_for(published.parent, redis_server.url, sources=sources)
    async with Running(settings) as srv:
        start = time.perf_counter()
        everything_but_slow_long = [
            "similar_to_recent", "top_genre", "top_country", "popular", "slow", "broken",
        ]  # fmt: skip
        res = await srv.stub.Retrieve(
            retrieval_pb2.RetrieveRequest(
                user=common_pb2.UserContext(user_id=typical_user(mv)[0]),
                budget=100,
                sources=everything_but_slow_long,
            ),
            timeout=5,
        )
        elapsed = time.perf_counter() - start
        reports = {r.source: r for r in res.source_reports}
        assert reports["slow"].status == TIMEOUT
        assert 30 <= reports["slow"].latency_ms < 1000
        assert reports["broken"].status == ERROR
        # The plugin's own text goes to the log (checked below), not to clients.
        assert reports["broken"].message.startswith("RuntimeError (details in")
        assert "plugin exploded" not in reports["broken"].message
        for name in ("similar_to_recent", "top_genre", "top_country", "popular"):
            assert reports[name].status == OK
        assert res.degraded and len(res.candidates) == 100
        assert elapsed < 1.0
        # The request deadline caps a source's own timeout, with time left to answer.
        res = await srv.stub.Retrieve(
            retrieval_pb2.RetrieveRequest(
                user=common_pb2.UserContext(user_id="u"), sources=["slow_long", "popular"]
            ),
            timeout=0.3,
        )
        reports = {r.source: r for r in res.source_reports}
        assert reports["slow_long"].status == TIMEOUT and reports["slow_long"].latency_ms < 300
        assert reports["popular"].status == OK and res.candidates
        slow_only = retrieval_pb2.RetrieveRequest(
            user=common_pb2.UserContext(user_id="u"), sources=["slow", "broken"]
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.stub.Retrieve(slow_only, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "slow: TIMEOUT" in err.value.details() and "broken: ERROR" in err.value.details()


@pytest.mark.parametrize(("first", "own_items"), [("broken", 0), ("trending", 1)])
async def test_the_pad_is_credited_to_the_popular_source(
    plugin_path, published: Path, redis_server, first: str, own_items: int
):
    """The pad is the popular list: a popular-tier source listed first, failed ("broken")
    or answering with one item of its own ("trending"), must not be named for it."""
    sources = [
        {"name": first, "type": f"test_{first}", "tier": "popular"},
        {"name": "popular", "type": "popular", "budget": 5, "tier": "popular"},
    ]
    settings = settings_for(published.parent, redis_server.url, sources=sources)
    async with Running(settings) as srv:
        res = await srv.stub.Retrieve(
            retrieval_pb2.RetrieveRequest(user=common_pb2.UserContext(user_id="pad"), budget=40),
            timeout=5,
        )
    reports = {r.source: r.status for r in res.source_reports}
    assert reports == {first: ERROR if first == "broken" else OK, "popular": OK}
    assert len(res.candidates) == 40, "padded past popular's budget of 5"
    assert sum(first in c.sources for c in res.candidates) == own_items
    assert all("popular" in c.sources for c in res.candidates if first not in c.sources)


@pytest.mark.parametrize("tracing", [False, True])
async def test_a_source_that_swallows_its_cancellation_does_not_hold_the_request(
    plugin_path, published: Path, redis_server, tracing: bool
):
    sources = [
        {"name": "stubborn", "type": "test_stubborn", "timeout_ms": 30},
        {"name": "popular", "type": "popular"},
    ]
    settings = settings_for(published.parent, redis_server.url, sources=sources)
    async with Running(settings) as srv:
        if tracing:
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )

            from recsys.config import TracingSettings
            from recsys.tracing import Tracing

            on = TracingSettings(enabled=True)
            srv.app.engine.tracing = Tracing.from_settings(
                on, "retrieval", exporter=InMemorySpanExporter()
            )
        start = time.perf_counter()
        res = await srv.stub.Retrieve(
            retrieval_pb2.RetrieveRequest(user=common_pb2.UserContext(user_id="u"), budget=20),
            timeout=0.3,
        )
        elapsed = time.perf_counter() - start
    reports = {r.source: r for r in res.source_reports}
    assert reports["stubborn"].status == TIMEOUT
    assert reports["popular"].status == OK and len(res.candidates) == 20
    assert elapsed < 1.0, f"held {elapsed:.2f} s by a source that ignored its cancel"


@pytest.mark.parametrize("extra", [1, -1])
async def test_a_block_whose_arrays_do_not_line_up_is_that_sources_error(
    plugin_path, published: Path, redis_server, extra: int
):
    """The merge indexes the arrays together: a misfit shifted other sources' scores."""
    sources = [
        {"name": "misaligned", "type": "test_misaligned", "extra_scores": extra},
        {"name": "popular", "type": "popular"},
    ]
    settings = settings_for(published.parent, redis_server.url, sources=sources)
    async with Running(settings) as srv:
        res = await srv.stub.Retrieve(
            retrieval_pb2.RetrieveRequest(user=common_pb2.UserContext(user_id="u"), budget=20),
            timeout=5,
        )
    reports = {r.source: r for r in res.source_reports}
    bad = reports["misaligned"]
    assert bad.status == ERROR and "scores of shape" in bad.message, bad.message
    assert reports["popular"].status == OK and len(res.candidates) == 20
    assert all(list(c.sources) == ["popular"] for c in res.candidates)


@pytest.mark.parametrize("first", [True, False])
async def test_a_plugins_redis_read_shares_the_built_ins_round_trip(
    plugin_path, published: Path, redis_server, mv: ModelVersion, first: bool
):
    """Hydrate, then one batch for every source's reads, wherever the plugin is listed."""
    from recsys.config import RetrievalSettings
    from retrieval_service.engine import RetrievalEngine, RetrieveQuery
    from retrieval_service.registry import build_sources

    reader = {"name": "reader", "type": "test_reader", "tier": "segment"}
    builtins = [e for e in default_sources() if e["name"] in ("top_genre", "top_country")]
    entries = [reader, *builtins] if first else [*builtins, reader]
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.zadd("test:reader", {mv.item_ids[0]: 1.0})
        eng = RetrievalEngine(
            RetrievalSettings(top_list_cache=False), build_sources(entries), client
        )
        eng.swap(await asyncio.to_thread(eng.load_version, published))
        uid = str(mv.users["user_id"][0])
        await eng.retrieve(RetrieveQuery(uid))  # loads the read script once
        res = await eng.retrieve(RetrieveQuery(uid))
    finally:
        await client.delete("test:reader")
        await client.aclose()
    assert {r.source: r.count for r in res.reports}["reader"] == 1
    assert res.redis_round_trips == 2


async def test_every_source_failing_is_not_retried_by_a_retrying_channel(
    plugin_path, published: Path, redis_server
):
    """The channel retries UNAVAILABLE for a dropped connection, not for this answer."""
    from recsys.channels import create_channel
    from recsys.serving import RPC_TOTAL

    sources = [{"name": "broken", "type": "test_broken"}]
    settings = settings_for(published.parent, redis_server.url, sources=sources)
    failed = RPC_TOTAL.labels("retrieval", "Retrieve", "UNAVAILABLE")
    async with Running(settings) as srv:
        channel = create_channel(f"127.0.0.1:{srv.handle.port}", aio=True, max_attempts=2)
        try:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            before = failed._value.get()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Retrieve(request("u", 10), timeout=5)
        finally:
            await channel.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "every candidate source failed" in err.value.details()
    assert failed._value.get() - before == 1, "retried an answer that would fail the same way"


async def test_a_failing_source_logs_once_per_interval_not_per_request(
    plugin_path, published: Path, redis_server, caplog
):
    """During an outage every request fails the same way: the metrics count each one."""
    import logging

    sources = [
        {"name": "broken", "type": "test_broken"},
        {"name": "popular", "type": "popular"},
    ]
    settings = settings_for(published.parent, redis_server.url, sources=sources)
    async with Running(settings) as srv:
        with caplog.at_level(logging.WARNING, logger="recsys.retrieval"):
            for _ in range(20):
                res = await srv.stub.Retrieve(request("u", 10), timeout=5)
                assert res.degraded
    lines = [r for r in caplog.records if r.getMessage().startswith("source failed")]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "plugin exploded" in lines[0].getMessage()
    assert lines[0].fields["source"] == "broken"


async def test_unknown_config_key_is_rejected_at_startup(plugin_path, published, redis_server):
    from retrieval_service.errors import SourceConfigError

    bad = [{"name": "slow", "type": "test_slow", "sleep_seconds": 1}]
    with pytest.raises(SourceConfigError, match=r"name='slow'.*unknown key 'sleep_seconds'"):
        build_server(settings_for(published.parent, redis_server.url, sources=bad))


async def test_redis_down_degrades_to_memory_sources(published: Path, mv: ModelVersion):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = load_settings(
        model_dir=published.parent,
        redis_url=dead,
        redis_timeout_s=0.05,
        retrieval={
            "port": 0,
            "metrics_port": 0,
            "reload_interval_s": 3600.0,
            "sources": default_sources(),
        },
    )
    async with Running(settings) as srv:
        start = time.perf_counter()
        res = await srv.stub.Retrieve(request("u", 50, recent_item_ids=mv.item_ids[:2]), timeout=2)
        assert time.perf_counter() - start < 1.0
        reports = {r.source: r for r in res.source_reports}
        # The request's history override and the in-memory popular list still answer.
        assert reports["similar_to_recent"].status == OK and reports["popular"].status == OK
        assert reports["similar_to_recent"].count > 0
        for name in ("top_genre", "top_country"):
            assert reports[name].status == ERROR
            assert "user state unavailable" in reports[name].message
        assert res.degraded and len(res.candidates) == 50
        # Without an override the similarity source has no history: ERROR, not "empty".
        res = await srv.stub.Retrieve(request("u", 50), timeout=2)
        reports = {r.source: r.status for r in res.source_reports}
        assert reports["similar_to_recent"] == ERROR and reports["popular"] == OK
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.stub.RecordInteraction(
                retrieval_pb2.RecordInteractionRequest(user_id="u", item_id=mv.item_ids[0]),
                timeout=2,
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("build_named", [True, False], ids=["build-named", "build-unknown"])
async def test_first_request_finds_the_top_lists_already_copied(
    published: Path, redis_server, mv: ModelVersion, build_named: bool
):
    # A server of its own, so this is the version's first request.
    settings = settings_for(published.parent, redis_server.url)
    build = redis_keys.version_build(mv.version)
    sync = redis.Redis.from_url(redis_server.url)
    if not build_named:  # published by a recsys from before the key: its lists are copied too
        sync.delete(build)
    try:
        await _first_request_from_copies(settings, redis_server, mv)
    finally:
        sync.set(build, mv.digest)
        sync.close()


async def _first_request_from_copies(settings, redis_server, mv: ModelVersion) -> None:
    async with Running(settings, counting_client(redis_server.url)) as running:
        cache = running.app.engine.served.top_cache
        keys = [redis_keys.top_genre(mv.version, g) for g in mv.spec.genres]
        keys += [redis_keys.top_country(mv.version, c) for c in mv.spec.countries]
        keys.append(redis_keys.top_popular(mv.version))
        published_keys = [k for k in keys if redis.Redis.from_url(redis_server.url).exists(k)]
        assert published_keys and all(cache.get_rows(k, 1) is not None for k in published_keys)
        before = CountingConnection.writes
        res = await running.stub.Retrieve(request(typical_user(mv)[0], 200), timeout=5)
        assert not res.degraded and len(res.candidates) == 200
        # Only the user's own read goes to Redis: every list came from the copies.
        assert CountingConnection.writes - before == 1


async def test_a_version_is_swapped_in_even_when_its_lists_cannot_be_copied(
    published: Path, redis_server, mv: ModelVersion, caplog
):
    settings = settings_for(published.parent, redis_server.url)
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    _handle, app = build_server(settings, redis=dead)
    try:
        with caplog.at_level("WARNING", logger="recsys.retrieval"):
            await app.load(published)
        assert app.engine.served is not None and app.engine.served.version == mv.version
        assert any("top lists not copied" in r.getMessage() for r in caplog.records)
    finally:
        await app.close()


async def test_the_stored_history_is_distinct_and_capped(server: Running, mv: ModelVersion):
    """A re-watch moves the item to the front, once; the list keeps history_length items."""
    user, items = "rewatcher", list(mv.item_ids[:4])
    cap = server.settings.retrieval.history_length
    for item in [*items, items[1]]:
        await server.stub.RecordInteraction(
            retrieval_pb2.RecordInteractionRequest(user_id=user, item_id=item), timeout=5
        )
    r = redis.Redis.from_url(server.settings.redis_url.get_secret_value(), decode_responses=True)
    assert r.lrange(redis_keys.user_recent(user), 0, -1) == [items[1], items[3], items[2], items[0]]
    for i in range(cap + 3):
        await server.stub.RecordInteraction(
            retrieval_pb2.RecordInteractionRequest(user_id=user, item_id=mv.item_ids[10 + i]),
            timeout=5,
        )
    assert r.llen(redis_keys.user_recent(user)) == cap


async def test_record_interaction_remembers_its_event_id_for_the_window_asked(
    server: Running, mv: ModelVersion
):
    req = retrieval_pb2.RecordInteractionRequest(
        user_id="windowed", item_id=mv.item_ids[0], event_id="e", dedupe_window_s=10
    )
    await server.stub.RecordInteraction(req, timeout=5)
    r = redis.Redis.from_url(server.settings.redis_url.get_secret_value())
    assert 0 < r.ttl(redis_keys.user_event("windowed", "e")) <= 10
    too_long = retrieval_pb2.RecordInteractionRequest(
        user_id="windowed", item_id=mv.item_ids[0], event_id="f", dedupe_window_s=86_401
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await server.stub.RecordInteraction(too_long, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("dedupe_window_s:")


async def test_request_exclude_ids_never_come_back(server, mv: ModelVersion):
    """The request's ``exclude_item_ids`` are filtered like watched items."""
    first = await server.stub.Retrieve(request("cold-exclude", 20), timeout=5)
    exclude = [c.item_id for c in first.candidates[:5]]
    assert len(exclude) == 5
    res = await server.stub.Retrieve(
        request("cold-exclude", 20, exclude_item_ids=exclude), timeout=5
    )
    assert not {c.item_id for c in res.candidates} & set(exclude)


async def test_stated_genres_do_not_override_a_known_users_history(server, mv: ModelVersion):
    """Stated genres are for cold users: a watcher's history still picks the genre lists."""
    user, _ = typical_user(mv)
    plain = await server.stub.Retrieve(
        retrieval_pb2.RetrieveRequest(
            user=common_pb2.UserContext(user_id=user), budget=30, sources=["top_genre"]
        ),
        timeout=5,
    )
    used = {c.genre for c in plain.candidates}
    other = next(g for g in mv.spec.genres if g not in used)
    stated = await server.stub.Retrieve(
        retrieval_pb2.RetrieveRequest(
            user=common_pb2.UserContext(
                user_id=user, features=common_pb2.UserFeatures(genre_ratings={other: 5.0})
            ),
            budget=30,
            sources=["top_genre"],
        ),
        timeout=5,
    )
    assert [c.item_id for c in stated.candidates] == [c.item_id for c in plain.candidates]


async def test_request_country_overrides_the_stored_one(server, mv: ModelVersion):
    """A country sent with the request wins over the stored one."""
    user, _ = typical_user(mv)
    r = redis.Redis.from_url(server.settings.redis_url.get_secret_value())
    stored = r.hget(redis_keys.user_state(user), "country")
    stored = stored.decode() if stored else ""
    other = next(c for c in mv.spec.countries if c != stored)
    cold = await server.stub.Retrieve(
        retrieval_pb2.RetrieveRequest(
            user=common_pb2.UserContext(
                user_id="nobody-country", features=common_pb2.UserFeatures(country=other)
            ),
            budget=5000,
            sources=["top_country"],
        ),
        timeout=5,
    )
    watched = {m.decode() for m in r.smembers(redis_keys.user_watched(user))}
    recent = {m.decode() for m in r.lrange(redis_keys.user_recent(user), 0, -1)}
    want = [c.item_id for c in cold.candidates if c.item_id not in watched | recent][:10]
    res = await server.stub.Retrieve(
        retrieval_pb2.RetrieveRequest(
            user=common_pb2.UserContext(
                user_id=user, features=common_pb2.UserFeatures(country=other)
            ),
            budget=10,
            sources=["top_country"],
        ),
        timeout=5,
    )
    assert [c.item_id for c in res.candidates] == want


async def test_a_corrupt_hash_still_gets_the_top_lists(server, mv: ModelVersion):
    """A corrupt hash is that user's problem, not Redis being down: the top lists still answer."""
    user = "corrupt-hash-user"
    r = redis.Redis.from_url(server.settings.redis_url.get_secret_value())
    r.hset(redis_keys.user_state(user), mapping={"n": "not-a-number", "sum": "x"})
    r.sadd(redis_keys.user_watched(user), mv.item_ids[0])
    try:
        res = await server.stub.Retrieve(
            retrieval_pb2.RetrieveRequest(
                user=common_pb2.UserContext(
                    user_id=user, features=common_pb2.UserFeatures(country=mv.spec.countries[0])
                ),
                budget=20,
                sources=["top_country"],
            ),
            timeout=5,
        )
    finally:
        r.delete(redis_keys.user_state(user), redis_keys.user_watched(user))
    reports = {x.source: x for x in res.source_reports}
    assert reports["top_country"].status == common_pb2.SOURCE_STATUS_OK, reports
    assert len(res.candidates) == 20


async def test_every_source_timing_out_on_a_short_deadline_is_deadline_exceeded(
    plugin_path, published, redis_server
):
    """A deadline too short for any source is the caller's DEADLINE_EXCEEDED, not UNAVAILABLE."""
    sources = [*default_sources(), {"name": "slow_long", "type": "test_slow", "timeout_ms": 5000}]
    settings = settings_for(published.parent, redis_server.url, sources=sources)
    async with Running(settings) as srv:
        with pytest.raises(DeadlineExceeded):
            await srv.app.engine.retrieve(RetrieveQuery("u", sources=["slow_long"]), timeout_s=0.2)


@pytest.mark.parametrize("key", ["watched", "recent"])
async def test_a_wrong_typed_watched_or_recent_key_degrades_not_fails(server, mv, key):
    """A wrong-typed watched set or recent list degrades that answer; it was INTERNAL."""
    user = f"wrongtype-{key}"
    r = redis.Redis.from_url(server.settings.redis_url.get_secret_value())
    bad = redis_keys.user_watched(user) if key == "watched" else redis_keys.user_recent(user)
    r.set(bad, "not-a-collection")
    try:
        res = await server.stub.Retrieve(request(user, 10), timeout=5)
    finally:
        r.delete(bad)
    assert len(res.candidates) == 10 and res.degraded


async def test_a_bad_recent_id_is_named_by_its_position_in_the_request(server):
    """The error names the bad id by its position in the request, not in the newest-first list."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await server.stub.Retrieve(request("u", 5, recent_item_ids=["1", "", "2", "3"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("user.recent_item_ids[1]:"), err.value.details()
