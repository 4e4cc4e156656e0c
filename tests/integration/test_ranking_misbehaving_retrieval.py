"""Ranking against a retrieval that answers oddly.

The retrieval here is a stand-in served over real gRPC on loopback: it
answers what a real retrieval would only in a version skew or a bug (ids the
ranking model lacks, a repeated candidate, answers too large together).
Real Redis, a real trained version, a real ranking server.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ranking_service.server import build_server
from ranking_service.testing import ranking_settings, serve_retrieval_stand_in, wait_serving
from recsys.artifacts import ModelVersion
from recsys.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc


class _Retrieval(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Answers every request with ``packed`` (a PackedCandidates)."""

    def __init__(self):
        self.packed = retrieval_pb2.PackedCandidates()
        self.many_calls: list[int] = []

    async def Retrieve(self, request, context):
        return retrieval_pb2.RetrieveResponse(index_version="x", packed=self.packed)

    async def RetrieveMany(self, request, context):
        self.many_calls.append(len(request.requests))
        await asyncio.sleep(0.02)  # long enough for the next batch's company to gather
        out = retrieval_pb2.RetrieveManyResponse()
        for _ in request.requests:
            out.outcomes.add().response.CopyFrom(
                retrieval_pb2.RetrieveResponse(index_version="x", packed=self.packed)
            )
        return out


@pytest.fixture
async def stack(trained_version, redis_server):
    """(retrieval stand-in, ranking stub), ranking's message limit lowered to 1 MiB."""
    fake = _Retrieval()
    retrieval, port = await serve_retrieval_stand_in(fake)
    srv = build_server(
        ranking_settings(
            trained_version.parent,
            redis_server.url,
            retrieval_address=f"127.0.0.1:{port}",
            max_message_bytes=1 << 20,
        )
    )
    await srv.start()
    try:
        await wait_serving(f"127.0.0.1:{srv.port}")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            yield fake, ranking_pb2_grpc.RankingServiceStub(ch)
    finally:
        await srv.stop(0)
        await retrieval.stop(0)


def _recommend(user: str, k: int = 5, budget: int = 0) -> ranking_pb2.RecommendRequest:
    return ranking_pb2.RecommendRequest(
        user=common_pb2.UserContext(user_id=user), k=k, retrieval_budget=budget
    )


async def test_candidates_all_unknown_to_the_model_fall_back_to_popular(stack):
    """The answer was empty, retrieval_fallback false and no reason: the skew went unseen."""
    fake, stub = stack
    fake.packed = retrieval_pb2.PackedCandidates(
        item_ids=[f"not-in-catalogue-{i}" for i in range(30)],
        scores=[1.0] * 30,
        source_names=["popular"],
        source_mask=[1] * 30,
    )
    res = await stub.Recommend(_recommend("u1"), timeout=10)
    assert res.retrieval_fallback and "catalogue" in res.fallback_reason
    assert len(res.items) == 5


async def test_a_repeated_candidate_keeps_the_first_copys_provenance(stack, trained_version):
    """Scored as its first copy, it was attributed to its last copy's sources."""
    fake, stub = stack
    ids = ModelVersion.open(trained_version).item_ids[:3]
    fake.packed = retrieval_pb2.PackedCandidates(
        item_ids=[ids[0], ids[1], ids[2], ids[0]],
        scores=[1.0] * 4,
        source_names=["top_genre", "popular"],
        source_mask=[1, 1, 1, 2],  # the first copy from top_genre, the repeat from popular
    )
    res = await stub.Recommend(_recommend("u1", k=3), timeout=10)
    got = {it.item_id: list(it.sources) for it in res.items}
    assert got[ids[0]] == ["top_genre"]


async def test_answers_too_large_together_are_fetched_in_smaller_batches(stack, trained_version):
    """Each answer fit the limit, 32 of them in one RetrieveMany did not: all fell back."""
    fake, stub = stack
    ids = list(ModelVersion.open(trained_version).item_ids)
    n = 400  # 400 ids of ~100 bytes: ~40 KB an answer, 1 MiB at ~26 of them
    fake.packed = retrieval_pb2.PackedCandidates(
        item_ids=[f"{ids[i % len(ids)]}".ljust(100, "~") for i in range(n)],
        scores=[1.0] * n,
        source_names=["popular"],
        source_mask=[1] * n,
    )
    # Every id is unknown to the model (padded), so each answer falls back to
    # popular *by name*: what must not happen is the RESOURCE_EXHAUSTED reason.
    res = await asyncio.gather(
        *(stub.Recommend(_recommend(f"u{i}", budget=n), timeout=20) for i in range(64))
    )
    assert max(fake.many_calls) > 26, fake.many_calls  # a batch did go over the limit
    reasons = {r.fallback_reason for r in res}
    assert not any("RESOURCE_EXHAUSTED" in x for x in reasons), reasons
    # Learnt: the next batches are sent small enough at once, not failed and halved again.
    first_round, fake.many_calls = fake.many_calls, []
    res = await asyncio.gather(
        *(stub.Recommend(_recommend(f"u{i}", budget=n), timeout=20) for i in range(64))
    )
    assert fake.many_calls and max(fake.many_calls) < max(first_round), fake.many_calls
    assert max(fake.many_calls) <= 24  # ~43 KB answers: 24 fit in 1 MiB
