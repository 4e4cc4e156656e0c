"""Shared benchmark helpers: machine description, targets, the results writer.

Every figure the benchmarks print travels with the machine it was measured
on (cores, CPU model, RAM, accelerator), the library versions, the git
commit and the command that reproduces it, because a speed figure without
them cannot be checked. Nothing here is a stored result: each run measures.

Area modules (``bench/<area>.py``) return plain dicts from
``run(quick: bool = False)``. Two optional conventions let the runner
summarise them:

* ``"targets"``: a list of :func:`target` dicts (name, value, op, threshold, met);
* ``"ratios"``: a dict of ``name -> {"value", "baseline", ...}`` for figures that
  are measured against a baseline in the same run (see :func:`ratio`).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recsys.embedded_redis import die_with_parent_prefix

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda v, t: v >= t,
    "<=": lambda v, t: v <= t,
    ">": lambda v, t: v > t,
    "<": lambda v, t: v < t,
    "==": lambda v, t: v == t,
}


# --- machine ----------------------------------------------------------------------


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on (affinity, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ram_gib() -> float | None:
    """Total RAM in GiB from /proc/meminfo."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def _gpu() -> str:
    """Accelerators visible through nvidia-smi, without importing TensorFlow."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "none (CPU only)"
    return "; ".join(line.strip() for line in out.splitlines() if line.strip()) or "none"


def _version(module: str) -> str | None:
    from importlib import metadata

    dist = {"tensorflow": "tensorflow", "grpc": "grpcio", "numpy": "numpy", "annoy": "annoy"}
    try:
        return metadata.version(dist.get(module, module))
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """Commit of the working tree, with ``-dirty`` when it has changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def machine_info() -> dict[str, Any]:
    """Everything a reader needs to compare a figure with their own machine."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "host": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "cores": usable_cores(),
        "cpu_model": cpu_model(),
        "ram_gib": ram_gib(),
        "device": _gpu(),
        "load_avg_at_start": load,
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("tensorflow", "grpc", "numpy", "annoy", "redis")},
        "git_commit": git_commit(),
    }


def describe_machine(info: dict[str, Any] | None = None) -> str:
    """One line: cores, CPU, RAM, device and main versions."""
    m = info or machine_info()
    v = m["versions"]
    return (
        f"{m['cores']} cores, {m['cpu_model']}, {m['ram_gib']} GiB RAM, device: {m['device']}; "
        f"Python {m['python']}, TF {v.get('tensorflow')}, grpcio {v.get('grpc')}, "
        f"numpy {v.get('numpy')}; commit {m['git_commit']}"
    )


def reproduce_command(area: str | None = None, quick: bool = False) -> str:
    """The shell command that reruns a benchmark from the repository root."""
    parts = ["python", "-m", "bench"]
    if area:
        parts += ["--only", area]
    if quick:
        parts.append("--quick")
    return shlex.join(parts)


# --- figures ----------------------------------------------------------------------


def target(name: str, value: float | None, op: str, threshold: float) -> dict[str, Any]:
    """A target check: ``value <op> threshold``; a missing value is not met."""
    if op not in _OPS:
        raise ValueError(f"unknown comparison {op!r}; use one of {sorted(_OPS)}")
    met = value is not None and not math.isnan(value) and _OPS[op](value, threshold)
    return {"name": name, "value": value, "op": op, "threshold": threshold, "met": bool(met)}


def ratio(value: float, baseline: float, **extra: Any) -> dict[str, Any]:
    """``value / baseline`` with both kept, so a reader can check the division."""
    r = value / baseline if baseline else float("nan")
    return {"ratio": r, "value": value, "baseline": baseline, **extra}


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """Measures wall and process CPU seconds of a block into the yielded dict."""
    out: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield out
    finally:
        out["wall_s"] = time.perf_counter() - wall
        out["cpu_s"] = time.process_time() - cpu


def header(title: str, area: str | None = None, quick: bool = False) -> str:
    """Printed above an area's figures: title, machine and reproduce command."""
    return (
        f"== {title} ==\nmachine: {describe_machine()}\nreproduce: {reproduce_command(area, quick)}"
    )


