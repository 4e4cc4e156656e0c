"""Model lifecycle under load: hot reload, corrupt versions, pinning, health, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from ranking_service.server import build_server
from ranking_service.testing import health, ranking_settings, wait_serving
from recsys.artifacts import ModelVersion
from recsys.v1 import ranking_pb2, ranking_pb2_grpc


@pytest.fixture(scope="module")
def second_version(train_version, tmp_path_factory) -> Path:
    """A second real version (manifest version "2"), staged outside any served dir."""
    staging = tmp_path_factory.mktemp("staging")
    (staging / "1").mkdir()  # so the writer numbers the new version 2
    path = train_version(staging, seed=1, epochs=1)
    assert path.name == "2"
    return path


def _staged(src: Path, model_dir: Path, name: str) -> Path:
    """A copy of ``src`` under a temporary name, its manifest numbered ``name``."""
    tmp = model_dir / f".tmp-{name}"
    shutil.copytree(src, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["version"] = name
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    return tmp


def install(src: Path, model_dir: Path, name: str) -> Path:
    """Copies a version in under a temporary name, then renames it into place."""
    tmp = _staged(src, model_dir, name)
    final = model_dir / name
    os.rename(tmp, final)
    return final


def corrupt_copy(src: Path, model_dir: Path, name: str) -> Path:
    tmp = _staged(src, model_dir, name)
    vec = tmp / "item_vectors.npy"
    data = bytearray(vec.read_bytes())
    data[-3] ^= 0x5A  # same size, wrong sha256
    vec.write_bytes(bytes(data))
    final = model_dir / name
    os.rename(tmp, final)
    return final


def rank_req(mv: ModelVersion, i: int) -> ranking_pb2.RankRequest:
    rng = np.random.default_rng(i)
    ids = [mv.item_ids[r] for r in rng.choice(len(mv.item_ids), 100, replace=False)]
    uid = mv.users["user_id"][i % len(mv.users["user_id"])]
    return ranking_pb2.RankRequest(
        user={"user_id": uid}, candidate_item_ids=ids, top_k=10, include_watched=True
    )


async def test_hot_reload_under_load_and_corrupt_version_rejected(
    trained_version, second_version, redis_url, tmp_path
):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    install(trained_version, model_dir, "1")
    mv = ModelVersion.open(model_dir / "1")
    srv = build_server(ranking_settings(model_dir, redis_url, reload_interval_s=0.1))
    await srv.start()
    address = f"127.0.0.1:{srv.port}"
    await wait_serving(address)
    ok: list[str] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def client(n: int, stub) -> None:
        i = n
        while not stop.is_set():
            try:
                r = await stub.Rank(rank_req(mv, i), timeout=10)
                assert len(r.items) == 10
                ok.append(r.model_version)
            except Exception as exc:
                failures.append(repr(exc))
            i += 8

    try:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = ranking_pb2_grpc.RankingServiceStub(ch)
            tasks = [asyncio.ensure_future(client(n, stub)) for n in range(8)]
            await asyncio.sleep(0.5)
            install(second_version, model_dir, "2")
            deadline = time.monotonic() + 60
            while "2" not in ok[-20:] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            n_at_swap = len(ok)
            await asyncio.sleep(0.3)
            # A corrupt version 3 is rejected; 2 keeps serving.
            corrupt_copy(second_version, model_dir, "3")
            deadline = time.monotonic() + 30
            while "3" not in srv.watcher.rejected and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*tasks)
        assert "3" in srv.watcher.rejected and "checksum" in srv.watcher.rejected["3"]
        assert srv.watcher.current == "2"
        assert await health(address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await srv.stop(0)
    assert failures == []
    assert ok.count("1") > 0 and ok.count("2") > 0
    # Once version 2 answered, nothing older came back (the swap is one assignment),
    # and version 3 never answered.
    assert "1" not in ok[n_at_swap:] and "3" not in ok


async def test_not_serving_until_a_version_arrives_then_pinning(
    trained_version, second_version, redis_url, tmp_path
):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    srv = build_server(ranking_settings(model_dir, redis_url))
    await srv.start()
    address = f"127.0.0.1:{srv.port}"
    try:
        await asyncio.sleep(0.4)
        assert await health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        async with grpc.aio.insecure_channel(address) as ch:
            stub = ranking_pb2_grpc.RankingServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Rank(
                    ranking_pb2.RankRequest(candidate_item_ids=["1"], top_k=1), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            install(trained_version, model_dir, "1")
            await wait_serving(address, timeout_s=30)
            mv = ModelVersion.open(model_dir / "1")
            r = await stub.Rank(rank_req(mv, 0), timeout=10)
            assert r.model_version == "1"
    finally:
        await srv.stop(0)
    # Pinned to version 1 while 2 is the newest on disk: serves 1.
    install(second_version, model_dir, "2")
    pinned = build_server(ranking_settings(model_dir, redis_url, pinned_version="1"))
    await pinned.start()
    try:
        await wait_serving(f"127.0.0.1:{pinned.port}")
        assert pinned.watcher.current == "1"
        await asyncio.sleep(0.5)
        assert pinned.watcher.current == "1"
    finally:
        await pinned.stop(0)


async def test_cli_serves_writes_the_port_file_and_drains_on_sigterm(
    trained_version, redis_url, tmp_path
):
    port_file = tmp_path / "ranking.port"
    env = {**os.environ, "RECSYS_REDIS_URL": redis_url, "RECSYS_LOG_FORMAT": "json"}
    cmd = [
        sys.executable, "-m", "recsys.cli", "serve", "ranking",
        "--model-dir", str(trained_version.parent), "--host", "127.0.0.1", "--port", "0",
        "--metrics-port", "0", "--device", "cpu", "--port-file", str(port_file),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not port_file.is_file():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no port file"
            await asyncio.sleep(0.1)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        await wait_serving(address, timeout_s=120)
        mv = ModelVersion.open(trained_version)
        async with grpc.aio.insecure_channel(address) as ch:
            r = await ranking_pb2_grpc.RankingServiceStub(ch).Rank(rank_req(mv, 1), timeout=10)
        assert len(r.items) == 10
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert '"device": "cpu"' in err and "draining" in err and "model ready" in err


def test_cli_refuses_gpu_without_one(trained_version, tmp_path):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    from recsys.cli import main

    argv = ["serve", "ranking", "--model-dir", str(trained_version.parent), "--device", "gpu",
            "--port", "0", "--metrics-port", "0"]  # fmt: skip
    assert main(argv) == 2
