"""Retrieval benchmark: Annoy recall/latency and ``Retrieve`` latency + Redis round trips.

Figures and their baselines (measured in the same run):

* ``annoy``: an Annoy index (angular, 50 trees: the trainer's default) over
  100,000 x 32 unit vectors drawn around 200 cluster centres (learned item
  embeddings are clustered, isotropic noise is not). For each ``search_k``
  in a sweep: recall@10 against exact brute force over the same vectors
  and the median / p99 query time of ``get_nns_by_item``. Baseline: an
  exact numpy top-10 (one matrix-vector product + ``argpartition``) per
  query; the ratio is Annoy median / exact median. The operating point is
  the smallest swept ``search_k`` with recall >= 0.95.
* ``retrieve``: the service's ``Retrieve`` path in-process (hydrate, 4
  default sources, merge/filter/interleave, protobuf response serialised)
  against a real embedded Redis holding the published version, budget 500,
  over MovieLens 100K users (trained for a few epochs; a synthetic dataset
  of the same shape when the data is absent). Server-side p50/p99, Redis
  round trips per request counted on the client's socket writes, and the
  ratio to one pipelined Redis round trip (the floor any Redis-backed
  retrieval pays). End-to-end gRPC latency over loopback is reported too.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, header, ratio, target

SHARED_DATA = Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


def _pct(samples: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(samples), p))


# --- Annoy ---------------------------------------------------------------------------


def bench_annoy(quick: bool) -> dict[str, Any]:
    from annoy import AnnoyIndex

    n, dim, k = (20_000 if quick else 100_000), 32, 10
    # Tree count and search_k are both knobs a deployment sets (trainer
    # ``annoy_trees``, source ``search_k``); sweep both and report the cheapest
    # point that reaches the recall target.
    tree_counts = (50,) if quick else (30, 50)
    n_queries = 100 if quick else 500
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, dim))
    x = centres[rng.integers(0, 200, n)] + 0.5 * rng.normal(size=(n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    queries = rng.choice(n, n_queries, replace=False)

    exact: list[set[int]] = []
    exact_times: list[float] = []
    for q in queries:
        t = time.perf_counter()
        cos = x @ x[q]
        cos[q] = -np.inf
        top = np.argpartition(-cos, k)[:k]
        exact_times.append(time.perf_counter() - t)
        exact.append(set(top.tolist()))
    exact_median = _pct(exact_times, 50)

    sweep = []
    build_s: dict[int, float] = {}
    for trees in tree_counts:
        t0 = time.perf_counter()
        index = AnnoyIndex(dim, "angular")
        for i in range(n):
            index.add_item(i, x[i])
        index.build(trees, n_jobs=-1)
        build_s[trees] = time.perf_counter() - t0
        for search_k in (-1, 300, 400, 500, 600, 700, 800, 1000, 1500, 2000):
            times, recalls = [], []
            for q, truth in zip(queries, exact, strict=True):
                t = time.perf_counter()
                rows = index.get_nns_by_item(int(q), k + 1, search_k, True)[0]
                times.append(time.perf_counter() - t)
                got = [r for r in rows if r != q][:k]
                recalls.append(len(truth & set(got)) / k)
            sweep.append(
                {
                    "trees": trees,
                    "search_k": search_k,
                    "recall_at_10": float(np.mean(recalls)),
                    "median_us": _pct(times, 50) * 1e6,
                    "p99_us": _pct(times, 99) * 1e6,
                }
            )
            print(
                f"  annoy trees={trees} search_k={search_k:>5}: "
                f"recall@10 {sweep[-1]['recall_at_10']:.3f}, "
                f"median {sweep[-1]['median_us']:.0f} us, p99 {sweep[-1]['p99_us']:.0f} us"
            )
    good = [s for s in sweep if s["recall_at_10"] >= 0.95]
    point = min(good, key=lambda s: s["median_us"]) if good else sweep[-1]
    print(
        f"  exact numpy top-10 over {n}x{dim}: median {exact_median * 1e6:.0f} us; "
        f"operating point trees={point['trees']} search_k={point['search_k']}"
    )
    return {
        "items": n,
        "dim": dim,
        "trees": point["trees"],
        "queries": n_queries,
        "build_s": build_s[point["trees"]],
        "exact_median_us": exact_median * 1e6,
        "sweep": sweep,
        "operating_point": point,
    }


# --- Retrieve ------------------------------------------------------------------------


def _version(model_dir: Path, quick: bool) -> tuple[Path, str]:
    from trainer.train import TrainConfig, train

    path = SHARED_DATA / "ml-100k"
    if (path / "u.data").is_file():
        from trainer.loaders import load_dataset

        spec = f"movielens-100k:{path}"
        data, name = load_dataset(spec), "movielens-100k"
    else:
        from trainer.synthetic import generate

        data, name = generate(943, 1682, 100_000, 6, 0), "synthetic (ML-100K shape)"
    cfg = TrainConfig(epochs=1 if quick else 3, patience=0, hidden_units=(64, 32))
    result = train(data, model_dir, cfg, evaluate=False, plots=False, quiet=True)
    return result.version_dir, name


async def _retrieve_figures(version_dir: Path, redis_url: str, quick: bool) -> dict[str, Any]:
    import grpc
    import redis.asyncio as aioredis

    from recsys.artifacts import ModelVersion
    from recsys.config import load_settings
    from recsys.user_store import load_user
    from recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
    from retrieval_service.engine import RetrieveQuery
    from retrieval_service.server import build_server
    from retrieval_service.servicer import result_to_pb

    writes = {"n": 0, "connections": 0}

    class Counting(aioredis.Connection):
        """Counts request writes; a new connection's handshake is counted apart."""

        _handshake = False

        async def on_connect(self) -> None:
            writes["connections"] += 1
            self._handshake = True
            try:
                await super().on_connect()
            finally:
                self._handshake = False

        async def send_packed_command(self, command, check_health=True):
            if not self._handshake:
                writes["n"] += 1
            return await super().send_packed_command(command, check_health)

    client = aioredis.Redis(
        connection_pool=aioredis.ConnectionPool.from_url(redis_url, connection_class=Counting)
    )
    settings = load_settings(
        model_dir=version_dir.parent,
        redis_url=redis_url,
        retrieval={"port": 0, "metrics_port": 0, "reload_interval_s": 3600.0},
    )
    handle, app = build_server(settings, redis=client)
    await app.start()
    while app.engine.served is None:
        await asyncio.sleep(0.05)
    engine = app.engine
    mv = ModelVersion.open(version_dir)
    users = [str(u) for u in mv.users["user_id"]]
    rng = np.random.default_rng(1)
    n_calls = 300 if quick else 3000
    sample = [users[i] for i in rng.integers(0, len(users), n_calls)]

    for u in sample[:50]:  # warm-up: connections, caches, code paths
        await engine.retrieve(RetrieveQuery(u, budget=500))

    # Baseline: one pipelined Redis round trip reading the same user state.
    rtt = []
    for u in sample:
        t = time.perf_counter()
        await load_user(client, mv.spec, u, recent_n=settings.retrieval.history_length)
        rtt.append(time.perf_counter() - t)

    times, sizes, statuses = [], [], {}
    writes["n"] = writes["connections"] = 0
    trips = 0
    cpu0 = time.process_time()
    for u in sample:
        t = time.perf_counter()
        result = await engine.retrieve(RetrieveQuery(u, budget=500))
        result_to_pb(result).SerializeToString()
        times.append(time.perf_counter() - t)
        sizes.append(len(result.candidates))
        trips += result.redis_round_trips
        for r in result.reports:
            statuses[r.status.value] = statuses.get(r.status.value, 0) + 1
    cpu_ms = (time.process_time() - cpu0) / n_calls * 1e3
    socket_trips = writes["n"] / n_calls
    new_connections = writes["connections"]

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
    stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    e2e = []
    for u in sample[: n_calls // 3]:
        req = retrieval_pb2.RetrieveRequest(user=common_pb2.UserContext(user_id=u), budget=500)
        t = time.perf_counter()
        await stub.Retrieve(req, timeout=5)
        e2e.append(time.perf_counter() - t)
    await channel.close()
    await app.stop(0)

    p50, p99 = _pct(times, 50) * 1e3, _pct(times, 99) * 1e3
    rtt_p50 = _pct(rtt, 50) * 1e3
    print(
        f"  Retrieve (4 sources, budget 500, {n_calls} calls): server-side p50 {p50:.2f} ms, "
        f"p99 {p99:.2f} ms; CPU {cpu_ms:.2f} ms/request; mean candidates {np.mean(sizes):.0f}; "
        f"source outcomes {statuses}; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"  Redis round trips/request: {socket_trips:.2f} (socket writes), "
        f"{trips / n_calls:.2f} (engine count), {new_connections} connections opened; "
        f"one pipelined round trip p50 {rtt_p50:.3f} ms"
    )
    print(
        f"  gRPC end to end over loopback (client in the same process): "
        f"p50 {_pct(e2e, 50) * 1e3:.2f} ms, p99 {_pct(e2e, 99) * 1e3:.2f} ms"
    )
    return {
        "calls": n_calls,
        "server_p50_ms": p50,
        "server_p99_ms": p99,
        "server_cpu_ms_per_request": cpu_ms,
        "load_avg_1m_after": os.getloadavg()[0],
        "mean_candidates": float(np.mean(sizes)),
        "source_outcomes": statuses,
        "redis_round_trips_per_request": socket_trips,
        "engine_round_trips_per_request": trips / n_calls,
        "redis_connections_opened": new_connections,
        "redis_rtt_p50_ms": rtt_p50,
        "grpc_e2e_p50_ms": _pct(e2e, 50) * 1e3,
        "grpc_e2e_p99_ms": _pct(e2e, 99) * 1e3,
    }


def bench_retrieve(quick: bool) -> dict[str, Any]:
    import redis

    from recsys.embedded_redis import EmbeddedRedis
    from trainer.publish import publish

    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
        version_dir, data_name = _version(Path(tmp) / "models", quick)
        with EmbeddedRedis(persist=False) as server:
            sync = redis.Redis.from_url(server.url)
            publish(version_dir, sync, quiet=True)
            sync.close()
            figures = asyncio.run(_retrieve_figures(version_dir, server.url, quick))
    return {"data": data_name, **figures}


def run(quick: bool = False) -> dict[str, Any]:
    print(header("retrieval: Annoy recall/latency, Retrieve latency and Redis round trips",
                 "retrieval", quick))  # fmt: skip
    annoy = bench_annoy(quick)
    retrieve = bench_retrieve(quick)
    point = annoy["operating_point"]
    return {
        "annoy": annoy,
        "retrieve": retrieve,
        "ratios": {
            "annoy_median_vs_exact_numpy": ratio(
                point["median_us"], annoy["exact_median_us"], unit="us"
            ),
            "retrieve_p50_vs_one_redis_round_trip": ratio(
                retrieve["server_p50_ms"], retrieve["redis_rtt_p50_ms"], unit="ms"
            ),
        },
        "targets": [
            target("annoy recall@10 (100K x 32)", point["recall_at_10"], ">=", 0.95),
            target("annoy median query us at that recall", point["median_us"], "<=", 100.0),
            target("Retrieve server-side p50 ms", retrieve["server_p50_ms"], "<=", 2.0),
            target("Retrieve server-side p99 ms", retrieve["server_p99_ms"], "<=", 10.0),
            target(
                "Redis round trips per Retrieve",
                retrieve["redis_round_trips_per_request"],
                "<=",
                2.0,
            ),
        ],
    }


if __name__ == "__main__":
    run(quick=bool(os.environ.get("QUICK")))
