"""Benchmark report helpers: targets, ratios, machine description, results files."""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest

from bench import common


def test_target_comparisons():
    assert common.target("qps", 0.3, ">=", 0.25)["met"] is True
    assert common.target("qps", 0.2, ">=", 0.25)["met"] is False
    assert common.target("p99", 49.0, "<=", 50)["met"] is True
    assert common.target("errors", 0, "==", 0)["met"] is True
    assert common.target("errors", 3, "==", 0)["met"] is False
    assert common.target("x", None, ">=", 1)["met"] is False
    assert common.target("x", math.nan, "<=", 1)["met"] is False
    with pytest.raises(ValueError, match="comparison"):
        common.target("x", 1, "=>", 1)


def test_ratio_keeps_both_sides():
    r = common.ratio(30.0, 120.0, unit="req/s")
    assert r == {"ratio": 0.25, "value": 30.0, "baseline": 120.0, "unit": "req/s"}
    assert math.isnan(common.ratio(1.0, 0.0)["ratio"])


def test_machine_info_describes_this_machine():
    m = common.machine_info()
    assert m["cores"] >= 1 and m["cpu_model"]
    assert m["versions"]["numpy"] and m["python"].count(".") == 2
    line = common.describe_machine(m)
    assert f"{m['cores']} cores" in line and "device:" in line


def test_reproduce_command():
    assert common.reproduce_command() == "python -m bench"
    assert common.reproduce_command("e2e", quick=True) == "python -m bench --only e2e --quick"


def test_results_files(tmp_path):
    results = {
        "e2e": {
            "qps": 123.4,
            "ratios": {"qps_vs_echo": common.ratio(100.0, 400.0)},
            "targets": [
                common.target("qps_vs_echo", 0.25, ">=", 0.25),
                common.target("p99_ms", 80.0, "<=", 50.0),
            ],
            "runs": {"real": [{"huge": "detail"}]},
            "nan": math.nan,
        }
    }
    areas = {
        "e2e": {"status": "ok", "seconds": 3.0},
        "data": {"status": "failed", "seconds": 1.0, "error": "Traceback: boom"},
        "training": {"status": "missing", "seconds": 0.0},
    }
    started = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
    machine = {**common.machine_info(), "host": "my host/1"}
    md, js = common.write_results(
        results, areas, command="python -m bench", started_at=started, duration_s=4.0,
        machine=machine, out_dir=tmp_path,
    )  # fmt: skip
    assert md.name == "2025-03-04-my-host-1.md" and js.name == "2025-03-04-my-host-1.json"
    doc = json.loads(js.read_text())
    assert doc["command"] == "python -m bench" and doc["machine"]["host"] == "my host/1"
    assert [t["met"] for t in doc["targets"]] == [True, False]
    assert doc["targets"][0]["area"] == "e2e"
    assert doc["ratios"][0]["ratio"] == 0.25 and doc["ratios"][0]["name"] == "qps_vs_echo"
    assert doc["results"]["e2e"]["nan"] is None  # strict JSON: no NaN
    text = md.read_text()
    assert "| e2e | p99_ms | 80 | <= 50 | NO |" in text
    assert "| e2e | qps_vs_echo | 0.25 | >= 0.25 | yes |" in text
    assert "Traceback: boom" in text and "training: missing" in text
    assert "| qps | 123.4 |" in text
    assert "huge" not in text  # per-run detail only in the JSON


def test_e2e_summary_keeps_the_kind_of_each_degraded_answer():
    from bench.e2e import _summary

    def run(qps, p99, flagged):
        lat = {"p50_ms": 10.0, "p99_ms": p99, "p999_ms": p99 + 1, "max_ms": p99 + 2}
        return {"qps": qps, "ok_qps": qps * 0.99, "latency": lat, "sent": 100,
                "errors": {"UNAVAILABLE": 1}, "flagged": flagged}  # fmt: skip

    s = _summary([run(100.0, 40.0, {"source_degraded": 2}),
                  run(300.0, 60.0, {"source_degraded": 1, "fewer_than_k": 4})])  # fmt: skip
    assert s["qps"] == pytest.approx(198.0) and s["calls_per_s"] == 200.0  # OK answers count
    assert s["p99_ms"] == 60.0  # the worst round counts
    assert s["requests"] == 200 and s["errors"] == 2
    assert s["flagged"] == 7
    assert s["flagged_by_kind"] == {"source_degraded": 3, "fewer_than_k": 4}


