"""Container health check: exit 0 only when a gRPC service reports SERVING.

Used by ``deploy/compose.yaml`` (Kubernetes uses its native gRPC probes
instead). It speaks the standard ``grpc.health.v1.Health/Check`` protocol, so
it reports exactly what the services' health servicer says: NOT_SERVING until
a model version is loaded and warmed, and again while draining on SIGTERM.

    python /opt/recsys/healthcheck.py --service recsys.v1.RetrievalService 127.0.0.1:50051

Exit codes: 0 SERVING, 1 any other status, 2 no answer (connection refused,
timeout, unknown service).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 3.0) -> int:
    """Asks ``address`` for the health of ``service``.

    Args:
        address: ``host:port`` of the gRPC server (plaintext).
        service: Service name to ask about; ``""`` is the whole server.
        timeout_s: Deadline for the call, connection included.

    Returns:
        The process exit code: 0 SERVING, 1 another status, 2 no answer.
    """
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            print(f"{address} {service or '<server>'}: {exc.code().name}", file=sys.stderr)
            return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return 0
    print(f"{address} {service or '<server>'}: {status}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="service name (default: whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    return check(args.address, args.service, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
