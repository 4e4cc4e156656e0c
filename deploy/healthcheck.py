"""Container health check: exit 0 only when a gRPC service reports SERVING.

Used by ``deploy/compose.yaml``; Kubernetes uses its native gRPC probes,
which cannot speak TLS, so a deployment with TLS on runs this as an exec
probe instead (docs/deploy.md). It speaks the standard
``grpc.health.v1.Health/Check`` protocol, so it reports exactly what the
services' health servicer says: NOT_SERVING until a model version is loaded
and warmed, and again while draining on SIGTERM.

    python /opt/recsys/healthcheck.py --service recsys.v1.RetrievalService 127.0.0.1:50051
    python /opt/recsys/healthcheck.py --tls-ca ca.pem --tls-cert c.pem --tls-key c.key \
        --tls-server-name retrieval.recsys.svc 127.0.0.1:50051

Exit codes: 0 SERVING, 1 any other status, 2 no answer (connection refused,
timeout, unknown service) or a check that cannot run (bad flags, a TLS file
it cannot read).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(
    address: str,
    service: str = "",
    timeout_s: float = 3.0,
    *,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_server_name: str | None = None,
) -> int:
    """Asks ``address`` for the health of ``service``.

    Args:
        address: ``host:port`` of the gRPC server.
        service: Service name to ask about; ``""`` is the whole server.
        timeout_s: Deadline for the call, connection included.
        tls_ca: CA of the server's certificate (PEM); given, the call uses TLS.
        tls_cert: This check's client certificate, for a server that requires one.
        tls_key: Its private key.
        tls_server_name: The name the server's certificate carries, when the
            address (a loopback one in a probe) is not it.

    Returns:
        The process exit code: 0 SERVING, 1 another status, 2 no answer.
    """
    if tls_ca is None:
        channel = grpc.insecure_channel(address)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(tls_ca),
            private_key=_read(tls_key) if tls_key else None,
            certificate_chain=_read(tls_cert) if tls_cert else None,
        )
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        channel = grpc.secure_channel(address, creds, options=options)
    with channel:
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


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="service name (default: whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    parser.add_argument("--tls-ca", help="CA of the server's certificate: call over TLS")
    parser.add_argument("--tls-cert", help="client certificate (a server requiring one)")
    parser.add_argument("--tls-key", help="client private key")
    parser.add_argument("--tls-server-name", help="name on the server's certificate")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        parser.error("--tls-cert needs --tls-ca")
    try:
        return check(
            args.address,
            args.service,
            args.timeout,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
        )
    except OSError as exc:  # a broken TLS mount is not the server's status (exit 1)
        print(f"cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
