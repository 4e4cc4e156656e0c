"""The load generator against a real gRPC echo server in a separate process."""

from __future__ import annotations

import json

import pytest

from bench.echo import EchoProcess
from recsys.cli import main as recsys_main
from recsys.loadtest import LoadConfig, known_ids, run_load
from recsys.v1 import ranking_pb2


@pytest.fixture(scope="module")
def echo():
    with EchoProcess() as server:
        yield server


@pytest.fixture(scope="module")
def failing_echo():
    with EchoProcess(fail_every=3, fail_code="RESOURCE_EXHAUSTED") as server:
        yield server


@pytest.fixture(scope="module")
def refusing_echo():
    with EchoProcess(fail_every=1, fail_code="RESOURCE_EXHAUSTED") as server:
        yield server


@pytest.fixture(scope="module")
def slow_echo():
    # 20 ms per call, one call at a time: at most 50 calls per second.
    with EchoProcess(delay_ms=20, serial=True) as server:
        yield server


async def test_closed_loop_against_echo(echo):
    cfg = LoadConfig(
        rpc="Recommend", target=echo.address, concurrency=20, duration_s=1.0, warmup_s=0.2
    )
    report = await run_load(cfg)
    assert report.errors == {}
    assert report.sent > 50 and report.qps > 0
    assert report.ok == report.sent == report.latency.count
    assert report.qps == pytest.approx(report.sent / report.elapsed_s)
    assert report.channels == 2
    assert 0 < report.latency.p50_ms <= report.latency.p99_ms <= report.latency.max_ms
    assert report.client_cpu_s > 0


@pytest.mark.parametrize("rpc", ["Rank", "Retrieve", "SimilarItems"])
async def test_every_rpc_reaches_echo(echo, rpc):
    report = await run_load(
        LoadConfig(rpc=rpc, target=echo.address, concurrency=4, requests=40, duration_s=None)
    )
    assert report.sent == report.ok == 40


async def test_calls_spread_over_every_address_of_the_target(echo, refusing_echo):
    # A target that resolves to several backends (a headless Service's pods) gets
    # calls on all of them, even from one channel: here one backend answers every
    # call and the other refuses every call, so each outcome shows up.
    both = f"ipv4:{echo.address},{refusing_echo.address}"
    cfg = LoadConfig(rpc="SimilarItems", target=both, concurrency=4, requests=40, duration_s=None)
    assert cfg.channels == 1
    report = await run_load(cfg)
    assert report.sent == 40
    assert report.ok >= 10 and report.errors.get("RESOURCE_EXHAUSTED", 0) >= 10, report.errors


async def test_error_codes_are_counted(failing_echo):
    # The server fails every third call it sees; with a count bound it sees exactly 30.
    cfg = LoadConfig(
        rpc="Rank", target=failing_echo.address, concurrency=4, requests=30, duration_s=None
    )
    report = await run_load(cfg)
    assert report.sent == 30
    assert report.errors == {"RESOURCE_EXHAUSTED": 10}
    assert report.ok == 20 == report.latency.count
    assert "fails on purpose" in report.error_examples["RESOURCE_EXHAUSTED"]


async def test_no_coordinated_omission_against_a_slow_server(slow_echo):
    # Open loop at 100/s for 40 calls against a 50/s server: the schedule ends
    # at 0.39 s but the server needs about 0.8 s, so the last calls wait ~0.4 s.
    open_loop = await run_load(
        LoadConfig(
            rpc="Recommend",
            target=slow_echo.address,
            rate=100,
            concurrency=64,
            requests=40,
            duration_s=None,
        )
    )
    assert open_loop.ok == 40
    assert open_loop.latency.max_ms > 300
    assert open_loop.latency.p90_ms > 200
    # The same server measured closed loop with one worker: just the service time.
    closed = await run_load(
        LoadConfig(
            rpc="Recommend", target=slow_echo.address, concurrency=1, requests=10, duration_s=None
        )
    )
    assert 15 < closed.latency.p50_ms < 150
    assert open_loop.latency.p90_ms > 2 * closed.latency.p50_ms


