"""gRPC server plumbing shared by the retrieval and ranking services.

Both services are built the same way: :func:`create_server` makes a
``grpc.aio`` server with the standard health and reflection services, the
interceptors (metrics, bounded concurrency, optional bearer token), message
size limits and TLS from config; :func:`serve` runs it until SIGTERM/SIGINT
and drains it (health NOT_SERVING first, so load balancers stop sending,
then ``server.stop(grace)``). :class:`VersionWatcher` follows the published
model version for both. :func:`run_service` runs one server process, or
``workers`` of them sharing one port through ``SO_REUSEPORT`` under a small
supervisor process.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import gc
import hmac
import inspect
import json
import logging
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram

from recsys import redis_keys
from recsys.artifacts import MANIFEST, latest_version, list_versions, manifest_digest
from recsys.config import (
    CURRENT_VERSION,
    RecsysSettings,
    ServerSettings,
    TLSSettings,
    grpc_address,
)
from recsys.embedded_redis import die_with_parent, die_with_parent_prefix
from recsys.errors import UserFacingError

log = logging.getLogger("recsys.serving")

RPC_LATENCY = Histogram(
    "recsys_rpc_latency_seconds",
    "Server-side latency per RPC.",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
RPC_TOTAL = Counter("recsys_rpc_total", "RPCs by final status code.", ["service", "method", "code"])
# multiprocess_mode only matters with several workers (see run_service): how
# the supervisor's /metrics combines the workers' values of a gauge.
RPC_IN_FLIGHT = Gauge(
    "recsys_rpc_in_flight",
    "Calls being handled now, as max_concurrent_rpcs counts them.",
    ["service"],
    multiprocess_mode="livesum",
)
# A multi-worker supervisor's wait for its workers beyond their drain time.
STOP_MARGIN_S = 5.0

RPC_REJECTED = Counter(
    "recsys_rpc_rejected_total", "RPCs refused before running.", ["service", "reason"]
)
MODEL_VERSION = Gauge(
    "recsys_model_version_info",
    "Version being served (value is 1; during a rollout, 1 if any worker serves it).",
    ["service", "version"],
    multiprocess_mode="livemax",
)
VERSION_REJECTED = Counter(
    "recsys_version_rejected_total",
    "Model version loads that failed (each failed retry of a version counts).",
    ["service"],
)
VERSION_MISSING = Gauge(
    "recsys_version_missing",
    "1 while the version to serve (the published pointer's, or a pinned one) is not on "
    "this replica's disk.",
    ["service"],
    multiprocess_mode="livemax",
)
LOOP_LAG = Histogram(
    "recsys_event_loop_lag_seconds",
    "How late the event loop ran a timer: time a ready callback (an arriving "
    "call, a Redis reply) waits behind the work ahead of it.",
    ["service"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1),
)
# How often the loop-lag probe wakes: often enough to see a saturated loop
# within seconds, rare enough to cost nothing (10 timers a second).
LOOP_LAG_INTERVAL_S = 0.1

# Health checks must keep answering under overload and without credentials,
# or Kubernetes would restart a pod that is merely busy.
_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


# --- logging ---------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra ``fields`` are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """``asctime level logger message`` plus ``key=value`` for each extra field.

    Values are ``repr``'d where they are not plain words, so an id holding a
    newline or an ``=`` cannot fake another line or field.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if not fields:
            return line
        parts = [line.split("\n", 1)[0]]
        for key, value in fields.items():
            text = str(value)
            plain = isinstance(value, int | float) or (
                text.isprintable() and text and not any(c in text for c in " =\"'")
            )
            parts.append(f"{key}={text if plain else repr(text)}")
        rest = line.split("\n", 1)[1:]  # a traceback stays below the line
        return " ".join(parts) + ("\n" + rest[0] if rest else "")


def configure_logging(settings: RecsysSettings) -> None:
    """Sets up root logging once per process from config."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # A library's warning then comes out as a record in the chosen format
    # (logger ``py.warnings``), not as a bare line in a JSON log stream.
    logging.captureWarnings(True)


# --- interceptors ------------------------------------------------------------------


class _Abort(Exception):
    pass


# The handler attribute counts_as_calls sets, read by GuardInterceptor.
_CALLS = "recsys_calls"


def counts_as_calls(calls: Callable[[Any], int]) -> Callable[[Callable], Callable]:
    """Marks a unary handler whose call does the work of ``calls(request)`` calls.

    :class:`GuardInterceptor` counts it as that many against its bound
    (``max_concurrent_rpcs``; at most the whole bound, so it always fits an
    otherwise idle server), so a batch cannot do hundreds of calls' work in
    one slot while other callers wait behind it on the event loop.
    """

    def mark(handler: Callable) -> Callable:
        setattr(handler, _CALLS, calls)
        return handler

    return mark


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Metrics, a concurrency bound and an optional bearer-token check.

    Above ``max_concurrent`` in-flight calls a new call fails at once with
    RESOURCE_EXHAUSTED, so overload sheds load instead of growing a queue
    that times out for everyone. A handler marked with
    :func:`counts_as_calls` counts as that many calls once its request is
    parsed, and is refused the same way when they do not fit.
    """

    def __init__(self, service: str, max_concurrent: int, token: str | None):
        self.service = service
        self.max_concurrent = max_concurrent
        self.token = token.encode() if token else None
        self.in_flight = 0
        # Wrapped handler per method (with the handler it wraps): built once, not per call.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_EXEMPT_PREFIXES):
            return handler
        if handler.unary_unary is None:
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler.unary_unary:
            cached = self._wrapped[method] = (handler.unary_unary, self._wrap(method, handler))
        return cached[1]

    def _wrap(self, method: str, handler):
        """The guarded version of one unary-unary method handler."""
        inner = handler.unary_unary
        short = method.rsplit("/", 1)[-1]
        # Parsing happens here rather than in gRPC's own deserializer hook, so a
        # corrupt message or a non-UTF-8 string field becomes INVALID_ARGUMENT
        # instead of gRPC's generic UNKNOWN, and only after auth and the bound.
        parse = handler.request_deserializer
        # Children resolved once: a labels() lookup per call costs ~1 µs each.
        gauge = RPC_IN_FLIGHT.labels(self.service)
        latency = RPC_LATENCY.labels(self.service, short)
        ok_total = RPC_TOTAL.labels(self.service, short, "OK")
        calls = getattr(inner, _CALLS, None)

        async def guarded(raw, context: grpc.aio.ServicerContext):
            if self.token is not None:
                metadata = dict(context.invocation_metadata() or ())
                sent = str(metadata.get("authorization", "")).encode()
                if not hmac.compare_digest(sent, b"Bearer " + self.token):
                    RPC_REJECTED.labels(self.service, "unauthenticated").inc()
                    RPC_TOTAL.labels(self.service, short, "UNAUTHENTICATED").inc()
                    await context.abort(
                        grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token"
                    )
            if self.in_flight >= self.max_concurrent:
                RPC_REJECTED.labels(self.service, "overload").inc()
                RPC_TOTAL.labels(self.service, short, "RESOURCE_EXHAUSTED").inc()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._busy(self.in_flight))
            self.in_flight += 1
            gauge.inc()
            taken = 1
            start = time.perf_counter()
            code = "OK"
            try:
                request = raw
                if parse is not None:
                    try:
                        request = parse(raw)
                    except Exception as exc:
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}"
                        )
                if calls is not None:
                    n = min(calls(request), self.max_concurrent)
                    if n > 1:
                        others = self.in_flight - 1
                        if others + n > self.max_concurrent:
                            # RPC_TOTAL is counted below, as for any code set in here.
                            RPC_REJECTED.labels(self.service, "overload").inc()
                            await context.abort(
                                grpc.StatusCode.RESOURCE_EXHAUSTED, self._busy(others, n)
                            )
                        self.in_flight += n - 1
                        gauge.inc(n - 1)
                        taken = n
                return await inner(request, context)
            except asyncio.CancelledError:
                # gRPC cancels the handler when the caller's deadline passes,
                # the caller cancels, or a drain's grace runs out; no code is
                # set then, and UNKNOWN would page as a server bug.
                code = _code_name(context) or _cancelled_code(context)
                raise
            except BaseException:
                code = _code_name(context) or "UNKNOWN"
                raise
            finally:
                self.in_flight -= taken
                gauge.dec(taken)
                if code == "OK":
                    code = _code_name(context) or "OK"
                latency.observe(time.perf_counter() - start)
                (ok_total if code == "OK" else RPC_TOTAL.labels(self.service, short, code)).inc()

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )

    def _busy(self, in_flight: int, calls: int = 1) -> str:
        """The overload refusal's message."""
        counted = f"; this one counts as {calls}" if calls > 1 else ""
        return f"server busy: {in_flight} calls in flight (limit {self.max_concurrent}){counted}"


