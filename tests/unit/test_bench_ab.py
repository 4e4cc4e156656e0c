"""bench.ab's pure parts: environment parsing, round order, the summary, the side context."""

import math
import os
import shlex
import statistics
from pathlib import Path

import pytest

from bench.ab import (
    Side,
    _as_side,
    main,
    parse_env,
    reproduce_line,
    round_order,
    split_rounds,
    summarise,
    summary_lines,
)


def test_parse_env_accepts_name_value_pairs_and_names_a_bad_item():
    assert parse_env(["A=1", "RECSYS_X__Y=a=b", "E="]) == {"A": "1", "RECSYS_X__Y": "a=b", "E": ""}
    for bad in ("novalue", "=1", "BAD-NAME=1"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_env([bad])


def test_rounds_alternate_which_side_goes_first():
    assert round_order(3) == [(0, "A"), (0, "B"), (1, "B"), (1, "A"), (2, "A"), (2, "B")]


def test_rounds_are_split_evenly_among_starts():
    assert split_rounds(12, 3) == [4, 4, 4]
    assert split_rounds(10, 3) == [4, 3, 3]
    assert split_rounds(5, 1) == [5]
    for rounds, starts in ((2, 3), (4, 0)):
        with pytest.raises(ValueError, match="starts"):
            split_rounds(rounds, starts)


def test_summary_ratios_medians_and_wins():
    def row(qps, p99=50.0, errors=0):
        return {"qps": qps, "p99_ms": p99, "errors": errors,
                "cpu_ranking_ms": 1000 / qps, "cpu_retrieval_ms": 0.5}  # fmt: skip

    rows = {"A": [row(100), row(200), row(100)], "B": [row(110), row(180), row(150, errors=2)]}
    s = summarise(rows, per_start=[2, 1])
    assert s["qps_ratio_per_round"] == [1.1, 0.9, 1.5]
    assert s["qps_ratio_median_per_start"] == [1.0, 1.5]
    assert s["qps_ratio_median"] == 1.1
    assert s["b_wins"] == 2
    assert s["A"]["qps"] == {"mean": 133.333, "median": 100, "dropped": 0}
    assert s["B"]["errors"] == 2 and s["A"]["errors"] == 0


def test_a_side_sets_environment_and_directory_only_while_inside(tmp_path: Path):
    before_cwd = os.getcwd()
    assert "AB_TEST_FLAG" not in os.environ
    with _as_side(Side("B", {"AB_TEST_FLAG": "on"}, tmp_path)):
        assert os.environ["AB_TEST_FLAG"] == "on"
        assert os.environ["PYTHONPATH"] == str(tmp_path)
        assert Path.cwd() == tmp_path.resolve()
    assert "AB_TEST_FLAG" not in os.environ
    assert os.getcwd() == before_cwd


def test_the_cli_refuses_bad_arguments_before_starting_anything(capsys):
    assert main(["--b-env", "oops"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err
    assert main(["--rounds", "0"]) == 2
    assert main(["--rounds", "2", "--starts", "3"]) == 2
    assert "--starts" in capsys.readouterr().err


def test_the_reproduce_line_pastes_back_as_the_same_arguments():
    argv = ["--b-env", "RECSYS_TRAINER__HIDDEN_UNITS=[64, 32]", "--out", "a b.json"]
    line = reproduce_line(argv)
    assert line.startswith("python -m bench.ab ")
    assert shlex.split(line)[3:] == argv


def _row(qps: float, p99: float = 10.0) -> dict[str, float]:
    return {"qps": qps, "p99_ms": p99, "errors": 0, "cpu_ranking_ms": 1.0, "cpu_retrieval_ms": 0.5}


def test_a_round_where_side_a_answered_nothing_is_counted_not_a_crash():
    """It was a ZeroDivisionError after every round had run: the whole A/B lost."""
    rows = {
        "A": [_row(100.0), _row(0.0, math.nan), _row(101.0)],
        "B": [_row(102.0), _row(99.0), _row(98.0)],
    }
    s = summarise(rows, [3])
    assert s["rounds_a_answered_nothing"] == 1
    assert s["b_wins"] == 1
    assert s["qps_ratio_median"] == round(statistics.median([102 / 100, 98 / 101]), 3)
    assert s["A"]["p99_ms"] == {"mean": 10.0, "median": 10.0, "dropped": 1}


def test_the_console_summary_says_which_rounds_it_left_out():
    rows = {
        "A": [_row(100.0), _row(0.0, math.nan), _row(101.0)],
        "B": [_row(102.0), _row(99.0), _row(98.0)],
    }
    text = "\n".join(summary_lines(summarise(rows, [3])))
    assert "B better in 1 of 2 (1 rounds where A answered nothing, left out)" in text
    assert "{'p99_ms': 1}" in text


def test_the_medians_do_not_depend_on_where_a_missing_p99_falls():
    orders = ([10.0, math.nan, 12.0], [math.nan, 10.0, 12.0], [10.0, 12.0, math.nan])
    got = {
        summarise({"A": [_row(100, p) for p in o], "B": [_row(100)] * 3})["A"]["p99_ms"]["median"]
        for o in orders
    }
    assert got == {11.0}


def test_an_unknown_rpc_is_refused_before_anything_starts(tmp_path: Path):
    from bench.ab import run

    with pytest.raises(ValueError, match="'Retrieve'"):
        run(Side("A"), Side("B"), rpc="Retrieve", model_dir=tmp_path / "absent")
    with pytest.raises(SystemExit):
        main(["--rpc", "Retrieve"])
