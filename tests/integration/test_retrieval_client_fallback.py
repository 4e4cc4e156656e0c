"""Ranking's retrieval client: an old server without RetrieveMany, deadlines, big requests.

The echo server (``bench.echo``) implements ``Retrieve`` only, like a
retrieval release older than ``RetrieveMany``: concurrent calls that the
client batched must all still be answered, the client must stop batching,
and ``close()`` must still stop the batcher it switched off.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from bench.echo import DEFAULT_BUDGET, EchoProcess
from ranking_service.retrieval_client import RetrievalClient
from ranking_service.testing import serve_retrieval_stand_in
from recsys.batching import BatcherClosed
from recsys.config import RankingSettings
from recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc


async def test_batched_calls_fall_back_to_retrieve_and_close_cleans_up():
    with EchoProcess() as echo:
        client = RetrievalClient(
            RankingSettings(
                retrieval_address=echo.address,
                retrieval_batch_size=16,
                # Long enough that the concurrent calls below share a batch.
                retrieval_batch_wait_ms=50,
                retrieval_timeout_s=10,
            )
        )
        batcher = client._batcher
        assert batcher is not None
        retired = [batcher]
        try:
            users = [common_pb2.UserContext(user_id=f"u{i}") for i in range(8)]
            answers = await asyncio.gather(*(client.retrieve(u, 0, (), None) for u in users))
            assert [len(a.candidates) for a in answers] == [DEFAULT_BUDGET] * 8
            # The RetrieveMany attempt was refused: batching is off for a while.
            assert client._batcher is None
            again = await client.retrieve(users[0], 0, (), None)
            assert len(again.candidates) == DEFAULT_BUDGET and client._batcher is None
            # Then tried again (the old server may have been a rollback): it
            # still refuses, so off again, and every caller is still answered.
            # Retried every minute for as long as the old server serves: the
            # batchers switched off pile up only while they are still busy.
            for _ in range(5):
                client._retry_batching_at = 0.0
                answers = await asyncio.gather(*(client.retrieve(u, 0, (), None) for u in users))
                assert [len(a.candidates) for a in answers] == [DEFAULT_BUDGET] * 8
                assert client._batcher is None and client._retry_batching_at > 0.0
                assert len(client._retired) == 1 and client._retired[0] not in retired
                retired.append(client._retired[0])
        finally:
            await client.close()
        for old in retired:
            with pytest.raises(BatcherClosed):
                await old.submit((None, 1.0))


class _Recording(retrieval_pb2_grpc.RetrievalServiceServicer):
    """A retrieval stand-in that records each call's size and deadline, and takes ``delay_s``."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.calls: list[tuple[str, int, float]] = []

    async def RetrieveMany(self, request, context):
        self.calls.append(("RetrieveMany", len(request.requests), context.time_remaining()))
        await asyncio.sleep(self.delay_s)
        out = retrieval_pb2.RetrieveManyResponse()
        for _ in request.requests:
            out.outcomes.add().response.index_version = "1"
        return out

    async def Retrieve(self, request, context):
        self.calls.append(("Retrieve", 1, context.time_remaining()))
        await asyncio.sleep(self.delay_s)
        return retrieval_pb2.RetrieveResponse(index_version="1")


async def _serve(servicer):
    options = [("grpc.max_receive_message_length", 16 << 20)]
    server, port = await serve_retrieval_stand_in(servicer, grpc.aio.server(options=options))
    return server, f"127.0.0.1:{port}"


async def test_a_batch_queued_behind_the_in_flight_bound_carries_the_time_left():
    fake = _Recording(delay_s=0.15)
    server, address = await _serve(fake)
    client = RetrievalClient(
        RankingSettings(retrieval_address=address, retrieval_timeout_s=0.4,
                        retrieval_batch_size=32, retrieval_max_in_flight=1)
    )  # fmt: skip
    user = common_pb2.UserContext(user_id="u")

    async def one(delay: float):
        await asyncio.sleep(delay)
        return await client.retrieve(user, 10, (), None)

    try:
        await asyncio.gather(one(0), one(0), one(0.02), one(0.02))
        many = [c for c in fake.calls if c[0] == "RetrieveMany"]
        assert len(many) == 2, fake.calls
        # The second batch waited ~130 ms for the first: retrieval must not
        # plan around the full 400 ms its members no longer have.
        assert many[0][2] > 0.3
        assert many[1][2] < 0.4 - 0.1, many
    finally:
        await client.close()
        await server.stop(0)


async def test_large_requests_are_split_off_instead_of_failing_the_whole_batch():
    fake = _Recording()
    server, address = await _serve(fake)
    client = RetrievalClient(RankingSettings(retrieval_address=address, retrieval_timeout_s=5))
    ids = [f"{'x' * 250}{i:06d}" for i in range(10_000)]  # valid: within every limit
    big = common_pb2.UserContext(user_id="big", exclude_item_ids=ids, recent_item_ids=ids)
    small = common_pb2.UserContext(user_id="small")
    try:
        for _ in range(2):  # company on the second wave: the batcher waits for it
            answers = await asyncio.gather(
                *(client.retrieve(big, 10, (), None) for _ in range(4)),
                client.retrieve(small, 10, (), None),
            )
        assert [a.index_version for a in answers] == ["1"] * 5
        limit = RankingSettings().max_message_bytes
        assert all(n * 5_180_000 < limit for kind, n, _ in fake.calls if kind == "RetrieveMany")
    finally:
        await client.close()
        await server.stop(0)