async def test_an_open_loop_run_behind_schedule_still_ends_on_time(slow_echo):
    """At 200/s for 1 s against a 50/s server, the run ends near 1 s, not ~4 s later."""
    import time

    start = time.perf_counter()
    report = await run_load(
        LoadConfig(rpc="Recommend", target=slow_echo.address, rate=200, concurrency=4,
                   duration_s=1.0)
    )  # fmt: skip
    took = time.perf_counter() - start
    assert took < 2.5, f"the run went on for {took:.1f} s"
    assert report.sent < 150 and report.not_sent > 0
    assert report.sent + report.not_sent == 200, "every call due before the end is accounted for"
    assert "not sent" in report.table()


def test_a_count_bounded_run_is_not_cut_at_the_default_duration(monkeypatch, echo, tmp_path):
    """--requests alone: the 10 s default applies only when no bound is given."""
    from recsys import loadtest

    seen = {}
    real = loadtest.LoadConfig

    def spy(**kw):
        seen.update(kw)
        return real(**kw)

    monkeypatch.setattr(loadtest, "LoadConfig", spy)
    args = ["loadtest", "--target", echo.address, "--requests", "5", "--concurrency", "1",
            "--json", "--model-dir", str(tmp_path / "none")]  # fmt: skip
    assert recsys_main(args) == 0
    assert seen["duration_s"] is None and seen["requests"] == 5
    assert recsys_main([*args[:3], "--duration", "0.3", "--json", "--model-dir", args[-1]]) == 0
    assert seen["duration_s"] == 0.3
    monkeypatch.setattr(loadtest, "DEFAULT_DURATION_S", 0.2)  # no bound given: the default
    assert recsys_main([*args[:3], "--json", "--model-dir", args[-1], "--concurrency", "1"]) == 0
    assert seen["duration_s"] == 0.2 and seen["requests"] is None


async def test_open_loop_holds_the_rate_against_echo(echo):
    report = await run_load(
        LoadConfig(rpc="Recommend", target=echo.address, rate=200, concurrency=8, duration_s=1.0)
    )
    assert report.sent == 200 and report.errors == {}
    assert report.qps == pytest.approx(200, rel=0.3)
    assert report.send_lag is not None
    assert report.connected and "accepted no connection" not in report.table()


async def test_unreachable_target_reports_unavailable():
    from recsys.embedded_redis import free_port

    cfg = LoadConfig(
        target=f"127.0.0.1:{free_port()}", concurrency=2, requests=4, duration_s=None, timeout_s=1
    )
    report = await run_load(cfg)
    assert report.ok == 0 and report.sent == 4
    assert set(report.errors) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert not report.connected and "accepted no connection" in report.table()


