"""How the bench's Markdown report writes numbers."""

from __future__ import annotations

import math
import re

import pytest

from bench.common import _fmt


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0123456, "0.01235"),
        (999.94, "999.9"),
        (36980.0, "36,980.0"),
        (99999.0, "99,999.0"),
        (100000.0, "100,000"),
        (-12345.67, "-12,345.7"),
        (math.nan, "n/a"),
        (None, "n/a"),
        (7, "7"),
    ],
)
def test_numbers_are_written_without_exponents(value, text):
    """``.4g`` wrote 36,980 as ``3.698e+04`` in the committed reports."""
    assert _fmt(value) == text


def test_a_bar_in_a_name_does_not_split_its_table_row():
    """ "1M vectors resident once (|copies - 1|)" gave 7 cells under a 5-cell header,
    and the "met" column showed the value."""
    from bench.common import render_markdown, target

    report = {
        "started_at": "now",
        "machine": {
            "host": "h",
            "os": "linux",
            "load_avg_at_start": 0.0,
            "cores": 2,
            "cpu_model": "cpu",
            "ram_gib": 1,
            "device": "cpu",
            "python": "3",
            "versions": {},
            "git_commit": "abc",
        },
        "command": "python -m bench",
        "duration_s": 1.0,
        "targets": [{"area": "ranking", **target("1M resident (|copies - 1|)", 3e-5, "<=", 0.1)}],
        "ratios": [],
        "areas": {},
        "results": {},
    }
    text = render_markdown(report)
    (row,) = [line for line in text.splitlines() if line.startswith("| ranking")]
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
    assert len(cells) == 5, cells
    assert cells[-1] == "yes"


@pytest.mark.parametrize(("n", "label"), [(1_000_000, "1M"), (200_000, "200K"), (1234, "1234")])
def test_catalogue_sizes_in_target_names(n, label):
    from bench.common import count_label

    assert count_label(n) == label
