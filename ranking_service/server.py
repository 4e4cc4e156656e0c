"""``recsys serve ranking``: building, running and draining the ranking server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ranking_service import metrics as M
from ranking_service.core import Ranker
from ranking_service.model import Device, LoadedModel, TowerRuntime, resolve_device
from ranking_service.retrieval_client import RetrievalClient
from ranking_service.servicer import RankingServicer
from ranking_service.validation import RetrievalLimits
from recsys.config import CURRENT_VERSION, RecsysSettings, ServerSettings, with_flags
from recsys.experiments import Experiment
from recsys.explain import source_kinds
from recsys.serving import (
    ServerHandle,
    SharedLoads,
    VersionWatcher,
    async_redis,
    configure_logging,
    create_server,
    follow_versions,
    in_daemon_thread,
    run_service,
    serve,
    settle_heap,
    track_watchers,
)
from recsys.tracing import Tracing
from recsys.v1 import ranking_pb2, ranking_pb2_grpc

log = logging.getLogger("ranking_service.server")

SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name


@dataclass
class RankingServer:
    """A built ranking server: gRPC handle, ranker and version watchers.

    With A/B variants there is one watcher per model track: ``current``
    (pinned / published / newest, as without variants) and one per version
    a variant pins. Each swaps its track independently; tracks that want
    the same version share one loaded model. ``watcher`` is the default
    variant's.
    """

    handle: ServerHandle
    ranker: Ranker
    watcher: VersionWatcher
    device: Device
    redis: Any = None
    tower_runtime: TowerRuntime = "session"
    _background: asyncio.Task | None = None
    watchers: dict[str, VersionWatcher] = field(default_factory=dict)
    _loads: SharedLoads[LoadedModel] = field(
        default_factory=lambda: SharedLoads(lambda m: (m.name, m.version.digest)), repr=False
    )

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.handle.port

    async def load(self, path: Path, track: str = CURRENT_VERSION) -> None:
        """Loads, verifies and warms a version off the event loop, then swaps it in.

        Args:
            path: The version directory.
            track: Which model track it serves (``current`` or a pinned version).

        Raises:
            ArtifactError: The version is rejected; the old one keeps serving.
        """
        model = await self._loads.get(path, self.ranker.models.values(), self._load_copy)
        self.ranker.swap(model, track)
        settle_heap()
        log.info(
            "model ready",
            extra={
                "fields": {
                    "version": model.name,
                    "device": model.device,
                    "tower_runtime": model.runtime,
                    "items": len(model.index),
                    "load_s": round(model.load_seconds, 3),
                    "track": track,
                }
            },
        )
        if self.ranker.ready():  # every variant has its model
            await self.handle.set_serving(True)

    async def _load_copy(self, path: Path) -> LoadedModel:
        return await in_daemon_thread(
            LoadedModel.load, path, self.device, runtime=self.tower_runtime
        )

    async def follow_versions(self) -> None:
        """Loads the wanted versions now, then keeps following them."""
        await follow_versions(self.watchers.values() or [self.watcher])

    async def start(self) -> None:
        """Starts serving and following versions (tests; the CLI uses ``serve``)."""
        await self.handle.set_serving(False)
        await self.handle.server.start()
        self._background = asyncio.ensure_future(self.follow_versions())

    async def stop(self, grace: float | None = None) -> None:
        """Stops following versions, drains the server and releases clients."""
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._background
        await self.handle.health.enter_graceful_shutdown()
        await self.handle.server.stop(grace)
        await self.close()

    async def close(self) -> None:
        """Releases the batcher, the retrieval channel and Redis."""
        await self.ranker.close()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()


def build_server(settings: RecsysSettings, *, tracing: Tracing | None = None) -> RankingServer:
    """Builds (does not start) the ranking server from config.

    Health stays NOT_SERVING until every variant's version is loaded and warmed.

    Args:
        settings: Full config.
        tracing: Tracer to use (default: from ``settings.tracing``, off unless enabled).

    Raises:
        UserFacingError: ``device = "gpu"`` without a GPU.
    """
    cfg = settings.ranking
    device = resolve_device(cfg.device)
    M.DEVICE.labels(device).set(1)
    log.info("item vectors placement", extra={"fields": {"device": device}})
    redis = async_redis(settings)
    ranker = Ranker(
        max_batch_size=cfg.max_batch_size,
        batch_timeout_ms=cfg.batch_timeout_ms,
        score_in_thread=cfg.batch_runner == "thread"
        or (cfg.batch_runner == "auto" and device == "gpu"),
        redis=redis,
        redis_timeout_s=settings.redis_timeout_s,
        retrieval=RetrievalClient(cfg),
        experiment=Experiment(settings.experiments),
        kinds=source_kinds(settings.retrieval.sources),
        tracing=tracing or Tracing.from_settings(settings.tracing, "ranking"),
    )
    servicer = RankingServicer(ranker, cfg, RetrievalLimits.from_settings(settings.retrieval))
    handle = create_server(
        cfg,
        label="ranking",
        service_names=[SERVICE_NAME],
        register=lambda s: ranking_pb2_grpc.add_RankingServiceServicer_to_server(servicer, s),
    )
    srv = RankingServer(
        handle=handle,
        ranker=ranker,
        watcher=None,  # type: ignore[arg-type]
        device=device,
        redis=redis,
        tower_runtime=cfg.tower_runtime,
    )
    srv.watchers = track_watchers(
        ranker.experiment.model_tracks(),
        label="ranking",
        model_dir=settings.model_dir,
        server=cfg,
        load=srv.load,
        redis=redis,
        redis_timeout_s=settings.redis_timeout_s,
    )
    srv.watcher = srv.watchers[ranker.default_track]
    return srv


def _apply_flags(args: argparse.Namespace, settings: RecsysSettings) -> RecsysSettings:
    names = ("host", "port", "metrics_port", "device", "retrieval_address", "workers")
    return with_flags(settings, "ranking", {k: getattr(args, k, None) for k in names})


def cli_serve(args: argparse.Namespace, settings: RecsysSettings) -> int:
    """``recsys serve ranking``: serves until SIGTERM/SIGINT, then drains."""
    settings = _apply_flags(args, settings)
    configure_logging(settings)

    async def main(settings: RecsysSettings, ready: Callable[[int], None]) -> None:
        srv = build_server(settings)
        # Health answers NOT_SERVING (not NOT_FOUND) until a version is warm.
        await srv.handle.set_serving(False)
        try:
            await serve(
                srv.handle, background=[srv.follow_versions()], on_ready=lambda h: ready(h.port)
            )
        finally:
            await srv.close()
            srv.ranker.tracing.shutdown()  # flushes spans still queued for export

    def serve_one(server: ServerSettings, ready: Callable[[int], None]) -> None:
        asyncio.run(main(settings.model_copy(update={"ranking": server}), ready))

    return run_service(
        settings.ranking,
        serve_one,
        label="ranking",
        argv=getattr(args, "argv", None),
        port_file=getattr(args, "port_file", None),
    )