def _cancelled_code(context: grpc.aio.ServicerContext) -> str:
    """What a handler cancelled by gRPC ended as: the caller's deadline, or a cancel."""
    left = context.time_remaining()
    return "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"


def _code_name(context: grpc.aio.ServicerContext) -> str | None:
    with contextlib.suppress(Exception):
        code = context.code()
        if code is not None:
            return code.name if isinstance(code, grpc.StatusCode) else str(code)
    return None


# --- server ------------------------------------------------------------------------


_T = TypeVar("_T")


async def in_daemon_thread(fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """Runs ``fn(*args, **kwargs)`` in a daemon thread of its own and awaits it.

    For version loads (seconds of TensorFlow or index reading).
    ``asyncio.to_thread``'s executor threads are joined when the event loop
    and the interpreter shut down, so a SIGTERM during a load waited for the
    load before the process could exit (past the grace period, the
    supervisor then killed it). A daemon thread is abandoned at exit, and a
    cancelled await leaves it to finish unseen.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()
    ctx = contextvars.copy_context()

    def settle(result: Any, exc: BaseException | None) -> None:
        if done.cancelled():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            result, exc = ctx.run(fn, *args, **kwargs), None
        except BaseException as e:  # handed to the awaiting task as it is
            result, exc = None, e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, result, exc)

    name = getattr(fn, "__qualname__", "work")
    threading.Thread(target=run, name=f"recsys-{name}", daemon=True).start()
    return await done


def settle_heap() -> None:
    """Keeps the collector off the long-lived heap after a version is swapped in.

    TensorFlow and the first version are hundreds of thousands of long-lived
    objects; left in the oldest generation, every full collection walks them
    (~150 ms pauses in the ranking process under load, each one stalling
    every in-flight call). So the first call in a process (nothing frozen
    yet) collects and then moves everything alive to the permanent
    generation.

    Later calls only collect. A later version's few thousand objects stay
    with the collector, so the collection walks them and what else was
    allocated since (2-12 ms in the ranking process, against the 150-300 ms
    an unfreeze and full collection took on every swap), and it frees a
    retired later version's reference cycles. A version that was frozen
    keeps its cycles frozen once retired: ~4 MB of TensorFlow graph objects
    for the trainer's model, once per process. The frozen count decides,
    not a count of tracked objects: ``gc.get_objects()`` holds a reference
    to every object while another thread loads a version, and CPython then
    refused to resize a tuple that thread was building ("bad argument to
    internal function" from a SavedModel load).
    """
    gc.collect()
    if gc.get_freeze_count() == 0:  # the process's first version
        gc.freeze()


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options both sides use (message limits, keepalive)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


@dataclass(frozen=True)
class TLSFiles:
    """The PEM contents of one side's :class:`TLSSettings`, read and checked."""

    cert: bytes | None
    key: bytes | None
    ca: bytes | None


def _checking_context() -> ssl.SSLContext:
    """An OpenSSL context that refuses only what gRPC cannot use either.

    Python's default security level (2) refuses an RSA key under 2048 bits
    and a certificate signed with SHA-1, which gRPC serves with; level 0
    checks that the files parse and that the key is the certificate's.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def _holds_certificates(pem: bytes) -> bool:
    try:
        # As str, cadata is PEM (as bytes it would be DER); "" raises
        # ValueError. Text around the blocks is skipped, as gRPC skips it:
        # CA bundles label their certificates, in UTF-8 too; the blocks
        # themselves are base64.
        _checking_context().load_verify_locations(cadata=pem.decode("ascii", errors="ignore"))
    except (ssl.SSLError, ValueError):
        return False
    return True


def read_tls_files(tls: TLSSettings, setting: str | Mapping[str, str]) -> TLSFiles:
    """Reads the files ``tls`` names, refusing any that gRPC could not use.

    gRPC takes whatever bytes it is given and fails later and elsewhere: a
    server's bad certificate or key reads "Failed to bind to address", a
    client's bad CA makes every call UNAVAILABLE, and an empty CA file read
    as no CA (mutual TLS then checked no client). So each file is
    checked here, at start-up, with the standard library's OpenSSL: it is
    readable, a certificate file holds at least one PEM certificate, and
    the key is the certificate's.

    Args:
        tls: One side's TLS settings.
        setting: Where ``tls`` sits in the config (``retrieval.tls``); the
            errors name ``<setting>.<field>``. Or each field's own name for
            the errors: ``{"ca_file": "--tls-ca", ...}`` for the flags that
            set them.

    Returns:
        The files' bytes, None for a path that is not set.

    Raises:
        UserFacingError: ``<setting>.<field>: <path>: <problem>`` (with a
            mapping, the field's name from it).
    """

    def named(field: str) -> str:
        return f"{setting}.{field}" if isinstance(setting, str) else setting[field]

    def read(name: str) -> bytes | None:
        path = getattr(tls, name)
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            problem = (exc.strerror or str(exc)).lower()
            raise UserFacingError(f"{named(name)}: {path}: {problem}") from None

    files = TLSFiles(cert=read("cert_file"), key=read("key_file"), ca=read("ca_file"))
    for name, pem in (("cert_file", files.cert), ("ca_file", files.ca)):
        if pem is not None and not _holds_certificates(pem):
            path = getattr(tls, name)
            raise UserFacingError(f"{named(name)}: {path}: holds no PEM certificate")
    if files.key is not None:
        where = f"{named('key_file')}: {tls.key_file}"
        if b"PRIVATE KEY-----" not in files.key:
            raise UserFacingError(f"{where}: holds no PEM private key")
        try:
            # An encrypted key gets the empty password (and fails) rather
            # than OpenSSL's prompt on the terminal; gRPC takes no password.
            _checking_context().load_cert_chain(tls.cert_file, tls.key_file, password=lambda: b"")
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                problem = f"not the key of {named('cert_file')} {tls.cert_file}"
            elif b"ENCRYPTED" in files.key:  # PKCS#8's header, or the legacy Proc-Type
                problem = "encrypted (gRPC takes no password)"
            else:
                problem = "not a usable private key"
            raise UserFacingError(f"{where}: {problem}") from None
    return files


def server_credentials(tls: TLSSettings, setting: str) -> grpc.ServerCredentials:
    """TLS (or mutual TLS with ``require_client_cert``) from PEM paths.

    Raises:
        UserFacingError: A file is unusable (see :func:`read_tls_files`).
    """
    files = read_tls_files(tls, setting)
    return grpc.ssl_server_credentials(
        [(files.key, files.cert)],
        root_certificates=files.ca,
        require_client_auth=tls.require_client_cert,
    )


def channel_credentials(tls: TLSSettings, setting: str = "tls") -> grpc.ChannelCredentials:
    """Client TLS: CA to trust, plus a client cert/key for mutual TLS.

    Raises:
        UserFacingError: A file is unusable (see :func:`read_tls_files`).
    """
    files = read_tls_files(tls, setting)
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca, private_key=files.key, certificate_chain=files.cert
    )


@dataclass
class ServerHandle:
    """A built, not yet started, server."""

    server: grpc.aio.Server
    health: grpc_health.aio.HealthServicer
    port: int
    service_names: tuple[str, ...]
    settings: ServerSettings
    label: str = "server"
    _serving: bool = field(default=False, repr=False)
    _when_serving: list[Callable[[], None]] = field(default_factory=list, repr=False)

    async def set_serving(self, serving: bool) -> None:
        """Flips health for the overall server and every named service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)
        self._serving = serving
        if serving:
            pending, self._when_serving = self._when_serving, []
            for callback in pending:
                callback()

    def when_serving(self, callback: Callable[[], None]) -> None:
        """Calls ``callback`` once health first reports SERVING (now, if it does)."""
        if self._serving:
            callback()
        else:
            self._when_serving.append(callback)


def create_server(
    settings: ServerSettings,
    *,
    label: str,
    service_names: Iterable[str],
    register: Callable[[grpc.aio.Server], None],
) -> ServerHandle:
    """Builds a ``grpc.aio`` server with health, reflection and interceptors.

    Args:
        settings: The service's server settings.
        label: Metrics/log label (``retrieval`` or ``ranking``).
        service_names: Full names of the services ``register`` adds.
        register: Adds the servicers to the server.

    Returns:
        The handle; health starts NOT_SERVING until a model version is loaded.
    """
    token = settings.auth_token.get_secret_value() if settings.auth_token else None
    options: list[tuple[str, int]] = [
        *grpc_options(settings.max_message_bytes),
        # Closing connections after a few minutes (gracefully: in-flight
        # calls finish) makes round-robin clients re-resolve DNS, so pods
        # added by an autoscaler start receiving traffic.
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.max_connection_age_grace_ms", 30_000),
    ]
    # Every worker binds the same port and the kernel spreads new connections
    # over them (see run_service). gRPC turns SO_REUSEPORT on by default: a
    # lone server must not, or a second one started on its port by mistake
    # binds too and silently takes part of the traffic.
    options.append(("grpc.so_reuseport", int(settings.workers > 1)))
    server = grpc.aio.server(
        interceptors=[GuardInterceptor(label, settings.max_concurrent_rpcs, token)],
        options=options,
    )
    register(server)
    health = grpc_health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = tuple(service_names)
    reflection.enable_server_reflection(
        (
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = grpc_address(settings.host, settings.port)
    # Built (and its files checked) first: gRPC reports an unusable
    # certificate or key as an address that did not bind.
    credentials = server_credentials(settings.tls, f"{label}.tls") if settings.tls.enabled else None
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:  # gRPC's way of saying the address did not bind
        raise UserFacingError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise UserFacingError(f"cannot listen on {address} (in use, or not this host's address)")
    return ServerHandle(server, health, port, names, settings, label)


async def serve(
    handle: ServerHandle,
    *,
    background: Iterable[Awaitable[None]] = (),
    on_ready: Callable[[ServerHandle], None] | None = None,
) -> None:
    """Runs a server until SIGTERM or SIGINT, then drains it.

    Drain order: health goes NOT_SERVING (readiness probes fail, clients
    stop picking this replica), new calls are refused and in-flight calls
    get ``grace_s`` to finish. ``on_ready`` runs once the server listens
    (in a worker of a multi-process service: once health is SERVING).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await handle.server.start()
    tasks = [asyncio.ensure_future(b) for b in (*background, watch_loop_lag(handle.label))]
    if on_ready is not None:
        if _ready_when_serving:
            # A worker of several: its supervisor reports the port only once every
            # worker has a version, so no caller meets a sibling still loading.
            handle.when_serving(lambda: on_ready(handle))
        else:
            on_ready(handle)
    log.info("listening", extra={"fields": {"port": handle.port}})
    await stop.wait()
    log.info("draining", extra={"fields": {"grace_s": handle.settings.grace_s}})
    await handle.health.enter_graceful_shutdown()
    # Calls already on the wire when stop() begins can be cancelled by gRPC;
    # the project's channels retry that CANCELLED, but other callers may not,
    # so first let clients that watch health see NOT_SERVING and route
    # elsewhere; this process still serves meanwhile.
    await asyncio.sleep(handle.settings.drain_delay_s)
    for t in tasks:
        t.cancel()
    await handle.server.stop(handle.settings.grace_s)
    log.info("stopped")


async def watch_loop_lag(service: str, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
    """Records how late each of a steady series of timers fires, until cancelled.

    A server's event loop runs every handler, batch and Redis reply of the
    process in turn, so when it saturates, each call waits behind the
    others before any of its code runs. gRPC's latency histogram shows the
    total; this lag is the queueing part alone, and rising lag at flat
    traffic is the sign to add replicas (see docs/operations.md).
    """
    loop = asyncio.get_running_loop()
    observe = LOOP_LAG.labels(service).observe
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - due))


def start_metrics(port: int, host: str, multiprocess_dir: str | None = None) -> Any:
    """Serves Prometheus ``/metrics`` on its own port (0 disables it).

    Args:
        port: Port of the endpoint; 0 starts nothing.
        host: Address to bind, bare (``::``, not ``[::]``).
        multiprocess_dir: A supervisor's ``PROMETHEUS_MULTIPROC_DIR``: the
            endpoint then shows every worker's metrics combined instead of
            this process's own.

    Returns:
        The HTTP server (``shutdown()`` stops it), or None when ``port`` is 0.
    """
    if not port:
        return None
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server

    registry = REGISTRY
    if multiprocess_dir is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)
    try:
        httpd, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        where = grpc_address(host, port)
        raise UserFacingError(f"cannot serve /metrics on {where}: {exc}") from None
    return httpd


# --- worker processes ---------------------------------------------------------------

# Set by the supervisor in each worker's environment: "<index>:<count>:<port>:<fd>".
WORKER_ENV = "RECSYS_WORKER"
# prometheus-client's multiprocess mode: where a worker writes its metric values.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# True in a worker process: serve() reports ready on SERVING instead of on listening.
_ready_when_serving = False
# How a worker may end once its supervisor stops it: 0 after draining, or, when
# the stop reached it before its signal handlers were set up, killed by the
# signal itself, or 130 (the CLI's KeyboardInterrupt exit).
_STOPPED = frozenset({0, -signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGINT})
# The CLI's exit code for a UserFacingError: a setting or file refused at start.
_REFUSED = 2


@dataclass(frozen=True)
class WorkerSlot:
    """Where one worker process of a multi-process service stands."""

    index: int
    count: int
    port: int
    notify_fd: int

    @classmethod
    def from_env(cls) -> WorkerSlot | None:
        """The slot the supervisor gave this process, or None outside a supervisor."""
        raw = os.environ.get(WORKER_ENV)
        if not raw:
            return None
        try:
            index, count, port, fd = (int(x) for x in raw.split(":"))
        except ValueError:
            raise ValueError(f"{WORKER_ENV}={raw!r}: expected index:count:port:fd") from None
        return cls(index, count, port, fd)

    def tag_logs(self) -> None:
        """Adds ``worker`` (index) and ``pid`` fields to every log record of this process.

        The workers share one log stream; the supervisor names a dead worker
        by pid, and the index says which slot it held.
        """
        fields = {"worker": self.index, "pid": os.getpid()}

        def add(record: logging.LogRecord) -> bool:
            record.fields = {**getattr(record, "fields", {}), **fields}
            return True

        for handler in logging.getLogger().handlers:
            handler.addFilter(add)

    def notify_ready(self) -> None:
        """Tells the supervisor this worker's server has started."""
        with contextlib.suppress(OSError):
            os.write(self.notify_fd, f"{self.index} {os.getpid()}\n".encode())
            os.close(self.notify_fd)


@contextlib.contextmanager
def reserve_port(host: str, port: int):
    """Binds (without listening) ``host:port`` for the workers and yields the port.

    ``host`` is bare, as the settings keep it (``::1``, not ``[::1]``).

    Port 0 becomes one free port that every worker then binds; holding the
    socket open keeps any other program from taking the port meanwhile. A
    socket that does not listen receives no connections.

    Raises:
        UserFacingError: The port is taken: a socket listens on it (another
            multi-worker service's workers too, which a bind with
            SO_REUSEPORT would have joined), or one is bound to it without
            SO_REUSEADDR.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Bound without SO_REUSEPORT, so any socket bound or listening on the
    # port refuses it, as it refuses a lone server (see create_server);
    # turned on after, so the workers' SO_REUSEPORT binds share it. Linux
    # checks each bound socket's flag at every later bind, and one socket
    # leaves no moment in which the port is free.
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0:
                raise UserFacingError(
                    f"cannot listen on {grpc_address(host, port)}: {exc}"
                ) from None
            # Perhaps only the connections a service just stopped on this
            # port left in TIME_WAIT (for a minute), which a restart on a
            # fixed port met as "address already in use". SO_REUSEADDR passes
            # those, and still meets a listening socket and another service's
            # reservation (bound without it). It is cleared again after, so a
            # later reservation is refused by this one (kernels that read the
            # flag at each bind; on others that window stays open).
            sock.close()
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as again:
                raise UserFacingError(
                    f"cannot listen on {grpc_address(host, port)}: {again}"
                ) from None
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        yield sock.getsockname()[1]
    finally:
        sock.close()


def run_service(
    server: ServerSettings,
    serve_one: Callable[[ServerSettings, Callable[[int], None]], None],
    *,
    label: str,
    argv: list[str] | None,
    port_file: Path | None = None,
) -> int:
    """Runs a service as one process, or as ``server.workers`` processes on one port.

    With one worker, ``serve_one`` runs here. With more, this process becomes
    a supervisor: it reserves the port (a free one when ``port`` is 0; one
    anything else holds, another service's workers included, is refused),
    starts ``workers`` copies of the same command line (``recsys`` ``argv``)
    that each build their own server, event loop, health servicer and
    version watcher and bind that port with SO_REUSEPORT, writes
    ``port_file`` once every worker serves, forwards SIGTERM/SIGINT to all
    of them (each drains as a single process would) and exits when they
    have. ``port_file`` is written once every worker's health is SERVING
    (one worker: once it listens, as before). A worker that dies stops the
    others, so the orchestrator restarts the whole pod rather than run it
    short-handed. The supervisor serves ``/metrics`` on ``metrics_port`` for
    all workers together (prometheus-client's multiprocess mode: each worker
    writes its values to files in a private directory the supervisor owns
    and removes on exit), so one scrape target covers the pod; with
    ``metrics_port`` 0 the workers keep their own, faster, registries.
    Each worker's log records carry its ``worker`` index and ``pid``.

    Args:
        server: The service's server settings.
        serve_one: Runs one server until it is drained; gets the settings to
            use (port and metrics port filled in) and a callback to call with
            the bound port once it listens.
        label: Service name for logs.
        argv: The ``recsys`` command-line arguments that started this process.
        port_file: Written with the bound port once serving.

    Returns:
        The process exit code.

    Raises:
        UserFacingError: The port is taken, or the port file's directory is
            not writable.
    """
    slot = WorkerSlot.from_env()
    if slot is not None:
        global _ready_when_serving
        _ready_when_serving = True
        die_with_parent()
        slot.tag_logs()
        # The supervisor serves every worker's metrics (see _supervise).
        mine = server.model_copy(update={"port": slot.port, "metrics_port": 0})
        serve_one(mine, lambda _port: slot.notify_ready())
        return 0
    if port_file is not None and not os.access(Path(port_file).parent, os.W_OK):
        # Found before the server starts, not once it already serves.
        raise UserFacingError(
            f"cannot write the port file {port_file}: its directory is not writable"
        )
    if server.workers <= 1:
        start_metrics(server.metrics_port, server.host)

        def ready(port: int) -> None:
            if port_file is not None:
                write_port_file(port_file, port)

        serve_one(server, ready)
        return 0
    if argv is None:
        raise RuntimeError(f"{label}: {server.workers} workers need the command line to re-run")
    return _supervise(server, label=label, argv=argv, port_file=port_file)


def write_port_file(path: Path, port: int) -> None:
    """Writes the port then renames, so a reader never sees a partial number."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(f"{port}\n")
        tmp.replace(path)
    except OSError as exc:
        raise UserFacingError(f"cannot write the port file {path}: {exc}") from None


def _supervise(
    server: ServerSettings, *, label: str, argv: list[str], port_file: Path | None
) -> int:
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    procs: list[subprocess.Popen] = []
    code = 0
    # Multiprocess mode only for a /metrics to serve: it slows every update.
    metrics_dir = _metrics_dir(label) if server.metrics_port else None
    httpd = None
    try:
        with reserve_port(server.host, server.port) as port:
            httpd = start_metrics(server.metrics_port, server.host, metrics_dir)
            read_fd, write_fd = os.pipe()
            try:
                for i in range(server.workers):
                    env = {**os.environ, WORKER_ENV: f"{i}:{server.workers}:{port}:{write_fd}"}
                    if metrics_dir is not None:
                        # Read when the worker first imports prometheus_client.
                        env[MULTIPROC_ENV] = metrics_dir
                    procs.append(
                        subprocess.Popen(
                            [*die_with_parent_prefix(), sys.executable, "-m", "recsys.cli", *argv],
                            env=env,
                            pass_fds=(write_fd,),
                        )
                    )
            finally:
                os.close(write_fd)
            log.info(
                "workers started",
                extra={"fields": {"service": label, "port": port, "pids": [p.pid for p in procs]}},
            )
            ready: set[int] = set()
            buffer = b""
            with os.fdopen(read_fd, "rb", buffering=0) as pipe:
                while len(ready) < len(procs) and not stopping:
                    if any(p.poll() is not None for p in procs):
                        break
                    readable, _, _ = select.select([pipe], [], [], 0.2)
                    if readable:
                        chunk = pipe.read(4096)
                        if not chunk:
                            # Every worker closed its end, each one not ready
                            # by exiting: reaped (its exit is all but done), so
                            # the error below names them.
                            for i, p in enumerate(procs):
                                if i not in ready:
                                    with contextlib.suppress(subprocess.TimeoutExpired):
                                        p.wait(1.0)
                            break
                        buffer += chunk
                        *lines, buffer = buffer.split(b"\n")
                        ready.update(int(line.split()[0]) for line in lines if line.strip())
            if len(ready) == len(procs):
                if port_file is not None:
                    write_port_file(port_file, port)
                log.info(
                    "all workers listening", extra={"fields": {"service": label, "port": port}}
                )
                while not stopping and all(p.poll() is None for p in procs):
                    time.sleep(0.2)
            reap_metrics(procs, metrics_dir)
            dead: dict[int, int] = {}
            if not stopping:
                dead = {p.pid: p.returncode for p in procs if p.poll() is not None}
                log.error(
                    "a worker exited; stopping the others",
                    extra={"fields": {"service": label, "exit_codes": dead}},
                )
            # A worker drains for drain_delay_s + grace_s, then flushes its
            # spans (bounded by tracing.FLUSH_TIMEOUT_S) and closes clients.
            _stop_all(procs, server.drain_delay_s + server.grace_s + STOP_MARGIN_S, metrics_dir)
            # A worker that crashed or had to be killed while draining is a
            # failed stop, whatever asked for it: the exit code says so. One
            # stopped before it had set up its handlers (early in its start)
            # died of the stop signal itself, or returned 130 for the
            # KeyboardInterrupt: that is the stop that was asked for.
            failed = {
                p.pid: p.returncode
                for p in procs
                if p.pid not in dead and p.returncode not in _STOPPED
            }
            if failed:
                log.error(
                    "a worker did not stop cleanly",
                    extra={"fields": {"service": label, "exit_codes": failed}},
                )
            if failed or not stopping:
                # Workers that failed to start and all refused their settings
                # (a bad TLS file, say): the service exits as one worker would.
                refused = {*dead.values(), *failed.values()} == {_REFUSED}
                code = _REFUSED if refused and len(ready) < len(procs) else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_all(procs, 0.0)
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


def _metrics_dir(label: str) -> str:
    """A new private directory for the workers' metric files, in memory when possible.

    New per supervisor: prometheus-client's multiprocess mode sums whatever
    files it finds there, so a reused one would add in a previous run's
    counters. On tmpfs (``/dev/shm``, present in every container) when it is
    writable, because every metric update writes into a memory-mapped file
    and on a disk-backed ``/tmp`` those dirty pages would be written back to
    disk every few seconds for nothing.
    """
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None
    return tempfile.mkdtemp(prefix=f"recsys-{label}-metrics-", dir=base)


def reap_metrics(procs: Sequence[subprocess.Popen], metrics_dir: str | None) -> None:
    """Drops the live gauges (in flight, ...) of every worker that has exited.

    prometheus-client keeps a ``livesum``/``livemax`` gauge file per process
    until told the process is dead; without this a worker that died would
    keep adding its last in-flight count to the pod's ``/metrics`` while the
    others drain. Counters and histograms are kept: their totals stay true.
    Nothing to do without a directory (``metrics_port`` 0).
    """
    if metrics_dir is None:
        return
    from prometheus_client import multiprocess

    for p in procs:
        if p.poll() is not None:
            multiprocess.mark_process_dead(p.pid, metrics_dir)


def _stop_all(procs: list[subprocess.Popen], wait_s: float, metrics_dir: str | None = None) -> None:
    """SIGTERM every live worker, waits up to ``wait_s``, then kills stragglers."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if metrics_dir is not None:
            reap_metrics([p], metrics_dir)


# --- model versions -----------------------------------------------------------------


def async_redis(settings: RecsysSettings):
    """An asyncio Redis client with a bounded pool and a connect timeout from config.

    The client has no per-read socket timeout: each service call bounds its
    whole round trip itself (``asyncio.timeout``: the request's deadline, or
    ``redis_timeout_s``). redis-py arms an asyncio timer for every reply it
    reads when ``socket_timeout`` is set, which is one timer per command of a
    pipeline (three per user in a batch's user read) and ~5 µs each; one
    bound per round trip gives the same protection against a Redis that
    stops answering. A cancelled read closes its connection, so a late reply
    cannot be mistaken for the next command's.

    A new connection is opened inside the bound of the call that needs it,
    and a bound that runs out discards it half-built, so its handshake must
    fit in that bound beside the command: it is cut to what the connection
    needs (:func:`_lean_handshake`: ``HELLO`` or ``AUTH``, and ``SELECT``
    for a database other than 0). No health-check ``PING`` either: it cost a
    round trip on every connection idle for the interval, and caught nothing
    the command itself does not: a pooled connection a Redis restart broke
    fails the one call that finds it (redis-py retries nothing on a client
    made by ``from_url``, and failed the call on a failed ``PING`` the same
    way) and is replaced by the next.
    """
    import redis.asyncio as aioredis

    return aioredis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=None,
        socket_connect_timeout=settings.redis_timeout_s,
        max_connections=settings.redis_max_connections,
        health_check_interval=0,
        **_lean_handshake(),
    )


def _lean_handshake() -> dict[str, Any]:
    """Client options that drop the optional commands of a new connection's handshake.

    redis-py 8 sends ``CLIENT MAINT_NOTIFICATIONS`` (a round trip; for
    managed clusters that announce failovers) and ``CLIENT SETINFO`` twice
    (a round trip; the client's name and version, for ``CLIENT LIST``).
    With the health-check ``PING``, a connection cost five round trips
    before its first command: a Redis 100 ms away never answered a read
    bounded at 250 ms. The options are detected, not assumed: the supported
    redis-py range (``>=5.0``) includes versions that lack some of them.
    """
    from redis.asyncio.connection import AbstractConnection, ConnectionPool

    connection = inspect.signature(AbstractConnection.__init__).parameters
    options: dict[str, Any] = {}
    if "driver_info" in connection:  # where it exists, lib_name and lib_version are deprecated
        options["driver_info"] = None
    elif "lib_name" in connection:
        options["lib_name"] = options["lib_version"] = None
    if "maint_notifications_config" in inspect.signature(ConnectionPool.__init__).parameters:
        from redis.maint_notifications import MaintNotificationsConfig

        options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return options


# A rejected version whose files did not change is tried again after
# REJECTED_RETRY_FIRST_S, the wait doubling with each failure up to
# REJECTED_RETRY_MAX_S. Not every failure is in the files (a transient
# OSError or MemoryError, a Redis or disk hiccup during warm-up): without a
# retry, one such failure kept a replica that served nothing NOT_SERVING
# until a restart. The cap bounds how long a cause that went away goes
# unnoticed; a version that stays broken costs a load every 10 minutes.
REJECTED_RETRY_FIRST_S = 30.0
REJECTED_RETRY_MAX_S = 600.0


@dataclass
class _Rejection:
    """A version's last failed load: of which files, how many tries, when to try again."""

    stamp: tuple[int, ...] | None  # _tree_stamp of the files it tried
    attempt: int  # tries of these files so far
    delay_s: float  # the wait before the next one
    retry_at: float  # the watcher's clock when it is due


class VersionWatcher:
    """Follows the version to serve and hands new ones to a loader.

    The wanted version is the pinned one if config pins it, else the one the
    Redis pointer names (``recsys publish``), else the newest complete one on
    disk (so a lone service still starts when Redis is down, and a
    deployment that never publishes follows its disk). Once a version is
    serving, only the pointer moves it: while Redis is unreachable, the
    pointer names a version not on disk yet, or a pointer it followed has
    vanished (Redis restarted empty), the current one stays (newest on disk
    may be unpublished, or newer than a rollback); a wanted version not on
    disk is logged once and exported (``recsys_version_missing``). The
    served version is reloaded when its directory comes to hold another
    build (deleted and trained again under its number). A version the
    loader rejects (bad checksum, failed warm-up, files still arriving) is
    remembered and retried at once when any of its files changes (the rest
    of a copy, or a re-copy), else after a backoff
    (``REJECTED_RETRY_FIRST_S``, doubling with each failure up to
    ``REJECTED_RETRY_MAX_S``), as a failure need not be in the files (a
    transient OSError, a Redis hiccup during warm-up); a pinned version
    that is not on disk yet is waited for, not rejected. The previous
    version keeps serving throughout, and a replica that serves nothing yet
    falls back to the newest older version that loads (not on a pinned
    track).

    Args:
        label: Service name in logs and metrics.
        model_dir: Versions root.
        load: Loads (verifies, warms) a version directory and serves it; an
            error rejects the version.
        redis: Client to read the published pointer from (None: none).
        pinned: Version to serve whatever the pointer says.
        interval_s: Time between polls (:meth:`run`).
        redis_timeout_s: Longest wait for the pointer's read.
        clock: Monotonic seconds the retry backoff is measured with (tests
            pass a fake one).
    """

    def __init__(
        self,
        *,
        label: str,
        model_dir: Path,
        load: Callable[[Path], Awaitable[None]],
        redis=None,
        pinned: str | None = None,
        interval_s: float = 2.0,
        redis_timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label = label
        self.model_dir = Path(model_dir)
        self.load = load
        self.redis = redis
        self.redis_timeout_s = redis_timeout_s
        self.pinned = pinned
        self.interval_s = interval_s
        self.current: str | None = None
        self.rejected: dict[str, str] = {}
        # Each rejected version's files when it was rejected, and its backoff.
        self._rejections: dict[str, _Rejection] = {}
        self._clock = clock
        # Whether "no version to serve" was said since something was served.
        self._none_logged = False
        # The wanted version last said to be missing from disk (None: the wanted one is here).
        self._absent_logged: str | None = None
        # The served build's manifest_digest, and the manifest's stat when it
        # was last read with what it held: a poll stats it, reads it only
        # when that changed.
        self._served_digest: str | None = None
        self._manifest_seen: tuple[tuple[int, ...], str | None] | None = None
        # Set once a pointer was read: from then on its absence means it was
        # lost, not that this deployment follows the newest version on disk.
        self._followed_pointer = False
        # Exported at 0 from the start: increase() never counts a series' first
        # sample, so a first rejection that created it at 1 raised no alert.
        VERSION_REJECTED.labels(label)
        VERSION_MISSING.labels(label)

    async def wanted(self) -> str | None:
        """The version that should be served now, or None if there is none."""
        if self.pinned:
            self._on_disk(self.pinned, (self.model_dir / self.pinned / MANIFEST).is_file())
            return self.pinned
        if self.redis is not None:
            try:
                async with asyncio.timeout(self.redis_timeout_s):
                    raw = await self.redis.get(redis_keys.CURRENT_VERSION)
            except Exception as exc:  # RedisError, OSError, TimeoutError
                log.debug("version pointer unavailable: %s", exc)
                if self.current is not None:
                    return self.current  # no pointer to follow: stay put
            else:
                if raw is not None:
                    self._followed_pointer = True
                    v = raw.decode() if isinstance(raw, bytes) else str(raw)
                    here = v in list_versions(self.model_dir)
                    self._on_disk(v, here)
                    if here:
                        return v
                    if self.current is not None:
                        return self.current  # published, not on disk here (yet)
                else:
                    # No pointer, so no wanted version can be missing: a gauge
                    # left at 1 by a pointer that then vanished alerted for good.
                    self._on_disk(None, True)
                    if self.current is not None and self._followed_pointer:
                        # The pointer this service followed is gone (a Redis
                        # restarted empty, a failover, a flush): stay, or a
                        # rolled-back or unpublished newer directory would serve.
                        return self.current
        return latest_version(self.model_dir)

    def _on_disk(self, version: str | None, here: bool) -> None:
        """Exports whether the wanted ``version`` is on this disk; when not, says so once.

        The current version keeps serving meanwhile (a copy still on its
        way), which from outside looks like a rollout that finished: a copy
        that never comes must show.
        """
        VERSION_MISSING.labels(self.label).set(0 if here else 1)
        if here:
            self._absent_logged = None  # said again if one goes missing again
        elif self._absent_logged != version:
            self._absent_logged = version
            log.warning(
                "wanted version is not on disk yet",
                extra={
                    "fields": {
                        "version": version,
                        "serving": self.current,
                        "model_dir": str(self.model_dir),
                    }
                },
            )

    def _rebuilt(self) -> bool:
        """True when the served version's directory now holds another build of it.

        A version deleted and trained again gets its number back: compared by
        name alone, a running service kept the old build for good while a
        replica started later loaded the new one, both reporting the same
        version. Every poll stats the manifest; it is read only when that
        changed (a re-copy of the same build changes the stat, not the digest).
        """
        manifest = self.model_dir / str(self.current) / MANIFEST
        try:
            st = manifest.stat()
        except OSError:
            return False  # removed, or replaced right now: the loaded build keeps serving
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if self._manifest_seen is None or self._manifest_seen[0] != key:
            self._manifest_seen = (key, manifest_digest(manifest.parent))
        digest = self._manifest_seen[1]
        return None not in (digest, self._served_digest) and digest != self._served_digest

    async def poll_once(self) -> bool:
        """Loads the wanted version if it changed; True when a swap happened."""
        want = await self.wanted()
        if want is None:
            if not self._none_logged:
                self._none_logged = True  # once, until something is served
                log.warning(
                    "no version to serve: no complete version under the model dir",
                    extra={"fields": {"model_dir": str(self.model_dir)}},
                )
            return False
        if want == self.current and not self._rebuilt():
            return False
        path = self.model_dir / want
        if not (path / MANIFEST).is_file():
            stamp = None
        else:
            stamp = await asyncio.to_thread(_tree_stamp, path)
        if want in self.rejected and not self._retry_due(want, stamp):
            return await self._fall_back(want)
        if stamp is None:  # a pinned version not copied in yet (wanted() said so)
            return False
        if not await self._try_load(want, stamp):
            return await self._fall_back(want)
        return True

    def _retry_due(self, version: str, stamp: tuple[int, ...] | None) -> bool:
        """Whether rejected ``version`` is worth another try now.

        It is once any of its files changed (``stamp``, see
        :func:`_tree_stamp`), or once its backoff ran out; never while it
        has no manifest.
        """
        rejection = self._rejections[version]
        if stamp is None:
            return False
        return stamp != rejection.stamp or self._clock() >= rejection.retry_at

    async def _try_load(self, version: str, stamp: tuple[int, ...] | None) -> bool:
        """Loads ``version`` and makes it current; False (remembered) when it is rejected."""
        # Read before the load: a build replacing it meanwhile is then seen as new.
        digest = manifest_digest(self.model_dir / version)
        before = self._rejections.get(version)
        if before is None or before.stamp != stamp:
            before = None  # new files: a first try, the backoff starts over
        attempt = 1 if before is None else before.attempt + 1
        try:
            await self.load(self.model_dir / version)
        except Exception as exc:
            delay_s = (
                REJECTED_RETRY_FIRST_S
                if before is None
                else min(before.delay_s * 2, REJECTED_RETRY_MAX_S)
            )
            self.rejected[version] = str(exc)
            self._rejections[version] = _Rejection(stamp, attempt, delay_s, self._clock() + delay_s)
            VERSION_REJECTED.labels(self.label).inc()
            log.error(
                "version rejected",
                extra={
                    "fields": {
                        "version": version,
                        "error": str(exc),
                        "serving": self.current,
                        "attempt": attempt,
                        "retry_in_s": delay_s,
                    }
                },
            )
            return False
        self.rejected.pop(version, None)
        self._rejections.pop(version, None)
        if attempt > 1:
            log.info(
                "rejected version loaded on retry",
                extra={"fields": {"version": version, "attempt": attempt}},
            )
        self._swapped_to(version)
        self._served_digest, self._manifest_seen = digest, None
        return True

    async def _fall_back(self, rejected: str) -> bool:
        """With nothing served yet, serves the newest older version that loads.

        Replicas already running keep their version when a newer one is
        rejected; a replica started after that (scale-up, restart) would
        otherwise serve nothing until someone moves the pointer. A pinned
        track (an experiment arm) does not fall back: it must serve what it
        names or nothing.
        """
        if self.current is not None or self.pinned:
            return False
        older = [
            v
            for v in list_versions(self.model_dir)
            if v.isdigit() and rejected.isdigit() and int(v) < int(rejected)
        ]
        for v in reversed(older):
            stamp = await asyncio.to_thread(_tree_stamp, self.model_dir / v)
            if v in self.rejected and not self._retry_due(v, stamp):
                continue
            log.error(
                "wanted version rejected and nothing served yet: serving an older one",
                extra={"fields": {"wanted": rejected, "version": v}},
            )
            if await self._try_load(v, stamp):
                return True
        return False

    def _swapped_to(self, want: str) -> None:
        """Bookkeeping after ``want`` became the served version."""
        if self.current is not None:
            # Drop the old series, not just zero it: a pod that exported one
            # series per version it ever served would look, to an alert that
            # counts versions per service, like replicas that disagree. (With
            # several workers the shared files keep the zero, as remove() is
            # not implemented there and only warns; the alert also filters on
            # the value.)
            MODEL_VERSION.labels(self.label, self.current).set(0)
            if MULTIPROC_ENV not in os.environ:
                with contextlib.suppress(KeyError):
                    MODEL_VERSION.remove(self.label, self.current)
        MODEL_VERSION.labels(self.label, want).set(1)
        log.info("version loaded", extra={"fields": {"version": want, "previous": self.current}})
        self.current = want
        self._none_logged = False

    async def run(self) -> None:
        """Polls forever (cancel to stop)."""
        await poll_forever(self.interval_s, self.poll_once)


async def poll_forever(interval_s: float, poll: Callable[[], Awaitable[Any]]) -> None:
    """Calls ``poll`` every ``interval_s`` until cancelled; its errors wait for the next call."""
    while True:
        await asyncio.sleep(interval_s)
        with contextlib.suppress(Exception):
            await poll()
        # redis-py's asyncio client (8.x) can swallow a cancellation that
        # lands while a read is in flight; a stop request must still end
        # this loop, or the server's shutdown waits on it forever.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError


def track_watchers(
    tracks: Iterable[str],
    *,
    label: str,
    model_dir: Path,
    server: ServerSettings,
    load: Callable[[Path, str], Awaitable[None]],
    redis: Any = None,
    redis_timeout_s: float = 1.0,
) -> dict[str, VersionWatcher]:
    """One version watcher per model track, as both services follow A/B variants.

    Args:
        tracks: ``"current"`` and/or the versions variants pin
            (:meth:`recsys.experiments.Experiment.model_tracks`).
        label: Service name; a pinned track's watcher is ``<label>@<version>``.
        model_dir: Versions root.
        server: The service's settings (its own ``pinned_version`` applies to
            the ``current`` track; ``reload_interval_s``).
        load: ``load(path, track)`` swaps a version into one track.
        redis: Client to read the published pointer from (``current`` track).
        redis_timeout_s: Longest wait for that read.
    """
    out: dict[str, VersionWatcher] = {}
    for track in tracks:
        current = track == CURRENT_VERSION

        async def load_track(path: Path, track: str = track) -> None:
            await load(path, track)

        out[track] = VersionWatcher(
            label=label if current else f"{label}@{track}",
            model_dir=model_dir,
            load=load_track,
            redis=redis,
            pinned=server.pinned_version if current else track,
            interval_s=server.reload_interval_s,
            redis_timeout_s=redis_timeout_s,
        )
    return out


Copy = TypeVar("Copy")


class SharedLoads(Generic[Copy]):
    """Loads each build of a version once for all the model tracks that want it.

    Tracks that want one version (the default arm following the pointer at
    it, an arm pinning it) share one loaded copy: one found among the copies
    the tracks serve, or one still loading. A version rebuilt under its
    number is seen by every track's watcher in the same poll, so matching
    the served copies alone loaded it once per track, and every copy stayed
    in memory. A load that fails fails every track waiting on it with the
    same error, and nothing is kept: the next try loads again. One cut
    short while its owner alone was cancelled is loaded again by the next
    track waiting; a stop cancels every track, and none loads again.

    Args:
        build_of: A loaded copy's version name and manifest digest
            (:func:`recsys.artifacts.manifest_digest`).
    """

    def __init__(self, build_of: Callable[[Copy], tuple[str, str | None]]):
        self.build_of = build_of
        self._loading: dict[tuple[str, str | None], asyncio.Future[Copy]] = {}

    async def get(
        self, path: Path, served: Iterable[Copy], load: Callable[[Path], Awaitable[Copy]]
    ) -> Copy:
        """The loaded copy of the build at ``path``: a served or loading one, else ``load(path)``.

        Args:
            path: The version directory.
            served: The copies the tracks serve now.
            load: Loads (and warms) a copy; its errors reach every caller waiting on it.
        """
        build = (Path(path).name, manifest_digest(path))
        found = next((c for c in served if self.build_of(c) == build), None)
        if found is not None:
            return found
        while (loading := self._loading.get(build)) is not None:
            try:
                # Shielded: this caller's cancellation must not cancel the load.
                return await asyncio.shield(loading)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not loading.cancelled() or (task is not None and task.cancelling()):
                    # This caller was cancelled (perhaps together with the
                    # load's owner, as a stopping service cancels every
                    # track): loading again would hold its stop up.
                    raise
        done: asyncio.Future[Copy] = asyncio.get_running_loop().create_future()
        self._loading[build] = done
        try:
            copy = await load(path)
        except asyncio.CancelledError:
            done.cancel()
            raise
        except BaseException as exc:
            done.set_exception(exc)
            done.exception()  # retrieved: no "never retrieved" log when no track waited
            raise
        finally:
            del self._loading[build]
        done.set_result(copy)
        return copy


async def follow_versions(watchers: Iterable[VersionWatcher]) -> None:
    """Loads every watcher's wanted version now, then follows them all until cancelled."""
    ws = list(watchers)
    for w in ws:
        with contextlib.suppress(Exception):
            await w.poll_once()
    await asyncio.gather(*(w.run() for w in ws))


def _tree_stamp(version_dir: Path) -> tuple[int, ...] | None:
    """What changes when any file of a version is (re)written; None without a manifest.

    A rejected version is retried once this changes. The manifest alone
    is not enough: a copy can land the manifest before the files it lists
    (the version is then rejected as incomplete and must be retried when
    they arrive), and ``cp -a`` / ``rsync -a`` keep mtimes and sizes, so
    a fixed re-copy changes only the files' ctimes.
    """
    if not (version_dir / MANIFEST).is_file():
        return None
    count = size = newest = 0
    for root, _dirs, files in os.walk(version_dir):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue  # removed while walking: the next poll sees the result
            count += 1
            size += st.st_size
            newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
    return count, size, newest
