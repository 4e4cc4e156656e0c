"""A/B of two configurations or two checkouts of the whole stack, on one machine.

``python -m bench.ab --b-env RECSYS_RANKING__RETRIEVAL_MAX_IN_FLIGHT=0``
compares the stack as it is (A) with the same stack under other settings
(B); ``--a-tree`` / ``--b-tree`` run a side from another checkout of the
repository (its services are started with that checkout first on the path).
The load is ``Recommend`` through both services (``bench.e2e``'s); ``--rpc
Rank`` puts ``bench.ranking``'s ``Rank`` load (1,000 candidates a call) on
the ranking service instead.

Why not two ``python -m bench`` runs: these machines change speed by ±10%
within minutes, more than most changes worth measuring. So both sides'
stacks (each with its own embedded Redis and copy of the model) stay up
for the whole run and are loaded in turn, in short closed-loop rounds in
ABBA order, after one unrecorded round each (the first round after
start-up runs slow): drift hits both sides alike, no round pays for a
restart, and the per-round B/A ratios show how consistent a difference
is. The idle side costs next to nothing while the other is measured.

Reported per side: throughput, p99, errors, and each service's CPU per
call (from ``/proc``; it moves more steadily than throughput). Summary:
means and medians, the B/A throughput ratio per round pair, its median,
and how many rounds B won.

A stack keeps some luck of its own for as long as it runs (where its
processes and memory landed): two sides of identical code, started once,
differed by 2-4% in every round of a run, in either direction from run to
run. So the rounds are split among ``--starts`` fresh starts of both
stacks (three by default), the side started first alternating, and the
B/A median of each start is reported too: a difference that changes sign
between starts is luck, not the change.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import describe_machine, jsonable, machine_info, stack_on_copy

REPO = Path(__file__).resolve().parents[1]
CONCURRENCY = 64
AB_RPCS = ("Recommend", "Rank")


@dataclass
class Side:
    """One configuration: extra environment for its services and the checkout they run."""

    label: str
    env: dict[str, str] = field(default_factory=dict)
    tree: Path = REPO


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``["K=V", ...]`` to a dict; a malformed item raises ValueError naming it."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise ValueError(f"--a-env/--b-env: expected NAME=VALUE, got {item!r}")
        out[key] = value
    return out


def split_rounds(rounds: int, starts: int) -> list[int]:
    """Rounds per start, as even as possible (earlier starts take the remainder)."""
    if starts < 1 or rounds < starts:
        raise ValueError(f"need 1 <= starts <= rounds, got {starts} starts for {rounds} rounds")
    base, extra = divmod(rounds, starts)
    return [base + (i < extra) for i in range(starts)]


def round_order(rounds: int) -> list[tuple[int, str]]:
    """(round, side) pairs in ABBA order, so neither side always goes first."""
    out = []
    for r in range(rounds):
        out += [(r, "A"), (r, "B")] if r % 2 == 0 else [(r, "B"), (r, "A")]
    return out


def summarise(
    rows: dict[str, list[dict[str, float]]], per_start: Sequence[int] | None = None
) -> dict[str, Any]:
    """Means and medians per side, and the B/A throughput ratio of each round (and start).

    A round without a figure (no OK answer, so no p99; no answer from A, so
    no ratio) is left out of the means and medians, which would otherwise
    depend on where NaN sorts, and counted instead (``*_dropped``,
    ``rounds_a_answered_nothing``): a run of many minutes still reports.
    """
    out: dict[str, Any] = {}
    for label in ("A", "B"):
        side = rows[label]
        out[label] = {key: _stats([r[key] for r in side]) for key in _FIGURES}
        out[label]["errors"] = sum(int(r["errors"]) for r in side)
    ratios = [
        b["qps"] / a["qps"] if a["qps"] > 0 else math.nan
        for a, b in zip(rows["A"], rows["B"], strict=True)
    ]
    out["qps_ratio_per_round"] = [round(x, 3) for x in ratios]
    out["qps_ratio_median"] = _stats(ratios)["median"]
    out["b_wins"] = sum(x > 1.0 for x in ratios if math.isfinite(x))
    out["rounds_a_answered_nothing"] = sum(a["qps"] <= 0 for a in rows["A"])
    if per_start is not None:
        medians, at = [], 0
        for n in per_start:
            medians.append(_stats(ratios[at : at + n])["median"])
            at += n
        out["qps_ratio_median_per_start"] = medians
    return out


_FIGURES = ("qps", "p99_ms", "cpu_ranking_ms", "cpu_retrieval_ms")


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The console summary of :func:`summarise`'s result, saying what it left out."""
    lines = []
    for label in ("A", "B"):
        x = s[label]
        missing = {k: x[k]["dropped"] for k in _FIGURES if x[k].get("dropped")}
        lines.append(
            f"{label}: {x['qps']['mean']:.1f} req/s mean ({x['qps']['median']:.1f} median), "
            f"p99 {x['p99_ms']['mean']:.1f} ms, cpu/call ranking {x['cpu_ranking_ms']['mean']:.3f}"
            f" retrieval {x['cpu_retrieval_ms']['mean']:.3f} ms, errors {x['errors']}"
            + (f"; rounds without a figure (left out): {missing}" if missing else "")
        )
    ratios = s["qps_ratio_per_round"]
    nothing = s.get("rounds_a_answered_nothing", 0)
    lines.append(
        f"B/A throughput per round: {ratios}; median {s['qps_ratio_median']:.3f}; B better in "
        f"{s['b_wins']} of {len(ratios) - nothing}"
        + (f" ({nothing} rounds where A answered nothing, left out)" if nothing else "")
    )
    if "qps_ratio_median_per_start" in s:
        lines.append(f"B/A median per start: {s['qps_ratio_median_per_start']}")
    return lines