@pytest.mark.parametrize("target", ["dns:///", "dns://localhost:50052"])
def test_a_target_grpc_cannot_open_is_refused_and_the_run_ends(target):
    """Waiting for such a channel to be ready hung the process at exit: no report, no end."""
    import subprocess
    import sys

    code = (
        "import asyncio\n"
        "from recsys.loadtest import LoadConfig, run_load\n"
        f"cfg = LoadConfig(target={target!r}, requests=2, duration_s=None, timeout_s=1)\n"
        "asyncio.run(run_load(cfg))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "LoadTestError: target: gRPC cannot open a channel" in done.stderr, done.stderr


def test_cli_json(echo, capsys, tmp_path):
    code = recsys_main(
        [
            "loadtest", "--rpc", "SimilarItems", "--target", echo.address, "--requests", "25",
            "--concurrency", "5", "--json", "--model-dir", str(tmp_path / "none"),
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["sent"] == 25 and doc["ok"] == 25 and doc["rpc"] == "SimilarItems"
    assert doc["latency"]["p99_ms"] > 0
    assert "synthetic user ids" in out.err


def test_cli_table_with_known_users(echo, trained_version, capsys):
    users, items, version = known_ids(trained_version.parent)
    assert version == trained_version.name
    assert len(users) == 300 and len(items) == 250
    code = recsys_main(
        [
            "loadtest", "--rpc", "Rank", "--target", echo.address, "--requests", "20",
            "--concurrency", "2", "--users", "zipf", "--candidates", "100",
            "--model-dir", str(trained_version.parent),
        ]
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "users zipf over 300" in text and "requests" in text and "p99.9" in text


def test_echo_answers_at_the_real_size(echo):
    import grpc

    from recsys.v1 import ranking_pb2_grpc

    with grpc.insecure_channel(echo.address) as ch:
        stub = ranking_pb2_grpc.RankingServiceStub(ch)
        resp = stub.Recommend(ranking_pb2.RecommendRequest(k=20), timeout=5)
        assert len(resp.items) == 20 and len(resp.source_reports) == 4
        assert all(i.title and i.reasons for i in resp.items)
        ranked = stub.Rank(
            ranking_pb2.RankRequest(candidate_item_ids=["a", "b", "c"], top_k=20), timeout=5
        )
        assert len(ranked.items) == 3


async def test_inspect_flags_responses_in_the_measured_phase_only(echo):
    def short(resp: bytes) -> str | None:
        items = ranking_pb2.RecommendResponse.FromString(resp).items
        return "short" if len(items) < 20 else None

    common = {"rpc": "Recommend", "target": echo.address, "concurrency": 2, "inspect": short}
    few = await run_load(LoadConfig(k=10, requests=30, duration_s=None, warmup_s=0.2, **common))
    assert few.flagged == {"short": 30} and few.ok == 30
    full = await run_load(LoadConfig(k=20, requests=30, duration_s=None, **common))
    assert full.flagged == {} and full.ok == 30


async def test_relay_carries_each_call_through_a_batched_hop():
    """The topology floor of bench/e2e.py answers with the given bytes, batching upstream."""
    import grpc

    from bench.relay import RelayProcess

    answer = ranking_pb2.RecommendResponse(model_version="7").SerializeToString()
    with RelayProcess(answer=answer, member_bytes=500) as relay:
        async with grpc.aio.insecure_channel(relay.address) as ch:
            call = ch.unary_unary("/recsys.v1.RankingService/Recommend")
            got = await call(b"", timeout=10)
        assert ranking_pb2.RecommendResponse.FromString(got).model_version == "7"
        cfg = LoadConfig(rpc="Recommend", target=relay.address, concurrency=32, requests=400)
        report = await run_load(cfg)
        assert report.errors == {} and report.ok == 400
        # Both ends are separate processes, as the services are.
        assert set(relay.pids) == {"relay_front", "relay_leaf"}
    assert relay.port is None and relay.procs == []


def test_ids_come_from_the_version_redis_names(trained_version, tmp_path, redis_url):
    """After a rollback the newest directory is not the served version."""
    import shutil

    import redis

    from recsys import redis_keys
    from recsys.config import load_settings
    from recsys.loadtest import _published_version

    models = tmp_path / "models"
    shutil.copytree(trained_version, models / trained_version.name)
    newer = models / "9"
    shutil.copytree(trained_version, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["version"] = "9"
    (newer / "manifest.json").write_text(json.dumps(manifest))
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(redis_keys.CURRENT_VERSION, trained_version.name)
        served = _published_version(load_settings(redis_url=redis_url))
    finally:
        client.delete(redis_keys.CURRENT_VERSION)
        client.close()
    assert served == trained_version.name
    assert known_ids(models, served)[2] == trained_version.name
    assert known_ids(models)[2] == "9"  # without Redis: the newest
    assert known_ids(models, "42")[2] == "9"  # a version the dir lacks: the newest
    assert _published_version(load_settings(redis_url="redis://127.0.0.1:1/0")) is None
