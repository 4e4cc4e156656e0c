"""``recsys serve retrieval``: builds and runs the retrieval gRPC server.

The server comes from :func:`recsys.serving.create_server` (health,
reflection, metrics/concurrency/auth interceptor), the candidate sources from
the entry-point registry, and the served version from a
:class:`recsys.serving.VersionWatcher`: a new version is opened, verified
and indexed in a worker thread, then swapped in with one reference
assignment, so calls in flight finish on the version they started with.
Health is NOT_SERVING until the first version is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.config import CURRENT_VERSION, ConfigError, RecsysSettings, ServerSettings, with_flags
from recsys.errors import UserFacingError, describe_error
from recsys.experiments import Experiment, source_entries
from recsys.serving import (
    ServerHandle,
    SharedLoads,
    VersionWatcher,
    async_redis,
    configure_logging,
    create_server,
    follow_versions,
    in_daemon_thread,
    poll_forever,
    run_service,
    serve,
    settle_heap,
    track_watchers,
)
from recsys.tracing import Tracing
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc
from retrieval_service.engine import WARM_TIMEOUT_S, RetrievalEngine
from retrieval_service.errors import SourceConfigError
from retrieval_service.registry import build_sources
from retrieval_service.served import ServedVersion
from retrieval_service.servicer import RetrievalServicer

log = logging.getLogger("recsys.retrieval")

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name


@dataclass
class RetrievalApp:
    """The running parts behind one server: engine, version watcher, Redis client."""

    settings: RecsysSettings
    engine: RetrievalEngine
    handle: ServerHandle
    redis: Any
    watcher: VersionWatcher | None = None  # the default variant's track
    watchers: dict[str, VersionWatcher] = field(default_factory=dict)  # one per model track
    _task: asyncio.Task | None = field(default=None, repr=False)
    _loads: SharedLoads[ServedVersion] = field(
        default_factory=lambda: SharedLoads(lambda v: (v.version, v.model.digest)), repr=False
    )

    async def load(self, path: Path, track: str = CURRENT_VERSION) -> None:
        """Loads ``path`` off the event loop into ``track``; SERVING once every track has one.

        Tracks that want the same version share one loaded copy (the same
        build: a number reused after its directory was deleted is another).
        """
        served = await self._loads.get(path, self.engine.tracks.values(), self._load_copy)
        self.engine.swap(served, track)
        settle_heap()
        if self.engine.ready():
            await self.handle.set_serving(True)

    async def _load_copy(self, path: Path) -> ServedVersion:
        served = await in_daemon_thread(self.engine.load_version, path)
        await self._warm(served)
        return served

    async def _warm(self, served: Any) -> None:
        start = time.perf_counter()
        fields: dict[str, Any] = {"version": served.version}
        try:
            async with asyncio.timeout(WARM_TIMEOUT_S):
                fields["lists"] = await self.engine.warm(served)
        except Exception as exc:  # a cold cache is slower, not wrong: swap anyway
            fields["error"] = describe_error(exc, waited=f"{WARM_TIMEOUT_S:g} s")
            log.warning("top lists not copied before serving", extra={"fields": fields})
            return
        fields["seconds"] = round(time.perf_counter() - start, 3)
        if fields["lists"] is None:
            # Copied once publish writes this build's (_follow_lists).
            log.warning(
                "top lists in Redis are of another build of this version: read from "
                "Redis, not copied, until this build's are published",
                extra={"fields": fields},
            )
            return
        if served.top_cache.absent:
            # Logged once here; until the lists appear its genre and country
            # sources report an error on every answer (TopListsMissing).
            log.warning(
                "no top lists in Redis for this version (not published, or removed)",
                extra={"fields": fields},
            )
            return
        log.info("top lists copied", extra={"fields": fields})

    async def run(self) -> None:
        """Loads the wanted versions now, then follows new ones until cancelled."""
        if not self.watchers and self.watcher is None:
            raise RuntimeError("RetrievalApp has no version watcher")
        await asyncio.gather(
            follow_versions(self.watchers.values() or [self.watcher]),
            poll_forever(self.settings.retrieval.reload_interval_s, self._follow_lists),
        )

    async def _follow_lists(self) -> None:
        """Copies a served build's top lists again once Redis holds another build's or its own.

        A version trained again under its number is loaded before ``recsys
        publish`` writes its lists (the watcher polls faster than a publish
        runs): its copy was made from the old build's lists and kept them
        for good, while a replica started afterwards served the new ones.
        One ``GET`` per served copy each poll.
        """
        for served in {id(v): v for v in self.engine.tracks.values()}.values():
            if await self.engine.lists_changed(served):
                await self._warm(served)

    async def start(self) -> None:
        """Starts serving in the current event loop (tests and embedding)."""
        await self.handle.set_serving(False)
        await self.handle.server.start()
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self, grace: float | None = None) -> None:
        """Stops a server started with :meth:`start` and closes Redis."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.handle.server.stop(grace)
        await self.close()

    async def close(self) -> None:
        """Releases the Redis connection pool."""
        with contextlib.suppress(Exception):
            await self.redis.aclose()


