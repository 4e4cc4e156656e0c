"""Soak: the real stack at a fixed request rate for minutes; memory and latency must stay flat.

Not part of CI (``python -m bench`` does not run it by default): it takes
5 minutes (``--quick``: 30 s). Setup is the one ``bench/e2e.py`` uses: an
embedded Redis, a model trained on the built-in synthetic dataset and
published, and both services started as separate processes through
:func:`recsys.stack.start_stack` (the code behind ``recsys up``).

Load is ``Recommend`` in **open loop** from :mod:`recsys.loadtest`, so a
slowing server shows up as growing latency instead of a lower rate. The run
is cut into intervals; after each one the resident memory (RSS, from
``/proc``) of both service processes and the interval's latency
percentiles are sampled. The baseline is the run's own first quarter
(after a warm-up interval): the figures are end/start ratios and
least-squares slopes per minute, so machine speed cancels out.

Reproduce: ``python -m bench.soak [--quick] [--duration S] [--rate R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import describe_machine, ratio, stack_settings, target
from recsys.loadtest import LoadConfig, known_ids, run_load

RATE = 50.0  # requests per second: inside a busy 2-core machine's capacity (150 saturates it)
CONCURRENCY = 64
K = 20
BUDGET = 200
# Flat means: memory grows less than this over the run, p99 less than that.
MAX_RSS_GROWTH = 1.10
MAX_P99_GROWTH = 1.5


def rss_mib(pid: int) -> float | None:
    """Resident set size of a process in MiB (None when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_per_minute(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``ts`` (seconds), per minute."""
    if len(ts) < 2:
        return 0.0
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    if den == 0:
        return 0.0
    return 60.0 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den


def _quarter_mean(values: list[float], last: bool) -> float:
    n = max(1, len(values) // 4)
    part = values[-n:] if last else values[:n]
    return statistics.fmean(part)


def intervals(duration_s: float) -> tuple[float, int]:
    """How ``duration_s`` measured seconds are cut: (seconds per interval, intervals).

    About 5 s intervals up to a minute and 10 s beyond, but at least 4 (the
    baseline is the first quarter); their total is ``duration_s`` itself, not
    the nearest multiple of the nominal interval (``--duration 10`` measured 20 s).
    """
    nominal = 5.0 if duration_s <= 60 else 10.0
    n = max(4, round(duration_s / nominal))
    return duration_s / n, n


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Slopes and end/start ratios of RSS and latency over the measured intervals."""
    ts = [s["t_s"] for s in samples]
    out: dict[str, Any] = {"ratios": {}, "slopes_per_min": {}, "targets": []}
    for proc in ("retrieval", "ranking"):
        rss = [s["rss_mib"][proc] for s in samples]
        start, end = _quarter_mean(rss, False), _quarter_mean(rss, True)
        out["ratios"][f"{proc}_rss_end_vs_start"] = ratio(end, start, unit="MiB")
        out["slopes_per_min"][f"{proc}_rss_mib"] = round(slope_per_minute(ts, rss), 3)
        out["targets"].append(target(f"{proc}_rss_end_vs_start", end / start, "<=", MAX_RSS_GROWTH))
    for key in ("p50_ms", "p99_ms"):
        lat = [s[key] for s in samples]
        start, end = _quarter_mean(lat, False), _quarter_mean(lat, True)
        out["ratios"][f"{key}_end_vs_start"] = ratio(end, start, unit="ms")
        out["slopes_per_min"][key] = round(slope_per_minute(ts, lat), 3)
    p99 = [s["p99_ms"] for s in samples]
    out["targets"].append(
        target(
            "p99_end_vs_start",
            _quarter_mean(p99, True) / _quarter_mean(p99, False),
            "<=",
            MAX_P99_GROWTH,
        )
    )
    errors = sum(s["errors"] for s in samples)
    out["targets"].append(target("errors", errors, "==", 0))
    return out


def run(quick: bool = False, duration_s: float | None = None, rate: float = RATE) -> dict[str, Any]:
    from bench.e2e import _train
    from recsys.stack import start_stack

    duration = duration_s or (30.0 if quick else 300.0)
    interval, n_intervals = intervals(duration)
    command = "python -m bench.soak" + (" --quick" if quick else "")
    if duration_s:
        command += f" --duration {duration_s:g}"
    if rate != RATE:
        command += f" --rate {rate:g}"
    print(
        f"== soak: Recommend at {rate:g} req/s for {duration:g} s "
        f"({n_intervals} intervals of {interval:.3g} s) =="
    )
    print(f"machine: {describe_machine()}\nreproduce: {command}", flush=True)
    out: dict[str, Any] = {
        "setup": {
            "rpc": "Recommend",
            "rate": rate,
            "concurrency_cap": CONCURRENCY,
            "interval_s": round(interval, 3),
            "intervals": n_intervals,
            "k": K,
            "budget": BUDGET,
            "client": "recsys.loadtest open loop (latency from each call's due time)",
            "machine": describe_machine(),
            "reproduce": command,
        },
        "samples": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        root = Path(tmp)
        model_dir = root / "models"
        out["setup"]["train_s"] = round(_train(model_dir, 1 if quick else 3, root / "train.log"), 1)
        settings = stack_settings(model_dir)
        stack = start_stack(settings, quiet=True, log_dir=root / "logs")
        try:
            users, _items, _version = known_ids(model_dir)
            pids = {"retrieval": stack.procs[0].pid, "ranking": stack.procs[1].pid}
            base = {
                "rpc": "Recommend",
                "target": stack.ranking_address,
                "rate": rate,
                "concurrency": CONCURRENCY,
                "k": K,
                "budget": BUDGET,
                "user_ids": users,
                "timeout_s": 2.0,
            }
            # Warm-up interval (caches, lazy init) is run but not sampled.
            asyncio.run(run_load(LoadConfig(duration_s=interval, seed=999, **base)))
            t0 = time.monotonic()
            for i in range(n_intervals):
                rep = asyncio.run(run_load(LoadConfig(duration_s=interval, seed=i, **base)))
                rss = {name: rss_mib(pid) for name, pid in pids.items()}
                if any(v is None for v in rss.values()):
                    raise RuntimeError(f"a service process died during the soak: {rss}")
                sample = {
                    "t_s": round(time.monotonic() - t0, 1),
                    "qps": round(rep.qps, 1),
                    "p50_ms": round(rep.latency.p50_ms, 2),
                    "p99_ms": round(rep.latency.p99_ms, 2),
                    "errors": rep.error_count,
                    "rss_mib": {k: round(v, 1) for k, v in rss.items()},
                }
                out["samples"].append(sample)
                print(
                    f"  t={sample['t_s']:6.1f}s  {sample['qps']:6.1f} req/s  "
                    f"p50 {sample['p50_ms']:6.2f}  p99 {sample['p99_ms']:7.2f} ms  "
                    f"errors {sample['errors']}  RSS retrieval {rss['retrieval']:.1f} MiB  "
                    f"ranking {rss['ranking']:.1f} MiB",
                    flush=True,
                )
        finally:
            stack.stop()
    out.update(summarise(out["samples"]))
    for name, r in out["ratios"].items():
        print(
            f"{name}: {r['value']:.2f} vs {r['baseline']:.2f} {r.get('unit', '')} "
            f"= {r['ratio']:.3f}"
        )
    for name, s in out["slopes_per_min"].items():
        print(f"slope {name}: {s:+.3f} per minute")
    for t in out["targets"]:
        print(f"target {t['name']}: {t['value']} {t['op']} {t['threshold']} -> "
              f"{'met' if t['met'] else 'MISSED'}")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="30 s instead of 5 minutes")
    p.add_argument(
        "--duration",
        type=float,
        help="measured seconds, cut into at least 4 equal intervals after a warm-up one "
        "(default 300; overrides --quick)",
    )
    p.add_argument("--rate", type=float, default=RATE, help="requests per second")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        p.error(f"--duration must be a number of seconds above 0, not {args.duration}")
    if not (math.isfinite(args.rate) and args.rate > 0):
        p.error(f"--rate must be a number of requests per second above 0, not {args.rate}")
    result = run(args.quick, args.duration, args.rate)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0 if all(t["met"] for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
