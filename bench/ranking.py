"""Ranking benchmarks: scoring strategies, micro-batching, RPC load, a 1M-item catalogue.

Every figure is measured in this run on this machine, and speed is reported
as a ratio against a baseline measured in the same run:

* **scoring**: 1,000 candidates for one user scored (a) the course lab's
  way, Keras ``model.predict`` over 1,000 (user, item) pairs of the full
  two-tower model; (b) the same full model in a ``tf.function`` on the
  pairs; (c) the service's way, user tower once + the cached item vectors
  (``ranking_service.model.score_batch``: tower, gather, dot, top-k). All
  three use the same weights and must agree on the scores.
* **batching**: in-process requests/s of the micro-batcher at growing
  concurrency, against concurrency 1 and against batching switched off.
* **rpc**: ``Rank`` under 64 closed-loop streams of 1,000 candidates from
  ``recsys.loadtest``, against the bare echo server of the same message
  shape (``bench.echo``), both in their own processes.
* **catalogue**: a 1,000,000-item version: load time, and the item vectors
  resident once in memory when two serving processes map them.

Run: ``python -m bench --only ranking`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench import common

TOP_K = 20
N_CANDIDATES = 1000


def _median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _device() -> str:
    from ranking_service.model import resolve_device

    return resolve_device(os.environ.get("RECSYS_RANKING__DEVICE", "auto"))


# --- (a) / (b) / (c) ------------------------------------------------------------------


def scoring(root: Path, quick: bool) -> dict[str, Any]:
    import tensorflow as tf

    from ranking_service.model import LoadedModel, ScoreRequest, score_batch, top_k
    from ranking_service.testing import SPEC, write_synthetic_version
    from recsys.features import UserProfile, aggregates_from_genre_ratings, user_feature_vector
    from trainer.model import build_two_tower

    n_items = 2000 if quick else 5000
    tf.keras.utils.set_random_seed(0)
    two = build_two_tower(SPEC)  # the trainer's default sizes: (256, 128) hidden, D = 32
    version = write_synthetic_version(root, n_items=n_items, two_tower=two, annoy_trees=1)
    model = LoadedModel.load(version, _device())
    rng = np.random.default_rng(0)
    rows = rng.choice(n_items, N_CANDIDATES, replace=False).astype(np.int64)
    user = user_feature_vector(
        SPEC,
        UserProfile(age=30, country=SPEC.countries[0]),
        aggregates_from_genre_ratings(SPEC, {"Comedy": 4.5, "Horror": 2.0}),
    )
    item_features = np.asarray(model.version.item_features)

    def lab() -> np.ndarray:
        pairs_u = np.repeat(user[None, :], N_CANDIDATES, axis=0)
        dots = two.model.predict([pairs_u, item_features[rows]], verbose=0).reshape(-1)
        return rows[top_k(dots, TOP_K)], dots

    spec_u = tf.TensorSpec([None, SPEC.n_user_features], tf.float32)
    spec_i = tf.TensorSpec([None, SPEC.n_item_features], tf.float32)
    full = tf.function(
        lambda u, i: two.model([u, i], training=False), input_signature=[spec_u, spec_i]
    )

    def full_fn() -> np.ndarray:
        pairs_u = np.repeat(user[None, :], N_CANDIDATES, axis=0)
        dots = full(pairs_u, item_features[rows]).numpy().reshape(-1)
        return rows[top_k(dots, TOP_K)], dots

    def served() -> np.ndarray:
        (res,) = score_batch([ScoreRequest(model, user, rows, TOP_K)])
        return res.rows, res.dots

    # Warm-up (graph tracing, first-call costs) is not what a request pays.
    a_rows, a_dots = lab()
    _b_rows, b_dots = full_fn()
    c_rows, _c_dots = served()
    (all_c,) = score_batch([ScoreRequest(model, user, rows, N_CANDIDATES)])
    c_by_row = dict(zip(all_c.rows.tolist(), all_c.dots.tolist(), strict=True))
    c_full = np.array([c_by_row[r] for r in rows.tolist()])
    agree = {
        "max_abs_diff_lab_vs_served": float(np.max(np.abs(a_dots - c_full))),
        "max_abs_diff_tf_function_vs_served": float(np.max(np.abs(b_dots - c_full))),
        "same_top_k": bool(set(a_rows.tolist()) == set(c_rows.tolist())),
    }
    reps_a, reps_b, reps_c = (5, 50, 200) if quick else (20, 200, 1000)
    t_a = _median_s(lab, reps_a)
    t_b = _median_s(full_fn, reps_b)
    t_c = _median_s(served, reps_c)
    out = {
        "device": model.device,
        "candidates": N_CANDIDATES,
        "catalogue_items": n_items,
        "model": two.config,
        "a_lab_predict_ms": t_a * 1e3,
        "b_tf_function_ms": t_b * 1e3,
        "c_tower_once_cached_vectors_ms": t_c * 1e3,
        "speedup_vs_lab": t_a / t_c,
        "speedup_vs_tf_function": t_b / t_c,
        "agreement": agree,
        "reps": {"a": reps_a, "b": reps_b, "c": reps_c},
    }
    print(
        f"scoring {N_CANDIDATES} candidates, device {model.device}: "
        f"(a) lab predict {t_a * 1e3:.2f} ms, (b) tf.function {t_b * 1e3:.2f} ms, "
        f"(c) tower once + cached vectors {t_c * 1e3:.3f} ms -> "
        f"{t_a / t_c:.0f}x vs (a), {t_b / t_c:.1f}x vs (b); "
        f"max |dot diff| {agree['max_abs_diff_lab_vs_served']:.2e}",
        flush=True,
    )
    return out


# --- micro-batching in process ------------------------------------------------------------


async def _closed_loop(batcher, request, concurrency: int, seconds: float) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await batcher.submit(request)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - t0)


def batching(version: Path, quick: bool) -> dict[str, Any]:
    from ranking_service.model import LoadedModel, ScoreRequest, score_batch
    from recsys.batching import MicroBatcher

    model = LoadedModel.load(version, _device())
    rows = np.random.default_rng(1).choice(len(model.index), N_CANDIDATES, replace=False)
    request = ScoreRequest(model, model.default_features, rows.astype(np.int64), TOP_K)
    seconds = 1.0 if quick else 3.0
    levels = (1, 4, 16, 64)

    async def measure() -> dict[str, Any]:
        out: dict[str, Any] = {}
        sizes: list[int] = []
        batched = MicroBatcher(
            score_batch, max_batch_size=64, max_wait_s=0.001, on_batch=sizes.append
        )
        single = MicroBatcher(score_batch, max_batch_size=1, max_wait_s=0.0)
        try:
            await _closed_loop(batched, request, 4, 0.3)  # warm-up
            for c in levels:
                sizes.clear()
                out[f"rps_concurrency_{c}"] = await _closed_loop(batched, request, c, seconds)
                out[f"mean_batch_concurrency_{c}"] = float(np.mean(sizes)) if sizes else 0.0
            out["rps_concurrency_64_unbatched"] = await _closed_loop(single, request, 64, seconds)
        finally:
            await batched.close()
            await single.close()
        return out

    out = asyncio.run(measure())
    out["growth_64_vs_1"] = out["rps_concurrency_64"] / out["rps_concurrency_1"]
    out["batched_vs_unbatched_at_64"] = (
        out["rps_concurrency_64"] / out["rps_concurrency_64_unbatched"]
    )
    print(
        "micro-batching (in process, 1,000 candidates): "
        + ", ".join(f"c={c}: {out[f'rps_concurrency_{c}']:.0f} req/s" for c in levels)
        + f"; 64 unbatched {out['rps_concurrency_64_unbatched']:.0f} req/s",
        flush=True,
    )
    return out


# --- Rank over gRPC vs the echo server -----------------------------------------------------


def _scrape_batch_sizes(metrics_port: int) -> dict[str, float]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    except OSError:
        return {}
    total = count = 0.0
    for line in text.decode().splitlines():
        if line.startswith("recsys_ranking_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("recsys_ranking_batch_size_count"):
            count = float(line.split()[-1])
    return {"batches": count, "mean_batch_size": total / count if count else 0.0}


# Server processes compared for Rank; the figures and targets below are the one-process run's.
RANK_WORKERS = (1, 2)


RANK_USERS = [f"load-user-{i}" for i in range(1000)]


def rank_load(target: str, item_ids: list[str], duration_s: float, warmup_s: float):
    """The ``Rank`` load this benchmark and ``bench.ab --rpc Rank`` put on ``target``.

    64 closed-loop streams, each call 1,000 candidates drawn from
    ``item_ids`` for one of 1,000 users the model does not know: every call
    reads Redis, finds no state and ranks with the default user features.
    """
    from recsys.loadtest import LoadConfig

    return LoadConfig(
        rpc="Rank", target=target, concurrency=64, duration_s=duration_s, warmup_s=warmup_s,
        user_ids=RANK_USERS, item_ids=item_ids, candidates=N_CANDIDATES, k=TOP_K,
        timeout_s=10.0,
    )  # fmt: skip


def rpc_load(version: Path, quick: bool) -> dict[str, Any]:
    from bench.echo import EchoProcess
    from ranking_service.testing import wait_serving
    from recsys.artifacts import ModelVersion
    from recsys.embedded_redis import EmbeddedRedis, free_port
    from recsys.loadtest import LoadConfig, run_load

    mv = ModelVersion.open(version)
    item_ids = list(mv.item_ids)
    duration, warmup = (3.0, 1.0) if quick else (10.0, 2.0)

    def config(target: str) -> LoadConfig:
        return rank_load(target, item_ids, duration, warmup)

    out: dict[str, Any] = {}
    by_workers: dict[int, Any] = {}
    with EmbeddedRedis() as redis, tempfile.TemporaryDirectory() as tmp:
        # One server process, then RANK_WORKERS on one port (recsys.serving.run_service).
        for workers in RANK_WORKERS:
            port_file = Path(tmp) / f"port-{workers}"
            # The supervisor serves every worker's metrics on metrics_port.
            metrics_port = free_port()
            env = {**os.environ, "RECSYS_REDIS_URL": redis.url, "RECSYS_LOG_LEVEL": "WARNING"}
            cmd = [
                sys.executable, "-m", "recsys.cli", "serve", "ranking", "--model-dir",
                str(version.parent), "--host", "127.0.0.1", "--port", "0", "--metrics-port",
                str(metrics_port), "--port-file", str(port_file), "--workers", str(workers),
            ]  # fmt: skip
            proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 180
                while not port_file.is_file():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("ranking server did not start")
                    time.sleep(0.1)
                address = f"127.0.0.1:{int(port_file.read_text())}"
                asyncio.run(wait_serving(address, timeout_s=180))
                if workers == 1:
                    # The echo baseline replays a real answer, as e2e's does: its
                    # made-up one was twice the bytes, which flattered the ratio.
                    sample = common.capture_answer(address, config(address))
                by_workers[workers] = asyncio.run(run_load(config(address)))
                if workers == 1:
                    out["batching_under_load"] = _scrape_batch_sizes(metrics_port)
            finally:
                proc.terminate()
                proc.wait(30)
    with EchoProcess(fixed={"Rank": sample}) as echo:
        base = asyncio.run(run_load(config(echo.address)))
    out["answer_bytes"] = len(sample)
    out["by_workers"] = {
        str(w): {
            "rank_qps": r.ok_qps,
            "rank_p50_ms": r.latency.p50_ms,
            "rank_p99_ms": r.latency.p99_ms,
            "rank_errors": r.error_count,
            "rank_vs_echo": r.ok_qps / base.ok_qps if base.ok_qps else float("nan"),
        }
        for w, r in by_workers.items()
    }
    for w, r in by_workers.items():
        print(
            f"Rank with {w} server process(es): {r.ok_qps:.0f} req/s, p99 "
            f"{r.latency.p99_ms:.1f} ms, {r.error_count} errors",
            flush=True,
        )
    rank = by_workers[1]
    out.update(
        {
            "streams": 64,
            "candidates": N_CANDIDATES,
            "duration_s": duration,
            "rank_qps": rank.ok_qps,
            "rank_errors": rank.error_count,
            "rank_p50_ms": rank.latency.p50_ms,
            "rank_p99_ms": rank.latency.p99_ms,
            "echo_qps": base.ok_qps,
            "echo_p50_ms": base.latency.p50_ms,
            "echo_p99_ms": base.latency.p99_ms,
            "rank_vs_echo": rank.ok_qps / base.ok_qps if base.ok_qps else float("nan"),
            "client_cores_rank": rank.client_cores,
            "client_cores_echo": base.client_cores,
        }
    )
    print(
        f"Rank under 64 streams x {N_CANDIDATES} candidates: {rank.ok_qps:.0f} req/s, "
        f"p50 {rank.latency.p50_ms:.1f} ms, p99 {rank.latency.p99_ms:.1f} ms, "
        f"{rank.error_count} errors; echo {base.ok_qps:.0f} req/s, p99 "
        f"{base.latency.p99_ms:.1f} ms -> {out['rank_vs_echo']:.0%} of echo",
        flush=True,
    )
    return out


# --- 1M-item catalogue ------------------------------------------------------------------


def _smaps_for(path: Path) -> dict[str, int]:
    """kB figures of this process's mappings of ``path``."""
    want = str(path.resolve())
    totals: dict[str, int] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[-1] == want
            continue
        if inside and head and head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
            totals[head[0][:-1]] = totals.get(head[0][:-1], 0) + int(head[1])
    return totals


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _catalogue_child(version: str) -> int:
    """Child process: load the version, touch every vector, report, wait, report memory."""
    from ranking_service.model import LoadedModel, ScoreRequest, score_batch

    t0 = time.perf_counter()
    model = LoadedModel.load(version, "cpu")
    load_s = time.perf_counter() - t0
    n = len(model.index)
    # Score the whole catalogue once so every vector page is resident.
    for start in range(0, n, 200_000):
        rows = np.arange(start, min(n, start + 200_000), dtype=np.int64)
        score_batch([ScoreRequest(model, model.default_features, rows, 1)])
    rng = np.random.default_rng(os.getpid())
    ids = [model.item_id(int(r)) for r in rng.choice(n, N_CANDIDATES, replace=False)]
    times = []
    for _ in range(50):
        t = time.perf_counter()
        rows = model.index.lookup(ids)
        score_batch([ScoreRequest(model, model.default_features, rows, TOP_K)])
        times.append(time.perf_counter() - t)
    print(json.dumps({"load_s": load_s, "rank_1000_ms": float(np.median(times)) * 1e3}), flush=True)
    sys.stdin.readline()  # the parent measures once every child has mapped the file
    vec = Path(version) / "item_vectors.npy"
    print(json.dumps({"smaps": _smaps_for(vec), "rss_kb": _rss_kb()}), flush=True)
    sys.stdin.readline()
    return 0


