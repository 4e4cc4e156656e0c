"""The gRPC floor of ``Recommend``'s topology: two servers and a batched hop, no work.

``Recommend`` crosses the ranking server, a ``RetrieveMany`` call shared by
up to 32 concurrent requests, and the retrieval server. The relay has that
shape and nothing else: its front server answers ``Recommend`` with the bytes
of a real answer after its request has been carried to a leaf server in a
batched call (built by ranking's own
:func:`ranking_service.retrieval_client.retrieval_batcher`, with its default
settings), and the leaf answers each batched call with a
real ``Retrieve`` answer's bytes per member. Handlers take and return raw
bytes (gRPC generic handlers), so no protobuf work is done either.

Driven like the real stack in the same run, it separates what the RPC layer
of this topology costs on the machine from what the services' own work
costs: real / relay is the share the services keep of the throughput the
topology itself allows.

Run one end directly: ``python -m bench.relay leaf --port-file F --member-bytes N``
or ``python -m bench.relay front --port-file F --answer A --upstream HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import ChildServers
from bench.echo import serve_until_signalled
from ranking_service.retrieval_client import retrieval_batcher
from recsys.batching import MicroBatcher
from recsys.config import RankingSettings
from recsys.serving import grpc_options

RETRIEVAL = "recsys.v1.RetrievalService"
RANKING = "recsys.v1.RankingService"
# What the front sends upstream for each batched member: a short opaque chunk,
# so the leaf can count members without parsing anything.
MEMBER = b"\x0a\x02m0"
MAX_MESSAGE = 64 * 1024 * 1024


async def _serve(server: grpc.aio.Server, port_file: Path) -> None:
    await serve_until_signalled(server, server.add_insecure_port("127.0.0.1:0"), port_file)


async def serve_leaf(port_file: Path, member_bytes: int) -> None:
    """Answers ``RetrieveMany`` with ``member_bytes`` opaque bytes per member."""
    member = b"\x0a" + b"r" * max(member_bytes - 1, 0)

    async def retrieve_many(request: bytes, context) -> bytes:
        return member * max(len(request) // len(MEMBER), 1)

    server = grpc.aio.server(options=grpc_options(MAX_MESSAGE))
    handler = grpc.unary_unary_rpc_method_handler(retrieve_many)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(RETRIEVAL, {"RetrieveMany": handler})]
    )
    await _serve(server, port_file)


async def serve_front(port_file: Path, answer: bytes, upstream: str) -> None:
    """Answers ``Recommend`` with ``answer`` once its batched upstream call returns."""
    defaults = RankingSettings()
    channel = grpc.aio.insecure_channel(upstream, options=grpc_options(MAX_MESSAGE))
    call = channel.unary_unary(f"/{RETRIEVAL}/RetrieveMany")

    async def carry(batch: list[bytes]) -> list[None]:
        await call(MEMBER * len(batch), timeout=5.0)
        return [None] * len(batch)

    batcher: MicroBatcher[bytes, None] = retrieval_batcher(carry, defaults)

    async def recommend(request: bytes, context) -> bytes:
        await batcher.submit(request)
        return answer

    server = grpc.aio.server(options=grpc_options(MAX_MESSAGE))
    handler = grpc.unary_unary_rpc_method_handler(recommend)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(RANKING, {"Recommend": handler})]
    )
    try:
        await _serve(server, port_file)
    finally:
        await batcher.close()
        await channel.close()


class RelayProcess(ChildServers):
    """Leaf and front in two child processes (each with its own GIL, like the services).

    Usage::

        with RelayProcess(answer=recommend_bytes, member_bytes=3000) as relay:
            ... LoadConfig(target=relay.address, rpc="Recommend", ...)
    """

    name = "relay"

    def __init__(self, *, answer: bytes, member_bytes: int):
        super().__init__()
        self.answer = answer
        self.member_bytes = member_bytes

    @property
    def pids(self) -> dict[str, int]:
        """Process ids by role, for CPU accounting."""
        return {"relay_front": self.procs[1].pid, "relay_leaf": self.procs[0].pid}

    def _start(self, args: list[str], port_file: Path, deadline: float) -> int:
        cmd = [sys.executable, "-m", "bench.relay", *args, "--port-file", str(port_file)]
        return self._spawn(cmd, port_file, deadline, f"{self.name} {args[0]}")

    def start(self, timeout_s: float = 60.0) -> RelayProcess:
        """Starts the leaf, then the front pointed at it."""
        self._tmp = tempfile.TemporaryDirectory(prefix="recsys-relay-")
        tmp = Path(self._tmp.name)
        deadline = time.monotonic() + timeout_s
        try:
            leaf = self._start(
                ["leaf", "--member-bytes", str(self.member_bytes)], tmp / "leaf.port", deadline
            )
            answer = tmp / "answer.bin"
            answer.write_bytes(self.answer)
            self.port = self._start(
                ["front", "--answer", str(answer), "--upstream", f"127.0.0.1:{leaf}"],
                tmp / "front.port",
                deadline,
            )
        except BaseException:
            self.stop()
            raise
        return self


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.splitlines()[0])
    p.add_argument("role", choices=["leaf", "front"])
    p.add_argument("--port-file", type=Path, required=True)
    p.add_argument("--member-bytes", type=int, default=3000, help="leaf: bytes per member")
    p.add_argument("--answer", type=Path, help="front: file with the Recommend answer's bytes")
    p.add_argument("--upstream", help="front: host:port of the leaf")
    a = p.parse_args(argv)
    if a.role == "leaf":
        asyncio.run(serve_leaf(a.port_file, a.member_bytes))
    else:
        if a.answer is None or not a.upstream:
            p.error("front needs --answer and --upstream")
        asyncio.run(serve_front(a.port_file, a.answer.read_bytes(), a.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
