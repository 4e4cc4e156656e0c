"""``recsys serve retrieval`` as a real process: port file, SERVING, answers, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from retrieval_service.server import SERVICE_NAME


def test_serve_retrieval_process(published_version: Path, redis_url: str, tmp_path: Path):
    port_file = tmp_path / "port"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recsys.cli",
            "serve",
            "retrieval",
            "--model-dir",
            str(published_version.parent),
            "--redis-url",
            redis_url,
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--port-file",
            str(port_file),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no port file"
            time.sleep(0.05)
        port = int(port_file.read_text())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            while health.Check(check, timeout=5).status != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "never SERVING"
                time.sleep(0.05)
            res = retrieval_pb2_grpc.RetrievalServiceStub(channel).Retrieve(
                retrieval_pb2.RetrieveRequest(
                    user=common_pb2.UserContext(user_id="cli-user"), budget=10
                ),
                timeout=5,
            )
            assert res.index_version == published_version.name and len(res.candidates) == 10
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        logs = proc.stderr.read()
        assert '"msg": "draining"' in logs and '"msg": "stopped"' in logs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