def _stats(values: list[float]) -> dict[str, float]:
    """Mean and median of the finite values (NaN when none), and how many were not."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "median": math.nan, "dropped": len(values)}
    return {
        "mean": round(statistics.mean(finite), 3),
        "median": round(statistics.median(finite), 3),
        "dropped": len(values) - len(finite),
    }


@contextlib.contextmanager
def _as_side(side: Side) -> Iterator[None]:
    """The process environment and working directory a side's services start with."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(side.env)
    # The services run `python -m recsys.cli`: the checkout must come first on the path.
    os.environ["PYTHONPATH"] = str(side.tree)
    os.chdir(side.tree)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)


def _start(side: Side, model_src: Path, tmp: Path):
    src = model_src.resolve()  # the side's directory becomes the working one
    with _as_side(side):
        return stack_on_copy(src, tmp / side.label)


def _round(
    stack, users: list[str], items: list[str], duration: float, warmup: float, rpc: str
) -> dict[str, float]:
    from bench.e2e import BUDGET, K, _inspect, measured, per_call_ms
    from bench.ranking import rank_load
    from recsys.loadtest import LoadConfig

    pids = {"ranking": stack.procs[1].pid, "retrieval": stack.procs[0].pid}
    if rpc == "Rank":
        cfg = rank_load(stack.ranking_address, items, duration, warmup)
    else:
        cfg = LoadConfig(
            rpc="Recommend",
            target=stack.ranking_address,
            concurrency=CONCURRENCY,
            duration_s=duration,
            warmup_s=warmup,
            k=K,
            budget=BUDGET,
            user_ids=users,
            timeout_s=2.0,
            inspect=_inspect,
        )
    report, cpu_s = measured(cfg, pids)
    # The servers' CPU covers the warm-up too, which ran at about the same rate.
    cpu = per_call_ms(cpu_s, report.qps, warmup, duration)
    return {
        "qps": report.ok_qps,  # OK answers: fast errors are not throughput
        "p99_ms": report.latency.p99_ms,
        "errors": report.error_count + sum(report.flagged.values()),
        "cpu_ranking_ms": cpu["ranking"],
        "cpu_retrieval_ms": cpu["retrieval"],
    }


