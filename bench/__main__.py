"""``python -m bench``: run every benchmark area that exists and write a report.

Each area runs in its own child process, so a crash, a leaked thread or the
memory one area holds (the 1M-item catalogue) cannot disturb the next, and
a failing area is reported without aborting the rest. Results go to
``bench/results/<date>-<host>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import common

AREAS = ("data", "training", "retrieval", "ranking", "e2e", "tracing")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs (smoke test of the figures)")
    p.add_argument(
        "--only", action="append", choices=AREAS, metavar="AREA",
        help=f"run only this area (repeatable): {', '.join(AREAS)}",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="results directory")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per area")
    p.add_argument(
        "--in-process", action="store_true", help="run areas in this process (debugging)"
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    return p


def module_name(area: str) -> str:
    """``bench.<area>`` for an area name; a dotted name is taken as a module path."""
    return area if "." in area else f"bench.{area}"


def area_exists(area: str) -> bool:
    """True when the area's module is there to run."""
    try:
        return importlib.util.find_spec(module_name(area)) is not None
    except ModuleNotFoundError:
        return False


def run_area(area: str, quick: bool) -> dict[str, Any]:
    """Imports the area's module and calls its ``run``; the result must be a dict."""
    module = importlib.import_module(module_name(area))
    result = module.run(quick=quick)
    if not isinstance(result, dict):
        raise TypeError(f"{module_name(area)}.run returned {type(result).__name__}, not a dict")
    return result


def _child(area: str, quick: bool, result_file: Path) -> int:
    try:
        result = run_area(area, quick)
    except BaseException:
        result_file.write_text(json.dumps({"error": traceback.format_exc()}))
        return 1
    result_file.write_text(json.dumps({"result": common.jsonable(result)}))
    return 0


def _in_child(area: str, quick: bool, timeout: float) -> tuple[dict[str, Any] | None, str | None]:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench", "--child", area, "--result-file", str(result_file)]
        if quick:
            cmd.append("--quick")
        # The area's temporary files go under this directory, so an area
        # killed at its timeout leaves none behind.
        scratch = Path(tmp) / "tmp"
        scratch.mkdir()
        env = {**os.environ, "TMPDIR": str(scratch)}
        try:
            proc = subprocess.run(cmd, cwd=common.REPO, timeout=timeout, check=False, env=env)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout:.0f} s"
        if not result_file.is_file():
            return None, f"child process exited with {proc.returncode} and wrote no result"
        doc = json.loads(result_file.read_text())
    if "error" in doc:
        return None, doc["error"]
    return doc["result"], None


def run_all(
    names: list[str], *, quick: bool, in_process: bool = False, timeout: float = 3600.0
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Runs areas one after another; a failing area is recorded and the rest still run.

    Returns:
        ``(results, areas)``: each area's figures, and each area's
        ``{"status": "ok"|"failed"|"missing", "seconds", "error"}``.
    """
    results: dict[str, Any] = {}
    areas: dict[str, dict[str, Any]] = {}
    for area in names:
        if not area_exists(area):
            areas[area] = {"status": "missing", "seconds": 0.0}
            print(f"-- {area}: no {module_name(area)} module, skipped", flush=True)
            continue
        print(f"-- {area}: running", flush=True)
        a0 = time.perf_counter()
        if in_process:
            try:
                result, error = run_area(area, quick), None
            except Exception:
                result, error = None, traceback.format_exc()
        else:
            result, error = _in_child(area, quick, timeout)
        seconds = time.perf_counter() - a0
        if error is not None:
            areas[area] = {"status": "failed", "seconds": seconds, "error": error}
            print(f"-- {area}: FAILED after {seconds:.1f} s\n{error}", file=sys.stderr, flush=True)
        else:
            areas[area] = {"status": "ok", "seconds": seconds}
            results[area] = result
            print(f"-- {area}: done in {seconds:.1f} s", flush=True)
    return results, areas


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        return _child(args.child, args.quick, args.result_file)

    command = shlex.join(["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])])
    started = _dt.datetime.now().astimezone()
    machine = common.machine_info()
    print(f"machine: {common.describe_machine(machine)}\ncommand: {command}\n", flush=True)
    t0 = time.perf_counter()
    results, areas = run_all(
        args.only or list(AREAS),
        quick=args.quick,
        in_process=args.in_process,
        timeout=args.timeout,
    )
    md, js = common.write_results(
        results,
        areas,
        command=command,
        started_at=started,
        duration_s=time.perf_counter() - t0,
        machine=machine,
        out_dir=args.out,
    )
    targets = common.collect_targets(results)
    for t in targets:
        status = "met" if t["met"] else "NOT MET"
        print(f"target {t['area']}/{t['name']}: {t['value']} {t['op']} {t['threshold']}: {status}")
    print(f"\nwrote {md}\nwrote {js}")
    failed = [a for a, s in areas.items() if s["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