def variant_sources(settings: RecsysSettings, experiment: Experiment) -> dict[str, list[Any]]:
    """Builds each variant's sources with its overrides (variants without overrides: none).

    Raises:
        SourceConfigError: An override names an unknown source or makes an entry invalid.
    """
    plans: dict[str, list[Any]] = {}
    for i, variant in enumerate(experiment.variants if experiment.active else ()):
        if not variant.sources:
            continue
        where = f"experiments.variants[{i}] (name={variant.name!r})"
        try:
            entries = source_entries(settings.retrieval.sources, variant, where=where)
            plans[variant.name] = build_sources(entries)
        except ConfigError as exc:
            raise SourceConfigError(str(exc)) from exc
        except SourceConfigError as exc:
            raise SourceConfigError(f"{where}: {exc}") from exc
    return plans


def build_server(
    settings: RecsysSettings, *, redis: Any = None, tracing: Tracing | None = None
) -> tuple[ServerHandle, RetrievalApp]:
    """Builds the retrieval server (call inside the event loop that will run it).

    Args:
        settings: Full config; ``settings.retrieval`` holds the server settings and sources.
        redis: ``redis.asyncio`` client to use (default: one from ``settings.redis_url``).
        tracing: Tracer to use (default: from ``settings.tracing``, off unless enabled).

    Returns:
        The unstarted server handle and the app that loads versions into it.

    Raises:
        SourceConfigError: A ``retrieval.sources`` entry is invalid (names the source and key).
    """
    rs = settings.retrieval
    sources = build_sources(rs.sources)
    client = redis if redis is not None else async_redis(settings)
    experiment = Experiment(settings.experiments)
    if tracing is None:
        tracing = Tracing.from_settings(settings.tracing, "retrieval")
    engine = RetrievalEngine(
        rs,
        sources,
        client,
        redis_timeout_s=settings.redis_timeout_s,
        experiment=experiment,
        variant_sources=variant_sources(settings, experiment),
        tracing=tracing,
    )
    servicer = RetrievalServicer(engine)
    handle = create_server(
        rs,
        label="retrieval",
        service_names=[SERVICE_NAME],
        register=lambda s: retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, s),
    )
    app = RetrievalApp(settings, engine, handle, client)
    app.watchers = track_watchers(
        experiment.model_tracks(),
        label="retrieval",
        model_dir=settings.model_dir,
        server=rs,
        load=app.load,
        redis=client,
        redis_timeout_s=settings.redis_timeout_s,
    )
    app.watcher = app.watchers[engine.default_track]
    log.info(
        "retrieval built",
        extra={"fields": {"port": handle.port, "sources": [s.name for s in sources]}},
    )
    return handle, app


async def _main(settings: RecsysSettings, ready: Callable[[int], None] | None = None) -> None:
    handle, app = build_server(settings)
    await handle.set_serving(False)
    try:
        await serve(
            handle,
            background=[app.run()],
            on_ready=None if ready is None else (lambda h: ready(h.port)),
        )
    finally:
        await app.close()
        app.engine.tracing.shutdown()  # flushes spans still queued for export


def cli_serve(args: argparse.Namespace, settings: RecsysSettings) -> int:
    """``recsys serve retrieval``: runs until SIGTERM/SIGINT, then drains."""
    names = ("host", "port", "metrics_port", "workers")
    settings = with_flags(settings, "retrieval", {k: getattr(args, k, None) for k in names})
    configure_logging(settings)

    def serve_one(server: ServerSettings, ready: Callable[[int], None]) -> None:
        mine = settings.model_copy(update={"retrieval": server})
        asyncio.run(_main(mine, ready))

    try:
        return run_service(
            settings.retrieval,
            serve_one,
            label="retrieval",
            argv=getattr(args, "argv", None),
            port_file=getattr(args, "port_file", None),
        )
    except SourceConfigError as exc:
        raise UserFacingError(str(exc)) from exc
