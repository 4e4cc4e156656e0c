"""End-to-end benchmark: ``Recommend`` through both real services vs a bare echo server.

Setup, all on this machine: an embedded Redis, a two-tower model trained on
the built-in synthetic dataset (2,000 users, 1,500 items, 100k ratings) and
published, and the retrieval and ranking services started as separate
processes with ``recsys serve`` (through :func:`recsys.stack.start_stack`,
the code behind ``recsys up``). The request is the issue's: every configured
retrieval source (4), budget 500, top 20, users drawn uniformly from the
known ones. (``Rank`` alone against the echo server, 64 streams of 1,000
candidates, is measured in ``bench/ranking.py``; it is not repeated here.)

The baseline is :mod:`bench.echo` in its own process, answering with the
bytes of a real response captured first, so both runs move the
same bytes through the same gRPC stack. Runs alternate echo/real (twice in
the full run) and the figure that counts is throughput real / echo, which
cancels most of the machine's speed and noise. Every round after the first
runs on freshly started processes (echo, relay and both services): a
process keeps some luck of its own for as long as it runs (where it and
its memory landed), 2-3% in ``bench.ab``'s A/A runs, and new processes per
round draw it again instead of carrying one draw through the whole run.

With one process per service a third baseline runs in the same rounds:
:mod:`bench.relay`, the topology of ``Recommend`` (two servers, one batched
``RetrieveMany`` hop, real answers' sizes) with raw-bytes handlers and no
work. Its throughput and p99 are the floor the RPC layer of this shape
allows on the machine; real / relay is what the services' own work keeps
of it.

Both services run first with one process each, then with two each
(``RECSYS_RETRIEVAL__WORKERS`` / ``RECSYS_RANKING__WORKERS``, the
supervisor in :func:`recsys.serving.run_service`), each against the echo
server in the same run. The targets are checked on the one-process run:
that is the shipped default and what the Kubernetes manifests deploy (they
scale with replicas); the two-process figure is reported beside it.

The load generator runs in this process, separate from every server; its
CPU time and that of each server process (from ``/proc``) are reported, so a
reader can see how the machine's cores were shared.

The closed loop keeps 64 calls in flight, so it measures capacity: batches
are full and the CPU per call is at its lowest. A deployment sees a fixed
offered load instead. So the one-process stack is also driven open loop at
fixed shares of the capacity it just measured (``OPEN_LOOP_SHARES``; latency
counted from each call's scheduled send time, so a stalled server cannot
hide its queue), with the echo server at the same rates in the same run.
These figures have no target; they show how latency and CPU per call move
with load below saturation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import capture_answer, header, ratio, stack_on_copy, stack_settings, target
from bench.echo import EchoProcess
from bench.relay import RelayProcess
from recsys.loadtest import LoadConfig, LoadReport, known_ids, run_load
from recsys.v1 import common_pb2, ranking_pb2

CONCURRENCY = 64
BUDGET = 500
K = 20
# (throughput vs echo at least, p99 at most in ms) per RPC, from the issue.
TARGETS = {"Recommend": (0.25, 50.0)}
TOP_LIST_CACHE_ENV = "RECSYS_RETRIEVAL__TOP_LIST_CACHE"
# Server processes per service in the compared runs; the first is the shipped
# default and the one the targets are checked on.
WORKERS = (1, 2)
WORKER_ENVS = ("RECSYS_RETRIEVAL__WORKERS", "RECSYS_RANKING__WORKERS")
# Open-loop rates, as shares of the closed-loop throughput just measured.
OPEN_LOOP_SHARES = (0.25, 0.5, 0.75)
# Most calls in flight in the open loop: high enough never to hold a call back
# (a late call's wait still counts, from its scheduled time).
OPEN_LOOP_MAX_IN_FLIGHT = 512


def _proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process and its live descendants (None when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:  # a multi-worker service is a supervisor plus its worker processes
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        total += _proc_cpu_s(int(child)) or 0.0
    return total


def _inspect(resp: bytes) -> str | None:
    """Labels Recommend answers that are OK on the wire but not the full path."""
    r = ranking_pb2.RecommendResponse.FromString(resp)
    if r.retrieval_fallback:
        return "retrieval_fallback"
    if len(r.items) < K:
        return "fewer_than_k"
    bad = [s for s in r.source_reports if s.status != common_pb2.SOURCE_STATUS_OK]
    if bad:
        # e.g. "source_timeout:annoy_similar": which status, and whose.
        status = common_pb2.SourceStatus.Name(bad[0].status).removeprefix("SOURCE_STATUS_")
        return f"source_{status.lower()}:{bad[0].source}"
    return None


def _train(model_dir: Path, epochs: int, log: Path) -> float:
    """Trains the built-in synthetic dataset with ``recsys train`` in a child process."""
    env = {**os.environ, "RECSYS_MODEL_DIR": str(model_dir), "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "recsys.cli", "train", "--data", "synthetic"]
    cmd += ["--epochs", str(epochs), "--no-plots", "--quiet"]
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


async def _load(cfg: LoadConfig) -> LoadReport:
    return await run_load(cfg)


def measured(cfg: LoadConfig, pids: dict[str, int]) -> tuple[LoadReport, dict[str, float]]:
    """One load run, with the CPU seconds each process in ``pids`` and the client spent."""
    before = {name: _proc_cpu_s(pid) for name, pid in pids.items()}
    report = asyncio.run(_load(cfg))
    cpu = {}
    for name, pid in pids.items():
        after = _proc_cpu_s(pid)
        if after is not None and before[name] is not None:
            # Warm-up included: the server cannot tell the phases apart.
            cpu[name] = after - before[name]
    cpu["load_generator"] = report.client_cpu_s
    return report, cpu


def _measure(
    label: str, cfg: LoadConfig, pids: dict[str, int]
) -> tuple[LoadReport, dict[str, float]]:
    report, raw = measured(cfg, pids)
    cpu = {name: round(s, 2) for name, s in raw.items()}
    lat = report.latency
    print(
        f"  {label:5s} {report.qps:8.1f} req/s  p50 {lat.p50_ms:6.2f}  p99 {lat.p99_ms:6.2f}  "
        f"p99.9 {lat.p999_ms:6.2f}  max {lat.max_ms:7.2f} ms  errors {report.error_count}  "
        f"flagged {sum(report.flagged.values())}  cpu s {cpu}",
        flush=True,
    )
    return report, cpu


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def worst(key: str) -> float | None:
        # A round with no OK answer has no latency: the figure is then unknown
        # (a target reads it as not met) rather than a crash of the whole area.
        values = [r["latency"][key] for r in runs]
        return None if any(v is None for v in values) else max(values)

    p50s = [r["latency"]["p50_ms"] for r in runs if r["latency"]["p50_ms"] is not None]
    return {
        # OK answers per second: fast errors are not throughput.
        "qps": statistics.fmean(r["ok_qps"] for r in runs),
        "calls_per_s": statistics.fmean(r["qps"] for r in runs),
        "p50_ms": statistics.fmean(p50s) if p50s else None,
        "p99_ms": worst("p99_ms"),  # worst round counts
        "p999_ms": worst("p999_ms"),
        "max_ms": worst("max_ms"),
        "requests": sum(r["sent"] for r in runs),
        "errors": sum(sum(r["errors"].values()) for r in runs),
        "flagged": sum(sum(r["flagged"].values()) for r in runs),
        # Which kind of degraded answer (see _inspect), so a non-zero count can be read.
        "flagged_by_kind": dict(sum((Counter(r["flagged"]) for r in runs), Counter())),
    }


def stack_pids(stack) -> dict[str, int]:
    """The processes whose CPU a real run reports: both services and Redis."""
    pids = {"ranking": stack.procs[1].pid, "retrieval": stack.procs[0].pid}
    if stack.redis is not None and stack.redis.proc is not None:
        pids["redis"] = stack.redis.proc.pid
    return pids


def _compare(
    rpc: str,
    stack,
    base: dict[str, Any],
    sample: bytes,
    rounds: int,
    member_bytes: int | None = None,
    restart: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """Alternates echo, relay (when ``member_bytes`` is given) and real runs; checks targets.

    Round 1 runs on ``stack``; each later round on a stack from ``restart(i)``
    (stopped after it) and on new echo and relay processes, when ``restart``
    is given.
    """
    min_ratio, max_p99 = TARGETS[rpc]
    runs: dict[str, list[dict[str, Any]]] = {"echo": [], "relay": [], "real": []}
    cpu_log = []
    for i in range(rounds):
        print(f"{rpc} round {i + 1}/{rounds}", flush=True)
        with contextlib.ExitStack() as stack_of:
            real = stack
            if i > 0 and restart is not None:
                real = restart(i)
                stack_of.callback(real.stop)
            echo = stack_of.enter_context(EchoProcess(fixed={rpc: sample}))
            plan = [("echo", echo.address, {"echo": echo.proc.pid})]
            if member_bytes is not None:
                relay = stack_of.enter_context(
                    RelayProcess(answer=sample, member_bytes=member_bytes)
                )
                plan.append(("relay", relay.address, relay.pids))
            plan.append(("real", real.ranking_address, stack_pids(real)))
            for label, address, watched in plan:
                rep, cpu = _measure(label, LoadConfig(target=address, seed=i, **base), watched)
                runs[label].append(rep.to_dict())
                cpu_log.append({"run": f"{label}{i + 1}", **cpu})
    echo_runs, real_runs = runs["echo"], runs["real"]
    echo_s, real_s = _summary(echo_runs), _summary(real_runs)
    relay_s = _summary(runs["relay"]) if runs["relay"] else None
    rel = ratio(real_s["qps"], echo_s["qps"], unit="req/s")
    name = rpc.lower()
    print(
        f"{rpc}: real {real_s['qps']:.1f} req/s vs echo {echo_s['qps']:.1f} req/s = "
        f"{rel['ratio']:.1%} (target >= {min_ratio:.0%}); real p99 {_ms(real_s['p99_ms'])} ms "
        f"(target <= {max_p99:g}); errors {real_s['errors']}, degraded {real_s['flagged']}",
        flush=True,
    )
    if relay_s is not None:
        print(
            f"{rpc}: topology floor (relay, no work) {relay_s['qps']:.1f} req/s, p99 "
            f"{_ms(relay_s['p99_ms'])} ms; real / relay = {real_s['qps'] / relay_s['qps']:.1%}",
            flush=True,
        )
    summary = {
        "echo": echo_s,
        "real": real_s,
        "cpu_s": cpu_log,
        "response_bytes": len(sample),
    }
    if relay_s is not None:
        summary["relay"] = relay_s
        summary["relay_member_bytes"] = member_bytes
    return {
        "summary": summary,
        "relay_ratio": (
            (f"{name}_qps_vs_relay", ratio(real_s["qps"], relay_s["qps"], unit="req/s"))
            if relay_s is not None
            else None
        ),
        "ratio": (f"{name}_qps_vs_echo", rel),
        "targets": [
            target(f"{name}_qps_vs_echo", rel["ratio"], ">=", min_ratio),
            target(f"{name}_p99_ms_at_{CONCURRENCY}_streams", real_s["p99_ms"], "<=", max_p99),
            target(f"{name}_errors_and_degraded", real_s["errors"] + real_s["flagged"], "==", 0),
        ],
        "runs": {k: v for k, v in runs.items() if v},
    }


def per_call_ms(
    cpu_s: dict[str, float], rate: float, warmup_s: float, duration_s: float
) -> dict[str, float]:
    """CPU milliseconds per call of each process at ``rate`` calls sent per second.

    A server's CPU time covers the warm-up too (it cannot tell the phases
    apart); the load generator's covers the measured phase only.
    """
    out = {}
    for name, s in cpu_s.items():
        calls = rate * (duration_s if name == "load_generator" else warmup_s + duration_s)
        if calls > 0:
            out[name] = round(1000.0 * s / calls, 3)
    return out


def _open_loop_row(
    share: float,
    rate: float,
    real: dict[str, Any],
    echo: dict[str, Any],
    cpu_s: dict[str, float],
    warmup_s: float,
    duration_s: float,
) -> dict[str, Any]:
    """One open-loop rate: the real stack's latency beside the echo server's."""
    lat, lag = real["latency"], real.get("send_lag") or {}
    return {
        "share_of_closed_loop": share,
        "offered_rps": round(rate, 1),
        "achieved_rps": round(real["ok_qps"], 1),
        "p50_ms": lat["p50_ms"],
        "p90_ms": lat["p90_ms"],
        "p99_ms": lat["p99_ms"],
        "max_ms": lat["max_ms"],
        # How late the generator itself sent: large values mean the client, not
        # the servers, fell behind (the latency above includes it either way).
        "send_lag_p99_ms": lag.get("p99_ms"),
        # Calls due before the end that every busy slot kept from starting
        # (512 slots: only a stack far behind the rate gets here).
        "not_sent": real.get("not_sent", 0),
        "errors": sum(real["errors"].values()),
        "flagged": sum(real["flagged"].values()),
        "echo_p50_ms": echo["latency"]["p50_ms"],
        "echo_p99_ms": echo["latency"]["p99_ms"],
        # Per call sent, not per call asked for: calls left unsent cost nothing.
        "cpu_ms_per_call": per_call_ms(cpu_s, real["qps"], warmup_s, duration_s),
    }


def _open_loop(
    stack,
    base: dict[str, Any],
    sample: bytes,
    capacity: float,
    pids: dict[str, int],
    shares: tuple[float, ...],
) -> list[dict[str, Any]]:
    """Drives ``Recommend`` at fixed rates below ``capacity``, echo first at each."""
    cfg = {**base, "concurrency": OPEN_LOOP_MAX_IN_FLIGHT}
    rows = []
    with EchoProcess(fixed={"Recommend": sample}) as echo:
        for i, share in enumerate(shares):
            rate = max(1.0, round(capacity * share))
            print(f"Recommend open loop at {rate:g} req/s ({share:.0%} of closed loop)", flush=True)
            echo_rep, _ = _measure(
                "echo",
                LoadConfig(target=echo.address, rate=rate, seed=100 + i, **cfg),
                {"echo": echo.proc.pid},
            )
            real_rep, cpu = _measure(
                "real",
                LoadConfig(target=stack.ranking_address, rate=rate, seed=100 + i, **cfg),
                pids,
            )
            rows.append(
                _open_loop_row(
                    share,
                    rate,
                    real_rep.to_dict(),
                    echo_rep.to_dict(),
                    cpu,
                    cfg["warmup_s"],
                    cfg["duration_s"],
                )
            )
    return rows


def run(quick: bool = False) -> dict[str, Any]:
    from recsys.stack import start_stack

    print(header("end-to-end Recommend vs echo", "e2e", quick), flush=True)
    rounds, duration, warmup, epochs = (1, 4.0, 1.5, 3) if quick else (2, 15.0, 3.0, 10)
    shares = OPEN_LOOP_SHARES[1:2] if quick else OPEN_LOOP_SHARES
    open_duration, open_warmup = (3.0, 1.0) if quick else (10.0, 2.0)
    out: dict[str, Any] = {
        "setup": {
            "dataset": "synthetic (2000 users, 1500 items, 100k ratings)",
            "recommend": f"all configured sources, budget {BUDGET}, k {K}",
            "concurrency": CONCURRENCY,
            "rounds": rounds,
            "duration_s": duration,
            "warmup_s": warmup,
            "epochs": epochs,
            "client": "recsys.loadtest closed loop, in the benchmark process (servers are "
            "separate processes); latency over OK and DEADLINE_EXCEEDED responses",
            "open_loop": f"one process per service, {open_duration:g} s (+{open_warmup:g} s "
            f"warm-up) at each of {', '.join(f'{x:.0%}' for x in shares)} of the closed-loop "
            "throughput; latency from each call's scheduled send time",
        },
        "ratios": {},
        "targets": [],
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = Path(tmp)
        model_dir = root / "models"
        out["setup"]["train_s"] = round(_train(model_dir, epochs, root / "train.log"), 1)
        settings = stack_settings(model_dir)
        # On by default; an inherited RECSYS_RETRIEVAL__TOP_LIST_CACHE overrides it.
        out["setup"]["retrieval_top_list_cache"] = os.environ.get(TOP_LIST_CACHE_ENV, "default")
        out["setup"]["workers_compared"] = list(WORKERS)
        users, _items, version = known_ids(model_dir)
        out["setup"]["model_version"] = version
        out["setup"]["users"] = len(users)
        common = {
            "concurrency": CONCURRENCY,
            "duration_s": duration,
            "warmup_s": warmup,
            "k": K,
            "user_ids": users,
            "timeout_s": 2.0,
        }
        plans = {
            "Recommend": {"rpc": "Recommend", "budget": BUDGET, "inspect": _inspect},
        }
        by_workers: dict[int, dict[str, Any]] = {}
        open_rows: list[dict[str, Any]] = []
        saved = {name: os.environ.get(name) for name in WORKER_ENVS}
        try:
            for workers in WORKERS:
                for name in WORKER_ENVS:
                    os.environ[name] = str(workers)
                print(f"--- {workers} process(es) per service", flush=True)
                stack = start_stack(settings, quiet=True, log_dir=root / f"logs-w{workers}")

                def restart(i: int, workers: int = workers):
                    # The first stack (and its Redis) still runs: a copy of its own.
                    return stack_on_copy(model_dir, root / f"run-w{workers}-{i}")

                try:
                    pids = stack_pids(stack)
                    for rpc, plan in plans.items():
                        base = {**common, **plan}
                        sample = capture_answer(stack.ranking_address, LoadConfig(**base))
                        flag = plan["inspect"](sample)
                        out["setup"][f"{rpc.lower()}_sample_flag_w{workers}"] = flag
                        member_bytes = None
                        if workers == WORKERS[0]:  # the floor does not depend on workers
                            member_bytes = len(
                                capture_answer(
                                    stack.retrieval_address,
                                    LoadConfig(rpc="Retrieve", budget=BUDGET, user_ids=users),
                                )
                            )
                        by_workers[workers] = _compare(
                            rpc, stack, base, sample, rounds, member_bytes, restart
                        )
                        if workers == WORKERS[0]:
                            capacity = by_workers[workers]["summary"]["real"]["qps"]
                            open_base = {
                                **base,
                                "duration_s": open_duration,
                                "warmup_s": open_warmup,
                            }
                            open_rows = _open_loop(stack, open_base, sample, capacity, pids, shares)
                finally:
                    stack.stop()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    # The headline is the shipped default (one process per service, as in
    # ranking's Rank figure); the other count is reported beside it.
    default = by_workers[WORKERS[0]]
    out["recommend"] = default["summary"]
    out["recommend_open_loop"] = open_rows
    out["ratios"][default["ratio"][0]] = default["ratio"][1]
    if default["relay_ratio"] is not None:
        out["ratios"][default["relay_ratio"][0]] = default["relay_ratio"][1]
    out["targets"] += default["targets"]
    out["runs"]["recommend"] = default["runs"]
    out["by_workers"] = {
        str(w): {"summary": r["summary"], "ratio_vs_echo": r["ratio"][1]}
        for w, r in by_workers.items()
    }
    one, many = default["summary"], by_workers[WORKERS[-1]]["summary"]
    out["ratios"][f"recommend_qps_{WORKERS[-1]}_workers_vs_{WORKERS[0]}"] = ratio(
        many["real"]["qps"], one["real"]["qps"], unit="req/s"
    )
    print(
        f"Recommend with {WORKERS[-1]} processes per service vs {WORKERS[0]}: "
        f"{many['real']['qps']:.1f} vs {one['real']['qps']:.1f} req/s; p99 "
        f"{_ms(many['real']['p99_ms'])} vs {_ms(one['real']['p99_ms'])} ms",
        flush=True,
    )
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
