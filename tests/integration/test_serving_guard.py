"""GuardInterceptor on a real grpc.aio server: parsing, auth, and one wrapper per method."""

import grpc
import pytest

from bench.echo import EchoServicer
from ranking_service.testing import serve_retrieval_stand_in
from recsys.serving import GuardInterceptor, grpc_options
from recsys.v1 import ranking_pb2, ranking_pb2_grpc


@pytest.fixture
async def guarded():
    guard = GuardInterceptor("ranking", max_concurrent=8, token="s3cret")
    server = grpc.aio.server(interceptors=[guard], options=grpc_options(4 << 20))
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield guard, channel
    finally:
        await channel.close()
        await server.stop(0)


async def test_each_method_is_wrapped_once_and_reused(guarded):
    guard, channel = guarded
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    auth = (("authorization", "Bearer s3cret"),)
    request = ranking_pb2.RankRequest(candidate_item_ids=["a"], top_k=1)
    for _ in range(3):
        await stub.Rank(request, metadata=auth)
    await stub.Recommend(ranking_pb2.RecommendRequest(k=1), metadata=auth)
    assert set(guard._wrapped) == {
        "/recsys.v1.RankingService/Rank",
        "/recsys.v1.RankingService/Recommend",
    }
    wrapper = guard._wrapped["/recsys.v1.RankingService/Rank"][1]
    await stub.Rank(request, metadata=auth)
    assert guard._wrapped["/recsys.v1.RankingService/Rank"][1] is wrapper
    assert guard.in_flight == 0


async def test_token_is_read_per_call_not_from_the_cached_wrapper(guarded):
    _, channel = guarded
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    request = ranking_pb2.RankRequest(candidate_item_ids=["a"], top_k=1)
    await stub.Rank(request, metadata=(("authorization", "Bearer s3cret"),))
    for metadata in ((("authorization", "Bearer wrong"),), None):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Rank(request, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await stub.Rank(request, metadata=(("authorization", "Bearer s3cret"),))


async def test_a_corrupt_message_is_invalid_argument(guarded):
    _, channel = guarded
    raw = channel.unary_unary("/recsys.v1.RankingService/Rank")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(b"\x12\x05ab", metadata=(("authorization", "Bearer s3cret"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in (err.value.details() or "")


async def test_callers_giving_up_are_counted_as_such_not_as_unknown():
    """A passed deadline or a cancel is the caller's doing; UNKNOWN pages as a server bug."""
    import asyncio

    from recsys.serving import RPC_TOTAL

    class Slow(ranking_pb2_grpc.RankingServiceServicer):
        async def Rank(self, request, context):
            await asyncio.sleep(2.0)
            return ranking_pb2.RankResponse()

    def count(code: str) -> float:
        return RPC_TOTAL.labels("slow-guard", "Rank", code)._value.get()

    guard = GuardInterceptor("slow-guard", max_concurrent=8, token=None)
    server = grpc.aio.server(interceptors=[guard], options=grpc_options(4 << 20))
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(Slow(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    try:
        # Deadlines long enough for the call to reach the handler on a busy
        # machine (at 50 ms one sometimes expired on its way: counted nowhere).
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Rank(ranking_pb2.RankRequest(), timeout=0.4)
        loop = asyncio.get_running_loop()

        async def in_flight_becomes(n: int) -> None:
            deadline = loop.time() + 5
            while guard.in_flight != n and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert guard.in_flight == n

        await in_flight_becomes(0)  # the expired calls' handlers have ended
        assert count("DEADLINE_EXCEEDED") == 2
        call = stub.Rank(ranking_pb2.RankRequest())
        await in_flight_becomes(1)  # cancelled once the server has it
        call.cancel()
        await in_flight_becomes(0)
        assert count("CANCELLED") == 1
        assert count("UNKNOWN") == 0
    finally:
        await channel.close()
        await server.stop(0)


async def test_each_request_in_a_retrieve_many_counts_against_the_bound():
    """One RetrieveMany of 256 requests did their work in one slot: ~700 ms on the
    event loop while every other caller waited behind it."""
    import asyncio

    from recsys.config import RetrievalSettings, _default_sources
    from recsys.serving import RPC_REJECTED, RPC_TOTAL
    from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc
    from retrieval_service.engine import RetrievalEngine
    from retrieval_service.registry import build_sources
    from retrieval_service.servicer import RetrievalServicer

    release = asyncio.Event()

    class Busy(RetrievalServicer):
        """The real RetrieveMany (no version loaded: each request UNAVAILABLE); Retrieve waits."""

        async def Retrieve(self, request, context):
            await release.wait()
            return retrieval_pb2.RetrieveResponse()

    engine = RetrievalEngine(RetrievalSettings(), build_sources(_default_sources()), redis=None)
    guard = GuardInterceptor("many-guard", max_concurrent=8, token=None)
    server, port = await serve_retrieval_stand_in(
        Busy(engine), grpc.aio.server(interceptors=[guard], options=grpc_options(4 << 20))
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)

    one = retrieval_pb2.RetrieveRequest(user={"user_id": "u"})

    def many(n: int) -> retrieval_pb2.RetrieveManyRequest:
        return retrieval_pb2.RetrieveManyRequest(requests=[one] * n)

    def overloads() -> float:
        return RPC_REJECTED.labels("many-guard", "overload")._value.get()

    try:
        waiting = [asyncio.ensure_future(stub.Retrieve(one)) for _ in range(5)]
        while guard.in_flight < 5:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RetrieveMany(many(4), timeout=5)  # 5 + 4 > 8
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details() == (
            "server busy: 5 calls in flight (limit 8); this one counts as 4"
        )
        assert overloads() == 1
        assert (
            RPC_TOTAL.labels("many-guard", "RetrieveMany", "RESOURCE_EXHAUSTED")._value.get() == 1
        )
        assert len((await stub.RetrieveMany(many(3), timeout=5)).outcomes) == 3  # 5 + 3 fit
        assert guard.in_flight == 5
        release.set()
        await asyncio.gather(*waiting)
        # Alone, a call larger than the bound takes all of it rather than never fitting.
        assert len((await stub.RetrieveMany(many(20), timeout=5)).outcomes) == 20
        assert guard.in_flight == 0 and overloads() == 1
    finally:
        await channel.close()
        await server.stop(0)