def run(
    a: Side,
    b: Side,
    *,
    rounds: int = 12,
    starts: int = 3,
    duration: float = 5.0,
    warmup: float = 1.0,
    model_dir: Path | None = None,
    rpc: str = "Recommend",
    say=print,
) -> dict[str, Any]:
    """Starts both sides' stacks, measures them in alternating rounds, stops them.

    Args:
        a, b: The two sides.
        rounds: Round pairs (each side is measured once per round).
        starts: Fresh starts of both stacks the rounds are split among; the
            side started first alternates.
        duration, warmup: Seconds of each measured round and of its warm-up.
        model_dir: A trained model directory to copy for both sides; None
            trains the built-in synthetic dataset first (about a minute).
        rpc: ``Recommend`` (through both services) or ``Rank`` (the ranking
            service alone; retrieval stays up, idle, and its CPU per call is
            near 0).
    """
    if rpc not in AB_RPCS:
        raise ValueError(f"rpc must be one of {AB_RPCS}, got {rpc!r}")
    from bench.e2e import _train
    from recsys.loadtest import known_ids

    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp_name:
        tmp = Path(tmp_name)
        if model_dir is None:
            model_dir = tmp / "trained"
            _train(model_dir, 3, tmp / "train.log")
        users, items, version = known_ids(model_dir)
        per_start = split_rounds(rounds, starts)
        rows: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
        done = 0
        for i, n in enumerate(per_start):
            order = (a, b) if i % 2 == 0 else (b, a)
            say(f"start {i + 1}/{len(per_start)}: {order[0].label} then {order[1].label}")
            stacks = {}
            try:
                for side in order:
                    stacks[side.label] = _start(side, model_dir, tmp / f"start{i}")
                # The first round after start-up runs slow (caches, allocator,
                # connections): one unrecorded round per side first.
                for side in order:
                    _round(stacks[side.label], users, items, duration, warmup, rpc)
                for r, label in round_order(n):
                    row = _round(stacks[label], users, items, duration, warmup, rpc)
                    rows[label].append(row)
                    say(
                        f"round {done + r + 1:2d} {label}: {row['qps']:7.1f} req/s  p99 "
                        f"{row['p99_ms']:6.1f} ms  cpu/call ranking {row['cpu_ranking_ms']:.3f} "
                        f"retrieval {row['cpu_retrieval_ms']:.3f} ms  errors {int(row['errors'])}"
                    )
            finally:
                for stack in stacks.values():
                    stack.stop()
            done += n
    return {
        "sides": {s.label: {"env": s.env, "tree": str(s.tree)} for s in (a, b)},
        "model_version": version,
        "rpc": rpc,
        "rounds": rows,
        "summary": summarise(rows, per_start),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    p.add_argument("--a-env", nargs="*", default=[], metavar="NAME=VALUE")
    p.add_argument("--b-env", nargs="*", default=[], metavar="NAME=VALUE")
    p.add_argument("--a-tree", type=Path, default=REPO, help="checkout side A runs")
    p.add_argument("--b-tree", type=Path, default=REPO, help="checkout side B runs")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument(
        "--starts",
        type=int,
        default=3,
        help="fresh starts of both stacks to split the rounds among",
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measured round")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--model-dir", type=Path, help="trained model directory (default: train)")
    p.add_argument(
        "--rpc",
        choices=AB_RPCS,
        default="Recommend",
        help="Recommend through both services, or Rank (1,000 candidates) on ranking alone",
    )
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    return p


def reproduce_line(argv: Sequence[str]) -> str:
    """The shell command that reruns this comparison from the repository root.

    Quoted, so a setting with spaces (``--b-env 'RECSYS_TRAINER__HIDDEN_UNITS=[64, 32]'``)
    pastes back as one argument.
    """
    return shlex.join(["python", "-m", "bench.ab", *argv])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    args = _parser().parse_args(argv)
    try:
        a = Side("A", parse_env(args.a_env), args.a_tree.resolve())
        b = Side("B", parse_env(args.b_env), args.b_tree.resolve())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("error: --rounds must be at least 1", file=sys.stderr)
        return 2
    try:
        split_rounds(args.rounds, args.starts)
    except ValueError as exc:
        print(f"error: --starts: {exc}", file=sys.stderr)
        return 2
    print(f"machine: {describe_machine(machine_info())}", flush=True)
    print(f"reproduce: {reproduce_line(sys.argv[1:] if argv is None else argv)}")
    for side in (a, b):
        print(f"side {side.label}: tree {side.tree}, env {side.env or '{}'}", flush=True)
    print(f"load: {args.rpc}, {CONCURRENCY} closed-loop streams", flush=True)
    result = run(
        a, b, rounds=args.rounds, starts=args.starts, duration=args.duration, warmup=args.warmup,
        model_dir=args.model_dir, rpc=args.rpc, say=lambda line: print(line, flush=True),
    )  # fmt: skip
    for line in summary_lines(result["summary"]):
        print(line)

    if args.out:
        args.out.write_text(json.dumps(jsonable({"machine": machine_info(), **result}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
