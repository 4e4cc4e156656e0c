"""Helpers for the reliability tests: real servers on port 0 over a private Redis.

The package gets its own ``EmbeddedRedis`` so tests that stop, restart or
flood it never disturb the shared session server other packages flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ranking_service.server import build_server as build_ranking
from ranking_service.testing import ranking_settings
from recsys import channels
from recsys.config import load_settings
from recsys.embedded_redis import EmbeddedRedis, die_with_parent_prefix
from retrieval_service.server import build_server as build_retrieval

RETRIEVAL = "recsys.v1.RetrievalService"
RANKING = "recsys.v1.RankingService"
# Client side: never the limit under test, so the server's limit is what bites.
BIG_CHANNEL = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def publish_into(url: str, version: Path) -> None:
    """Flushes the Redis at ``url`` and publishes ``version`` into it."""
    from trainer.publish import publish

    client = redis.Redis.from_url(url)
    try:
        client.flushall()
        publish(version, client, quiet=True)
    finally:
        client.close()


def retrieval_settings(model_dir: Path, redis_url: str, **retrieval):
    """Loopback, free port, no metrics; generous source timeouts for a busy CI box."""
    from recsys.config import _default_sources

    sources = [{**s, "timeout_ms": 1000} for s in _default_sources()]
    rs = {
        "port": 0,
        "metrics_port": 0,
        "reload_interval_s": 3600.0,
        "sources": sources,
        **retrieval,
    }
    return load_settings(model_dir=model_dir, redis_url=redis_url, log_format="text", retrieval=rs)


async def health_status(address: str, service: str, timeout: float = 2.0) -> int:
    """One ``Health/Check`` against ``address`` for ``service``."""
    async with grpc.aio.insecure_channel(address) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return r.status


async def wait_serving(address: str, service: str, timeout_s: float = 60.0) -> None:
    """Polls health until SERVING (tolerating a server that is not listening yet)."""
    await channels.wait_serving(address, service, timeout_s=timeout_s)


@contextlib.asynccontextmanager
async def _serving(server: Any, port: int, service: str) -> AsyncIterator[tuple[str, Any]]:
    """Starts a built server, waits for SERVING, yields ``(address, server)``; stops it on exit."""
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        try:
            await wait_serving(address, service)
        except TimeoutError as exc:
            # Why: a rejected version's reason is only a structured log field.
            watchers = getattr(server, "watchers", {})
            rejected = {track: w.rejected for track, w in watchers.items() if w.rejected}
            raise TimeoutError(f"{exc}; versions rejected: {rejected}") from exc
        yield address, server
    finally:
        await server.stop(0)


def serving_retrieval(settings) -> contextlib.AbstractAsyncContextManager[tuple[str, Any]]:
    """``async with serving_retrieval(settings) as (address, app)``: retrieval, SERVING."""
    handle, app = build_retrieval(settings)
    return _serving(app, handle.port, RETRIEVAL)


def serving_ranking(settings) -> contextlib.AbstractAsyncContextManager[tuple[str, Any]]:
    """``async with serving_ranking(settings) as (address, server)``: ranking, SERVING."""
    srv = build_ranking(settings)
    return _serving(srv, srv.port, RANKING)


@dataclass
class Services:
    """Both services running in this process, and where they listen."""

    retrieval: str
    ranking: str
    retrieval_app: object
    ranking_server: object


@contextlib.asynccontextmanager
async def running_services(
    model_dir: Path,
    redis_url: str,
    *,
    retrieval: dict | None = None,
    ranking: dict | None = None,
) -> AsyncIterator[Services]:
    """Starts retrieval, then ranking pointed at it; stops both on exit."""
    rs = retrieval_settings(model_dir, redis_url, **(retrieval or {}))
    async with serving_retrieval(rs) as (r_addr, app):
        cfg = {"retrieval_address": r_addr, "retrieval_timeout_s": 2.0, **(ranking or {})}
        async with serving_ranking(ranking_settings(model_dir, redis_url, **cfg)) as (k_addr, srv):
            yield Services(r_addr, k_addr, app, srv)


@pytest.fixture(scope="package")
def rel_redis():
    """A private real redis-server for this package."""
    server = EmbeddedRedis().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="package")
def rel_published(rel_redis, trained_version: Path) -> Path:
    """``trained_version`` published into the private Redis."""
    publish_into(rel_redis.url, trained_version)
    return trained_version


@pytest_asyncio.fixture(scope="package", loop_scope="session")
async def services(rel_published: Path, rel_redis) -> AsyncIterator[Services]:
    """Both services over the published version; message limit set deliberately to 8 MiB."""
    limit = {"max_message_bytes": 8 * 1024 * 1024}
    async with running_services(
        rel_published.parent, rel_redis.url, retrieval=limit, ranking=limit
    ) as s:
        yield s


# --- service processes ------------------------------------------------------------


class ServiceProcess:
    """``recsys serve <name>`` as a child process, with its stderr captured to a file."""

    def __init__(self, name: str, env: dict[str, str], log: Path, *args: str):
        self.name = name
        self.log_path = log
        self.port_file = log.with_suffix(".port")
        self.port_file.unlink(missing_ok=True)
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "recsys.cli", "serve", name, "--host", "127.0.0.1"]
        cmd += ["--metrics-port", "0", "--port-file", str(self.port_file), *args]
        self.proc = subprocess.Popen(
            [*die_with_parent_prefix(), *cmd],
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    async def address(self, timeout_s: float = 120.0) -> str:
        """Waits for the port file and returns ``127.0.0.1:<port>``."""
        deadline = time.monotonic() + timeout_s
        while not self.port_file.is_file():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} wrote no port file")
            await asyncio.sleep(0.05)
        return f"127.0.0.1:{int(self.port_file.read_text())}"

    def terminate(self) -> None:
        """Sends SIGTERM (the service drains)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, wait, kill if it will not go; returns the exit code."""
        self.terminate()
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")