# --- results ----------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: non-finite floats become null (``json`` writes bare NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def collect_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ``targets`` entry of every area, tagged with the area name."""
    out = []
    for area, res in results.items():
        if not isinstance(res, dict):
            continue
        found = res.get("targets") or []
        if isinstance(found, dict):  # tolerate {name: {...}} as well as a list
            found = [{"name": k, **v} for k, v in found.items() if isinstance(v, dict)]
        for t in found:
            if isinstance(t, dict):
                out.append({"area": area, **t})
    return out


def collect_ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ``ratios`` entry of every area, tagged with the area name."""
    out = []
    for area, res in results.items():
        if not isinstance(res, dict) or not isinstance(res.get("ratios"), dict):
            continue
        for name, r in res["ratios"].items():
            out.append({"area": area, "name": name, **(r if isinstance(r, dict) else {"ratio": r})})
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        # .4g writes 36,980 as 3.698e+04: four significant digits only below 1,000.
        return f"{v:.4g}" if abs(v) < 1e3 else f"{v:,.1f}" if abs(v) < 1e5 else f"{v:,.0f}"
    if v is None:
        return "n/a"
    return str(v)


def _flatten(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, list) and d and all(isinstance(x, int | float) for x in d) and len(d) <= 8:
        yield prefix, ", ".join(_fmt(x) for x in d)
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, d


def _cell(v: Any) -> str:
    """A table cell: ``|`` escaped, or a name like ``|copies - 1|`` splits the row."""
    return _fmt(v).replace("|", "\\|")


def count_label(n: int) -> str:
    """``1000000`` as ``1M``, ``20000`` as ``20K``: a catalogue size in a target's name."""
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    return f"{n // 1000}K" if n % 1000 == 0 else str(n)


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: machine, command, targets, ratios, every figure."""
    m = report["machine"]
    lines = [
        f"# Benchmark results {report['started_at']}",
        "",
        f"- machine: {describe_machine(m)}",
        f"- host: {m['host']} ({m['os']}), load average at start: {m['load_avg_at_start']}",
        f"- command: `{report['command']}`",
        f"- duration: {report['duration_s']:.1f} s",
        "",
    ]
    targets = report.get("targets") or []
    if targets:
        lines += [
            "## Targets",
            "",
            "| area | target | value | threshold | met |",
            "|---|---|---|---|---|",
        ]
        for t in targets:
            met = "yes" if t.get("met") else "NO"
            lines.append(
                f"| {_cell(t['area'])} | {_cell(t['name'])} | {_cell(t.get('value'))} "
                f"| {t.get('op', '')} {_cell(t.get('threshold'))} | {met} |"
            )
        lines.append("")
    ratios = report.get("ratios") or []
    if ratios:
        lines += ["## Ratios (measured against a baseline in the same run)", ""]
        lines += ["| area | figure | ratio | value | baseline |", "|---|---|---|---|---|"]
        for r in ratios:
            lines.append(
                f"| {_cell(r['area'])} | {_cell(r['name'])} | {_cell(r.get('ratio'))} "
                f"| {_cell(r.get('value'))} | {_cell(r.get('baseline'))} |"
            )
        lines.append("")
    lines += ["## Areas", ""]
    for area, status in report["areas"].items():
        lines.append(f"### {area}: {status['status']} ({status.get('seconds', 0):.1f} s)")
        lines.append("")
        if status["status"] == "failed":
            lines += ["```", str(status.get("error", "")).rstrip(), "```", ""]
            continue
        res = report["results"].get(area)
        if not isinstance(res, dict):
            lines.append("")
            continue
        lines += ["| figure | value |", "|---|---|"]
        # Raw per-run detail ("runs") stays in the JSON; the table shows the summaries.
        shown = {k: v for k, v in res.items() if k not in ("targets", "ratios", "runs")}
        for key, value in _flatten(shown):
            lines.append(f"| {_cell(key)} | {_cell(value)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_results(
    results: dict[str, Any],
    areas: dict[str, dict[str, Any]],
    *,
    command: str,
    started_at: _dt.datetime,
    duration_s: float,
    machine: dict[str, Any] | None = None,
    out_dir: Path = RESULTS_DIR,
) -> tuple[Path, Path]:
    """Writes ``<date>-<host>.md`` and ``.json`` under ``out_dir``.

    Args:
        results: Area name to the dict its ``run()`` returned.
        areas: Area name to ``{"status": "ok"|"failed"|"missing", "seconds", "error"}``.
        command: The command line that produced the run.
        started_at: When the run began (names the files).
        duration_s: Wall time of the whole run.
        machine: :func:`machine_info` (measured now when omitted).
        out_dir: Where to write.

    Returns:
        The Markdown and JSON paths.
    """
    machine = machine or machine_info()
    report = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "command": command,
        "duration_s": duration_s,
        "machine": machine,
        "areas": areas,
        "targets": collect_targets(results),
        "ratios": collect_ratios(results),
        "results": results,
    }
    report = jsonable(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in machine["host"]) or "host"
    stem = f"{started_at.strftime('%Y-%m-%d')}-{host}"
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    n = 1
    while md.exists() or js.exists():  # a second run that day: never overwrite the first
        n += 1
        md, js = out_dir / f"{stem}-{n}.md", out_dir / f"{stem}-{n}.json"
    js.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    md.write_text(render_markdown(report))
    return md, js


def stack_settings(model_dir: Path) -> Any:
    """Settings for a benchmark's own stack: its model dir, free ports, quiet text logs."""
    from recsys.config import load_settings

    return load_settings(
        model_dir=model_dir,
        log_format="text",
        log_level="WARNING",
        retrieval={"port": 0, "metrics_port": 0},
        ranking={"port": 0, "metrics_port": 0},
    )


