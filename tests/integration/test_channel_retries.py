"""The project's channels retry what a draining server answers, and nothing else."""

from __future__ import annotations

import grpc
import pytest

from ranking_service.testing import serve_retrieval_stand_in
from recsys.channels import create_channel
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc


class _Flaky(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Answers the first ``failures`` calls with ``code``, then a real response."""

    def __init__(self, code: grpc.StatusCode, failures: int) -> None:
        self.code, self.failures, self.calls = code, failures, 0

    async def Retrieve(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(self.code, "stopping")
        return retrieval_pb2.RetrieveResponse(index_version="7")


async def _call(code: grpc.StatusCode, failures: int) -> tuple[object, int]:
    flaky = _Flaky(code, failures)
    server, port = await serve_retrieval_stand_in(flaky)
    channel = create_channel(f"127.0.0.1:{port}", aio=True)
    try:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        try:
            got: object = await stub.Retrieve(retrieval_pb2.RetrieveRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            got = exc.code()
        return got, flaky.calls
    finally:
        await channel.close()
        await server.stop(None)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
async def test_a_call_refused_by_a_stopping_server_is_retried(code):
    """gRPC's server stop answers calls not yet dispatched with CANCELLED (or UNAVAILABLE)."""
    got, calls = await _call(code, failures=1)
    assert isinstance(got, retrieval_pb2.RetrieveResponse), got
    assert got.index_version == "7"
    assert calls == 2


async def test_an_error_from_the_handler_is_not_retried():
    got, calls = await _call(grpc.StatusCode.INVALID_ARGUMENT, failures=1)
    assert got == grpc.StatusCode.INVALID_ARGUMENT
    assert calls == 1
