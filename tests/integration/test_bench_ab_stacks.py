"""bench.ab end to end: two real stacks, measured in turn, then stopped."""

import pytest

from bench.ab import Side, run

pytestmark = pytest.mark.slow


def test_two_stacks_are_measured_in_alternating_rounds(trained_version, tmp_path):
    lines: list[str] = []
    out = run(
        Side("A"),
        # A real setting on side B: the services must start and answer with it.
        Side("B", {"RECSYS_RANKING__RETRIEVAL_MAX_IN_FLIGHT": "1"}),
        rounds=3,
        starts=2,
        duration=1.0,
        warmup=0.5,
        model_dir=trained_version.parent,
        say=lines.append,
    )
    # Two fresh starts, each side first once; the rounds go on counting across them.
    assert [line.split(":")[0] for line in lines] == [
        "start 1/2", "round  1 A", "round  1 B", "round  2 B", "round  2 A",
        "start 2/2", "round  3 A", "round  3 B",
    ]  # fmt: skip
    assert lines[0].endswith("A then B") and lines[5].endswith("B then A")
    for label in ("A", "B"):
        rows = out["rounds"][label]
        assert len(rows) == 3
        for row in rows:
            assert row["qps"] > 0 and row["errors"] == 0
            assert row["cpu_ranking_ms"] > 0 and row["cpu_retrieval_ms"] > 0
    assert len(out["summary"]["qps_ratio_per_round"]) == 3
    assert len(out["summary"]["qps_ratio_median_per_start"]) == 2
    assert out["sides"]["B"]["env"] == {"RECSYS_RANKING__RETRIEVAL_MAX_IN_FLIGHT": "1"}


def test_rank_mode_loads_the_ranking_service_alone(trained_version, tmp_path):
    out = run(
        Side("A"),
        Side("B"),
        rounds=1,
        starts=1,
        duration=1.0,
        warmup=0.5,
        model_dir=trained_version.parent,
        rpc="Rank",
        say=lambda line: None,
    )
    assert out["rpc"] == "Rank"
    for label in ("A", "B"):
        (row,) = out["rounds"][label]
        assert row["qps"] > 0 and row["errors"] == 0
        # Rank never reaches retrieval, which is up and idle: its CPU per call
        # is a small fraction of ranking's (Recommend's is about 0.7 of it).
        assert row["cpu_retrieval_ms"] < 0.2 * row["cpu_ranking_ms"]
