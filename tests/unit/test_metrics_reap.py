"""reap_metrics: a dead worker's live gauges leave the pod's /metrics, its counters stay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, multiprocess

from recsys.serving import reap_metrics

# A worker's metrics: 3 calls in flight (a livesum gauge, as recsys_rpc_in_flight) and 5 served.
WORKER = """
import sys
import prometheus_client as p
p.Gauge("t_in_flight", "in flight", multiprocess_mode="livesum").inc(3)
p.Counter("t_calls", "calls").inc(5)
print("ready", flush=True)
sys.stdin.read()
"""


def _scrape(path: Path) -> dict[str, float]:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))
    return {
        s.name: s.value for m in registry.collect() for s in m.samples if s.name.startswith("t_")
    }


def _worker(path: Path) -> subprocess.Popen:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_only_exited_workers_lose_their_live_gauges(tmp_path: Path):
    dead, alive = _worker(tmp_path), _worker(tmp_path)
    try:
        dead.kill()
        dead.wait()
        assert _scrape(tmp_path) == {"t_in_flight": 6.0, "t_calls_total": 10.0}
        reap_metrics([dead, alive], str(tmp_path))
        assert _scrape(tmp_path) == {"t_in_flight": 3.0, "t_calls_total": 10.0}
    finally:
        alive.kill()
        alive.wait()
