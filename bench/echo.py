"""A bare ``grpc.aio`` echo server of the same shape as the real services.

It implements ``RankingService.Rank``/``Recommend`` and
``RetrievalService.Retrieve``/``SimilarItems`` with the generated code, but
does no work: every call returns a response built once, of the same size as
the real one (``k`` scored items with titles, genres, sources and reasons;
``budget`` candidates). Run in a separate process, it measures what the RPC
itself costs on this machine (HTTP/2, protobuf, the asyncio server loop), so
``real / echo`` isolates the cost of our own work from the machine's speed.

For tests it can also be made deliberately slow (``--delay-ms``, optionally
``--serial`` so calls queue one behind another) or failing (every Nth call
aborts with ``--fail-code``).

Run it directly: ``python -m bench.echo --port 0 --port-file /tmp/echo.port``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import ChildServers
from recsys.serving import grpc_options
from recsys.v1 import (
    common_pb2,
    ranking_pb2,
    ranking_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)

SOURCES = ("similar_to_recent", "top_genre", "top_country", "popular")
DEFAULT_BUDGET = 500


def _scored_items(k: int, with_provenance: bool) -> list[ranking_pb2.ScoredItem]:
    items = []
    for i in range(k):
        item = ranking_pb2.ScoredItem(
            item_id=str(1000 + i),
            score=4.5 - i * 0.01,
            title=f"Some Film Title Of Typical Length ({1990 + i % 30})",
            genres=["Drama", "Comedy"],
        )
        if with_provenance:
            item.sources.extend(SOURCES[: 1 + i % 2])
            item.reasons.append(
                common_pb2.Reason(
                    kind="similar_to", ref=str(50 + i), text="Because you watched Toy Story (1995)"
                )
            )
        items.append(item)
    return items


def recommend_response(k: int) -> ranking_pb2.RecommendResponse:
    """A Recommend answer shaped like the real one: k items, four source reports."""
    return ranking_pb2.RecommendResponse(
        items=_scored_items(k, True),
        model_version="1",
        index_version="1",
        source_reports=[
            common_pb2.SourceReport(
                source=s, status=common_pb2.SOURCE_STATUS_OK, count=100, latency_ms=1.5
            )
            for s in SOURCES
        ],
        variant="control",
    )


def rank_response(k: int) -> ranking_pb2.RankResponse:
    """A Rank answer: k scored items with titles and genres."""
    return ranking_pb2.RankResponse(
        items=_scored_items(k, False), model_version="1", variant="control"
    )


def retrieve_response(budget: int) -> retrieval_pb2.RetrieveResponse:
    """A Retrieve answer: ``budget`` candidates with per-source scores."""
    cands = []
    for i in range(budget):
        src = SOURCES[i % len(SOURCES)]
        cands.append(
            common_pb2.Candidate(
                item_id=str(1000 + i),
                sources=[src],
                score=1.0 - i / max(budget, 1),
                source_scores={src: 1.0 - i / max(budget, 1)},
                genre="Drama" if src == "top_genre" else "",
            )
        )
    return retrieval_pb2.RetrieveResponse(
        candidates=cands,
        source_reports=[
            common_pb2.SourceReport(
                source=s, status=common_pb2.SOURCE_STATUS_OK, count=budget // 4, latency_ms=1.0
            )
            for s in SOURCES
        ],
        index_version="1",
        variant="control",
    )


def similar_response(k: int) -> retrieval_pb2.SimilarItemsResponse:
    """A SimilarItems answer with k neighbours."""
    return retrieval_pb2.SimilarItemsResponse(
        items=[retrieval_pb2.SimilarItem(item_id=str(2000 + i), score=0.9) for i in range(k)],
        index_version="1",
    )


class EchoServicer(
    ranking_pb2_grpc.RankingServiceServicer, retrieval_pb2_grpc.RetrievalServiceServicer
):
    """Answers every RPC with a cached response; optionally slow or failing.

    Args:
        delay_ms: Sleep this long inside every call.
        serial: Let only one call sleep at a time (a server with capacity
            ``1000 / delay_ms`` calls per second).
        fail_every: Every Nth call (counted across all RPCs) fails; 0 never.
        fail_code: Status code name of those failures.
        fixed: Serialised responses to return instead of the synthetic ones,
            keyed by RPC name (e.g. a real Recommend answer, for equal size).
    """

    name = "echo server"

    def __init__(
        self,
        *,
        delay_ms: float = 0.0,
        serial: bool = False,
        fail_every: int = 0,
        fail_code: str = "UNAVAILABLE",
        fixed: dict[str, bytes] | None = None,
    ):
        self.delay_s = delay_ms / 1000.0
        self.lock = asyncio.Lock() if serial else None
        self.fail_every = fail_every
        self.fail_code = grpc.StatusCode[fail_code]
        self.calls = 0
        self.cache: dict[tuple[str, int], object] = {}
        parsers = {
            "Recommend": ranking_pb2.RecommendResponse,
            "Rank": ranking_pb2.RankResponse,
            "Retrieve": retrieval_pb2.RetrieveResponse,
            "SimilarItems": retrieval_pb2.SimilarItemsResponse,
        }
        self.fixed = {rpc: parsers[rpc].FromString(data) for rpc, data in (fixed or {}).items()}

    async def _answer(self, rpc: str, size: int, build, context) -> object:
        self.calls += 1
        n = self.calls
        if self.delay_s > 0:
            if self.lock is not None:
                async with self.lock:
                    await asyncio.sleep(self.delay_s)
            else:
                await asyncio.sleep(self.delay_s)
        if self.fail_every and n % self.fail_every == 0:
            await context.abort(self.fail_code, f"echo: call {n} fails on purpose")
        if rpc in self.fixed:
            return self.fixed[rpc]
        key = (rpc, size)
        resp = self.cache.get(key)
        if resp is None:
            resp = self.cache[key] = build(size)
        return resp

    async def Recommend(self, request, context):
        return await self._answer("Recommend", request.k or 20, recommend_response, context)

    async def Rank(self, request, context):
        k = min(request.top_k or 20, max(len(request.candidate_item_ids), 1))
        return await self._answer("Rank", k, rank_response, context)

    async def Retrieve(self, request, context):
        return await self._answer(
            "Retrieve", request.budget or DEFAULT_BUDGET, retrieve_response, context
        )

    async def SimilarItems(self, request, context):
        return await self._answer("SimilarItems", request.k or 20, similar_response, context)


async def serve_echo(
    port: int = 0,
    port_file: Path | None = None,
    *,
    host: str = "127.0.0.1",
    **servicer_args,
) -> None:
    """Serves until SIGTERM/SIGINT; writes the bound port to ``port_file``."""
    server = grpc.aio.server(options=grpc_options(16 * 1024 * 1024))
    servicer = EchoServicer(**servicer_args)
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(servicer, server)
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await serve_until_signalled(server, bound, port_file)


async def serve_until_signalled(server: grpc.aio.Server, bound: int, port_file: Path | None):
    """Starts ``server``, writes its port to ``port_file`` and serves until SIGTERM/SIGINT."""
    await server.start()
    if port_file is not None:
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(str(bound))
        tmp.replace(port_file)  # readers never see a half-written number
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


class EchoProcess(ChildServers):
    """The echo server in a child process (so it has its own GIL and core).

    Usage::

        with EchoProcess(delay_ms=20, serial=True) as echo:
            ... LoadConfig(target=echo.address, ...)
    """

    def __init__(
        self,
        *,
        delay_ms: float = 0.0,
        serial: bool = False,
        fail_every: int = 0,
        fail_code: str = "UNAVAILABLE",
        fixed: dict[str, bytes] | None = None,
    ):
        super().__init__()
        self.args = {
            "delay_ms": delay_ms,
            "serial": serial,
            "fail_every": fail_every,
            "fail_code": fail_code,
        }
        self.fixed = fixed or {}

    @property
    def proc(self) -> subprocess.Popen:
        """The server's process (while it runs)."""
        if not self.procs:
            raise RuntimeError("echo server is not running")
        return self.procs[0]

    def start(self, timeout_s: float = 60.0) -> EchoProcess:
        """Starts the child and waits until it listens."""
        self._tmp = tempfile.TemporaryDirectory(prefix="recsys-echo-")
        tmp = Path(self._tmp.name)
        port_file = tmp / "port"
        cmd = [
            sys.executable, "-m", "bench.echo", "--port", "0", "--port-file", str(port_file),
            "--delay-ms", str(self.args["delay_ms"]), "--fail-every", str(self.args["fail_every"]),
            "--fail-code", self.args["fail_code"],
        ]  # fmt: skip
        if self.args["serial"]:
            cmd.append("--serial")
        for rpc, data in self.fixed.items():
            path = tmp / f"{rpc}.bin"
            path.write_bytes(data)
            cmd += ["--fixed", f"{rpc}={path}"]
        try:
            self.port = self._spawn(cmd, port_file, time.monotonic() + timeout_s, self.name)
        except BaseException:
            self.stop()
            raise
        return self


def _parse_fixed(values: list[str]) -> dict[str, bytes]:
    out = {}
    for v in values:
        rpc, _, path = v.partition("=")
        if rpc not in ("Recommend", "Rank", "Retrieve", "SimilarItems") or not path:
            raise SystemExit(f"--fixed: expected RPC=PATH with a known RPC, got {v!r}")
        out[rpc] = Path(path).read_bytes()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", type=Path)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--serial", action="store_true")
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--fail-code", default="UNAVAILABLE", choices=[c.name for c in grpc.StatusCode])
    p.add_argument("--fixed", action="append", default=[], help="RPC=PATH of a serialised answer")
    a = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve_echo(
                a.port,
                a.port_file,
                host=a.host,
                delay_ms=a.delay_ms,
                serial=a.serial,
                fail_every=a.fail_every,
                fail_code=a.fail_code,
                fixed=_parse_fixed(a.fixed),
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
