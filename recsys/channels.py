"""Client channels: one builder for the Python client and the ranking→retrieval hop.

Retries and load balancing come from gRPC's own service config rather than
hand-written loops: ``UNAVAILABLE`` and ``CANCELLED`` (what a server that
is going away answers) are retried with exponential backoff, and
``round_robin`` spreads calls over every address a ``dns:///`` target
resolves to. That matters on Kubernetes: HTTP/2 keeps one
long-lived connection, so behind a ClusterIP every call would go to the one
pod the connection landed on; a headless Service plus ``dns:///`` and
round-robin gives one subchannel per pod.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc

from recsys.config import TLSSettings
from recsys.serving import channel_credentials, grpc_options

SERVICES = ("recsys.v1.RankingService", "recsys.v1.RetrievalService")


def service_config(*, max_attempts: int = 4, round_robin: bool = True) -> str:
    """Service config JSON: retry UNAVAILABLE and CANCELLED with backoff; optional round-robin.

    ``max_attempts`` below 2 leaves the retry policy out (gRPC rejects a
    policy with fewer than two attempts, failing every call on the channel).
    """
    method: dict = {"name": [{"service": s} for s in SERVICES]}
    if max_attempts >= 2:
        method["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            # CANCELLED too: a server that stops answers the calls it had not
            # dispatched yet with it, which a caller racing a replica's drain
            # meets. gRPC never retries a cancel the caller made itself, and
            # every method is safe to repeat (RecordInteraction by its event_id).
            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
        }
    cfg: dict = {"methodConfig": [method]}
    if round_robin:
        cfg["loadBalancingConfig"] = [{"round_robin": {}}]
        # Client-side health checking (gRPC A17): each subchannel watches the
        # backend's grpc.health.v1 status, so a replica that goes NOT_SERVING
        # (draining on SIGTERM, or still loading a model) gets no new calls
        # while its in-flight calls finish. Backends without a health service
        # count as healthy.
        cfg["healthCheckConfig"] = {"serviceName": ""}
    return json.dumps(cfg)


def channel_options(
    max_message_bytes: int = 16 * 1024 * 1024, *, max_attempts: int = 4, round_robin: bool = True
) -> list[tuple[str, object]]:
    """Options for a client channel: limits, keepalive, retries, balancing."""
    return [
        *grpc_options(max_message_bytes),
        # gRPC's default reconnect backoff grows to minutes; a replica restarted
        # in a rolling update would sit unused that long, and once the other
        # replica drains every call fails. Reconnect at least every second.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(max_attempts=max_attempts, round_robin=round_robin)),
    ]


def create_channel(
    target: str,
    *,
    aio: bool = False,
    tls: TLSSettings | None = None,
    tls_setting: str = "tls",
    max_message_bytes: int = 16 * 1024 * 1024,
    max_attempts: int = 4,
    round_robin: bool = True,
):
    """Opens a (blocking or asyncio) channel with the project's defaults.

    Args:
        target: ``host:port`` or ``dns:///name:port`` (round-robin over all
            resolved addresses, e.g. a Kubernetes headless Service).
        aio: Return a ``grpc.aio.Channel`` instead of a blocking one.
        tls: TLS settings; a CA (and for mutual TLS a client cert/key) when
            enabled. ``None`` or no files means plaintext.
        tls_setting: Where ``tls`` sits in the config, for the message
            about an unusable file (``ranking.retrieval_tls``).
        max_message_bytes: Largest message either way.
        max_attempts: Attempts per call for UNAVAILABLE (1 disables retries).
        round_robin: Balance over all resolved addresses.

    Raises:
        UserFacingError: A TLS file is unusable (the message names it and
            ``tls_setting``).
    """
    options = channel_options(max_message_bytes, max_attempts=max_attempts, round_robin=round_robin)
    secure = tls is not None and (tls.ca_file is not None or tls.enabled)
    mod = grpc.aio if aio else grpc
    if secure:
        return mod.secure_channel(target, channel_credentials(tls, tls_setting), options=options)
    return mod.insecure_channel(target, options=options)


async def wait_serving(
    address: str, service: str, *, tls: TLSSettings | None = None, timeout_s: float = 60.0
) -> None:
    """Polls ``grpc.health.v1.Health/Check`` until ``service`` at ``address`` is SERVING.

    Tolerates a server that is not listening yet; every call carries a
    deadline, so a lost call is retried rather than awaited forever.

    Raises:
        TimeoutError: Not SERVING within ``timeout_s``.
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    # A plain channel: a health-watching one would hold the Check itself back
    # until the backend is already SERVING.
    async with create_channel(address, aio=True, tls=tls, round_robin=False) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} at {address} not SERVING after {timeout_s} s")
            await asyncio.sleep(0.05)
