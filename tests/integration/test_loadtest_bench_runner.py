"""``python -m bench`` runs each area in a child process and survives failing ones."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

from bench.__main__ import main, run_all

AREAS = {
    "fine": "def run(quick=False):\n    return {'quick': quick, 'value': 42}\n",
    "raises": "def run(quick=False):\n    raise RuntimeError('area broke')\n",
    "crashes": "import os\ndef run(quick=False):\n    os._exit(3)\n",
    "not_a_dict": "def run(quick=False):\n    return [1, 2]\n",
    # Starts a helper server and outlives the area's timeout.
    "hangs": """
        import os, tempfile, time
        from pathlib import Path
        from bench.echo import EchoProcess
        def run(quick=False):
            echo = EchoProcess().start()
            Path(os.environ["HANGS_REPORT"]).write_text(
                f"{echo.proc.pid} {tempfile.gettempdir()}"
            )
            time.sleep(600)
    """,
}


def _package(tmp_path, monkeypatch) -> str:
    pkg = tmp_path / "fake_bench_areas"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, body in AREAS.items():
        (pkg / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # for the child processes
    return "fake_bench_areas"


def test_failing_areas_do_not_stop_the_others(tmp_path, monkeypatch):
    pkg = _package(tmp_path, monkeypatch)
    names = [f"{pkg}.{n}" for n in ("raises", "crashes", "fine", "not_a_dict", "absent")]
    results, areas = run_all(names, quick=True, timeout=60)
    status = {n.split(".")[-1]: s["status"] for n, s in areas.items()}
    assert status == {
        "raises": "failed", "crashes": "failed", "fine": "ok", "not_a_dict": "failed",
        "absent": "missing",
    }  # fmt: skip
    assert results == {f"{pkg}.fine": {"quick": True, "value": 42}}
    assert "area broke" in areas[f"{pkg}.raises"]["error"]
    assert "exited with 3" in areas[f"{pkg}.crashes"]["error"]
    assert "not a dict" in areas[f"{pkg}.not_a_dict"]["error"]


def test_an_area_killed_at_its_timeout_leaves_no_server_or_files(tmp_path, monkeypatch):
    """Its echo server ran on for good, holding a piped stdout open, and its files stayed."""
    pkg = _package(tmp_path, monkeypatch)
    report = tmp_path / "hangs.txt"
    monkeypatch.setenv("HANGS_REPORT", str(report))
    _, areas = run_all([f"{pkg}.hangs"], quick=True, timeout=15)
    assert areas[f"{pkg}.hangs"]["status"] == "failed"
    pid_text, scratch = report.read_text().split(" ", 1)
    pid = int(pid_text)
    gone_by = time.monotonic() + 15
    while time.monotonic() < gone_by and Path(f"/proc/{pid}").exists():
        if "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]:
            break  # a zombie waiting for init to reap it: it has exited
        time.sleep(0.1)
    assert (
        not Path(f"/proc/{pid}").exists()
        or "Z" in (Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0])
    ), "the echo server outlived its area"
    assert not Path(scratch).exists()


def test_in_process_mode_also_catches_failures(tmp_path, monkeypatch):
    pkg = _package(tmp_path, monkeypatch)
    results, areas = run_all([f"{pkg}.raises", f"{pkg}.fine"], quick=False, in_process=True)
    assert areas[f"{pkg}.raises"]["status"] == "failed"
    assert results[f"{pkg}.fine"] == {"quick": False, "value": 42}


def test_main_writes_the_report(tmp_path, monkeypatch, capsys):
    # No areas: the real ones take minutes; this checks the report plumbing only.
    monkeypatch.setattr("bench.__main__.AREAS", ())
    monkeypatch.setattr(sys, "argv", ["bench"])
    code = main(["--out", str(tmp_path)])
    assert code == 0
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".md"]
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["machine"]["cores"] >= 1 and doc["command"].startswith("python -m bench")
    assert "wrote" in capsys.readouterr().out
