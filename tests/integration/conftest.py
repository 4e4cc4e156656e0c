"""Both services started together for the end-to-end integration modules.

``serve_both`` starts retrieval on a free port, ranking pointed at it, waits
for ranking to report SERVING and opens one channel to each; every module
that needs the whole request path uses it instead of its own start-up.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from ranking_service.server import RankingServer, build_server
from ranking_service.testing import ranking_settings, wait_serving
from recsys.config import RecsysSettings, RetrievalSettings
from recsys.tracing import Tracing
from recsys.v1 import ranking_pb2_grpc, retrieval_pb2_grpc


@dataclass
class Stack:
    """Both services running in this process, with a stub for each."""

    ranking: ranking_pb2_grpc.RankingServiceStub
    retrieval: retrieval_pb2_grpc.RetrievalServiceStub
    ranking_server: RankingServer
    settings: RecsysSettings
    ranking_port: int
    retrieval_port: int
    retrieval_app: Any = None


@contextlib.asynccontextmanager
async def _serve_both(
    model_dir: Path,
    redis_url: str,
    *,
    retrieval: dict[str, Any] | None = None,
    tracing: dict[str, Tracing] | None = None,
    **settings: Any,
) -> AsyncIterator[Stack]:
    """Retrieval, then ranking pointed at it; both stopped on exit.

    ``retrieval`` adds ``RetrievalSettings`` fields, ``tracing`` maps a
    service name to its tracer, other keywords replace top-level settings
    (e.g. ``experiments``).
    """
    from recsys.channels import wait_serving as wait_for
    from retrieval_service.server import SERVICE_NAME as RETRIEVAL
    from retrieval_service.server import build_server as build_retrieval

    rs = RetrievalSettings(host="127.0.0.1", port=0, metrics_port=0, **(retrieval or {}))
    base = ranking_settings(model_dir, redis_url, retrieval_timeout_s=2.0)
    cfg = base.model_copy(update={"retrieval": rs, **settings})
    tracers = tracing or {}
    handle, app = build_retrieval(cfg, tracing=tracers.get("retrieval"))
    await app.start()
    try:
        ranking_cfg = cfg.ranking.model_copy(
            update={"retrieval_address": f"127.0.0.1:{handle.port}"}
        )
        cfg = cfg.model_copy(update={"ranking": ranking_cfg})
        srv = build_server(cfg, tracing=tracers.get("ranking"))
        await srv.start()
        try:
            await wait_serving(f"127.0.0.1:{srv.port}")
            # Ranking serves without retrieval (the popular fallback), so it
            # being ready says nothing about retrieval's version load.
            await wait_for(f"127.0.0.1:{handle.port}", RETRIEVAL, timeout_s=60.0)
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as rch,
                grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as tch,
            ):
                yield Stack(
                    ranking_pb2_grpc.RankingServiceStub(rch),
                    retrieval_pb2_grpc.RetrievalServiceStub(tch),
                    srv,
                    cfg,
                    srv.port,
                    handle.port,
                    app,
                )
        finally:
            await srv.stop(0)
    finally:
        await app.stop(0)


@pytest.fixture(scope="session")
def serve_both():
    """``async with serve_both(model_dir, redis_url, **options) as stack``: both services."""
    return _serve_both
