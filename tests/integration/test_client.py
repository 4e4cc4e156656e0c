"""The Python client against real services: defaults, retries, tokens, what it returns."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
import redis.exceptions

from ranking_service.testing import serve_retrieval_stand_in
from recsys.artifacts import ModelVersion
from recsys.client import RecommenderClient, Recorded
from recsys.config import load_settings
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(published, redis_server, serve_both):
    async with serve_both(published.parent, redis_server.url) as s:
        yield s


def client(stack) -> RecommenderClient:
    return RecommenderClient(f"127.0.0.1:{stack.ranking_port}", f"127.0.0.1:{stack.retrieval_port}")


async def test_a_record_retried_by_the_channel_counts_once(stack, mv: ModelVersion, monkeypatch):
    """The write lands, its reply is lost (UNAVAILABLE), the channel retries it."""
    import retrieval_service.engine as engine

    real = engine.record_interaction
    event_ids: list[str] = []

    async def lands_then_fails(*args, **kwargs):
        event_ids.append(kwargs.get("event_id"))
        got = await real(*args, **kwargs)
        if len(event_ids) == 1:
            raise redis.exceptions.TimeoutError("reply lost")
        return got

    monkeypatch.setattr(engine, "record_interaction", lands_then_fails)
    with client(stack) as c:
        got = await asyncio.to_thread(c.record, "retried-user", mv.item_ids[0], 4.0)
    assert len(event_ids) == 2 and event_ids[0] and event_ids[0] == event_ids[1]
    # The retry found the first attempt's write: counted once. Not a duplicate to the
    # caller, who sent it once (the server's "seen" was this call's own attempt).
    assert got == Recorded(history_length=1, rating_count=1, duplicate=False)


async def test_record_says_what_it_did(stack, mv: ModelVersion):
    with client(stack) as c:
        first = await asyncio.to_thread(c.record, "recording-user", mv.item_ids[0], event_id="e1")
        again = await asyncio.to_thread(c.record, "recording-user", mv.item_ids[1], event_id="e1")
        other = await asyncio.to_thread(c.record, "recording-user", mv.item_ids[1], 3.0)
    assert first == Recorded(1, 0, False)
    assert again == Recorded(1, 0, True)
    assert other == Recorded(2, 1, False)


async def test_k_and_top_k_left_out_mean_the_servers_default(stack, mv: ModelVersion):
    default_k = stack.settings.ranking.default_k
    many = list(mv.item_ids) * 5  # more ids than max_k, fewer than max_candidates
    assert stack.settings.ranking.max_k < len(many) <= stack.settings.ranking.max_candidates
    with client(stack) as c:
        ranked = await asyncio.to_thread(c.rank, "client-user", many)
        zero = await asyncio.to_thread(c.rank, "client-user", many[:200], 0)
        recs = await asyncio.to_thread(c.recommend, "client-user")
    assert len(ranked.items) == len(zero.items) == len(recs.items) == default_k


async def test_an_id_the_client_made_is_remembered_minutes_not_a_day(stack, mv: ModelVersion):
    """Each remembered id costs Redis memory: the channel's retries need minutes."""
    import redis

    from recsys.client import OWN_RETRY_WINDOW_S

    with client(stack) as c:
        await asyncio.to_thread(c.record, "short-memory", mv.item_ids[0])
        await asyncio.to_thread(c.record, "short-memory", mv.item_ids[1], event_id="mine")
    r = redis.Redis.from_url(stack.settings.redis_url.get_secret_value(), decode_responses=True)
    ttls = {
        k.rsplit(":", 1)[1]: r.ttl(k) for k in r.scan_iter("recsys:user:{short-memory}:event:*")
    }
    assert len(ttls) == 2
    assert 24 * 3600 - 60 < ttls.pop("mine") <= 24 * 3600  # the caller's own id: a day
    (generated,) = ttls.values()
    assert 0 < generated <= OWN_RETRY_WINDOW_S


class _Authorizations(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Answers SimilarItems with nothing, keeping each call's ``authorization``."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    async def SimilarItems(self, request, context):
        self.seen.append(dict(context.invocation_metadata()).get("authorization"))
        return retrieval_pb2.SimilarItemsResponse()


@pytest.mark.parametrize(
    ("ranking_token", "retrieval_token", "kwargs", "sent"),
    [
        # The README: left out, retrieval_token is token. It was "" (none sent).
        (None, None, {"token": "shared"}, "Bearer shared"),
        (None, "r", {"token": "k"}, "Bearer r"),
        ("k", None, {}, None),  # the config's ranking token is not retrieval's
    ],
    ids=["caller's token", "config's retrieval token", "config's ranking token"],
)
async def test_from_settings_sends_retrieval_the_token_it_should(
    ranking_token, retrieval_token, kwargs, sent
):
    servicer = _Authorizations()
    server, port = await serve_retrieval_stand_in(servicer)
    settings = load_settings(
        ranking={"auth_token": ranking_token},
        retrieval={"host": "127.0.0.1", "port": port, "auth_token": retrieval_token},
    )
    try:
        with RecommenderClient.from_settings(settings, max_attempts=1, **kwargs) as c:
            await asyncio.to_thread(c.similar, "1", 3)
    finally:
        await server.stop(0)
    assert servicer.seen == [sent]