def stack_on_copy(model_src: Path, root: Path) -> Any:
    """A benchmark stack on its own copy of ``model_src`` under ``root``, with logs beside it.

    The copy keeps stacks apart: the embedded Redis keeps its files next to
    the model directory, so two stacks on one directory would share them.
    """
    import shutil

    from recsys.stack import start_stack

    model_dir = root / "models"
    shutil.copytree(model_src, model_dir)
    return start_stack(stack_settings(model_dir), quiet=True, log_dir=root / "logs")


def python_cmd() -> list[str]:
    """The interpreter running now (subprocesses use the same environment)."""
    return [sys.executable]


class ChildServers:
    """Base of the benchmark's helper servers that run as child processes.

    A subclass starts its processes in ``start()`` (through ``_spawn``,
    keeping its files in ``_tmp``) and sets ``port``; ``address``, ``stop()``
    and the context manager are shared.
    """

    name = "helper server"

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.port: int | None = None
        self._tmp: Any = None

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>`` of the server the load goes to."""
        if self.port is None:
            raise RuntimeError(f"{self.name} is not running")
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> Any:
        """Starts the children and waits until they listen."""
        raise NotImplementedError

    def _spawn(self, cmd: list[str], port_file: Path, deadline: float, name: str) -> int:
        """Starts one child (kept in ``procs``) and returns the port it writes to ``port_file``."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # In a session of its own (a Ctrl-C at the terminal is the parent's to
        # handle), so only the parent-death signal stops it when the area's
        # process is killed (bench's --timeout): without it, it ran on.
        proc = subprocess.Popen([*die_with_parent_prefix(), *cmd], env=env, start_new_session=True)
        self.procs.append(proc)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}")
            if port_file.is_file():
                return int(port_file.read_text())
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start in time")

    def stop(self) -> None:
        """Terminates the children (the last started first) and removes their files."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []
        self.port = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def capture_answer(address: str, cfg: Any) -> bytes:
    """One real answer to ``cfg``'s first request, serialised: what an echo baseline replays.

    Args:
        address: The real server.
        cfg: A ``recsys.loadtest.LoadConfig`` (its RPC and request shape).
    """
    import grpc

    from recsys.loadtest import RequestFactory, method_path

    payload = RequestFactory(cfg).payload(0)
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(method_path(cfg.rpc))
        # A first call may pay for lazy initialisation; the second is the sample.
        call(payload, timeout=30)
        return call(payload, timeout=10)