def test_e2e_inspect_names_the_status_and_source_of_a_degraded_answer():
    from bench.e2e import K, _inspect
    from recsys.v1 import common_pb2, ranking_pb2

    def answer(*statuses):
        r = ranking_pb2.RecommendResponse()
        for i in range(K):
            r.items.add(item_id=str(i))
        for name, status in statuses:
            r.source_reports.add(source=name, status=status)
        return r.SerializeToString()

    ok, late, err = (common_pb2.SOURCE_STATUS_OK, common_pb2.SOURCE_STATUS_TIMEOUT,
                     common_pb2.SOURCE_STATUS_ERROR)  # fmt: skip
    assert _inspect(answer(("popular", ok), ("annoy_similar", ok))) is None
    assert _inspect(answer(("popular", ok), ("annoy_similar", late))) == (
        "source_timeout:annoy_similar"
    )
    assert _inspect(answer(("top_genre", err))) == "source_error:top_genre"


def test_e2e_open_loop_row_counts_warm_up_calls_for_servers_only():
    from bench.e2e import _open_loop_row

    def report(p50, p99, errors=None, flagged=None, qps=100.0):
        lat = {"p50_ms": p50, "p90_ms": p99 - 1, "p99_ms": p99, "max_ms": p99 + 5}
        ok = 99.0 - sum((errors or {}).values()) / 10  # 10 s measured
        return {"qps": qps, "ok_qps": ok, "latency": lat, "send_lag": {"p99_ms": 0.5},
                "errors": errors or {}, "flagged": flagged or {}}  # fmt: skip

    cpu = {"ranking": 1.2, "retrieval": 0.6, "load_generator": 0.5}
    row = _open_loop_row(
        0.5, 100.0, report(20.0, 40.0, {"UNAVAILABLE": 2}), report(1.0, 3.0), cpu, 2.0, 10.0
    )
    # Servers ran through warm-up and measurement: 100/s x 12 s = 1,200 calls;
    # the client's CPU time covers the 1,000 measured calls only.
    assert row["cpu_ms_per_call"] == {"ranking": 1.0, "retrieval": 0.5, "load_generator": 0.5}
    assert (row["p99_ms"], row["echo_p99_ms"], row["errors"]) == (40.0, 3.0, 2)
    assert row["offered_rps"] == 100.0 and row["achieved_rps"] == 98.8  # OK answers only
    assert row["send_lag_p99_ms"] == 0.5 and row["share_of_closed_loop"] == 0.5
    # A stack that fell behind: half the offered calls were never sent, so the
    # same CPU is spread over half as many calls (it was divided by the offer).
    behind = _open_loop_row(0.5, 100.0, report(20.0, 40.0, qps=50.0), report(1, 3), cpu, 2.0, 10.0)
    assert behind["cpu_ms_per_call"] == {"ranking": 2.0, "retrieval": 1.0, "load_generator": 1.0}


def test_e2e_summary_of_a_round_without_one_ok_answer_is_unknown_not_a_crash():
    from bench.e2e import _summary

    ok = {"p50_ms": 10.0, "p99_ms": 30.0, "p999_ms": 31.0, "max_ms": 32.0}
    none = {"p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    runs = [
        {"qps": 500.0, "ok_qps": 500.0, "latency": ok, "sent": 10, "errors": {}, "flagged": {}},
        {"qps": 900.0, "ok_qps": 0.0, "latency": none, "sent": 10,
         "errors": {"RESOURCE_EXHAUSTED": 10}, "flagged": {}},
    ]  # fmt: skip
    s = _summary(runs)
    assert s["qps"] == 250.0 and s["p99_ms"] is None and s["p50_ms"] == 10.0
    assert not common.target("p99", s["p99_ms"], "<=", 50.0)["met"]


def test_a_second_run_does_not_overwrite_the_first(tmp_path):
    started = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
    kw = {"command": "python -m bench", "started_at": started, "duration_s": 1.0,
          "machine": {**common.machine_info(), "host": "h"}, "out_dir": tmp_path}  # fmt: skip
    first = common.write_results({"a": {"x": 1}}, {"a": {"status": "ok", "seconds": 1}}, **kw)
    second = common.write_results({"b": {"y": 2}}, {"b": {"status": "ok", "seconds": 1}}, **kw)
    assert first[0] != second[0] and first[1] != second[1]
    assert second[0].name == "2025-03-04-h-2.md"
    assert json.loads(first[1].read_text())["results"] == {"a": {"x": 1}}
