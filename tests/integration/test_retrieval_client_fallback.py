"""Ranking's retrieval client against a retrieval server without RetrieveMany.

The echo server (``bench.echo``) implements ``Retrieve`` only, like a
retrieval release older than ``RetrieveMany``: concurrent calls that the
client batched must all still be answered, the client must stop batching,
and ``close()`` must still stop the batcher it switched off.
"""

from __future__ import annotations

import asyncio

import pytest

from bench.echo import DEFAULT_BUDGET, EchoProcess
from ranking_service.retrieval_client import RetrievalClient
from recsys.batching import BatcherClosed
from recsys.config import RankingSettings
from recsys.v1 import common_pb2


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
        try:
            users = [common_pb2.UserContext(user_id=f"u{i}") for i in range(8)]
            answers = await asyncio.gather(*(client.retrieve(u, 0, (), None) for u in users))
            assert [len(a.candidates) for a in answers] == [DEFAULT_BUDGET] * 8
            # The RetrieveMany attempt was refused: batching is off from now on.
            assert client._batcher is None
            again = await client.retrieve(users[0], 0, (), None)
            assert len(again.candidates) == DEFAULT_BUDGET
        finally:
            await client.close()
        with pytest.raises(BatcherClosed):
            await batcher.submit((None, 1.0))