def catalogue(root: Path, quick: bool) -> dict[str, Any]:
    from ranking_service.testing import write_synthetic_version

    n_items = 200_000 if quick else 1_000_000
    t0 = time.perf_counter()
    version = write_synthetic_version(root, n_items=n_items, dim=32, annoy_trees=1)
    write_s = time.perf_counter() - t0
    vec_mb = (version / "item_vectors.npy").stat().st_size / 2**20
    cmd = [sys.executable, "-m", "bench.ranking", "--catalogue-child", str(version)]
    procs = [
        subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=common.REPO,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        first = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            p.stdin.write("measure\n")
            p.stdin.flush()
        second = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            p.stdin.write("done\n")
            p.stdin.flush()
            p.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    maps = [s["smaps"] for s in second]
    out = {
        "items": n_items,
        "write_version_s": write_s,
        "item_vectors_mb": vec_mb,
        "load_s": [f["load_s"] for f in first],
        "rank_1000_candidates_ms": [f["rank_1000_ms"] for f in first],
        "vectors_rss_mb_per_process": [m.get("Rss", 0) / 1024 for m in maps],
        "vectors_pss_mb_per_process": [m.get("Pss", 0) / 1024 for m in maps],
        "vectors_anonymous_mb_per_process": [m.get("Anonymous", 0) / 1024 for m in maps],
        "process_rss_mb": [s["rss_kb"] / 1024 for s in second],
    }
    pss_total = sum(out["vectors_pss_mb_per_process"])
    # Resident once: the proportional shares of both processes add up to one copy.
    out["vectors_copies_resident"] = pss_total / vec_mb if vec_mb else float("nan")
    print(
        f"{n_items:,}-item catalogue: load {min(out['load_s']):.2f} s, Rank of 1,000 candidates "
        f"{min(out['rank_1000_candidates_ms']):.2f} ms in process; item vectors {vec_mb:.0f} MB, "
        f"2 processes map them with PSS {pss_total:.0f} MB in total "
        f"({out['vectors_copies_resident']:.2f} copies), anonymous "
        f"{sum(out['vectors_anonymous_mb_per_process']):.0f} MB",
        flush=True,
    )
    return out


# --- entry point ---------------------------------------------------------------------


def run(quick: bool = False) -> dict:
    print(common.header("ranking", "ranking", quick), flush=True)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ranking-") as tmp:
        root = Path(tmp)
        result["scoring"] = s = scoring(root / "scoring", quick)
        version = root / "scoring" / "1"
        result["batching"] = b = batching(version, quick)
        result["rpc"] = r = rpc_load(version, quick)
        result["catalogue"] = c = catalogue(root / "catalogue", quick)
    result["device"] = s["device"]
    result["ratios"] = {
        "served_vs_lab_predict": common.ratio(
            s["a_lab_predict_ms"], s["c_tower_once_cached_vectors_ms"], unit="ms/ms (speed-up)"
        ),
        "served_vs_tf_function": common.ratio(
            s["b_tf_function_ms"], s["c_tower_once_cached_vectors_ms"], unit="ms/ms (speed-up)"
        ),
        "rank_vs_echo_qps": common.ratio(r["rank_qps"], r["echo_qps"], unit="req/s"),
        "rank_2_workers_vs_1_qps": common.ratio(
            r["by_workers"]["2"]["rank_qps"], r["rank_qps"], unit="req/s"
        ),
        "batching_growth_64_vs_1": common.ratio(
            b["rps_concurrency_64"], b["rps_concurrency_1"], unit="req/s"
        ),
    }
    result["targets"] = [
        common.target("served >= 100x lab predict", s["speedup_vs_lab"], ">=", 100.0),
        common.target("served >= 3x tf.function", s["speedup_vs_tf_function"], ">=", 3.0),
        common.target("Rank qps >= 40% of echo", r["rank_vs_echo"], ">=", 0.4),
        common.target("Rank p99 ms <= 25", r["rank_p99_ms"], "<=", 25.0),
        common.target("Rank errors under load == 0", float(r["rank_errors"]), "==", 0.0),
        # Both sides: no mapping at all (each process reading the file into
        # private memory) gives 0 copies of the mapping, which "<= 1.1" passed.
        common.target(
            f"{common.count_label(c['items'])} vectors resident once (|copies - 1|)",
            abs(c["vectors_copies_resident"] - 1.0),
            "<=",
            0.1,
        ),
    ]
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--catalogue-child":
        sys.exit(_catalogue_child(sys.argv[2]))
    print(json.dumps(common.jsonable(run(quick="--quick" in sys.argv)), indent=2))
